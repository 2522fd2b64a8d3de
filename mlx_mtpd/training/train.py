"""`mlx_mtpd train`: on-device MTP-D training of the heads, backbone frozen.

    L = sum_k alpha_k CE(P^k_i, t_{i+k+1}) + sum_k beta_k KL(softmax(Q~_{i+k}) || softmax(P~^k_i))

Q is the frozen main head's logits (teacher, stop-gradient), P^k head k's, and
~ restricts both to the teacher's top-N tokens at that position.  The student's
logits are computed only on the rows of the shared output projection that the
batch's top-N sets (and targets) use, a gather instead of the full vocabulary;
CE is restricted to the same set.  `--top-n` at or above the vocabulary size
gives the full-vocabulary loss.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .data_cache import epoch_order, iter_sequences
from ..errors import MTPDError
from ..heads import Backbone, HeadSet, init_heads, load_heads, write_head_files
from ..files import HEADS_WEIGHTS, atomic_dir

STATE_FILE = "trainer_state.json"
BEST_DIR = "best"  # the checkpoint with the best held-out agreement, inside --out
OPT_FILE = "optimizer.safetensors"


@dataclass
class TrainConfig:
    num_heads: int = 1
    alpha: List[float] = field(default_factory=lambda: [1.0])
    beta: List[float] = field(default_factory=lambda: [1.0])
    top_n: int = 10000
    kl: str = "forward"
    learning_rate: float = 1e-3
    warmup: int = 50
    steps: int = 1000
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100
    trainable: List[int] = field(default_factory=list)  # 0-based heads that train (empty: all)
    train_depth: int = 0  # cascade depth trained (0: the number of heads); deeper depths loop the heads
    loop_weight: float = 1.0  # loss weight of the looped depths, relative to the last head's
    prompt_loss: bool = False  # also learn to draft prompt tokens (default: answer tokens only)
    patience: int = 0  # stop after this many evaluations without a better held-out agreement (0: never)
    dropout: float = 0.0  # on each depth's inputs, in training only


def per_head(values: Sequence[float], k: int, name: str) -> List[float]:
    values = list(values)
    if len(values) == 1:
        return values * k
    if len(values) != k:
        raise MTPDError(f"--{name} needs one value or one per head ({k}), got {len(values)}")
    return values


def mtpd_loss(
    student: mx.array, target_idx: mx.array, teacher_logits: mx.array, teacher_idx: mx.array,
    mask: mx.array, alpha: float, beta: float, kl: str = "forward",
):
    """The MTP-D loss of one head, in one place.

    student: (B, L, U) logits over the batch's token set U; teacher_idx: (B, L, N)
    positions in U of the teacher's top-N; teacher_logits: (B, L, N); target_idx:
    (B, L) position in U of the true next token; mask: (B, L) valid positions.
    Returns (loss, ce, kl, top-1 agreement with the teacher) averaged over valid positions.
    """
    n = teacher_idx.shape[-1]
    s_top = mx.take_along_axis(student, teacher_idx, axis=-1)  # (B, L, N)
    # CE over the same set, with the target added where the teacher's top-N misses it.
    in_top = (teacher_idx == target_idx[..., None]).any(axis=-1)
    s_tgt = mx.take_along_axis(student, target_idx[..., None], axis=-1)
    s_tgt_extra = mx.where(in_top[..., None], -mx.inf, s_tgt)
    lse_ce = mx.logsumexp(mx.concatenate([s_top, s_tgt_extra], axis=-1), axis=-1)
    ce = lse_ce - s_tgt[..., 0]
    # KL between the teacher and the student, both renormalized on the top-N.
    log_t = teacher_logits - mx.logsumexp(teacher_logits, axis=-1, keepdims=True)
    log_s = s_top - mx.logsumexp(s_top, axis=-1, keepdims=True)
    if kl == "forward":
        kl_term = (mx.exp(log_t) * (log_t - log_s)).sum(-1)
    else:
        kl_term = (mx.exp(log_s) * (log_s - log_t)).sum(-1)
    denom = mx.maximum(mask.sum(), 1)
    ce_m = (ce * mask).sum() / denom
    kl_m = (kl_term * mask).sum() / denom
    agree = ((mx.argmax(s_top, -1) == mx.argmax(teacher_logits, -1)) * mask).sum() / denom
    del n
    return alpha * ce_m + beta * kl_m, ce_m, kl_m, agree


def make_batch(records: List[Dict[str, mx.array]], backbone: Backbone, top_n: int, num_heads: int):
    """Pad a list of cached sequences into arrays, with each head's targets and
    teacher top-N mapped into its sequence's token set U (`union`, (B, U))."""
    L = max(int(r["tokens"].shape[0]) for r in records)
    B = len(records)
    toks = np.zeros((B, L), np.int32)
    lens = np.zeros(B, np.int32)
    starts = np.zeros(B, np.int32)  # first answer token (0: no prompt, or a cache without it)
    hid_rows = []
    for i, r in enumerate(records):
        n = int(r["tokens"].shape[0])
        toks[i, :n] = np.array(r["tokens"])
        lens[i] = n
        if "prompt_len" in r:
            starts[i] = int(r["prompt_len"].item())
        hid_rows.append(mx.pad(r["hidden"].astype(mx.float32), [(0, L - n), (0, 0)]))
    hidden = mx.stack(hid_rows)
    if "top_ids" in records[0] and records[0]["top_ids"].shape[-1] >= top_n:
        ids = mx.stack([mx.pad(r["top_ids"], [(0, L - r["top_ids"].shape[0]), (0, 0)]) for r in records])
        vals = mx.stack([mx.pad(r["top_logits"].astype(mx.float32), [(0, L - r["top_logits"].shape[0]), (0, 0)])
                         for r in records])
        if ids.shape[-1] > top_n:  # a cache prepared with a larger N serves a smaller one
            order = mx.argsort(-vals, axis=-1)[..., :top_n]
            ids, vals = mx.take_along_axis(ids, order, -1), mx.take_along_axis(vals, order, -1)
    else:  # the teacher from the hidden state: the backbone's own norm and projection
        logits = backbone.project(backbone.norm(backbone.last_state(hidden)))
        if top_n >= backbone.vocab_size:
            ids = mx.broadcast_to(mx.arange(backbone.vocab_size), logits.shape)
            vals = logits
        else:
            ids = mx.argpartition(-logits, kth=top_n - 1, axis=-1)[..., :top_n]
            vals = mx.take_along_axis(logits, ids, axis=-1)
    ids = mx.stop_gradient(ids)
    vals = mx.stop_gradient(vals)
    if ids.shape[-1] >= backbone.vocab_size:  # the full-vocabulary loss: U is the vocabulary
        return {"tokens": mx.array(toks), "lens": mx.array(lens), "starts": mx.array(starts), "hidden": hidden,
                "union": mx.arange(backbone.vocab_size, dtype=mx.int32), "teacher_idx": ids.astype(mx.int32),
                "teacher_logits": vals, "token_idx": mx.array(toks), "num_tokens": int(lens.sum()),
                "answer_tokens": int((lens - starts).sum())}
    # U per sequence (its teacher top-N sets and its tokens), padded to the
    # longest: half the rows of one union over the whole batch, so the student's
    # projection costs half as much.
    ids_np = np.array(ids)
    unions = [np.unique(np.concatenate([ids_np[b, : lens[b]].reshape(-1), toks[b, : lens[b]]])) for b in range(B)]
    U = max(len(u) for u in unions)
    union = np.zeros((B, U), np.int32)
    teacher_idx = np.zeros(ids_np.shape, np.int32)
    token_idx = np.zeros((B, L), np.int32)
    for b, u in enumerate(unions):
        union[b, : len(u)], union[b, len(u):] = u, u[0]
        # padding positions look up anything in range (they are masked)
        teacher_idx[b] = np.minimum(np.searchsorted(u, ids_np[b]), len(u) - 1)
        token_idx[b] = np.minimum(np.searchsorted(u, toks[b]), len(u) - 1)
    return {
        "tokens": mx.array(toks), "lens": mx.array(lens), "starts": mx.array(starts), "hidden": hidden,
        "union": mx.array(union), "teacher_idx": mx.array(teacher_idx), "teacher_logits": vals,
        "token_idx": mx.array(token_idx), "num_tokens": int(lens.sum()),
        "answer_tokens": int((lens - starts).sum()),
    }


