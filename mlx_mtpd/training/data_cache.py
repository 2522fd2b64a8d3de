"""Training data for the heads: token sequences, and the frozen backbone's
outputs on them cached to disk.

The backbone runs once per sequence, without gradients.  What is cached per
token is its hidden state (float16, or bfloat16 beyond its range; what depth 1 takes) and the teacher's top-N
token ids and logits (what the MTP-D loss needs); nothing of the size of the
vocabulary.  Shards are streamed back, so memory stays bounded for any dataset.
"""

from __future__ import annotations

import bisect
import json
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..errors import MTPDError
from ..files import atomic_dir

CACHE_INDEX = "index.json"
MAX_CACHED_TOP_N = 1024  # above this the teacher is recomputed from the hidden state
HALF_MAX = 65000.0  # float16's largest finite value is 65504
LOGITS_BUDGET = 1 << 27  # logits a cache-preparing forward holds at most (512 MB in float32)


class TokenSeq(list):
    """A training sequence's token ids, with how many of them are the prompt
    (chat template, system and user turns): the heads learn to draft answers, so
    the loss counts only the positions whose target is an answer token."""

    def __init__(self, ids, prompt_len: int = 0, key: Optional[str] = None):
        super().__init__(ids)
        self.prompt_len = int(prompt_len)
        self.key = key  # a data set answer's job id


def _existing_files(p) -> List[Path]:
    """`_data_files(p)`, or a one-line error when the path names no data."""
    files = _data_files(Path(p))
    if not files or not all(f.exists() for f in files):
        raise MTPDError(f"training data {p} not found (or holds no .jsonl/.txt files)")
    return files


def _data_files(path: Path) -> List[Path]:
    """The files a --data path names: a token data set's chunks (`dataset.py`), a
    folder's .jsonl and .txt files, or the file itself."""
    from .dataset import chunk_files, is_dataset

    if is_dataset(path):
        return chunk_files(path)
    return sorted(path.glob("*.jsonl")) + sorted(path.glob("*.txt")) if path.is_dir() else [path]


def read_sequences(paths: List[str], tokenizer, seq_len: int) -> Tuple[List[List[int]], Dict[str, int]]:
    """Token sequences from gen-data output (token ids), JSONL (`text` or chat
    `messages`, rendered with the chat template) and plain text files.

    Returns (sequences, counts) where counts says what was skipped and why."""
    seqs: List[List[int]] = []
    counts = {"records": 0, "skipped_invalid": 0, "skipped_long_prompt": 0, "truncated": 0}
    eos = tokenizer.eos_token_id
    for p in paths:
        for f in _existing_files(p):
            if f.stat().st_size == 0:
                raise MTPDError(f"training data file {f} is empty")
            if f.suffix == ".jsonl":
                _read_jsonl(f, tokenizer, seq_len, eos, seqs, counts)
            elif f.suffix == ".npz":
                _read_chunk(f, seq_len, seqs, counts)
            else:
                ids = tokenizer.encode(f.read_text())
                for i in range(0, len(ids) - 1, seq_len):
                    if len(ids[i : i + seq_len]) > 1:
                        seqs.append(ids[i : i + seq_len])
                        counts["records"] += 1
    if not seqs:
        raise MTPDError(f"no usable training sequences in {', '.join(map(str, paths))} ({counts})")
    return seqs, counts


def _read_jsonl(f: Path, tokenizer, seq_len, eos, seqs, counts) -> None:
    with open(f) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                counts["skipped_invalid"] += 1
                continue
            if not isinstance(obj, dict):
                counts["skipped_invalid"] += 1
                continue
            if "prompt_tokens" in obj and "completion_tokens" in obj:
                prompt = list(obj["prompt_tokens"])
                ids = prompt + list(obj["completion_tokens"])
                if obj.get("finish_reason") == "stop" and eos is not None:
                    ids.append(eos)
            elif isinstance(obj.get("messages"), list):
                try:
                    ids = list(tokenizer.apply_chat_template(obj["messages"]))
                    prompt = list(tokenizer.apply_chat_template(obj["messages"][:-1], add_generation_prompt=True))
                except Exception:
                    counts["skipped_invalid"] += 1
                    continue
            elif isinstance(obj.get("text"), str):
                ids, prompt = tokenizer.encode(obj["text"]), []
            else:
                counts["skipped_invalid"] += 1
                continue
            _add_sequence(ids, len(prompt), seq_len, seqs, counts)


