"""Several clients at once: `mlx_mtpd server` against `mlx_lm.server`, same requests, one run.

    python scripts/server_bench.py --clients 1,2,4,8,16 --json bench/server.json --plot bench/server.png \
        --readme docs/BENCHMARKS.md

Both servers are started on the default model (OpenBLAS bound first for both,
as this project does) and warmed up; only one is asked at a time (they would
share the CPU). For each number of clients C, C streams of requests are sent
at once (the chat benchmark's prompts by default, greedy, answers ending at
their end-of-sequence token), each client `--requests` of them one after
another, to one server and then the other, `--rounds` times with the order
alternating, so that the machine's drift between runs falls on both. Reported
per C, pooled over the rounds: aggregate completion tokens per second over the
level's wall time (and each round's), time to first token and latency p50 /
p95, errors, the peak resident memory, and how many answers equal the other
server's to the same request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd, pattern, env=None):
    proc = subprocess.Popen(cmd, cwd=str(ROOT), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, **(env or {})))
    lines = []
    deadline = time.time() + 600
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            port = int(m.group(1))
            for _ in range(100):  # mlx_lm.server says so just before it listens
                try:
                    http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")
                    return proc, port
                except OSError:
                    time.sleep(0.1)
            return proc, port
        if proc.poll() is not None:
            break
    raise SystemExit("server did not start:\n" + "".join(lines[-20:]))


def ask(port, prompt, max_tokens):
    """One streamed chat request: (text, completion tokens, ttft s, latency s, status,
    the server's steps by source: usage.mtp.steps_by_source where it reports one)."""
    from mlx_mtpd.prompts import chat_messages

    body = {"model": "default_model", "messages": chat_messages(prompt), "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    tic = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        resp.read()
        return "", 0, None, time.perf_counter() - tic, resp.status, {}
    text, tokens, ttft, steps = "", None, None, {}
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
            steps = (ev["usage"].get("mtp") or {}).get("steps_by_source") or {}
        for c in ev.get("choices") or []:
            piece = (c.get("delta") or {}).get("content") or ""
            if piece and ttft is None:
                ttft = time.perf_counter() - tic
            text += piece
    conn.close()
    return text, tokens, ttft, time.perf_counter() - tic, 200, steps


def rss_mb(pid) -> float:
    """The server process's resident memory (MB), from ps (Linux and macOS)."""
    try:
        return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout) / 1024
    except ValueError:
        return 0.0


def level(port, prompts, clients, per_client, max_tokens, pid):
    results = [[] for _ in range(clients)]
    peak, running = [0.0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()

    def client(i):
        for k in range(per_client):
            p = prompts[(i * per_client + k) % len(prompts)]
            results[i].append((p, *ask(port, p, max_tokens)))

    tic = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    running[0] = False
    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if r[5] == 200]
    tokens = sum(r[2] or 0 for r in ok)
    lat = sorted(r[4] for r in ok)
    ttft = sorted(r[3] for r in ok if r[3] is not None)

    def pct(xs, q):
        return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else None

    return {"clients": clients, "steps_by_source": dict(sum((Counter(r[6]) for r in ok), Counter())),
            "requests": len(flat), "errors": len(flat) - len(ok), "wall_s": wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50": pct(ttft, 0.5),
            "ttft_p95": pct(ttft, 0.95), "latency_p50": statistics.median(lat) if lat else None,
            "latency_p95": pct(lat, 0.95), "peak_rss_mb": peak[0], "answers": {json.dumps(r[0]): r[1] for r in ok},
            "raw": {"lat": lat, "ttft": ttft}}


def pooled(runs):
    """One level's rounds as one: tokens over wall time summed, percentiles over every request."""
    lat = sorted(x for r in runs for x in r["raw"]["lat"])
    ttft = sorted(x for r in runs for x in r["raw"]["ttft"])

    def pct(xs, q):
        return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else None

    answers = {}
    for r in runs:
        answers.update(r["answers"])
    wall, tokens = sum(r["wall_s"] for r in runs), sum(r["tokens"] for r in runs)
    return {"clients": runs[0]["clients"], "rounds": len(runs), "requests": sum(r["requests"] for r in runs),
            "steps_by_source": dict(sum((Counter(r["steps_by_source"]) for r in runs), Counter())),
            "errors": sum(r["errors"] for r in runs), "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "tokens_per_s_by_round": [r["tokens_per_s"] for r in runs],
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "latency_p50": statistics.median(lat) if lat else None, "latency_p95": pct(lat, 0.95),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "answers": answers}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=2, help="Requests per client, one after another.")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=8, help="Both servers' batch bound.")
    ap.add_argument("--prompts", default="chat",
                    help="'chat' (ordinary requests), 'edits' (conversations whose last answer edits or repeats "
                         "an earlier one) or a prompt file.")
    ap.add_argument("--server-args", default="", help="More arguments for mlx_mtpd server (one string).")
    ap.add_argument("--marker", default="server", help="The README markers' name: bench:NAME:begin/end.")
    ap.add_argument("--rounds", type=int, default=2,
                    help="Runs of each level per server, alternating which server goes first (both stay up, "
                         "only one is asked at a time): the machine's drift falls on both.")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--readme", action="append", default=[],
                    help="Write the table between markers in this file (again for more files).")
    args = ap.parse_args()
    from mlx_mtpd.prompts import read_prompts, resolve
    from mlx_mtpd.utils import default_model_path

    model = str(default_model_path())
    prompts = read_prompts(resolve(args.prompts))
    levels = [int(x) for x in args.clients.split(",")]
    py = sys.executable
    lm_port = free_port()
    servers = {
        "mlx_lm.server": ([py, "-c", "import mlx_mtpd, sys; from mlx_lm.server import main; sys.argv[0] = "
                           "'mlx_lm.server'; main()", "--model", model, "--port", str(lm_port),
                           "--decode-concurrency", str(args.max_batch), "--prompt-concurrency",
                           str(min(args.max_batch, 8))], r"Starting httpd at [\d.]+ on port (\d+)"),
        "mlx_mtpd server": ([py, "-m", "mlx_mtpd", "server", "--port", "0", "--quiet", "--max-batch",
                             str(args.max_batch), "--max-queue", "256", *args.server_args.split()],
                            r"listening on http://[\d.]+:(\d+)"),
    }
    out = {"max_tokens": args.max_tokens, "requests_per_client": args.requests, "max_batch": args.max_batch,
           "rounds": args.rounds, "prompts": str(args.prompts), "servers": {name: [] for name in servers}}
    running = {}
    try:
        for name, (cmd, pattern) in servers.items():
            running[name] = start(cmd, pattern)
            ask(running[name][1], prompts[0], 8)  # warm-up
        for c in levels:
            runs = {name: [] for name in servers}
            for r in range(args.rounds):
                for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    proc, port = running[name]
                    runs[name].append(level(port, prompts, c, args.requests, args.max_tokens, proc.pid))
            for name in servers:
                p = pooled(runs[name])
                out["servers"][name].append(p)
                print(f"{name:>16} C={c:<3} {p['tokens_per_s']:6.1f} tok/s (rounds: "
                      f"{', '.join(f'{x:.1f}' for x in p['tokens_per_s_by_round'])})  ttft p50 {p['ttft_p50']:.2f} s  "
                      f"latency p50 {p['latency_p50']:.1f} s p95 {p['latency_p95']:.1f} s  errors {p['errors']}  "
                      f"peak RSS {p['peak_rss_mb']:.0f} MB" + (f"  steps {p['steps_by_source']}"
                                                               if p["steps_by_source"] else ""), flush=True)
    finally:
        for proc, _ in running.values():
            proc.terminate()
            proc.wait(timeout=60)
    base, ours = out["servers"]["mlx_lm.server"], out["servers"]["mlx_mtpd server"]
    for a, b in zip(base, ours):
        same = sum(b["answers"].get(p) == t for p, t in a["answers"].items())
        b["ratio"] = b["tokens_per_s"] / a["tokens_per_s"]
        b["equal_answers"] = f"{same}/{len(a['answers'])}"
    rows = ["| clients | mlx_lm.server tok/s | mlx_mtpd server tok/s | ratio | TTFT p50 (lm / mtpd) | "
            "latency p50 / p95 (lm / mtpd) | errors | peak RSS (lm / mtpd) | answers equal |",
            "|---|---|---|---|---|---|---|---|---|"]
    for a, b in zip(base, ours):
        rows.append(f"| {b['clients']} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {b['ratio']:.2f}x | "
                    f"{a['ttft_p50']:.2f} / {b['ttft_p50']:.2f} s | {a['latency_p50']:.1f} / {a['latency_p95']:.1f}, "
                    f"{b['latency_p50']:.1f} / {b['latency_p95']:.1f} s | {a['errors']} / {b['errors']} | "
                    f"{a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} MB | {b['equal_answers']} |")
    table = "\n".join(rows)
    print(table)
    for rs in out["servers"].values():
        for r in rs:
            r.pop("answers")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for name, rs in out["servers"].items():
            a1.plot([r["clients"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=name)
            a2.plot([r["clients"] for r in rs], [r["latency_p50"] for r in rs], "o-", label=name)
        a1.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", xscale="log", title="throughput")
        a2.set(xlabel="concurrent clients", ylabel="latency p50 (s)", xscale="log", title="latency")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    for readme in args.readme:  # between <!-- bench:MARKER:begin --> and <!-- bench:MARKER:end -->
        path, begin, end = Path(readme), f"<!-- bench:{args.marker}:begin -->", f"<!-- bench:{args.marker}:end -->"
        text = path.read_text()
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        cmd = "python scripts/server_bench.py " + " ".join(sys.argv[1:])
        tmp = path.with_name(path.name + ".tmp")
        how = (f"greedy, {args.max_tokens} tokens at most, {args.rounds} rounds per level alternating the servers "
               "(figures pooled over them)")
        tmp.write_text(f"{head}{begin}\n`{cmd}`, {how}:\n\n{table}\n{end}{tail}")
        tmp.replace(path)


if __name__ == "__main__":
    main()
