"""Drafting from the first token: the head depths caught up inside the prefill,
step costs measured once per device, model and head set (cached, keyed), the
head set's own measured acceptance as the planner's prior, and a cold
`generate` that drafts with the heads from its first step."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import greedy_tokens, run_cli, tiny_model
from heads_util import fit_heads
from mlx_mtpd import costs
from mlx_mtpd.engine import DraftPlanner, DraftState, SpecStats, mtp_generate_step
from mlx_mtpd.heads import init_heads
from test_engine import _check_depth_caches


class _Tok:
    """The one thing the cost measurement needs from a tokenizer (no chat template)."""

    chat_template = None

    def encode(self, text):
        return [3 + (ord(c) % 250) for c in text[:60]]


def _fitted(arch="llama", features=None, loop="last", seed=3):
    model, _ = tiny_model(arch, vocab_size=300, seed=seed)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, size=24).tolist() for _ in range(3)]
    refs = [greedy_tokens(model, p, 30) for p in prompts]
    heads = fit_heads(model, [p + r for p, r in zip(prompts[:2], refs[:2])], num_heads=2, loop=loop,
                      features=features)
    return model, heads, prompts, refs


class _Ahead(DraftPlanner):
    """D heads every step, the depths caught up in the prefill; records step times."""

    def __init__(self, d):
        super().__init__("auto", "heads", max_draft=d)
        self.d, self.seen = d, []

    def prefill_depth(self):
        return self.d

    def plan(self, st, remaining):
        return "heads", min(self.d, remaining - 1) if remaining > 1 else 1, None

    def observe(self, kind, d, accepted, seconds, match=0):
        self.seen.append(seconds)
        super().observe(kind, d, accepted, seconds, match)


@pytest.mark.parametrize("arch,features,loop", [("llama", None, "last"), ("qwen3", [0], "cycle")])
def test_prefill_catch_up_is_exact_and_the_first_step_is_timed(arch, features, loop):
    """Depths caught up on the prompt inside the prefill hold exactly what
    drafting would have computed (depth caches equal recomputation, through a
    second turn that rewinds), the output is plain greedy decoding's, and the
    first drafting step is a typical one (timed: its catch-up is short)."""
    model, heads, prompts, refs = _fitted(arch, features, loop)
    for p, ref in zip(prompts, refs):
        st = DraftState(model, heads, 3, loop)
        planner = _Ahead(3)
        got = [t for t, _, _ in mtp_generate_step(mx.array(p), model, heads, num_draft="auto", max_tokens=20,
                                                  state=st, planner=planner)]
        assert got == ref[:20]
        assert planner.seen[0] is not None  # the first step caught up over at most d + 2 positions
        _check_depth_caches(st, model, heads, loop)
        # the next turn: the conversation so far, edited at its end, then a new message
        turn2 = p + ref[:12] + [5, 6, 7, 8, 9, 10]
        planner2 = _Ahead(3)
        got2 = [t for t, _, _ in mtp_generate_step(mx.array(turn2), model, heads, num_draft="auto",
                                                   max_tokens=15, state=st, planner=planner2)]
        assert got2 == greedy_tokens(model, turn2, 15)
        assert planner2.seen[0] is not None
        _check_depth_caches(st, model, heads, loop)


def test_catch_up_reaches_every_known_position():
    """After a prefill of P tokens, depth k holds P - k entries (it needs t_{j+k}),
    and the first step runs one position per depth plus its drafts."""
    model, heads, prompts, _ = _fitted()
    st = DraftState(model, heads, 3, "last")
    gen = mtp_generate_step(mx.array(prompts[0]), model, heads, num_draft="auto", max_tokens=5, state=st,
                            planner=_Ahead(3))
    next(gen)  # the first token: the prefill is done
    p = len(prompts[0])
    assert st.depths.committed[1:4] == [p - 1, p - 2, p - 3]
    assert [c.offset for c in st.depths.caches] == [p - 1, p - 2, p - 3]
    gen.close()


def test_step_costs_are_measured_once_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MTPD_HOME", str(tmp_path))
    model, _ = tiny_model("llama", vocab_size=300, seed=1)
    heads = init_heads(model, 2)
    c = costs.step_costs(model, _Tok(), heads, quiet=True)
    assert c["plain"] > 0 and set(c["heads"]) == {"1", "2", "3", "4"}
    assert set(c["lookup"]) == {"2", "4", "8", "16", "32"}
    assert set(c["tree"]) == {"3", "4", "5", "6", "8", "10", "12", "16"}  # tree steps by size
    assert all(t > 0 for kind in ("heads", "lookup", "tree") for t in c[kind].values())
    files = list((tmp_path / costs.COSTS_DIR).glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["costs"] == c

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(costs, "measure_costs", boom)
    assert costs.step_costs(model, _Tok(), heads, quiet=True) == c  # cached
    # another head set, another dtype, another BLAS: another key, measured again
    for other in (lambda: (model, init_heads(model, 1)), lambda: (tiny_model("llama", 300, seed=2)[0], heads)):
        m, h = other()
        assert costs.load_costs(m, h) is None
        with pytest.raises(AssertionError, match="measured again"):
            costs.step_costs(m, _Tok(), h, quiet=True)
    monkeypatch.setattr(costs, "_device", lambda: {"device": "elsewhere"})
    assert costs.load_costs(model, heads) is None
    assert costs.step_costs(model, _Tok(), heads, measure=False) is None


def test_step_costs_on_a_sliding_window_model_are_measured_past_the_window(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MTPD_HOME", str(tmp_path))
    model, _ = tiny_model("gemma3_text", vocab_size=300, seed=1)  # window 16: 32-token drafts wrap it
    c = costs.measure_costs(model, list(range(3, 9)), init_heads(model, 1))
    assert c["plain"] > 0 and "32" in c["lookup"] and set(c["heads"]) == {"1", "2", "3", "4"}


def test_head_acceptance_prefers_decoding_then_teacher_forced(tmp_path):
    assert costs.head_acceptance(tmp_path) is None
    (tmp_path / "eval.json").write_text(json.dumps({"teacher_forced_agreement": [0.6, 0.5]}))
    assert costs.head_acceptance(tmp_path) == {"acceptance": [0.6, 0.5], "source": "teacher-forced"}
    (tmp_path / "eval.json").write_text(json.dumps({"teacher_forced_agreement": [0.6], "decoding": {
        "D=1,loop=last": {"loop": "last", "acceptance_rates": [0.45]},
        "D=3,loop=last": {"loop": "last", "acceptance_rates": [0.43, 0.4, 0.35]},
        "D=4,loop=cycle": {"loop": "cycle", "acceptance_rates": [0.43, 0.4, 0.35, 0.3]}}}))
    assert costs.head_acceptance(tmp_path, "last") == {"acceptance": [0.43, 0.4, 0.35], "source": "decoding",
                                                       "ranks": None, "by_temp": {}}
    # a tree's row gives acceptance by rank (ranks never tried: half the rank before), not by position
    rec = json.loads((tmp_path / "eval.json").read_text())
    rec["decoding"]["D=2,loop=last,tree=3-2"] = {"loop": "last", "tree": [3, 2], "tree_steps": 40,
                                                 "acceptance_rates": [0.9, 0.9, 0.9, 0.9, 0.9],
                                                 "rank_acceptance": [[0.3, 0.1, None], [0.2, None, None]]}
    (tmp_path / "eval.json").write_text(json.dumps(rec))
    found = costs.head_acceptance(tmp_path, "last")
    assert found["acceptance"] == [0.43, 0.4, 0.35]
    assert found["ranks"] == [[0.3, 0.1, 0.05], [0.2, 0.1, 0.05]]
    (tmp_path / "eval.json").write_text("{broken")
    assert costs.head_acceptance(tmp_path) is None


def test_a_seeded_planner_drafts_from_its_first_step_and_its_measurements_correct_the_seed():
    class St:
        max_depth, index, memory = 3, None, None

        def can_verify(self, d):
            return True

    fresh = DraftPlanner("auto", "heads", max_draft=3)
    assert fresh.plan(St(), 100)[0] == "plain" and fresh.prefill_depth() == 0
    seeded = DraftPlanner("auto", "heads", max_draft=3).seed(
        acceptance=[0.6, 0.5, 0.4], costs={"plain": 0.1, "heads": {"1": 0.11, "2": 0.12, "3": 0.14}})
    kind, d, _ = seeded.plan(St(), 100)
    assert kind == "heads" and d >= 2 and seeded.prefill_depth() == d
    assert seeded.acceptance("heads", 1) == pytest.approx(0.6)
    for _ in range(40):  # the heads turn out to guess nothing here, and steps cost more
        seeded.observe("heads", d, 0, 0.2)
        seeded.observe("heads", 1, 0, 0.15)
    # the prior keeps its weight (12) while the counts decay (a window of ~33 steps):
    # the measured 0 pulls 0.6 down to about a sixth of it
    assert seeded.acceptance("heads", 1) < 0.2
    assert seeded.step_cost("heads", d) > 0.19
    assert seeded.plan(St(), 100)[0] == "plain"
    assert seeded.prefill_depth() == 0


def test_sampling_starts_from_the_acceptance_measured_at_its_temperature(tmp_path):
    """eval-heads --temp 0.7 --save adds sampled rows beside the greedy ones; a
    generation's prior is the one measured nearest its temperature, and sampling
    with only a greedy measurement trusts it less (sampled drafts are accepted
    less often)."""
    from mlx_mtpd.planner import GREEDY_PRIOR_WEIGHT_WHEN_SAMPLING, MEASURED_PRIOR_WEIGHT
    from mlx_mtpd.training.eval_heads import merged_evaluation

    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"teacher_forced_agreement": [0.6], "best": {"num_draft": 2}, "decoding": {
        "D=2,loop=last": {"loop": "last", "acceptance_rates": [0.45, 0.4]}}}))
    sampled = {"best": {"num_draft": 1}, "decoding": {
        "D=2,loop=last,temp=0.7": {"loop": "last", "temp": 0.7, "acceptance_rates": [0.3, 0.25]}}}
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "draft_temperature": {"0.7": {"scale": 0.9}, "1": {"scale": 0.5}}}))
    sampled["draft_temperature"] = {"0.7": {"scale": 0.6}}
    merged = merged_evaluation(path, sampled)
    # a draft temperature re-measured replaces the old one; the others are kept
    assert merged["draft_temperature"] == {"0.7": {"scale": 0.6}, "1": {"scale": 0.5}}
    assert set(merged["decoding"]) == {"D=2,loop=last", "D=2,loop=last,temp=0.7"}
    assert merged["teacher_forced_agreement"] == [0.6] and merged["best"] == {"num_draft": 2}
    path.write_text(json.dumps(merged))
    found = costs.head_acceptance(tmp_path, "last")
    assert found["acceptance"] == [0.45, 0.4] and found["by_temp"] == {0.7: [0.3, 0.25]}

    planner = DraftPlanner("auto", "heads", max_draft=2).seed(acceptance=found["acceptance"],
                                                               by_temp=found["by_temp"])
    for temp, prior in ((0.0, 0.45), (0.7, 0.3), (1.0, 0.3), (0.2, 0.45)):
        planner.set_temp(temp)
        assert planner.acceptance("heads", 1) == pytest.approx(prior)
        assert planner.head_prior_weight == MEASURED_PRIOR_WEIGHT
    greedy_only = DraftPlanner("auto", "heads", max_draft=2).seed(acceptance=[0.45, 0.4])
    greedy_only.set_temp(0.7)
    assert greedy_only.head_prior_weight == GREEDY_PRIOR_WEIGHT_WHEN_SAMPLING
    greedy_only.set_temp(0.0)
    assert greedy_only.head_prior_weight == MEASURED_PRIOR_WEIGHT


def test_the_heads_catch_up_after_plain_decoding_is_priced_and_measured():
    """After plain decoding the first heads step first catches every depth up on
    the tokens it missed: the planner adds that to the step's cost (so a draft
    that barely pays waits, and a shorter draft catches up fewer depths), and
    learns its cost per position from such steps."""
    from mlx_mtpd.depths import DepthCaches

    class St:
        max_depth, index, memory, length = 3, None, None, 200

        def __init__(self, lags):
            self.depths = DepthCaches(3)
            self.depths.committed[1:4] = [self.length - x for x in lags]

        def can_verify(self, d):
            return True

    def seeded():
        return DraftPlanner("auto", "heads", max_draft=3, tree=None).seed(
            acceptance=[0.6, 0.5, 0.3], costs={"plain": 0.1, "heads": {"1": 0.11, "2": 0.125, "3": 0.145}})

    planner = seeded()
    kind, d, _ = planner.plan(St([1, 2, 3]), 100)
    assert (kind, d) == ("heads", 2)
    assert planner.catch_up_work(2, [1, 2, 3]) == 0
    assert planner.catch_up_work(2, [40, 60, 60]) == (40 - 4) + (60 - 4)
    # 400 positions behind, every depth (a long plain stretch), 6 tokens left: catching even
    # one depth up (~0.2 s at the prior, shared by the 3 steps left) costs more than drafts gain
    kind, _, _ = planner.plan(St([400, 400, 400]), 6)
    assert kind == "plain"
    # with the answer's tokens ahead the catch-up is shared by the steps that follow (8)
    assert planner.catch_up_share(1, [400] * 3, 100) == pytest.approx(planner.catch_up_cost(1, [400] * 3) / 8)
    assert planner.plan(St([400, 400, 400]), 100)[0] == "heads"
    # depth 1 up to date, the deeper ones far behind (only one-token drafts lately): a
    # one-token draft, where it would draft 2 with every depth up to date
    kind, d, _ = planner.plan(St([1, 300, 300]), 100)
    assert (kind, d) == ("heads", 1)
    # measured: a step that caught 2 x 36 positions up took 0.125 + 72 x 2 ms
    planner.observe_catch_up(2, [40, 40, 40], 0.125 + 72 * 0.002, 0.125)
    planner.observe_catch_up(2, [3, 4, 4], 0.5, 0.125)  # nothing caught up: not a measurement
    assert planner.cost[("catchup", 0)] == pytest.approx(0.002)
    assert planner.catch_up_cost(2, [40, 40, 40]) == pytest.approx(72 * 0.002)


def test_shipped_head_set_has_its_evaluation():
    from mlx_mtpd.utils import DEFAULT_HEADS

    found = costs.head_acceptance(DEFAULT_HEADS, "last")
    assert found is not None and found["source"] == "decoding" and 0.2 < found["acceptance"][0] < 0.9


def test_cold_generate_drafts_with_the_heads_from_its_first_step(smol_path):
    """A new `mlx_mtpd generate` process: the planner starts from the head set's
    evaluation and this device's cached step costs, so the answer's first step
    after its first token is a head step (--verbose says so).  The costs are
    written here as a device where head steps are cheap would have measured
    them: on a loaded CI machine the real measurement may say they do not pay."""
    import mlx_lm

    from mlx_mtpd.utils import DEFAULT_HEADS, home

    model, tok = mlx_lm.load(str(smol_path))
    from mlx_mtpd.heads import load_heads

    heads = load_heads(DEFAULT_HEADS, model)
    key = costs.cost_key(model, heads)
    path = costs.cost_path(key)
    assert str(path).startswith(str(home()))
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = path.read_text() if path.exists() else None
    t = 0.05
    path.write_text(json.dumps({"key": key, "costs": {
        "plain": t, "heads": {"1": 1.05 * t, "2": 1.1 * t, "3": 1.15 * t, "4": 1.2 * t},
        "lookup": {"2": 1.05 * t, "4": 1.1 * t, "8": 1.2 * t, "16": 1.4 * t, "32": 2 * t}, "context_tokens": 60}}))
    try:
        r = run_cli("generate", "--prompt", "Why is the sky blue?", "--max-tokens", "24", "--draft", "heads")
        assert r.returncode == 0, r.stderr
        assert "measuring step costs" not in r.stderr
        line = next(x for x in r.stdout.splitlines() if x.startswith("Acceptance"))
        assert "(first: heads)" in line, line
    finally:
        if saved is None:
            path.unlink()
        else:
            path.write_text(saved)


def test_stats_name_the_first_step():
    model, _ = tiny_model("llama", vocab_size=300, seed=1)
    st = SpecStats()
    for _ in mtp_generate_step(mx.array([3, 4, 5]), model, None, num_draft=0, max_tokens=4, stats=st):
        pass
    assert st.first_step is None  # plain decoding alone: no planned steps
    st = SpecStats()
    for _ in mtp_generate_step(mx.array([3, 4, 5, 3, 4]), model, init_heads(model, 1), num_draft=2,
                               max_tokens=6, stats=st):
        pass
    assert st.first_step == "heads" and st.as_dict()["first_step"] == "heads"