def _read_chunk(f: Path, seq_len, seqs, counts) -> None:
    from .dataset import chunk_records

    for rec in chunk_records(f):
        _add_sequence(rec["tokens"], rec["prompt_len"], seq_len, seqs, counts, key=rec["id"])


def _add_sequence(ids, prompt_len, seq_len, seqs, counts, key=None) -> None:
    """Keep a (prompt + answer) sequence, cut to seq_len; a prompt that fills it is skipped."""
    if prompt_len >= seq_len - 1:
        counts["skipped_long_prompt"] += 1
        return
    if len(ids) > seq_len:
        counts["truncated"] += 1
        ids = ids[:seq_len]
    if len(ids) > 2:
        seqs.append(TokenSeq(ids, prompt_len, key))
        counts["records"] += 1


def half(x: mx.array) -> mx.array:
    """16 bits a value: float16, or bfloat16 where a value is beyond float16's range
    (Gemma's residual stream reaches 10^5: float16 would store inf)."""
    return x.astype(mx.float16) if mx.abs(x).max().item() < HALF_MAX else x.astype(mx.bfloat16)


def prepare_cache(model, seqs: List[List[int]], out: Path, top_n: int, *, batch_size: int = 4,
                  shard_size: int = 64, force: bool = False, desc: str = "backbone",
                  signature: Optional[dict] = None, features: Optional[List[int]] = None,
                  captured: Optional[Dict[str, dict]] = None) -> Path:
    """Run the frozen backbone over `seqs` and write the cache (atomically).
    `features`: the layers fused heads take (their outputs are cached before the last state).
    `captured`: what `capture.py` kept while generating, by job id: those
    sequences are written without a second backbone pass."""
    from tqdm import tqdm

    from ..heads import Backbone

    bb = Backbone(model, features)
    vocab = bb.vocab_size
    top_n = min(top_n, vocab)
    cache_top_n = top_n if top_n <= MAX_CACHED_TOP_N else 0
    captured = captured if cache_top_n else None  # a capture keeps at most MAX_CACHED_TOP_N
    have = [i for i in range(len(seqs)) if captured is not None and getattr(seqs[i], "key", None) in captured]
    have_set = set(have)
    order = sorted((i for i in range(len(seqs)) if i not in have_set), key=lambda i: len(seqs[i]))
    n_tokens = sum(len(s) for s in seqs)
    tic = time.perf_counter()
    shards, shard, shard_id, in_shard = [], {}, 0, 0
    with atomic_dir(out, force=force) as tmp, tqdm(total=n_tokens, desc=desc, unit="tok") as bar:
        def flush():
            nonlocal shard, shard_id, in_shard
            if shard:
                name = f"shard_{shard_id:05d}.safetensors"
                mx.save_safetensors(str(tmp / name), shard)
                shards.append({"file": name, "sequences": in_shard})
                shard, shard_id, in_shard = {}, shard_id + 1, 0

        n_seq = 0

        def add(seq, hidden, ids, vals):
            nonlocal n_seq, in_shard
            key = f"{n_seq:07d}"
            shard[f"{key}.tokens"] = mx.array(seq, dtype=mx.int32)
            shard[f"{key}.prompt_len"] = mx.array([getattr(seq, "prompt_len", 0)], dtype=mx.int32)
            shard[f"{key}.hidden"] = half(hidden)
            if cache_top_n:
                shard[f"{key}.top_ids"] = ids.astype(mx.int32)
                shard[f"{key}.top_logits"] = vals.astype(mx.float16)
            n_seq += 1
            in_shard += 1
            if in_shard == shard_size:
                flush()

        for i in have:
            c, n = captured[seqs[i].key], len(seqs[i])
            if c["hidden"].shape[-1] != bb.hidden_size * (len(bb.features) + 1) or c["top_ids"].shape[-1] < top_n:
                raise MTPDError("a capture does not match this cache's layers or --top-n: generate it again")
            ids, vals = mx.array(c["top_ids"][:n]), mx.array(c["top_logits"][:n])
            if ids.shape[-1] > top_n:  # the N largest of a larger capture
                keep = mx.argsort(-vals.astype(mx.float32), axis=-1)[:, :top_n]
                ids, vals = mx.take_along_axis(ids, keep, -1), mx.take_along_axis(vals, keep, -1)
            add(seqs[i], mx.array(c["hidden"][:n]), ids, vals)
            bar.update(n)
        b = 0
        while b < len(order):  # fewer sequences a forward where the logits would be large (big vocabularies)
            longest = len(seqs[order[min(b + batch_size, len(order)) - 1]])  # `order` is by length
            idx = order[b : b + max(1, min(batch_size, LOGITS_BUDGET // max(longest * vocab, 1)))]
            b += len(idx)
            L = max(len(seqs[i]) for i in idx)
            toks = np.zeros((len(idx), L), np.int32)
            for r, i in enumerate(idx):
                toks[r, : len(seqs[i])] = seqs[i]
            logits, hidden = bb.forward_batch(mx.array(toks))
            logits = logits.astype(mx.float32)
            if cache_top_n:
                ids = mx.argpartition(-logits, kth=cache_top_n - 1, axis=-1)[..., :cache_top_n]
                vals = mx.take_along_axis(logits, ids, axis=-1)
                mx.eval(hidden, ids, vals)
            else:
                mx.eval(hidden)
            for r, i in enumerate(idx):
                n = len(seqs[i])
                add(seqs[i], hidden[r, :n], ids[r, :n] if cache_top_n else None, vals[r, :n] if cache_top_n else None)
            bar.update(sum(len(seqs[i]) for i in idx))
            bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - tic):.0f}")
            mx.clear_cache()
        flush()
        elapsed = time.perf_counter() - tic
        index = {
            "sequences": len(seqs), "tokens": n_tokens, "top_n": top_n, "cached_top_n": cache_top_n,
            "hidden_size": bb.hidden_size, "features": bb.features, "vocab_size": vocab, "backbone": bb.fingerprint(),
            "shards": shards, "prep_seconds": elapsed, "prep_tokens_per_s": n_tokens / max(elapsed, 1e-9),
            "answer_tokens": sum(len(s) - getattr(s, "prompt_len", 0) for s in seqs),
            "signature": signature, "captured_sequences": len(have),
            "backbone_tokens": n_tokens - sum(len(seqs[i]) for i in have),
        }
        (tmp / CACHE_INDEX).write_text(json.dumps(index, indent=2))
    print(f"[mlx_mtpd] {desc}: {n_tokens} tokens in {elapsed:.0f} s "
          f"({n_tokens / max(elapsed, 1e-9):.0f} tokens/s) -> {out}", file=sys.stderr)
    return Path(out)


def open_cache(path: Path, backbone=None) -> dict:
    path = Path(path)
    if not (path / CACHE_INDEX).exists():
        raise MTPDError(f"{path} is not a prepared data cache (no {CACHE_INDEX})")
    index = json.loads((path / CACHE_INDEX).read_text())
    if backbone is not None:
        from ..heads import check_fingerprint

        check_fingerprint({"backbone": index["backbone"]}, backbone, path)
        have = list(index.get("features") or [])
        if not set(backbone.features) <= set(have):
            raise MTPDError(
                f"the data cache {path} holds the outputs of layers {have} "
                f"but these heads fuse {backbone.features}: prepare it again (delete it)"
            )
        if have != list(backbone.features):  # a cache of more layers serves heads that fuse fewer
            index["select"] = [have.index(i) for i in backbone.features] + [len(have)]
    index["path"] = str(path)
    return index


def file_signature(f: Path, seq_len: int, top_n: int) -> Dict[str, object]:
    """What one data file's cache is made from: the file (path, size, mtime),
    --seq-len, --top-n.  A cache whose signature differs is prepared again; so
    is one that lacks a layer the heads fuse (one with more layers serves)."""
    st = f.stat()
    return {"file": str(f.resolve()), "size": st.st_size, "mtime": int(st.st_mtime), "seq_len": int(seq_len),
            "top_n": int(top_n), "format": 3}


def file_cache_dir(root: Path, f: Path, sig: dict) -> Path:
    import hashlib

    digest = hashlib.sha1(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root) / f"{f.name}-{digest}"


def caches_for(model, tokenizer, paths: List[str], root: Path, *, seq_len: int, top_n: int,
               features: Optional[List[int]] = None, backbone=None, name: str = "train",
               may_prepare: bool = True) -> dict:
    """One cache per data file under ROOT (a data set's chunks, .jsonl, .txt),
    prepared where missing or where the file changed, merged into one index.
    A data set that grows by a chunk costs one backbone pass over that chunk
    only; `gen-data --cache-into` fills a new chunk's cache while generating it,
    so its tokens never take a second pass."""
    root = Path(root)
    files = [f for p in paths for f in _existing_files(p)]
    indexes, wanted = [], set()
    for f in files:
        sig = file_signature(f, seq_len, top_n)
        d = file_cache_dir(root, f, sig)
        wanted.add(d.name)
        ok = (d / CACHE_INDEX).exists() and set(features or []) <= set(open_cache(d).get("features") or [])
        if not ok:
            if not may_prepare:
                raise MTPDError(f"prepare the data cache {d} first (run once with one process)")
            stale = [q for q in root.glob(f"{f.name}-*") if q.is_dir()]
            seqs, counts = read_sequences([str(f)], tokenizer, seq_len)
            skipped = {k: v for k, v in counts.items() if k != "records" and v}
            print(f"[mlx_mtpd] {name}: {f.name}: {counts['records']} sequences" +
                  (f" (skipped/truncated: {skipped})" if skipped else "") +
                  ("; it changed since its cache was made: preparing it again" if stale else ""), file=sys.stderr)
            prepare_cache(model, seqs, d, top_n, desc=f"backbone ({name}: {f.name})", signature=sig,
                          features=features, force=True)
        indexes.append(open_cache(d, backbone))
    names = {f.name for f in files}
    for q in root.glob("*"):  # caches of these files made before they changed (other files' caches stay)
        stale = q.name not in wanted and q.name.rsplit("-", 1)[0] in names
        if stale and q.is_dir() and (q / CACHE_INDEX).exists() and may_prepare:
            import shutil

            shutil.rmtree(q, ignore_errors=True)
    return merge_caches(indexes)


def merge_caches(indexes: List[dict]) -> dict:
    """One index over several caches: their shards in order, each read from its own folder."""
    if len(indexes) == 1:
        return indexes[0]
    shards = []
    for idx in indexes:
        local = 0
        for s in idx["shards"]:
            shards.append({**s, "dir": idx["path"], "key0": local, "select": idx.get("select")})
            local += s["sequences"]
    merged = dict(indexes[0])
    merged.pop("select", None)
    merged.update(shards=shards, parts=[i["path"] for i in indexes],
                  **{k: sum(i[k] for i in indexes) for k in ("sequences", "tokens", "answer_tokens")})
    return merged


def epoch_order(index: dict, seed: int, epoch: int) -> List[int]:
    """Shard-major shuffled order: shards permuted, sequences permuted within
    each, so one shard at a time is in memory.  Deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    starts, start = [], 0
    for s in index["shards"]:
        starts.append((start, s["sequences"]))
        start += s["sequences"]
    order = []
    for j in rng.permutation(len(starts)):
        lo, n = starts[j]
        order.extend(int(lo + k) for k in rng.permutation(n))
    return order


def iter_sequences(index: dict, order: Optional[List[int]] = None) -> Iterator[Dict[str, mx.array]]:
    """Sequences from the cache in `order` (global sequence numbers), one shard
    in memory at a time when the order is shard-major."""
    bounds, start = [], 0
    for s in index["shards"]:
        shard_file = Path(s.get("dir") or index["path"]) / s["file"]
        select = s["select"] if "select" in s else index.get("select")
        bounds.append((start, s.get("key0", start), shard_file, select))
        start += s["sequences"]
    order = list(range(index["sequences"])) if order is None else order
    loaded_file, data = None, None
    starts = [b[0] for b in bounds]
    for i in order:
        lo, key0, f, select = bounds[bisect.bisect_right(starts, i) - 1]
        if f != loaded_file:
            data, loaded_file = mx.load(str(f)), f
        key = f"{key0 + i - lo:07d}"
        rec = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(key + ".")}
        if select is not None:  # the layers these heads fuse, out of a cache of more
            h = rec["hidden"]
            h = h.reshape(h.shape[0], -1, index["hidden_size"])[:, mx.array(select)]
            rec["hidden"] = h.reshape(h.shape[0], -1)
        yield rec
