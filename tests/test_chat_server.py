"""`mlx_mtpd chat` through a pseudo-terminal and `mlx_mtpd server` over real
HTTP, both on the default model with its shipped heads."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT

pexpect = pytest.importorskip("pexpect")

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def spawn_chat(*args, timeout=240):
    child = pexpect.spawn(sys.executable, ["-m", "mlx_mtpd", "chat", *map(str, args)], cwd=str(ROOT),
                          env=dict(os.environ), encoding="utf-8", timeout=timeout, dimensions=(40, 200))
    child.expect(">> ")
    return child


def answer(child, text):
    child.sendline(text)
    child.expect(r"\[(\d+) tokens, .*?\]")
    reply, line = ANSI.sub("", child.before), ANSI.sub("", child.after)
    child.expect(">> ")
    return reply, line


def test_chat_multi_turn_stats_reset_and_interrupt(smol_path):
    child = spawn_chat("--max-tokens", 300)
    reply1, _ = answer(child, "What is the capital of France? Answer in one sentence.")
    assert "Paris" in reply1
    # the second turn prefills only its own tokens (the first turn's are cached)
    _, line2 = answer(child, "And of Italy?")
    new_tokens = int(re.search(r"prompt \+(\d+) tokens", line2).group(1))
    assert 0 < new_tokens < 30, line2
    child.sendline("/stats")
    child.expect(">> ")
    stats = ANSI.sub("", child.before)
    assert "last answer:" in stats and "session:" in stats and "tok/s" in stats and "tau" in stats
    # Ctrl-C stops an answer; the conversation goes on
    child.sendline("Write a very long story about a dragon who learns to bake bread, in many chapters.")
    child.expect("chapters.\r\n")  # the echo of the line
    child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming
    child.sendintr()
    child.expect(r"\[(\d+) tokens, .*?interrupted\]")
    n_interrupted = int(child.match.group(1))
    assert n_interrupted < 300
    child.expect(">> ")
    reply3, line3 = answer(child, "What was the capital city in my first question?")
    assert "interrupted" not in line3 and reply3.strip()
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect(">> ")
    child.sendline("/nonsense")
    child.expect("unknown command")
    child.expect(">> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


_PLAIN = """
import json, sys
import mlx_mtpd, mlx_lm
model, tok = mlx_lm.load(sys.argv[1])
out = []
for job in json.loads(sys.stdin.read()):
    if "text" in job:
        ids = tok.encode(job["text"])
    else:
        ids = tok.apply_chat_template(job["messages"], add_generation_prompt=True)
    out.append("".join(r.text for r in mlx_lm.stream_generate(model, tok, ids, max_tokens=job["max_tokens"])))
print(json.dumps(out))
"""


def plain_mlx_lm_texts(model_path, jobs):
    """Plain mlx-lm greedy answers, computed in a subprocess: this process forks
    pseudo-terminals, which MLX's threads must not be busy across."""
    r = subprocess.run([sys.executable, "-c", _PLAIN, str(model_path)], input=json.dumps(jobs), text=True,
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_chat_drafts_a_repeat_from_the_conversation_under_load(smol_path):
    """A user asks for a function, then for the same function renamed.  With
    both CPU cores loaded by other processes during the second answer (the
    planner's plain-decoding yardstick was measured on an idle machine), the
    second answer still drafts from the conversation, and both answers are
    plain mlx-lm's, token for token."""
    q1 = "Write a Python function that checks whether a number is prime, then explain it briefly"
    q2 = "Now repeat the function exactly, but rename it to check_prime."
    n = 90
    child = spawn_chat("--max-tokens", n)
    reply1, _ = answer(child, q1)
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        reply2, _ = answer(child, q2)
    finally:
        for p in load:
            p.kill()
    child.sendline("/stats")
    child.expect(">> ")
    stats = ANSI.sub("", child.before)
    child.sendeof()
    child.expect(pexpect.EOF)
    steps = dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)", stats.split("steps:")[1].split("\n")[0]))
    assert steps.get("lookup", 0) >= 3, stats
    (ref1,) = plain_mlx_lm_texts(smol_path, [{"messages": [{"role": "user", "content": q1}], "max_tokens": n}])
    (ref2,) = plain_mlx_lm_texts(smol_path, [{"messages": [{"role": "user", "content": q1},
                                                           {"role": "assistant", "content": ref1},
                                                           {"role": "user", "content": q2}], "max_tokens": n}])

    def norm(text):  # the terminal's line endings, and the echoed question before the answer
        return text.replace("\r\n", "\n").strip()

    assert norm(reply1).endswith(ref1.strip()), (reply1, ref1)
    assert norm(reply2).endswith(ref2.strip()), (reply2, ref2)