def _dropout(x: mx.array, p: float) -> mx.array:
    return x * (mx.random.bernoulli(1 - p, x.shape) / (1 - p)).astype(x.dtype) if p > 0 else x


def forward_heads(head_set: HeadSet, backbone: Backbone, batch, cfg: TrainConfig, train: bool = False):
    """Teacher-forced cascade over whole sequences; returns the summed loss and
    per-head metrics.  `train`: apply --dropout to each depth's inputs."""
    tokens, hidden = batch["tokens"], batch["hidden"]
    B, L = tokens.shape
    p = cfg.dropout if train else 0.0
    w_rows = backbone.projection_rows(batch["union"])
    entry = head_set.entry_hidden(backbone)
    hidden = _dropout(hidden, p)
    prev = entry(hidden) if entry is not None else hidden
    total = mx.array(0.0)
    metrics = []
    pos = mx.arange(L)[None]
    K = len(head_set.heads)
    for k in range(1, max(cfg.train_depth, K) + 1):
        # Depths beyond K loop the heads (the head set's loop policy): the same
        # module, trained on its own output, so that the engine's loop drafts well.
        head = head_set.head_for_depth(k)
        idx = next(i for i, h in enumerate(head_set.heads) if h is head)
        w = 1.0 if k <= K else cfg.loop_weight
        m = L - k  # positions 0..L-k-1 have an input token t_{i+k}
        if m < 2:
            break
        x = head(_dropout(prev[:, :m], p) if k > 1 else prev[:, :m],
                 _dropout(backbone.embed_tokens(tokens[:, k : k + m]), p))
        normed = head.norm(x)
        prev = normed if head_set.feedback_post_norm else x
        # position i predicts t_{i+k+1}; teacher at i+k; valid while i+k+1 < len,
        # and (unless prompt_loss) when t_{i+k+1} is an answer token
        student = w_rows(normed[:, : m - 1])
        target = pos[:, : m - 1] + k + 1
        valid = target < batch["lens"][:, None]
        if not cfg.prompt_loss:
            valid = valid & (target >= batch["starts"][:, None])
        mask = valid.astype(mx.float32)
        loss, ce, kl, agree = mtpd_loss(
            student, batch["token_idx"][:, k + 1 : k + m], batch["teacher_logits"][:, k : k + m - 1],
            batch["teacher_idx"][:, k : k + m - 1], mask, cfg.alpha[idx] * w, cfg.beta[idx] * w, cfg.kl,
        )
        if not cfg.trainable or idx in cfg.trainable:
            total = total + loss
        metrics.append((ce, kl, agree))
    return total, metrics


