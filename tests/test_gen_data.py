"""gen-data: the backbone answers prompts; records carry token ids; resume; bad input."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_cli, write_hf_checkpoint


def test_gen_data_greedy_and_sampled_then_resume(tmp_path):
    model = tmp_path / "model"
    write_hf_checkpoint(model, "qwen2", vocab_size=300, seed=6)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"tell me about the {w}"})
                                 for w in ["sea", "moon", "tea", "cats", "rain"]) + "\n")
    out = tmp_path / "data"
    r = run_cli("gen-data", "--model", model, "--prompts", prompts, "--out", out, "--max-tokens", 12,
                "--batch-size", 4, "--temps", "0,1.0", "--limit", 3)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and {r["temp"] for r in recs} == {0.0, 1.0}
    for rec in recs:
        assert rec["messages"][-1]["role"] == "assistant"
        assert 0 < len(rec["completion_tokens"]) <= 12 and rec["prompt_tokens"]
    # greedy answers are the backbone's own greedy continuation
    from conftest import greedy_tokens
    import mlx_lm

    m, tok = mlx_lm.load(str(model))
    g = next(r for r in recs if r["temp"] == 0.0)
    ref = greedy_tokens(m, g["prompt_tokens"], len(g["completion_tokens"]))
    assert sum(a == b for a, b in zip(ref, g["completion_tokens"])) >= len(ref) - 2  # batch numerics
    # a second run without --resume refuses; with --resume adds only what is missing
    r = run_cli("gen-data", "--model", model, "--prompts", prompts, "--out", out, "--limit", 3)
    assert r.returncode == 1 and "--resume" in r.stderr
    # an interruption in the middle of a write: the cut record runs again
    lines = (out / "data.jsonl").read_text().splitlines()
    (out / "data.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    r = run_cli("gen-data", "--model", model, "--prompts", prompts, "--out", out, "--max-tokens", 12,
                "--batch-size", 4, "--temps", "0,1.0", "--limit", 5, "--resume")
    assert r.returncode == 0, r.stderr
    raw = (out / "data.jsonl").read_text().splitlines()
    assert raw[5] == lines[-1][:20]  # kept on a line of its own (readers skip it with a count)
    recs = [json.loads(x) for i, x in enumerate(raw) if i != 5]
    assert len(recs) == 10 and len({r["id"] for r in recs}) == 10


def test_gen_data_bad_prompts(tmp_path):
    model = tmp_path / "model"
    write_hf_checkpoint(model, "qwen2", vocab_size=300, seed=6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    r = run_cli("gen-data", "--model", model, "--prompts", bad, "--out", tmp_path / "o")
    assert r.returncode == 1 and "bad.jsonl:2: invalid JSON" in r.stderr
    r = run_cli("gen-data", "--model", model, "--prompts", tmp_path / "none.txt", "--out", tmp_path / "o")
    assert r.returncode == 1 and "not found" in r.stderr


def test_gen_data_grows_a_token_data_set(tmp_path):
    """--pack-into: each run adds only new answers as one compact chunk, the
    manifest keeps the totals, the trainer reads the data set like any --data,
    and a damaged chunk is refused with a clear error."""
    import numpy as np

    from mlx_mtpd.training.data_cache import read_sequences
    from mlx_mtpd.training.dataset import iter_records, read_manifest
    from mlx_mtpd.utils import load

    model = tmp_path / "model"
    write_hf_checkpoint(model, "qwen2", vocab_size=300, seed=6)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"tell me about the {w}"})
                                 for w in ["sea", "moon", "tea", "cats", "rain", "sea"]) + "\n")
    data = tmp_path / "tokens"
    args = ["gen-data", "--model", model, "--prompts", prompts, "--out", tmp_path / "work", "--max-tokens", 8,
            "--batch-size", 4, "--temps", "0,1.0", "--pack-into", data, "--new", 4, "--resume"]
    for _ in range(3):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
    man = read_manifest(data)
    assert [c["answers"] for c in man["chunks"]] == [4, 4, 2]  # 5 distinct prompts x 2 temperatures
    assert man["totals"]["answers"] == 10 and man["backbone"]["vocab_size"] == 300
    assert all(c["cpu_seconds"] > 0 and c["bytes"] > 0 for c in man["chunks"])
    recs = list(iter_records(data))
    assert len({r["id"] for r in recs}) == 10 and {r["temp"] for r in recs} == {0.0, 1.0}
    assert not (tmp_path / "work" / "data.jsonl").exists()
    with np.load(data / "chunk-0001.npz") as z:
        assert z["tokens"].dtype == np.uint16
    r = run_cli(*args)
    assert r.returncode == 0 and "nothing new" in r.stderr
    _, tok, _ = load(str(model))
    seqs, counts = read_sequences([str(data)], tok, 64)
    assert counts["records"] == 10 and all(0 < s.prompt_len < len(s) for s in seqs)
    assert sorted(map(list, seqs)) == sorted(r["tokens"] for r in recs)
    (data / "chunk-0002.npz").write_bytes(b"not a zip")
    r = run_cli("train", "--model", model, "--data", data, "--out", tmp_path / "h", "--steps", 1)
    assert r.returncode == 1 and "chunk-0002.npz is not a readable token chunk" in r.stderr


def _argmax_ids(rec, n):
    import numpy as np

    best = np.argmax(np.array(rec["top_logits"][:n], np.float32), -1)
    return np.array(rec["top_ids"][:n])[np.arange(n), best]


def test_capture_while_generating_gives_the_training_cache(tmp_path):
    """--cache-into: the answers are the backbone's greedy ones, the chunk's
    training cache is written from what generation kept (no second pass: the
    trainer prepares nothing), and it equals a cache prepared by a backbone pass
    at every position training reads (all but the last)."""
    import numpy as np

    from conftest import greedy_tokens
    from mlx_mtpd.training.data_cache import iter_sequences, open_cache, prepare_cache, read_sequences
    from mlx_mtpd.training.dataset import iter_records
    from mlx_mtpd.utils import load

    model = tmp_path / "model"
    write_hf_checkpoint(model, "llama", vocab_size=300, seed=6)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ["tell me about the sea", "moon", "a much longer question about tea and cats"]) + "\n")
    data, caches = tmp_path / "tokens", tmp_path / "cache"
    r = run_cli("gen-data", "--model", model, "--prompts", prompts, "--out", tmp_path / "work", "--max-tokens", 20,
                "--batch-size", 2, "--temps", "0,1.0", "--pack-into", data, "--cache-into", caches,
                "--features", "0", "--top-n", 64, "--seq-len", 64)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "work" / "capture").exists()
    (d,) = (caches / "train").iterdir()
    got = open_cache(d)
    assert got["captured_sequences"] == 6 and got["backbone_tokens"] == 0 and got["features"] == [0]
    m, tok, _ = load(str(model))
    for rec in iter_records(data):
        if rec["temp"] == 0:
            p, answer = rec["prompt_len"], rec["tokens"][rec["prompt_len"]:]
            ref = greedy_tokens(m, rec["tokens"][:p], len(answer))
            assert sum(a == b for a, b in zip(answer, ref)) >= len(ref) - 2  # batch numerics
    seqs, _ = read_sequences([str(data)], tok, 64)
    ref = open_cache(prepare_cache(m, seqs, tmp_path / "ref", 64, features=[0]))
    by_tokens = {tuple(np.array(x["tokens"]).tolist()): x for x in iter_sequences(ref)}
    assert len(by_tokens) == 6
    for rec in iter_sequences(got):
        want = by_tokens[tuple(np.array(rec["tokens"]).tolist())]
        n = rec["tokens"].shape[0] - 1
        np.testing.assert_allclose(np.array(rec["hidden"][:n], np.float32), np.array(want["hidden"][:n], np.float32),
                                   rtol=2e-2, atol=2e-2)

        assert (_argmax_ids(rec, n) == _argmax_ids(want, n)).mean() >= 0.9
    r = run_cli("train", "--model", model, "--data", data, "--out", tmp_path / "h", "--cache-dir", caches,
                "--features", "0", "--top-n", 64, "--seq-len", 64, "--steps", 2, "--batch-size", 2,
                "--draft-vocab", 0, "--eval-every", 0)
    assert r.returncode == 0 and "backbone (train" not in r.stderr, r.stderr


@pytest.mark.parametrize("arch,batch_size,max_tokens,lengths", [
    ("llama", 4, 12, None),
    # long prompts come last (shortest first) and join a batch whose rows are shorter,
    # and the batch runs past 256 positions, where its caches grow
    ("qwen3", 2, 160, [3, 4, 3, 5, 100, 110, 120, 130, 140, 150, 160, 170, 180]),
])
def test_continuous_batching_capture_equals_one_sequence_at_a_time(arch, batch_size, max_tokens, lengths):
    """Rows that end early (an end token the tiny model often says) leave the
    batch and new prompts join it: every answer is still the greedy one and
    every captured position equals a plain forward of that sequence alone."""
    import mlx.core as mx
    import numpy as np

    from conftest import greedy_tokens, tiny_model
    from mlx_mtpd.training.capture import generate_captured
    from mlx_mtpd.heads import Backbone

    model, _ = tiny_model(arch, vocab_size=64, seed=3)
    rng = np.random.default_rng(0)
    lengths = lengths or [int(rng.integers(3, 12)) for _ in range(9)]
    prompts = [rng.integers(3, 64, size=n).tolist() for n in lengths]
    # the end token: one the model often says, so answers end at different steps
    firsts = [greedy_tokens(model, p, max_tokens) for p in prompts]
    eos = int(np.bincount(np.concatenate(firsts)).argmax())

    class Tok:
        eos_token_ids = [eos]

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return messages[0]["ids"]

        def decode(self, ids):
            return " ".join(map(str, ids))

    jobs = [{"id": str(i), "messages": [{"role": "user", "content": "", "ids": p}]} for i, p in enumerate(prompts)]
    out = list(generate_captured(model, Tok(), jobs, max_tokens=max_tokens, batch_size=batch_size, temp=0.0,
                                 seed=0, features=[0], top_n=16))
    assert sorted(int(r["id"]) for r, _ in out) == list(range(len(prompts)))
    lengths = {len(r["completion_tokens"]) for r, _ in out}
    assert len(lengths) > 2, lengths  # rows ended at different steps
    bb = Backbone(model, [0])
    for rec, arrays in out:
        p = prompts[int(rec["id"])]
        ref = greedy_tokens(model, p, max_tokens)
        cut = ref[: ref.index(eos)] if eos in ref else ref
        assert rec["completion_tokens"] == cut and rec["finish_reason"] == ("stop" if eos in ref else "length")
        seq = p + cut + ([eos] if eos in ref else [])
        logits, hidden = bb.forward(mx.array(seq), None)
        n = len(seq) - 1
        np.testing.assert_allclose(arrays["hidden"][:n].astype(np.float32), np.array(hidden[:n]), rtol=1e-2, atol=1e-2)
        # the argmax is the captured top logit (ties allowed: logits are kept in float16)
        top = arrays["top_logits"][:n].astype(np.float32)
        want = np.array(mx.argmax(logits[:n], -1))
        at_want = np.where(arrays["top_ids"][:n] == want[:, None], top, -np.inf).max(-1)
        assert (at_want == top.max(-1)).all()


def test_multi_turn_prompts_follow_up_on_greedy_answers(tmp_path):
    """make_pool --multi-turn: each finished greedy answer of a pool prompt
    becomes a conversation (prompt, that answer, a follow-up asking to repeat
    or edit it); sampled, cut and unknown answers are left out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_pool", ROOT / "scripts" / "make_pool.py")
    make_pool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_pool)
    CODE_FOLLOW_UPS, FOLLOW_UPS = make_pool.CODE_FOLLOW_UPS, make_pool.FOLLOW_UPS
    build_multi_turn, build_pool = make_pool.build_multi_turn, make_pool.build_pool
    from mlx_mtpd.training.dataset import job_id, pack

    class Tok:
        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    pool = build_pool()
    assert len(pool) > 5000 and len(set(pool)) == len(pool)
    code = next(p for p in pool if p.startswith("Write a Python function"))
    recs = []
    for i, (p, t, finish) in enumerate([(pool[0], 0.0, "stop"), (code, 0.0, "stop"), (pool[1], 0.7, "stop"),
                                        (pool[2], 0.0, "length"), ("not in the pool", 0.0, "stop")]):
        recs.append({"id": job_id([{"role": "user", "content": p}], t), "temp": t, "prompt_tokens": [1, 2],
                     "completion_tokens": [10 + i, 20 + i], "finish_reason": finish})
    pack(recs, tmp_path / "d", eos=0, backbone={"vocab_size": 100}, meta={})
    convs = build_multi_turn(tmp_path / "d", Tok(), pool)
    assert [c[0]["content"] for c in convs] == [pool[0], code]
    assert convs[0][1] == {"role": "assistant", "content": "w10 w20"}
    assert convs[0][2]["content"] in FOLLOW_UPS and convs[1][2]["content"] in CODE_FOLLOW_UPS


