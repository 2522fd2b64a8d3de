"""`mlx_mtpd gen-data`: the backbone answers prompts; its answers are training text.

Self-distillation needs no labels: the heads learn exactly what they will be
asked to draft.  Generation is batched with mlx-lm's BatchGenerator (on a CPU a
batch of 16 or more makes several times more tokens per second than one
sequence), greedy and sampled, with the model's chat template.  Records are
appended as they finish, so an interrupted run keeps its work and `--resume`
skips what is done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterable, List

from ..errors import MTPDError
from ..prompts import DATA_DIR, chat_messages, read_prompts  # noqa: F401  (read_prompts: re-exported)

OUTPUT_FILE = "data.jsonl"


def generate_answers(model, tokenizer, jobs: List[dict], max_tokens: int, batch_size: int,
                     temp: float, seed: int, stop=None) -> Iterable[dict]:
    """Yield finished records as the batch generator completes them; when `stop()`
    turns true, the answers under way end there (finish_reason "length")."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        sampler=make_sampler(temp=temp),
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8),
    )
    try:
        prompt_ids = [tokenizer.apply_chat_template(j["messages"], add_generation_prompt=True) for j in jobs]
        uids = gen.insert(prompt_ids, [max_tokens] * len(jobs))
        by_uid = {u: (j, p) for u, j, p in zip(uids, jobs, prompt_ids)}
        tokens = {u: [] for u in uids}
        while responses := gen.next_generated():
            if stop is not None and stop():
                for uid in list(tokens):
                    job, pids = by_uid[uid]
                    out = tokens.pop(uid)
                    if out:
                        yield {**job, "messages": job["messages"] + [
                            {"role": "assistant", "content": tokenizer.decode(out)}],
                            "prompt_tokens": list(pids), "completion_tokens": out, "finish_reason": "length"}
                return
            for r in responses:
                if r.finish_reason != "stop":
                    tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    job, pids = by_uid[r.uid]
                    out = tokens.pop(r.uid)
                    yield {
                        **job,
                        "messages": job["messages"] + [{"role": "assistant", "content": tokenizer.decode(out)}],
                        "prompt_tokens": list(pids),
                        "completion_tokens": out,
                        "finish_reason": "stop" if r.finish_reason == "stop" else "length",
                    }
    finally:
        gen.close()


