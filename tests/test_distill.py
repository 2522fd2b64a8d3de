"""`mlx_mtpd distill`: one command from a model folder to a measured head set, on
tiny models of every architecture the engine supports and a native-MTP one;
interrupted anywhere and resumed; a second round; bad input; the hub upload up
to the library's call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import greedy_tokens, leftovers, run_cli, write_hf_checkpoint

# a run small enough for a test: counted (no time budget), short answers, a two-prompt bench
SMALL = ["--new", "12", "--steps", "8", "--max-tokens", "20", "--eval-prompts", "4", "--bench-prompts", "2",
         "--bench-tokens", "12", "--batch-size", "6"]
ARCHS = ["llama", "qwen2", "qwen3", "gemma3_text", "mistral_swa", "gpt_oss", "phi3"]


def _model(root: Path, arch: str, seed: int = 0, extra=None) -> Path:
    from mlx_mtpd.convert import convert_hf

    write_hf_checkpoint(root / "hf", arch, seed=seed, extra=extra)
    convert_hf(str(root / "hf"), str(root / "mlx"))
    shutil.rmtree(root / "hf")
    return root / "mlx"


def _distill(*args):
    from mlx_mtpd.training.distill import build_parser, distill

    return distill(build_parser().parse_args([str(a) for a in args]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("distill-llama"), "llama", seed=3)


def _weights(folder: Path):
    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(folder / "mtp_heads.safetensors")).items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_distill_on_every_architecture(arch, tmp_path):
    """Data, training, the verdict and the head set, on each architecture; the
    head it writes drafts losslessly."""
    from mlx_mtpd.engine import SpecStats, mtp_generate_step
    from mlx_mtpd.heads import load_heads
    from mlx_mtpd.utils import load

    model_dir = _model(tmp_path, arch)
    out = tmp_path / "heads"
    report = _distill("--model", model_dir, "--out", out, "--work", tmp_path / "work", *SMALL)
    for name in ("mtp_heads.safetensors", "mtp_config.json", "eval.json", "distill.json", "learning_curve.png",
                 "acceptance.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "distill.json").read_text())["verdict"] == report["verdict"]
    assert report["data"]["answers"] == 12 and report["recipe"]["steps"] == 8 and not report["kept"]
    assert report["before"] is None and report["after"]["bench"]["greedy"]["identical_outputs"] is True
    assert report["verdict"].startswith(("pays:", "pays in greedy decoding", "does not pay yet on this device:"))
    model, tok, _ = load(str(model_dir))
    heads = load_heads(out, model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three rivers."}], add_generation_prompt=True)
    st = SpecStats()
    got = [t for t, _, _ in mtp_generate_step(mx.array(prompt), model, heads, num_draft=2, max_tokens=16, stats=st)]
    assert got == greedy_tokens(model, prompt, 16) and st.rounds > 0
    assert leftovers(out) == [] and leftovers(tmp_path) == []


def test_interrupted_anywhere_resumes_to_the_same_head(tiny, tmp_path, monkeypatch):
    """Ctrl-C while generating, right after a training checkpoint and during the
    verdict: each rerun of the same command continues, and the head equals an
    uninterrupted run's; then a second run starts round 2 from round 1's head."""
    from mlx_mtpd.training import capture, distill, train

    whole = _distill("--model", tiny, "--out", tmp_path / "a", "--work", tmp_path / "wa", *SMALL)
    args = ["--model", tiny, "--out", tmp_path / "b", "--work", tmp_path / "wb", *SMALL]

    real_gen = capture.generate_captured

    def gen_then_stop(*a, **k):
        for i, rec in enumerate(real_gen(*a, **k)):
            if i == 5:
                raise KeyboardInterrupt
            yield rec

    real_save = train.Trainer.save

    def save_then_stop(self, *a, **k):
        real_save(self, *a, **k)
        if self.step == 4:
            raise KeyboardInterrupt

    real_bench = distill._bench_one
    calls = []

    def bench_then_stop(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_bench(*a, **k)

    for target, name, fake in ((capture, "generate_captured", gen_then_stop), (train.Trainer, "save", save_then_stop),
                               (distill, "_bench_one", bench_then_stop)):
        with monkeypatch.context() as m:
            m.setattr(target, name, fake)
            with pytest.raises(KeyboardInterrupt):
                _distill(*args)
        assert not (tmp_path / "b" / "distill.json").exists()
    report = _distill(*args)
    state = json.loads((tmp_path / "wb" / "state.json").read_text())
    assert state["done"] and state["round"] == 1 and report["data"]["answers"] == 12
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-3, err_msg=k)
    assert report["after"]["teacher_forced_agreement"] == pytest.approx(
        whole["after"]["teacher_forced_agreement"], abs=0.02)
    # a second run: a new round, from round 1's head, on more data
    second = _distill(*args)
    assert second["round"] == 2 and second["data"]["answers"] == 24 and second["before"] is not None
    assert second["before"]["heads"].endswith("heads-r1")


def test_native_mtp_heads_are_the_start_and_kept_unless_beaten(tmp_path, monkeypatch):
    """A model with native MTP layers: distill fine-tunes them; when training cannot
    beat them (a zero learning rate) they stay in the model folder as they were."""
    from test_native_mtp import mimo_mtp_tensors

    from mlx_mtpd.training import distill

    model_dir = _model(tmp_path, "mimo", extra={k: mx.array(v) for k, v in mimo_mtp_tensors().items()})
    before = (model_dir / "mtp_heads.safetensors").read_bytes()
    monkeypatch.setitem(distill.RECIPE, "learning_rate_continued", 0.0)
    report = _distill("--model", model_dir, "--work", tmp_path / "work", *SMALL)
    assert report["kept"] and report["before"]["heads"] == str(model_dir)
    assert (model_dir / "mtp_heads.safetensors").read_bytes() == before
    assert "were kept" in report["verdict"] and (model_dir / "distill.json").exists()
    cfg = json.loads((model_dir / "mtp_config.json").read_text())
    assert cfg["source"] == "native" and cfg["family"] == "mimo"
    # with a learning rate it trains them (the native layout stays) and writes whichever is better
    monkeypatch.undo()
    report = _distill("--model", model_dir, "--out", tmp_path / "ft", "--work", tmp_path / "work2", *SMALL)
    cfg = json.loads((tmp_path / "ft" / "mtp_config.json").read_text())
    assert cfg["family"] == "mimo" and cfg["concat_order"] == "hidden_embedding"
    if not report["kept"]:
        assert report["after"]["teacher_forced_agreement"][0] > report["before"]["teacher_forced_agreement"][0]


def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, monkeypatch):
    from mlx_mtpd.errors import MTPDError
    from mlx_mtpd.training import distill

    work = tmp_path / "work"
    r = run_cli("distill", "--model", tmp_path, "--work", work)
    assert r.returncode == 1 and "not an MLX model folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("distill", "--model", tiny, "--work", work, "--minutes", "0.2")
    assert r.returncode == 1 and "too small for one evaluation" in r.stderr and "--minutes" in r.stderr
    other = _model(tmp_path / "q", "qwen2", seed=1)
    from mlx_mtpd.heads import init_heads, save_heads
    from mlx_mtpd.utils import load

    save_heads(init_heads(load(str(other))[0], 1), tmp_path / "qheads")
    r = run_cli("distill", "--model", tiny, "--work", work, "--init-from", tmp_path / "qheads", *SMALL)
    assert r.returncode == 1 and "made for another backbone" in r.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = run_cli("distill", "--model", tiny, "--work", work, "--out", tmp_path / "busy", *SMALL)
    assert r.returncode == 1 and "holds other files" in r.stderr
    monkeypatch.setattr(distill, "physical_memory", lambda: 200 * 2**20)
    with pytest.raises(MTPDError, match=r"needs about .* GiB to distill .* this machine has 0.2 GiB"):
        _distill("--model", tiny, "--work", work, *SMALL)
    assert not work.exists() and (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_upload_sends_the_head_set_with_a_model_card(tiny, tmp_path, monkeypatch):
    """--upload-repo: the head set, its report, pictures and a generated model card,
    through huggingface_hub's own calls (a stand-in here: no network)."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False, **k):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id, repo_type, **k):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            card = (Path(folder_path) / "README.md").read_text()
            calls.append(("upload", repo_id, repo_type, files, card))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    report = _distill("--model", tiny, "--out", tmp_path / "h", "--work", tmp_path / "w", "--upload-repo",
                      "someone/tiny-mtpd", *SMALL)
    assert calls[0] == ("create", "someone/tiny-mtpd", True)
    _, repo, kind, files, card = calls[1]
    assert repo == "someone/tiny-mtpd" and kind == "model"
    assert {"mtp_heads.safetensors", "mtp_config.json", "distill.json", "README.md", "acceptance.png"} <= set(files)
    assert "# MTP-D heads for mlx" in card and report["verdict"] in card and "fingerprint" in card
    assert leftovers(tmp_path) == []