def teacher_forced_agreement(heads: HeadSet, backbone: Backbone, cache: dict, cfg: TrainConfig,
                             max_sequences: Optional[int] = None) -> List[float]:
    """Per-head top-1 agreement with the teacher's greedy token, over a cached set."""
    agree: List[List[float]] = []  # per depth (the trained depth may loop past the heads)
    n_seq = cache["sequences"] if max_sequences is None else min(max_sequences, cache["sequences"])
    recs = list(iter_sequences(cache, list(range(n_seq))))
    for b in range(0, len(recs), cfg.batch_size):
        batch = make_batch(recs[b : b + cfg.batch_size], backbone, cfg.top_n, len(heads.heads))
        _, metrics = forward_heads(heads, backbone, batch, cfg)
        n = batch["num_tokens"] if cfg.prompt_loss else batch["answer_tokens"]
        for k, (_, _, a) in enumerate(metrics):
            if k == len(agree):
                agree.append([0.0, 0.0])
            agree[k][0] += a.item() * n
            agree[k][1] += n
    return [a / max(n, 1) for a, n in agree]


def _schedule(cfg: TrainConfig):
    """Linear warm-up to the peak, then a cosine decay to 5% of it at the last step."""
    warm = min(cfg.warmup, max(cfg.steps - 1, 0))
    return optim.join_schedules(
        [optim.linear_schedule(1e-7, cfg.learning_rate, max(warm, 1)),
         optim.cosine_decay(cfg.learning_rate, max(cfg.steps - warm, 1), cfg.learning_rate * 0.05)],
        [max(warm, 1)],
    )