@pytest.mark.parametrize("capture", [True, False])
def test_a_deadline_ends_the_answers_under_way_and_keeps_them(tmp_path, capture):
    """gen-data with a deadline already past: it waits for `min_answers` finished
    answers and starts no prompt after them; with none to wait for, the answers
    under way end where they are (finish_reason "length", kept and packed, with
    their training cache when capturing)."""
    import mlx_lm

    from mlx_mtpd.training.dataset import iter_records
    from mlx_mtpd.training.gen_data import gen_data

    model = tmp_path / "model"
    write_hf_checkpoint(model, "qwen2" if capture else "gemma3_text", vocab_size=300, seed=6)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a few words on {w}"}) + "\n"
                               for w in ["sea", "moon", "tea", "cats", "rain", "snow"]))
    m, tok = mlx_lm.load(str(model))

    def answers(data, min_answers):
        gen_data(None, prompts, tmp_path / "gen", max_tokens=24, batch_size=2, temps=(0.0,), pack_into=data,
                 cache_into=tmp_path / "cache" if capture else None, deadline=0.0, min_answers=min_answers,
                 loaded=(m, tok), resume=True)
        return sorted(len(r["tokens"]) - r["prompt_len"] - r["stopped"] for r in iter_records(data))

    assert answers(tmp_path / "d1", 3) == [24, 24, 24, 24]  # two waves of two: the second reached 3
    if capture:
        assert list((tmp_path / "cache" / "train").glob("chunk-0001.npz-*/index.json"))
    # a stop that turns true after a few steps: the rows under way end there, none starts after
    from mlx_mtpd.training import capture as cap
    from mlx_mtpd.training.gen_data import generate_answers

    checks = []

    def stop():
        checks.append(1)
        return len(checks) > 5

    jobs = [{"id": str(i), "temp": 0.0, "messages": [{"role": "user", "content": f"say {i}"}]} for i in range(6)]
    if capture:
        got = [rec for rec, arrays in cap.generate_captured(m, tok, jobs, max_tokens=24, batch_size=2, temp=0.0,
                                                             seed=0, features=None, top_n=8, stop=stop)]
    else:
        got = list(generate_answers(m, tok, jobs, 24, 2, 0.0, 0, stop))
    assert len(got) == 2 and all(r["finish_reason"] == "length" for r in got)
    assert all(0 < len(r["completion_tokens"]) < 24 for r in got), [len(r["completion_tokens"]) for r in got]