def test_make_heads_form_trains_on_a_data_set_made_before(tiny, tmp_path):
    """`make heads`' call: the data set, extra text and held-out answers made
    before, no new answers (--new 0), a start (--init-from), the head written to a
    shipped folder in float16 and its full-precision checkpoint beside."""
    first = _distill("--model", tiny, "--out", tmp_path / "h1", "--work", tmp_path / "w1", *SMALL)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["--model", tiny, "--work", tmp_path / "w2", "--data", tmp_path / "w1" / "data", "--extra-data", text,
            "--eval-data", tmp_path / "w1" / "eval", "--init-from", tmp_path / "w1" / "checkpoint-r1",
            "--out", tmp_path / "shipped", "--export-checkpoint", tmp_path / "ckpt", *SMALL]
    args[args.index("--new") + 1] = "0"
    report = _distill(*args)
    assert report["data"]["answers"] == first["data"]["answers"] == 12
    assert not (tmp_path / "w2" / "eval").exists()  # the held-out answers given were used
    dtypes = {str(v.dtype) for k, v in mx.load(str(tmp_path / "shipped" / "mtp_heads.safetensors")).items()
              if k != "draft_vocab"}
    assert dtypes == {"mlx.core.float16"}
    assert (tmp_path / "ckpt" / "mtp_heads.safetensors").exists() != report["kept"]