class Trainer:
    def __init__(self, model, head_set: HeadSet, cfg: TrainConfig, out: Path, train_cache: dict,
                 eval_cache: Optional[dict] = None, group=None):
        self.model, self.heads, self.cfg, self.out = model, head_set, cfg, Path(out)
        self.backbone = Backbone(model, head_set.features)
        self.train_cache, self.eval_cache = train_cache, eval_cache
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.world = group.size() if group is not None else 1
        for i, head in enumerate(head_set.heads):
            if cfg.trainable and i not in cfg.trainable:
                head.freeze()
        if cfg.trainable and 0 not in cfg.trainable and "fuse" in head_set:
            head_set.fuse.freeze()  # depth 1's entry belongs to the first head
        self.optimizer = optim.AdamW(learning_rate=_schedule(cfg), weight_decay=cfg.weight_decay)
        self.step, self.epoch, self.cursor = 0, 0, 0
        self.history: List[dict] = []
        self.best: Optional[dict] = None  # {"step", "score"} of the best held-out evaluation
        self.best_params: Optional[dict] = None
        self.loss_and_grad = nn.value_and_grad(head_set, self._loss)

    def _loss(self, batch):
        total, metrics = forward_heads(self.heads, self.backbone, batch, self.cfg, train=True)
        self._metrics = metrics
        return total

    # -- data ----------------------------------------------------------------
    def _batches(self):
        """Micro-batches forever, resumable at (epoch, cursor); each rank takes its share."""
        bs = self.cfg.batch_size
        while True:
            order = epoch_order(self.train_cache, self.cfg.seed, self.epoch)
            usable = len(order) - len(order) % (bs * self.world)
            if usable == 0:
                raise MTPDError(
                    f"{self.train_cache['sequences']} training sequences cannot fill one batch of "
                    f"{bs} x {self.world} processes: lower --batch-size or add data"
                )
            while self.cursor < usable:
                chunk = order[self.cursor : self.cursor + bs * self.world]
                mine = chunk[self.rank * bs : (self.rank + 1) * bs]
                self.cursor += bs * self.world
                yield list(iter_sequences(self.train_cache, mine))
            self.epoch, self.cursor = self.epoch + 1, 0

    # -- checkpoints -----------------------------------------------------------
    def save(self, path: Optional[Path] = None) -> None:
        if self.rank != 0:
            return
        path = Path(path or self.out)
        with atomic_dir(path, force=True) as tmp:
            self.heads.config["trained"] = True
            self.heads.config["training"] = asdict(self.cfg) | {"step": self.step}
            write_head_files(self.heads, tmp)
            opt_state = dict(tree_flatten(self.optimizer.state))
            mx.save_safetensors(str(tmp / OPT_FILE), {k: v for k, v in opt_state.items() if isinstance(v, mx.array)})
            state = {"step": self.step, "epoch": self.epoch, "cursor": self.cursor,
                     "config": asdict(self.cfg), "history": self.history, "best": self.best}
            (tmp / STATE_FILE).write_text(json.dumps(state))
            if (path / BEST_DIR).is_dir():  # the best evaluated step so far: what a resumed run exports
                shutil.copytree(path / BEST_DIR, tmp / BEST_DIR)

    def restore(self, path: Path) -> None:
        path = Path(path)
        state = json.loads((path / STATE_FILE).read_text())
        self.step, self.epoch, self.cursor = state["step"], state["epoch"], state["cursor"]
        self.history = state["history"]
        self.best = state.get("best")
        if self.best and (path / BEST_DIR / HEADS_WEIGHTS).exists():
            self.best_params = mx.load(str(path / BEST_DIR / HEADS_WEIGHTS))
            self.best_params.pop("draft_vocab", None)
        opt = mx.load(str(path / OPT_FILE))
        self.optimizer.init(self.heads.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(opt.items()))
        # training draws no random numbers (data order is numpy's, seeded per epoch)

    # -- evaluation ------------------------------------------------------------
    def evaluate(self, max_sequences: int = 64) -> Dict[str, List[float]]:
        if self.eval_cache is None:
            return {}
        return {"eval_agreement": teacher_forced_agreement(self.heads, self.backbone, self.eval_cache,
                                                           self.cfg, max_sequences)}

    # -- the loop --------------------------------------------------------------
    def plan_steps(self, deadline: float, evaluations: int = 8) -> int:
        """Set --steps to what fits before `deadline` (time.time()), with about
        `evaluations` held-out evaluations (and checkpoints) on the way: one training
        step and one evaluation are timed first (a step's second run: the first
        compiles), the warm-up scaled to the steps, the schedule rebuilt."""
        probe = self._batches()
        times = []
        for _ in range(2):
            batch = make_batch(next(probe), self.backbone, self.cfg.top_n, len(self.heads.heads))
            tic = time.perf_counter()
            loss, g = self.loss_and_grad(batch)
            mx.eval(loss, g)
            times.append(time.perf_counter() - tic)
        step = times[-1] * self.cfg.grad_accum * 1.15  # the update, the bookkeeping
        tic = time.perf_counter()
        self.evaluate()
        evaluation = time.perf_counter() - tic
        left = deadline - time.time() - evaluation  # the last evaluation
        evaluations = max(min(evaluations, int(0.25 * left / max(evaluation, 1e-6))), 1)
        steps = max(int((left - evaluations * evaluation) / step), 1)
        cfg = self.cfg
        cfg.steps = steps
        cfg.warmup = min(cfg.warmup, max(steps // 10, 1))
        cfg.eval_every = cfg.save_every = max(steps // evaluations, 1)
        self.optimizer = optim.AdamW(learning_rate=_schedule(cfg), weight_decay=cfg.weight_decay)
        self.epoch = self.cursor = 0  # the timing batches are trained on like the others
        print(f"[mlx_mtpd] {steps} training steps fit ({step:.2f} s a step, {evaluation:.1f} s an evaluation)",
              file=sys.stderr)
        return steps

    def train(self, progress: bool = True, deadline: Optional[float] = None) -> List[dict]:
        """Run to cfg.steps (or stop early: patience, or `deadline`, a time.time())."""
        from tqdm import tqdm

        cfg = self.cfg
        batches = self._batches()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=not progress or self.rank != 0)
        tok_count, tic = 0, time.perf_counter()
        last_good = self.step
        seen = self.history[-1].get("tokens_seen", 0) if self.history else 0
        seconds = self.history[-1].get("seconds", 0.0) if self.history else 0.0
        if not self.history and cfg.eval_every and self.eval_cache is not None and self.heads.config.get("trained"):
            # heads that start trained (--init-from) are evaluated first: a run that
            # never beats them exports them unchanged, never a worse head
            rec = {"step": 0, "tokens_seen": 0, "seconds": 0.0, **self.evaluate()}
            self._track_best(rec)
            self.history.append(rec)
        while self.step < cfg.steps:
            grads, loss_sum, metrics_sum = None, 0.0, None
            for _ in range(cfg.grad_accum):
                batch = make_batch(next(batches), self.backbone, cfg.top_n, len(self.heads.heads))
                loss, g = self.loss_and_grad(batch)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(loss, grads)
                loss_sum += loss.item()
                tok_count += batch["num_tokens"] * self.world
                seen += (batch["num_tokens"] if cfg.prompt_loss else batch["answer_tokens"]) * self.world
                m = [(c.item(), kl.item(), a.item()) for c, kl, a in self._metrics]
                metrics_sum = m if metrics_sum is None else [
                    tuple(x + y for x, y in zip(p, q)) for p, q in zip(metrics_sum, m)
                ]
            scale = 1.0 / cfg.grad_accum
            if self.world > 1:
                grads = tree_map(lambda x: mx.distributed.all_sum(x, group=self.group), grads)
                scale /= self.world
                loss_sum = mx.distributed.all_sum(mx.array(loss_sum), group=self.group).item() / self.world
            grads = tree_map(lambda x, s=scale: x * s, grads)
            loss_val = loss_sum / cfg.grad_accum
            if not math.isfinite(loss_val):
                bar.close()
                raise MTPDError(
                    f"loss became {loss_val} at step {self.step + 1}; the last good checkpoint "
                    f"(step {last_good}) is kept in {self.out}: lower --learning-rate and --resume"
                )
            self.optimizer.update(self.heads, grads)
            mx.eval(self.heads.parameters(), self.optimizer.state)
            if not _all_finite(self.heads.trainable_parameters()):
                bar.close()
                raise MTPDError(
                    f"parameters became NaN/inf at step {self.step + 1}; the last good checkpoint "
                    f"(step {last_good}) is kept in {self.out}: lower --learning-rate and --resume"
                )
            self.step += 1
            rec = {"step": self.step, "loss": loss_val,
                   "ce": [m[0] / cfg.grad_accum for m in metrics_sum],
                   "kl": [m[1] / cfg.grad_accum for m in metrics_sum],
                   "agreement": [m[2] / cfg.grad_accum for m in metrics_sum],
                   "tokens_per_s": tok_count / (time.perf_counter() - tic),
                   "tokens_seen": seen, "epoch": self.epoch,  # tokens with a loss so far (the learning curve's axis)
                   "seconds": seconds + time.perf_counter() - tic}
            stop = False
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                rec.update(self.evaluate())
                stop = self._track_best(rec)
            self.history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", acc="/".join(f"{a:.2f}" for a in rec["agreement"]),
                            tok_s=f"{rec['tokens_per_s']:.0f}")
            if cfg.save_every and self.step % cfg.save_every == 0 or stop:
                self.save()
                last_good = self.step
            if stop:
                if self.rank == 0:
                    print(f"[mlx_mtpd] no better held-out agreement in {cfg.patience} evaluations: "
                          f"stopping at step {self.step} (best: step {self.best['step']})", file=sys.stderr)
                break
            if deadline is not None and time.time() >= deadline:
                if self.eval_cache is not None and "eval_agreement" not in rec and cfg.eval_every:
                    rec.update(self.evaluate())  # the last steps count if they are the best
                    self._track_best(rec)
                if self.rank == 0:
                    print(f"[mlx_mtpd] out of time: stopping at step {self.step}", file=sys.stderr)
                break
        bar.close()
        self.save()
        return self.history

    def _track_best(self, rec: dict) -> bool:
        """Keep the parameters of the best held-out depth-1 agreement (saved in
        OUT/best); True when `patience` evaluations have passed without a better one.
        Patience counts from the best step trained, not from heads evaluated before
        their first step: those are kept if nothing beats them, but a run that starts
        from trained heads dips while its warm-up raises the learning rate and must
        not stop in that dip."""
        if "eval_agreement" not in rec:
            return False
        score = rec["eval_agreement"][0]
        if self.best is None or score > self.best["score"]:
            self.best = {"step": self.step, "score": score, "eval_agreement": list(rec["eval_agreement"])}
            self.best_params = dict(tree_flatten(self.heads.parameters()))
            if self.rank == 0:
                path = self.out / BEST_DIR
                path.mkdir(parents=True, exist_ok=True)
                write_head_files(self.heads, path)
            return False
        trained = [h for h in self.history + [rec] if h["step"] > 0 and "eval_agreement" in h]
        ref = max(trained, key=lambda h: h["eval_agreement"][0], default=self.best)  # the first best
        evals_since = (self.step - ref["step"]) // max(self.cfg.eval_every, 1)
        return bool(self.cfg.patience) and evals_since >= self.cfg.patience

    def use_best(self) -> Optional[dict]:
        """Load the best evaluated parameters into the heads (for export)."""
        if self.best_params is None:
            return None
        self.heads.load_weights(list(self.best_params.items()))
        mx.eval(self.heads.parameters())
        return self.best


def frequent_tokens(cache: dict, size: int, tokenizer) -> mx.array:
    """The `size` most frequent tokens of the training answers (the whole text
    where there is no prompt; ties: lower id), plus the end-of-sequence tokens:
    the heads' draft vocabulary."""
    counts = np.zeros(cache["vocab_size"], np.int64)
    for rec in iter_sequences(cache):
        start = int(rec["prompt_len"].item()) if "prompt_len" in rec else 0
        np.add.at(counts, np.array(rec["tokens"])[start:], 1)
    for t in getattr(tokenizer, "eos_token_ids", []) or []:
        counts[t] = counts.max() + 1
    order = np.lexsort((np.arange(len(counts)), -counts))[:size]
    return mx.array(np.sort(order).astype(np.int32))


def _all_finite(params) -> bool:
    checks = [mx.isfinite(v).all() for _, v in tree_flatten(params)]
    return bool(mx.all(mx.stack(checks)).item()) if checks else True


def build_heads(model, args) -> HeadSet:
    """New heads, or heads from --init-from (given a pass-through fusion of
    --features if they have none), extended to --extend-to by copying."""
    from ..heads import parse_features

    features = parse_features(getattr(args, "features", None))
    if args.init_from:
        hs = load_heads(Path(args.init_from), model)
        if features and hs.features != sorted(features):
            hs.add_fusion(Backbone(model), features)
        k_old = hs.num_heads
        if args.extend_to:
            if args.extend_to <= k_old:
                raise MTPDError(f"--extend-to {args.extend_to} must exceed the {k_old} heads of --init-from")
            import copy

            for i in range(k_old, args.extend_to):
                hs.heads.append(copy.deepcopy(hs.heads[i % k_old]))
            hs.config["num_heads"] = args.extend_to
            hs.config["extended_from"] = k_old
        return hs
    return init_heads(model, args.num_heads, draft_vocab=args.draft_vocab, features=features)


def build_parser() -> argparse.ArgumentParser:
    """train's options (`distill` builds its runs from the same parser)."""
    p = argparse.ArgumentParser(prog="mlx_mtpd train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="MLX model folder (default: SmolLM2-135M-Instruct).")
    p.add_argument("--data", nargs="+", required=True,
                   help="gen-data folders/files, .jsonl (text or messages) or .txt files.")
    p.add_argument("--eval-data", nargs="+", default=None, help="Held-out data for evaluation.")
    p.add_argument("--out", required=True, help="Output head set / checkpoint folder.")
    p.add_argument("--cache-dir", default=None, help="Where the backbone's outputs are cached (default OUT.cache).")
    p.add_argument("--num-heads", type=int, default=1)
    p.add_argument("--features", default=None,
                   help="Fuse these backbone layers' outputs into depth 1 beside the last state "
                        "(comma-separated indices, e.g. 2,15,27 for a 30-layer model; default: none).")
    p.add_argument("--init-from", default=None, help="Start from this head set (fine-tune or extend).")
    p.add_argument("--extend-to", type=int, default=None,
                   help="Copy heads 1..K into K+1..this, train only the new ones.")
    p.add_argument("--train-depth", type=int, default=0,
                   help="Train the cascade this deep, looping the heads past the last one (the training "
                        "form of looped extension: a head learns from its own output); default: the heads.")
    p.add_argument("--loop-weight", type=float, default=1.0, help="Loss weight of the looped depths.")
    p.add_argument("--prompt-loss", action="store_true",
                   help="Also train on prompt tokens (default: only answer tokens of gen-data/chat data).")
    p.add_argument("--alpha", type=float, nargs="+", default=[1.0], help="CE weight(s), per head or one.")
    p.add_argument("--beta", type=float, nargs="+", default=None,
                   help="KL weight(s) (default 1.0 with one head, 0.5 with more).")
    p.add_argument("--top-n", type=int, default=10000, help="Teacher top-N for the loss (clipped to the vocabulary).")
    p.add_argument("--kl", choices=("forward", "reverse"), default="forward")
    p.add_argument("--learning-rate", "--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="Dropout on each depth's inputs (backbone features, token embeddings) in training; "
                        "a run with dropout resumes to a different (equally valid) result.")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--patience", type=int, default=0,
                   help="Stop after this many evaluations without a better held-out depth-1 agreement "
                        "(0: run all steps).  With --eval-data, --export writes the best evaluated heads.")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--export", default=None,
                   help="Also write the trained heads alone (no optimizer state) to this folder.")
    p.add_argument("--export-dtype", choices=("float32", "float16", "bfloat16"), default="float16",
                   help="Precision of the exported heads (default float16).")
    p.add_argument("--export-checkpoint", default=None,
                   help="Also write the exported heads at full precision here (what the next run continues "
                        "from with --init-from).")
    p.add_argument("--resume", action="store_true", help="Continue from the checkpoint in --out.")
    p.add_argument("--force", action="store_true", help="Replace an existing --out.")
    return p


