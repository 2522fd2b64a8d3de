"""The growing data set: the backbone's own answers as token ids, committed in
compact chunks beside a manifest, so every run of the recipe adds to the last.

    data/tokens/manifest.json     backbone fingerprint, one entry per chunk
    data/tokens/chunk-0001.npz    token ids (uint16 where the vocabulary fits)

A chunk holds one `gen-data --pack-into` run: for each answer its job id (a
hash of the conversation and the temperature, so a later run skips what is
done), the prompt length, the temperature and whether it ended with the
end-of-sequence token.  The trainer reads a chunk folder like any other
`--data` path.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import numpy as np

from ..errors import MTPDError
from ..files import write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "mlx-mtpd-tokens-1"


def job_id(messages: list, temp: float) -> str:
    """A job's identity across prompt files and runs: the conversation and the temperature."""
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    return f"{digest}-t{float(temp):g}"


def is_dataset(path: Path) -> bool:
    return (Path(path) / MANIFEST).exists()


def read_manifest(path: Path) -> dict:
    f = Path(path) / MANIFEST
    if not f.exists():
        return {"format": FORMAT, "backbone": None, "chunks": []}
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise MTPDError(f"{f} is not valid JSON ({e}): restore it from git") from None
    if manifest.get("format") != FORMAT:
        raise MTPDError(f"{f} is not a token data manifest ({FORMAT})")
    return manifest


def load_chunk(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/ValueError on a truncated or foreign file
        raise MTPDError(f"{path} is not a readable token chunk ({e}): restore it from git") from None


def answered(path: Path) -> set:
    """Job ids already in the data set."""
    done = set()
    for c in read_manifest(path)["chunks"]:
        done.update(str(x) for x in load_chunk(Path(path) / c["file"])["ids"])
    return done


def chunk_records(f: Path) -> Iterator[dict]:
    """The answers of one chunk file: id, tokens, prompt_len, temp, stopped."""
    z = load_chunk(f)
    ends = np.cumsum(z["lengths"])
    for i, end in enumerate(ends):
        start = end - z["lengths"][i]
        yield {"id": str(z["ids"][i]), "tokens": z["tokens"][start:end].astype(np.int64).tolist(),
               "prompt_len": int(z["prompt_lens"][i]), "temp": float(z["temps"][i]),
               "stopped": bool(z["stopped"][i])}


def iter_records(path: Path) -> Iterator[dict]:
    """Every answer of the data set, chunk by chunk (see `chunk_records`)."""
    for c in read_manifest(path)["chunks"]:
        yield from chunk_records(Path(path) / c["file"])


def pack(records: Iterable[dict], path: Path, *, eos: Optional[int], backbone: dict, meta: dict) -> Optional[dict]:
    """Add gen-data records (prompt_tokens, completion_tokens, finish_reason,
    temp, id) not yet in the data set as a new chunk; returns its manifest entry
    (None when nothing was new).  The chunk is written under a temporary name and
    renamed, then the manifest is rewritten the same way: an interruption leaves
    the data set as it was (at worst an unlisted chunk file, which the next
    pack overwrites)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(path)
    if manifest["backbone"] is not None:
        from ..heads import compare_fingerprints

        compare_fingerprints(manifest["backbone"], backbone, path)
    done = answered(path)
    toks, lengths, plens, temps, stopped, ids = [], [], [], [], [], []
    for rec in records:
        if rec["id"] in done:
            continue
        done.add(rec["id"])
        seq = list(rec["prompt_tokens"]) + list(rec["completion_tokens"])
        stop = rec.get("finish_reason") == "stop"
        if stop and eos is not None:
            seq.append(eos)
        toks.append(np.asarray(seq, np.int64))
        lengths.append(len(seq))
        plens.append(len(rec["prompt_tokens"]))
        temps.append(float(rec.get("temp", 0.0)))
        stopped.append(stop)
        ids.append(rec["id"])
    if not ids:
        return None
    vocab = int(backbone.get("vocab_size", 1 << 31))
    flat = np.concatenate(toks)
    dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    n = len(manifest["chunks"]) + 1
    name = f"chunk-{n:04d}.npz"
    tmp = path / f".{name}.tmp.npz"
    np.savez_compressed(tmp, tokens=flat.astype(dtype), lengths=np.array(lengths, np.int32),
                        prompt_lens=np.array(plens, np.int32), temps=np.array(temps, np.float32),
                        stopped=np.array(stopped, bool), ids=np.array(ids))
    tmp.rename(path / name)
    entry = {"file": name, "answers": len(ids), "tokens": int(flat.size),
             "answer_tokens": int(sum(lengths) - sum(plens)), "temps": sorted(set(temps)),
             "bytes": (path / name).stat().st_size, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **meta}
    manifest["backbone"] = manifest["backbone"] or backbone
    manifest["chunks"].append(entry)
    manifest["totals"] = {k: sum(c.get(k, 0) for c in manifest["chunks"])
                          for k in ("answers", "tokens", "answer_tokens", "cpu_seconds", "bytes")}
    write_json_atomic(path / MANIFEST, manifest)
    return entry


def chunk_files(path: Path) -> List[Path]:
    return [Path(path) / c["file"] for c in read_manifest(path)["chunks"]]