def test_chat_outgrows_the_context(smol_path):
    """A small --max-context: the oldest turns are dropped with a message, and a
    message longer than the context gets a clear error; never a crash."""
    child = spawn_chat("--max-context", 160, "--max-tokens", 40)
    dropped = False
    for i in range(5):
        child.sendline(f"Tell me one fact about the number {i + 2}.")
        idx = child.expect([r"dropped the \d+ oldest turn", r"\[\d+ tokens, .*?\]"])
        if idx == 0:
            dropped = True
            child.expect(r"\[\d+ tokens, .*?\]")
        child.expect(">> ")
    assert dropped
    child.sendline("word " * 300)
    child.expect("context holds 160: shorten it")
    child.expect(">> ")
    _, line = answer(child, "Say hello.")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_bad_options_one_line_errors(smol_path):
    from conftest import run_cli

    r = run_cli("chat", "--num-draft", "lots")
    assert r.returncode == 1 and "--num-draft must be an integer >= 0 or 'auto'" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("chat", "--temp", "-1", input="")
    assert r.returncode == 1 and "--temp must be >= 0" in r.stderr


# --- server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(smol_path):
    proc = subprocess.Popen([sys.executable, "-m", "mlx_mtpd", "server", "--port", "0", "--quiet"],
                            cwd=str(ROOT), env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    port = None
    deadline = time.time() + 300
    lines = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
        if proc.poll() is not None:
            break
    assert port, "".join(lines)
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def request(port, method, path, body=None, raw=None, timeout=300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, payload


def chat_body(content, **kw):
    return {"model": "x", "messages": [{"role": "user", "content": content}], "max_tokens": 24, **kw}


def sse_events(payload: bytes):
    events = [line[6:] for line in payload.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_server_endpoints(server):
    status, body = request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["object"] == "model"
    status, body = request(server, "POST", "/v1/chat/completions",
                           chat_body("What is the capital of France? Answer in one sentence."))
    assert status == 200, body
    res = json.loads(body)
    assert res["object"] == "chat.completion"
    assert "Paris" in res["choices"][0]["message"]["content"]
    assert res["choices"][0]["finish_reason"] == "stop"
    usage = res["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["mtp"]["mean_accepted_length"] >= 1 and "acceptance_rates" in usage["mtp"]
    # streaming gives the same text, then usage when asked
    status, payload = request(server, "POST", "/v1/chat/completions",
                              chat_body("What is the capital of France? Answer in one sentence.", stream=True,
                                        stream_options={"include_usage": True}))
    assert status == 200
    events = sse_events(payload)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == res["choices"][0]["message"]["content"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["mtp"]["backbone_forwards"] > 0
    # completions, with a stop string
    status, body = request(server, "POST", "/v1/completions",
                           {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 30, "stop": [" 9"]})
    assert status == 200, body
    res = json.loads(body)
    assert res["object"] == "text_completion" and " 9" not in res["choices"][0]["text"]
    assert "6" in res["choices"][0]["text"] and res["choices"][0]["finish_reason"] == "stop"
    status, payload = request(server, "POST", "/v1/completions",
                              {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 30, "stop": [" 9"], "stream": True})
    text = "".join(e["choices"][0]["text"] for e in sse_events(payload) if e["choices"])
    assert text == res["choices"][0]["text"]


def test_server_long_drafts_run_into_a_stop_string(server, smol_path):
    """A prompt that repeats a passage: the suffix index drafts past the stop
    string; the text ends just before it and equals plain mlx-lm's up to there."""
    line = "The quick brown fox jumps over the lazy dog near the old mill by the river."
    prompt = f"{line}\n{line}\n{line}\nThe quick brown fox"
    (plain,) = plain_mlx_lm_texts(smol_path, [{"text": prompt, "max_tokens": 60}])
    stop = " mill"
    assert stop in plain, plain
    status, body = request(server, "POST", "/v1/completions",
                           {"prompt": prompt, "max_tokens": 60, "stop": [stop, "unlikely stop"]})
    assert status == 200, body
    res = json.loads(body)
    assert res["choices"][0]["text"] == plain[: plain.index(stop)]
    assert res["choices"][0]["finish_reason"] == "stop"
    mtp = res["usage"]["mtp"]
    assert mtp["steps_by_source"].get("lookup", 0) >= 1 and mtp["mean_accepted_length"] > 3, mtp


@pytest.mark.parametrize("raw,fragment", [
    (b"{not json", "malformed JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}).encode(), "unknown field"),
    (json.dumps(chat_body("hi", temperature=5)).encode(), "'temperature' must be between"),
    (json.dumps(chat_body("hi", max_tokens=0)).encode(), "'max_tokens' must be between"),
    (json.dumps(chat_body("hi", max_tokens="many")).encode(), "'max_tokens' must be an integer"),
    (json.dumps({"messages": []}).encode(), "'messages' must be a non-empty list"),
    (json.dumps(chat_body("hi", n=3)).encode(), "not supported"),
    (json.dumps([1, 2]).encode(), "must be a JSON object"),
])
def test_server_rejects_bad_requests(server, raw, fragment):
    status, body = request(server, "POST", "/v1/chat/completions", raw=raw)
    assert 400 <= status < 500
    assert fragment in json.loads(body)["error"]["message"]


def test_server_unknown_path_and_oversized_prompt(server):
    status, _ = request(server, "GET", "/v1/nothing")
    assert status == 404
    status, body = request(server, "POST", "/v1/completions", {"prompt": "word " * 9000, "max_tokens": 4})
    assert status == 400 and "context holds" in json.loads(body)["error"]["message"]


def test_server_concurrent_clients_and_disconnect(server):
    """Four clients at once are served one at a time: each gets exactly the
    answer it gets alone.  A client that drops a stream stops its generation
    and the server stays healthy."""
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
                 "Say hello in Spanish."]
    alone = {}
    for q in questions:
        _, body = request(server, "POST", "/v1/chat/completions", chat_body(q))
        alone[q] = json.loads(body)["choices"][0]["message"]["content"]
    together = {}

    def ask(q):
        _, body = request(server, "POST", "/v1/chat/completions", chat_body(q))
        together[q] = json.loads(body)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert together == alone

    _, before = request(server, "GET", "/health")
    served_before = json.loads(before)["served"]
    sock = socket.create_connection(("127.0.0.1", server), timeout=120)
    body = json.dumps(chat_body("Write a very long story about a lighthouse keeper.", max_tokens=2000,
                                stream=True)).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 3:
        got += sock.recv(4096)
    sock.close()
    # the generation stops well before 2000 tokens: the next request is answered soon
    tic = time.time()
    status, body = request(server, "POST", "/v1/chat/completions", chat_body("What is 2 + 2?"), timeout=120)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == alone["What is 2 + 2?"]
    assert time.time() - tic < 60
    _, after = request(server, "GET", "/health")
    assert json.loads(after)["served"] == served_before + 2


def _start_server(*args):
    proc = subprocess.Popen([sys.executable, "-m", "mlx_mtpd", "server", "--port", "0", "--quiet", *map(str, args)],
                            cwd=str(ROOT), env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    lines = []
    while True:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(m.group(1)), "".join(lines)
        assert proc.poll() is None, "".join(lines)


def _ask_all(port, bodies):
    """POST every body at once (a thread each); returns [(status, headers, json)] in order."""
    out = [None] * len(bodies)

    def ask(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(bodies[i]).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out[i] = (resp.status, dict(resp.getheaders()), json.loads(resp.read() or b"null"))
        conn.close()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
        time.sleep(0.02)  # in this order
    for t in threads:
        t.join(timeout=900)
    return out


def test_server_batch_bounds_and_prefix_reuse_across_clients(smol_path):
    """--max-batch 2 --max-queue 2: six requests at once: two decode together, two
    wait, two get 429 with Retry-After; no 5xx; /health shows the batch.  Then two
    clients' second turns, sent while a third request decodes: both continue from
    their own first turn's cache, though the other client came in between."""
    proc, port, banner = _start_server("--max-batch", "2", "--max-queue", "2")
    try:
        assert "up to 2 requests together" in banner
        qs = ["Name a red fruit.", "Name a blue bird.", "Name a green vegetable.", "Name a yellow flower.",
              "Name a white animal.", "Name a black stone."]
        got = _ask_all(port, [chat_body(q, max_tokens=40) for q in qs])
        statuses = [g[0] for g in got]
        assert statuses.count(429) >= 1 and statuses.count(200) >= 3 and set(statuses) <= {200, 429}, statuses
        assert all(int(h["Retry-After"]) >= 1 for st, h, _ in got if st == 429)
        _, health = request(port, "GET", "/health")
        health = json.loads(health)
        assert health["max_batch"] == 2 and health["max_queue"] == 2 and health["queued"] == 0
        # two conversations, a second turn each, while a long third request keeps the batch busy
        convs = []
        firsts = _ask_all(port, [chat_body(q, max_tokens=30) for q in ("Tell me about owls.", "Tell me about tea.")])
        for (st, _, res), q in zip(firsts, ("Tell me about owls.", "Tell me about tea.")):
            assert st == 200
            convs.append([{"role": "user", "content": q},
                          {"role": "assistant", "content": res["choices"][0]["message"]["content"]},
                          {"role": "user", "content": "And in one more sentence?"}])
        bodies = [chat_body("Count slowly from one to forty in words.", max_tokens=120)]
        bodies += [{"model": "x", "messages": m, "max_tokens": 20} for m in convs]
        got = _ask_all(port, bodies)
        assert all(g[0] == 200 for g in got), got
        for _, _, res in got[1:]:
            usage = res["usage"]
            assert usage["prompt_tokens_cached"] >= 0.6 * usage["prompt_tokens"], usage
        # one request at a time (each served alone by the speculative loop): A, B, then A's
        # second turn starts from A's kept caches (B came between)
        a = [{"role": "user", "content": "Describe a lighthouse."}]
        _, res = request(port, "POST", "/v1/chat/completions", {"messages": a, "max_tokens": 24})
        first = json.loads(res)
        request(port, "POST", "/v1/chat/completions", chat_body("Describe a windmill."))
        a += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
              {"role": "user", "content": "Who works there?"}]
        _, res = request(port, "POST", "/v1/chat/completions", {"messages": a, "max_tokens": 24})
        second = json.loads(res)
        assert second["usage"]["prompt_tokens_cached"] >= first["usage"]["prompt_tokens"], second["usage"]
        _, health = request(port, "GET", "/health")
        assert json.loads(health)["kept_caches"] >= 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_serves_queued_requests_in_arrival_order(smol_path):
    """--max-batch 2: six streamed requests arriving one after another; none gets a
    5xx, and no request starts (its first token) before one that arrived earlier
    (first come, first served: the ones beyond the bound wait their turn).  With
    --batch-heads: the batch's rows may draft with the heads too."""
    proc, port, _ = _start_server("--max-batch", "2", "--max-queue", "16", "--batch-heads")
    firsts, statuses = [None] * 6, [None] * 6
    t0 = time.perf_counter()

    def ask(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = chat_body(f"Write a sentence about the number {i + 1}.", max_tokens=12, stream=True)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        statuses[i] = resp.status
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: {") and firsts[i] is None and '"content"' in line:
                firsts[i] = time.perf_counter() - t0
        conn.close()

    try:
        threads = []
        for i in range(6):
            threads.append(threading.Thread(target=ask, args=(i,)))
            threads[-1].start()
            time.sleep(0.15)  # arrival order
        for t in threads:
            t.join(timeout=600)
        assert statuses == [200] * 6, statuses
        # a later arrival may share an earlier one's step (prefilled together), never come first
        for i in range(1, 6):
            assert firsts[i - 1] <= firsts[i] + 0.1, firsts
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_worker_keeps_each_conversation_state_served_alone(smol_path):
    """In process: conversations A, B, then A's next turn, each served alone: A's
    turn goes on with the very state (heads' caches and all) that served A, and
    B's state is kept in turn; its usage shows A's whole previous prompt cached."""
    import mlx_mtpd
    from mlx_mtpd.server import Job, Worker, parse_request
    from mlx_mtpd.session import Session

    model, tok, heads = mlx_mtpd.load(str(smol_path))
    worker = Worker(Session(model, tok, heads), max_batch=8)

    def serve(messages):
        job = Job("chat", parse_request({"messages": messages, "max_tokens": 24}, "chat", None))
        worker._serve(job)
        while True:
            ev = job.events.get(timeout=1)
            if ev[0] == "done":
                return ev[1], ev[3]
            assert ev[0] == "text", ev

    a = [{"role": "user", "content": "Describe a lighthouse."}]
    serve(a)
    state_a = worker.session.state
    text_a, usage_a = serve(a)  # the same request again (another answer): the same state, rewound
    assert worker.session.state is state_a and worker.states == []
    assert usage_a["prompt_tokens_cached"] == usage_a["prompt_tokens"] - 1
    serve([{"role": "user", "content": "Describe a windmill."}])
    state_b = worker.session.state
    assert state_b is not state_a and worker.states == [state_a]
    a += [{"role": "assistant", "content": text_a}, {"role": "user", "content": "Who works there?"}]
    _, usage = serve(a)
    assert worker.session.state is state_a and worker.states == [state_b]
    assert usage["prompt_tokens_cached"] >= usage_a["prompt_tokens"], usage