def main(argv=None) -> None:
    from ..errors import run_main

    args = build_parser().parse_args(argv)
    run_main("train", lambda: train_cli(args))


def train_cli(args, deadline: Optional[float] = None, loaded=None) -> Optional[dict]:
    """Run train's command line (`args` from build_parser).  With `deadline` (a
    time.time() value), training stops there with the best heads so far, and a new
    run's --steps 0 means: as many steps as fit before it (timed on the first ones).
    `loaded`: the model and tokenizer, already loaded.  Returns {"best": the
    exported step and its held-out agreement, "history", "steps"}."""
    from .data_cache import caches_for
    from ..utils import load

    group = None
    if mx.distributed.is_available():
        g = mx.distributed.init()
        group = g if g.size() > 1 else None
    rank = group.rank() if group else 0
    out = Path(args.out)
    if out.exists() and not (args.resume or args.force):
        raise MTPDError(f"{out} already exists: pass --resume to continue it or --force to start over")
    if args.resume and not (out / STATE_FILE).exists():
        raise MTPDError(f"nothing to resume in {out} (no {STATE_FILE})")
    mx.random.seed(args.seed)
    model, tokenizer = loaded if loaded is not None else load(args.model)[:2]
    model.freeze()
    heads = load_heads(out, model) if args.resume else build_heads(model, args)
    backbone = Backbone(model, heads.features)
    k = heads.num_heads
    beta = args.beta or [1.0 if k == 1 else 0.5]
    # copy-and-train: only the new heads learn; the old ones stay as they were
    trainable = list(range(heads.config["extended_from"], k)) if args.extend_to and not args.resume else []
    cfg = TrainConfig(
        num_heads=k, alpha=per_head(args.alpha, k, "alpha"), beta=per_head(beta, k, "beta"),
        top_n=min(args.top_n, backbone.vocab_size), kl=args.kl, learning_rate=args.learning_rate,
        warmup=args.warmup, steps=args.steps, weight_decay=args.weight_decay, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seed=args.seed, eval_every=args.eval_every,
        save_every=args.save_every, trainable=trainable, train_depth=args.train_depth,
        loop_weight=args.loop_weight, prompt_loss=args.prompt_loss, patience=args.patience,
        dropout=args.dropout,
    )
    if not 0 <= args.dropout < 1:
        raise MTPDError(f"--dropout must be in [0, 1) (got {args.dropout})")
    if args.train_depth and args.train_depth < k:
        raise MTPDError(f"--train-depth {args.train_depth} is below the {k} heads: give at least {k}")
    if args.resume:
        saved = json.loads((out / STATE_FILE).read_text())["config"]
        cfg = TrainConfig(**saved) if saved else cfg
        cfg.steps = args.steps or cfg.steps  # 0: the steps the run planned
    cache_root = Path(args.cache_dir) if args.cache_dir else out.with_name(out.name + ".cache")

    def cache_for(name, paths):
        return caches_for(model, tokenizer, paths, cache_root / name, seq_len=args.seq_len, top_n=cfg.top_n,
                          features=backbone.features, backbone=backbone, name=name, may_prepare=rank == 0)

    train_cache = cache_for("train", args.data)
    if not (args.resume or args.init_from) and 0 < args.draft_vocab < backbone.vocab_size:
        heads.set_draft_vocab(frequent_tokens(train_cache, args.draft_vocab, tokenizer))
    eval_cache = cache_for("eval", args.eval_data) if args.eval_data else None
    trainer = Trainer(model, heads, cfg, out, train_cache, eval_cache, group)
    if args.resume:
        trainer.restore(out)
    elif deadline is not None and args.steps == 0:
        trainer.plan_steps(deadline)
    history = trainer.train(deadline=deadline)
    if rank == 0 and args.export:
        from ..heads import save_heads

        best = trainer.use_best()
        if best is not None:
            heads.config["training"]["exported_step"] = best["step"]
            heads.config["training"]["exported_eval_agreement"] = round(best["score"], 4)
            print(f"[mlx_mtpd] exporting the best evaluated heads: step {best['step']}, held-out "
                  f"agreement {best['score']:.3f}", file=sys.stderr)
        save_heads(heads, Path(args.export), force=True, dtype=args.export_dtype)
        if best is not None and best.get("eval_agreement"):
            # the acceptance `auto` starts from until `eval-heads --save` measures it in decoding
            from ..files import EVAL_FILE, write_json_atomic

            write_json_atomic(Path(args.export) / EVAL_FILE, {
                "heads": str(args.export), "num_heads": heads.num_heads, "source": "train --export",
                "step": best["step"], "teacher_forced_agreement": [float(a) for a in best["eval_agreement"]]})
        if args.export_checkpoint:
            save_heads(heads, Path(args.export_checkpoint), force=True)
    if rank == 0 and history and "loss" in history[-1]:
        last = history[-1]
        print(f"[mlx_mtpd] step {last['step']}: loss {last['loss']:.4f}, agreement "
              f"{' '.join(f'{a:.3f}' for a in last['agreement'])}, {last['tokens_per_s']:.0f} tokens/s "
              f"-> {out}", file=sys.stderr)
    return {"best": trainer.best, "history": history, "steps": cfg.steps}