def gen_data(model_path, prompts_file, out, *, max_tokens=256, batch_size=16, temps=(0.0, 0.7),
             seed=0, limit=None, system=None, resume=False, force=False, pack_into=None, new=None,
             cache_into=None, features=None, top_n=256, seq_len=512, deadline=None, min_answers=0,
             loaded=None) -> Path:
    """Answer the prompts into OUT/data.jsonl.  With `pack_into` (a token data
    set, `dataset.py`): skip what the data set already holds, answer at most
    `new` more, then add them to it as one chunk and remove the work file.
    With `cache_into` (the trainer's --cache-dir) as well: keep the backbone's
    outputs while generating (`capture.py`) and write the new chunk's training
    cache from them, so its tokens never take a second backbone pass.
    `deadline` (a time.time()): stop there once `min_answers` are done, the
    answers under way ending where they are (kept and packed: a prefix of an
    answer is as good a training text); `loaded`: the model and tokenizer."""
    from tqdm import tqdm

    from .dataset import answered, job_id
    from ..utils import load

    out = Path(out)
    target = out / OUTPUT_FILE
    if target.exists() and not (resume or force):
        raise MTPDError(f"{target} already exists: pass --resume to add to it or --force to start over")
    prompts = read_prompts(prompts_file)[: limit or None]
    if cache_into and not pack_into:
        raise MTPDError("--cache-into needs --pack-into (a cache belongs to a data set's chunk)")
    model, tokenizer = loaded if loaded is not None else load(model_path)[:2]
    from . import capture

    capture_dir = out / "capture" if cache_into and capture.supported(model) else None
    if cache_into and capture_dir is None:
        print("[mlx_mtpd] this model's caches are not plain KV caches: generating without capture "
              "(training prepares the cache with one more pass)", file=sys.stderr)
    jobs = [{"id": job_id(chat_messages(p, system), t), "temp": t, "messages": chat_messages(p, system)}
            for t in temps for p in prompts]
    jobs = list({j["id"]: j for j in jobs}.values())  # a prompt listed twice is answered once
    in_work = _ids_in(target) if resume else set()  # a line cut by an interruption: its job runs again
    done = (answered(pack_into) if pack_into else set()) | in_work
    if force and target.exists():
        target.unlink()
    if target.exists() and target.stat().st_size:
        with open(target, "rb+") as f:  # an interrupted write: end the cut line (it is skipped)
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if j["id"] not in done]
    if pack_into and new is not None:  # answers kept from an interrupted run count toward --new
        todo = todo[: max(new - len(in_work), 0)]
    n_tokens, tic, cpu0 = 0, time.perf_counter(), time.process_time()
    n_done = len(in_work)

    def stop() -> bool:
        return deadline is not None and time.time() >= deadline and n_done >= min_answers

    with open(target, "a") as f, tqdm(total=len(todo), desc="gen-data", unit="answer") as bar:
        for t in temps:
            group = [j for j in todo if j["temp"] == t]
            if not group or stop():
                continue
            if capture_dir is not None:
                capture_dir.mkdir(parents=True, exist_ok=True)
                answers = _captured(capture.generate_captured(
                    model, tokenizer, group, max_tokens=max_tokens, batch_size=batch_size, temp=t, seed=seed,
                    features=features, top_n=top_n, stop=stop), capture_dir)
            else:
                answers = generate_answers(model, tokenizer, group, max_tokens, batch_size, t, seed, stop)
            for rec in answers:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                n_tokens += len(rec["completion_tokens"])
                n_done += 1
                bar.update(1)
                bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - tic):.1f}")
    elapsed = time.perf_counter() - tic
    made = n_done - len(in_work)
    print(f"[mlx_mtpd] {made} answers{f' (of {len(todo)}: the deadline came)' if made < len(todo) else ''}, "
          f"{n_tokens} tokens in {elapsed:.0f} s "
          f"({n_tokens / max(elapsed, 1e-9):.1f} tokens/s) -> {target}", file=sys.stderr)
    if pack_into:
        entry = _pack(target, Path(pack_into), model, tokenizer, prompts_file, elapsed, time.process_time() - cpu0)
        if cache_into and entry is not None:
            _write_chunk_cache(model, tokenizer, Path(pack_into) / entry["file"], Path(cache_into), out / "capture",
                               features, top_n, seq_len)
    return target


def _captured(answers, folder: Path):
    """Store each answer's captured arrays (by job id) as it finishes; yield the records."""
    import numpy as np

    try:
        for rec, arrays in answers:
            tmp = folder / f".{rec['id']}.tmp.npz"
            np.savez(tmp, **arrays)
            tmp.rename(folder / f"{rec['id']}.npz")
            yield rec
    finally:
        answers.close()


class _Captures(dict):
    """Captured arrays by job id, read from disk when asked for."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def __contains__(self, key) -> bool:
        return key is not None and (self.folder / f"{key}.npz").exists()

    def __getitem__(self, key):
        import numpy as np

        with np.load(self.folder / f"{key}.npz") as z:
            return {k: z[k] for k in z.files}


def _write_chunk_cache(model, tokenizer, chunk: Path, cache_root: Path, capture_dir: Path, features, top_n,
                       seq_len) -> None:
    import shutil

    from .data_cache import file_cache_dir, file_signature, prepare_cache, read_sequences

    seqs, _ = read_sequences([str(chunk)], tokenizer, seq_len)
    sig = file_signature(chunk, seq_len, top_n)
    dest = file_cache_dir(cache_root / "train", chunk, sig)
    prepare_cache(model, seqs, dest, top_n, desc=f"cache ({chunk.name})", signature=sig, features=features,
                  captured=_Captures(capture_dir), force=True)
    shutil.rmtree(capture_dir, ignore_errors=True)


def _ids_in(path: Path) -> set:
    if not path.exists():
        return set()
    return {rec["id"] for rec in read_records(path) if isinstance(rec, dict) and "id" in rec}


def read_records(path: Path):
    """The records of a gen-data work file (data.jsonl), skipping a line an interruption cut."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption


