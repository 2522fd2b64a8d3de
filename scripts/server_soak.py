"""A long run of `mlx_mtpd server` under clients holding multi-turn conversations.

    python scripts/server_soak.py --minutes 20 --clients 4 --json bench/server_soak.json \
        --plot docs/server_soak.png --readme docs/BENCHMARKS.md

Starts the server on the default model (as a user would: `python -m mlx_mtpd
server`), then `--clients` threads each hold conversations of `--turns` turns
(a chat request, then follow-ups sent with the whole conversation so far, as a
chat front end resends it), greedy or at T = 0.7 by turn, streamed with
`include_usage`, until the time is up. Checked and reported:

- every request answered (HTTP 200 and a finished stream), no error event;
- every follow-up's prefix reused: its usage's `prompt_tokens_cached` covers at
  least the previous turn's whole prompt (whichever clients came between);
- memory: the server's resident memory sampled every 5 s; its growth from the
  end of the warm-up (the first quarter of the run) to the end, and a linear
  fit's slope over that span.

Exits 1 when a request failed or a prefix was not reused.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from server_bench import rss_mb, start  # noqa: E402

FOLLOW_UPS = [
    "Can you make that shorter?",
    "Give me one more example.",
    "Explain the first point in more detail.",
    "Now say it in one sentence.",
    "What would be a common mistake here?",
    "Thanks. Can you put that as a numbered list?",
]


def ask(port, messages, max_tokens, temp):
    """One streamed chat request: (status, answer text, usage or None, latency s, error text)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": temp, "stream": True,
            "stream_options": {"include_usage": True}}
    tic = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, "", None, time.perf_counter() - tic, resp.read().decode(errors="replace")[:200]
        text, usage, finished, error = "", None, False, None
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                finished = True
                continue
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                error = str(ev["error"])[:200]
            if ev.get("usage"):
                usage = ev["usage"]
            for c in ev.get("choices") or []:
                text += (c.get("delta") or {}).get("content") or ""
        if not finished and error is None:
            error = "the stream ended without [DONE]"
        return 200, text, usage, time.perf_counter() - tic, error
    except OSError as e:
        return 0, "", None, time.perf_counter() - tic, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4, help="Turns per conversation.")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--server-args", default="", help="More arguments for the server (one string).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--readme", default=None, help="Write the summary between markers in this file.")
    args = ap.parse_args()
    from mlx_mtpd.prompts import CHAT_PROMPTS, read_prompts

    prompts = [p for p in read_prompts(CHAT_PROMPTS) if isinstance(p, str)]
    cmd = [sys.executable, "-m", "mlx_mtpd", "server", "--port", "0", "--quiet", *args.server_args.split()]
    proc, port = start(cmd, r"listening on http://[\d.]+:(\d+)")
    records, memory, lock = [], [], threading.Lock()
    t0 = time.perf_counter()
    end = t0 + args.minutes * 60
    running = [True]

    def watch():
        while running[0]:
            memory.append((time.perf_counter() - t0, rss_mb(proc.pid)))
            time.sleep(5)

    def client(i):
        rng = random.Random(args.seed * 1000 + i)
        conv = 0
        while time.perf_counter() < end:
            messages, prev_prompt = [], None
            temp = 0.0 if conv % 2 == 0 else 0.7
            first = prompts[(i * 7 + conv) % len(prompts)]
            for turn in range(args.turns):
                if time.perf_counter() >= end:
                    break
                messages.append({"role": "user", "content": first if turn == 0 else rng.choice(FOLLOW_UPS)})
                status, text, usage, latency, error = ask(port, messages, args.max_tokens, temp)
                rec = {"t": time.perf_counter() - t0, "client": i, "conversation": conv, "turn": turn,
                       "status": status, "error": error, "latency_s": latency, "temp": temp,
                       "prompt_tokens": usage and usage["prompt_tokens"],
                       "cached": usage and usage.get("prompt_tokens_cached"),
                       "completion_tokens": usage and usage["completion_tokens"],
                       "previous_prompt_tokens": prev_prompt}
                rec["reused"] = None if prev_prompt is None or usage is None else rec["cached"] >= prev_prompt
                with lock:
                    records.append(rec)
                if status != 200 or error or usage is None:
                    break
                messages.append({"role": "assistant", "content": text})
                prev_prompt = usage["prompt_tokens"]
            conv += 1

    threading.Thread(target=watch, daemon=True).start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    running[0] = False
    wall = time.perf_counter() - t0
    proc.terminate()
    proc.wait(timeout=60)

    failed = [r for r in records if r["status"] != 200 or r["error"] or r["prompt_tokens"] is None]
    follow = [r for r in records if r["reused"] is not None]
    not_reused = [r for r in follow if not r["reused"]]
    warm = [m for m in memory if m[0] >= wall / 4]
    if len(warm) >= 2:
        import numpy as np

        xs, ys = np.array([m[0] for m in warm]), np.array([m[1] for m in warm])
        slope = float(np.polyfit(xs, ys, 1)[0]) * 600  # MB per 10 minutes
    else:
        slope = float("nan")
    summary = {
        "minutes": wall / 60, "clients": args.clients, "turns": args.turns, "max_tokens": args.max_tokens,
        "requests": len(records), "conversations": len({(r["client"], r["conversation"]) for r in records}),
        "failed": len(failed), "follow_ups": len(follow), "prefix_reused": len(follow) - len(not_reused),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in records),
        "cached_tokens": sum(r["cached"] or 0 for r in records),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in records),
        "rss_mb_after_warmup": warm[0][1] if warm else None, "rss_mb_end": memory[-1][1] if memory else None,
        "rss_mb_peak": max(m[1] for m in memory) if memory else None, "rss_slope_mb_per_10min": slope,
    }
    lines = [
        f"{summary['minutes']:.1f} minutes, {args.clients} clients, {summary['conversations']} conversations of up "
        f"to {args.turns} turns, {summary['requests']} requests ({summary['completion_tokens']} answer tokens), "
        f"greedy and T = 0.7 alternating by conversation",
        f"failed requests: {summary['failed']}",
        f"follow-ups whose whole previous prompt was reused: {summary['prefix_reused']} / {summary['follow_ups']} "
        f"({summary['cached_tokens']} of {summary['prompt_tokens']} prompt tokens from caches)",
        f"server memory (RSS): {summary['rss_mb_after_warmup']:.0f} MB after the warm-up, "
        f"{summary['rss_mb_end']:.0f} MB at the end, peak {summary['rss_mb_peak']:.0f} MB; "
        f"fitted slope after the warm-up {slope:+.1f} MB per 10 minutes",
    ]
    print("\n".join(lines))
    for r in failed[:5]:
        print("failed:", r, file=sys.stderr)
    for r in not_reused[:5]:
        print("not reused:", r, file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "memory": memory, "requests": records}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([m[0] / 60 for m in memory], [m[1] for m in memory], "-", label="server RSS (MB)")
        ax.axvline(wall / 4 / 60, color="gray", ls=":", label="end of warm-up")
        ax.set(xlabel="minutes", ylabel="MB", title=f"{args.clients} clients, multi-turn: server memory")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    if args.readme:  # between <!-- bench:soak:begin --> and <!-- bench:soak:end -->
        path, begin, stop = Path(args.readme), "<!-- bench:soak:begin -->", "<!-- bench:soak:end -->"
        text = path.read_text()
        head, rest = text.split(begin, 1)
        tail = rest.split(stop, 1)[1]
        body = "\n".join(f"- {x}" for x in lines)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{head}{begin}\n`python scripts/server_soak.py {' '.join(sys.argv[1:])}`:\n\n{body}\n"
                       f"{stop}{tail}")
        tmp.replace(path)
    sys.exit(1 if failed or not_reused else 0)


if __name__ == "__main__":
    main()
