"""A backbone sharded over mlx.distributed: two processes over the ring backend
on 127.0.0.1, tiny models of three families (llama tensor parallel with fused
trained-style heads; DeepSeek-V3 pipeline parallel with its imported native
MTP layer; Qwen3.5 tensor parallel, recurrent layers and a vocabulary-sharded
lm_head), greedy output equal to plain mlx-lm decoding of the unsharded model,
sampled output equal to one process with the same seed, and ranks that never
hang: a dead rank or a wrong hostfile ends the others with a message."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import greedy_tokens, run_cli, write_hf_checkpoint

BIN = Path(sys.executable).parent
WORKER = Path(__file__).parent / "dist_worker.py"
PROMPTS = [[1, 5 + i, 40 + 3 * i, 77, 12 + i] for i in range(3)]
TOKENS = 24


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, timeout=240, input=None):
    cmd = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port", str(_port()), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)


def _run_worker(tmp_path, job):
    job = dict(ranks=2, timeout=60, **job)
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = _launch([sys.executable, WORKER, tmp_path / "job.json", tmp_path / "out.json"])
    assert (tmp_path / "out.json").exists(), r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((tmp_path / "out.json").read_text())


def _greedy_runs(drafts=(1, 2, 3), lookup=True):
    runs = [dict(prompt=p, num_draft=d, draft="heads", max_tokens=TOKENS) for p in PROMPTS for d in drafts]
    if lookup:
        runs += [dict(prompt=p, num_draft=4, draft="prompt-lookup", max_tokens=TOKENS) for p in PROMPTS]
        runs += [dict(prompt=p, num_draft="auto", draft="heads+lookup", max_tokens=TOKENS) for p in PROMPTS[:1]]
    return runs


def _check_greedy(out, runs, model):
    refs = {tuple(p): greedy_tokens(model, p, TOKENS) for p in PROMPTS}
    equal = 0
    for run, got in zip(runs, out["runs"]):
        if run.get("temp"):
            continue
        assert got["tokens"] == refs[tuple(run["prompt"])], (run, got)
        equal += 1
    return equal


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny llama in MLX format with two fitted heads fusing layer 0."""
    import mlx_lm

    from heads_util import fit_heads
    from mlx_mtpd.heads import save_heads

    root = tmp_path_factory.mktemp("llama")
    write_hf_checkpoint(root / "hf", "llama")
    r = run_cli("convert", "--hf-path", root / "hf", "--mlx-path", root / "mlx")
    assert r.returncode == 0, r.stderr
    model, tok = mlx_lm.load(str(root / "mlx"))
    seqs = [p + greedy_tokens(model, p, 40) for p in PROMPTS]
    save_heads(fit_heads(model, seqs, num_heads=2, features=[0]), root / "heads")
    return root, model, tok


def test_llama_tensor_parallel_fused_heads(llama, tmp_path):
    from mlx_mtpd.engine import mtp_generate_step
    from mlx_mtpd.heads import load_heads

    root, model, _ = llama
    runs = _greedy_runs()
    runs.append(dict(prompt=PROMPTS[0], num_draft=2, draft="heads", max_tokens=TOKENS, temp=0.8, seed=3))
    runs.append(dict(prompt=PROMPTS[1], num_draft="auto", draft="heads+lookup", max_tokens=TOKENS, temp=0.8, seed=4))
    session = dict(num_draft="auto", draft="heads+lookup", max_tokens=16, prompts=PROMPTS, stop_after=[4, None, 2])
    out = _run_worker(tmp_path, dict(model=str(root / "mlx"), heads=str(root / "heads"), sharding="tensor",
                                     runs=runs, session=session))
    assert out["sharding"] == "tensor"
    assert _check_greedy(out, runs, model) == 13
    assert any(r["sources"].get("heads") and r["accepted"] for r in out["runs"])  # the heads drafted and hit
    # sampled with a fixed draft length: the same tokens as one process with the same seed
    heads = load_heads(root / "heads", model)
    mx.random.seed(3)
    one = [t for t, _, _ in mtp_generate_step(mx.array(PROMPTS[0]), model, heads, num_draft=2, draft="heads",
                                              max_tokens=TOKENS, temp=0.8)]
    assert out["runs"][-2]["tokens"] == one
    assert len(out["runs"][-1]["tokens"]) == TOKENS
    # a session whose answers rank 0 stopped early (after 4 and 2 tokens) stayed in step
    got = out["session"]
    for ids, toks, stop in zip(PROMPTS, got, session["stop_after"]):
        ref = greedy_tokens(model, ids, 16)
        assert toks == ref[: len(toks)] and len(toks) == (stop + 1 if stop else 16), (toks, ref)


def test_deepseek_v3_pipeline_native_mtp(tmp_path):
    import mlx_lm

    from test_native_mtp import moe_checkpoint

    moe_checkpoint(tmp_path / "hf")
    r = run_cli("convert", "--hf-path", tmp_path / "hf", "--mlx-path", tmp_path / "mlx")
    assert r.returncode == 0 and "native MTP" in r.stderr, r.stderr
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    runs = _greedy_runs(lookup=False) + _greedy_runs(drafts=(), lookup=True)[:2]
    out = _run_worker(tmp_path, dict(model=str(tmp_path / "mlx"), sharding="pipeline", runs=runs))
    assert out["sharding"] == "pipeline"
    assert _check_greedy(out, runs, model) == len(runs)
    assert any(r["sources"].get("heads") and r["accepted"] for r in out["runs"])