def _pack(work: Path, dataset: Path, model, tokenizer, prompts_file, seconds: float, cpu_seconds: float) -> None:
    from .dataset import pack
    from ..heads import Backbone

    # by job id: an interrupted and resumed run packs the same chunk as one that was not
    records = sorted(read_records(work), key=lambda r: str(r.get("id")))
    meta = {"prompts": Path(prompts_file).name, "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3), "generated_tokens_per_s":
            round(sum(len(r["completion_tokens"]) for r in records) / max(seconds, 1e-9), 2)}
    entry = pack(records, dataset, eos=tokenizer.eos_token_id, backbone=Backbone(model).fingerprint(), meta=meta)
    work.unlink()
    if entry is None:
        print(f"[mlx_mtpd] nothing new to add to {dataset}", file=sys.stderr)
    else:
        print(f"[mlx_mtpd] {dataset}/{entry['file']}: {entry['answers']} answers, {entry['tokens']} tokens "
              f"({entry['bytes'] / 1e6:.2f} MB)", file=sys.stderr)
    return entry


def main(argv=None) -> None:
    from ..errors import run_main

    p = argparse.ArgumentParser(prog="mlx_mtpd gen-data", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="MLX model folder (default: SmolLM2-135M-Instruct).")
    p.add_argument("--prompts", default=str(DATA_DIR / "prompts_train.jsonl"),
                   help="Prompts: .jsonl (prompt/text/messages) or text, one per line "
                        "(default: this project's training prompts).")
    p.add_argument("--out", required=True, help="Output folder (data.jsonl inside).")
    p.add_argument("--max-tokens", type=int, default=256, help="Tokens per answer (default 256).")
    p.add_argument("--batch-size", type=int, default=16, help="Sequences generated together (default 16).")
    p.add_argument("--temps", default="0,0.7", help="Comma-separated temperatures; one answer each (default 0,0.7).")
    p.add_argument("--system-prompt", default=None, help="System message for the chat template.")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="Keep finished answers and generate the rest.")
    p.add_argument("--force", action="store_true", help="Start over, replacing data.jsonl.")
    p.add_argument("--pack-into", default=None,
                   help="A token data set (e.g. data/tokens): skip the prompts it has answered, then add "
                        "this run's answers to it as one compact chunk.")
    p.add_argument("--new", type=int, default=None,
                   help="With --pack-into: answer at most this many new jobs (prompt x temperature).")
    p.add_argument("--cache-into", default=None,
                   help="With --pack-into: keep the backbone's outputs while generating and write the new "
                        "chunk's training cache into this folder (train's --cache-dir): one pass per token.")
    p.add_argument("--features", default=None,
                   help="With --cache-into: also keep these layers' outputs (train's --features).")
    p.add_argument("--top-n", type=int, default=256, help="With --cache-into: the teacher's top-N kept (train's).")
    p.add_argument("--seq-len", type=int, default=512, help="With --cache-into: train's --seq-len.")
    args = p.parse_args(argv)

    def run():
        from ..heads import parse_features

        try:
            temps = tuple(float(x) for x in args.temps.split(","))
        except ValueError:
            raise MTPDError(f"--temps must be numbers separated by commas (got {args.temps!r})") from None
        if args.max_tokens < 1 or args.batch_size < 1:
            raise MTPDError("--max-tokens and --batch-size must be positive")
        gen_data(args.model, args.prompts, args.out, max_tokens=args.max_tokens,
                 batch_size=args.batch_size, temps=temps, seed=args.seed, limit=args.limit,
                 system=args.system_prompt, resume=args.resume, force=args.force,
                 pack_into=args.pack_into, new=args.new, cache_into=args.cache_into,
                 features=parse_features(args.features), top_n=args.top_n, seq_len=args.seq_len)

    run_main("gen-data", run)