def test_qwen35_tensor_parallel_recurrent_layers(tmp_path):
    import mlx_lm

    from test_native_mtp import qwen35_checkpoint

    qwen35_checkpoint(tmp_path / "hf")
    r = run_cli("convert", "--hf-path", tmp_path / "hf", "--mlx-path", tmp_path / "mlx")
    assert r.returncode == 0, r.stderr
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    runs = _greedy_runs(lookup=False) + _greedy_runs(drafts=(), lookup=True)[:1]
    out = _run_worker(tmp_path, dict(model=str(tmp_path / "mlx"), sharding="tensor", runs=runs))
    assert out["sharding"] == "tensor"
    assert _check_greedy(out, runs, model) == len(runs)
    # rejections happened, so the recurrent state was restored and replayed under sharding
    assert any(r["drafted"] > r["accepted"] for r in out["runs"])


def test_generate_and_chat_under_mlx_launch(llama):
    from mlx_mtpd.generate import generate
    from mlx_mtpd.heads import load_heads

    root, model, tok = llama
    heads = load_heads(root / "heads", model)
    prompt = "the cat"
    want = generate(model, tok, tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True),
                    max_tokens=20, heads=heads, num_draft=2, draft="heads")
    r = _launch([BIN / "mlx_mtpd", "generate", "--model", root / "mlx", "--heads", root / "heads", "--prompt", prompt,
                 "--max-tokens", 20, "--num-draft", 2, "--draft", "heads"])
    # (mlx.launch takes --verbose for itself: the text is read between mlx-lm's ===== lines)
    parts = r.stdout.split("=" * 10 + "\n")
    assert len(parts) >= 3 and parts[1].rstrip("\n") == want and want.strip(), r.stdout + r.stderr[-3000:]
    assert "Acceptance: tau" in r.stdout and "[mlx_mtpd] 2 ranks, tensor parallel" in r.stderr
    # chat: only rank 0 reads the terminal and prints; /reset reaches every rank
    r = _launch([BIN / "mlx_mtpd", "chat", "--model", root / "mlx", "--heads", root / "heads", "--max-tokens", 20],
                input=f"{prompt}\n/reset\n{prompt}\n/stats\n/quit\n")
    assert r.stdout.count("[mlx_mtpd chat]") == 1, r.stdout + r.stderr[-3000:]
    assert "2 ranks (tensor parallel)" in r.stdout
    assert r.stdout.count(want.strip()) == 2, r.stdout
    assert "steps:" in r.stdout


def _start_pair(root, hostfile, port, extra=()):
    """The two ranks of a server started by hand, as mlx.launch would (ring)."""
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
        procs.append(subprocess.Popen(
            [str(BIN / "mlx_mtpd"), "server", "--model", str(root / "mlx"), "--heads", str(root / "heads"),
             "--port", str(port), "--dist-timeout", "20", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _post(port, body, timeout=60):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as f:
        return json.loads(f.read())


def test_server_on_two_ranks_and_a_rank_that_dies(llama, tmp_path):
    from mlx_mtpd.generate import generate
    from mlx_mtpd.heads import load_heads

    root, model, tok = llama
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{_port()}"], [f"127.0.0.1:{_port()}"]]))
    port = _port()
    procs = _start_pair(root, hostfile, port)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and procs[0].poll() is None, procs[0].stderr.read()
                time.sleep(0.5)
        heads = load_heads(root / "heads", model)
        want = generate(model, tok, "the cat", max_tokens=24, heads=heads, num_draft="auto", draft="heads+lookup")
        got = _post(port, {"prompt": "the cat", "max_tokens": 24, "temperature": 0})
        assert got["choices"][0]["text"] == want
        # a stop string: rank 0 stops early, and both ranks stay in step for the next request
        cut = want[3:6]
        got = _post(port, {"prompt": "the cat", "max_tokens": 24, "temperature": 0, "stop": [cut]})
        assert got["choices"][0]["text"] == want[: want.index(cut)]
        got = _post(port, {"prompt": "the cat", "max_tokens": 24, "temperature": 0})
        assert got["choices"][0]["text"] == want
        # rank 1 dies: the next request ends rank 0 with a message, not a hang
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        try:
            _post(port, {"prompt": "the cat", "max_tokens": 8}, timeout=60)
        except OSError:
            pass
        assert procs[0].wait(60) == 1
        err = procs[0].stderr.read()
        # the link reports the loss, or (where it does not) the watchdog ends the wait
        assert ("lost another rank" in err or "waited" in err) and "every rank stops" in err, err
        assert "Traceback" not in err and err.count("error:") == 1, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_wrong_hostfile_ends_with_a_message(tmp_path, llama):
    root, _, _ = llama
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{_port()}"], [f"127.0.0.1:{_port()}"]]))
    env = dict(os.environ, MLX_RANK="0", MLX_HOSTFILE=str(hostfile))
    tic = time.time()
    r = subprocess.run([str(BIN / "mlx_mtpd"), "generate", "--model", str(root / "mlx"), "--prompt", "hi",
                        "--dist-timeout", "4"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and time.time() - tic < 30
    assert re.search(r"rank 0 waited \d+ s for the other ranks while connecting", r.stderr), r.stderr
    assert "check the hostfile" in r.stderr
