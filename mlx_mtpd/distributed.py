"""A backbone sharded over mlx.distributed, drafting as on one machine.

Run under `mlx.launch` (ring, JACCL or MPI), every rank loads the backbone
through mlx-lm's `sharded_load` (tensor parallel with `model.shard(group)`,
or pipeline parallel with `model.model.pipeline(group)`), keeps its own copy
of the heads (they are small), and runs the same drafting loop.  What the
ranks must agree on is decided once, on rank 0, and broadcast
(docs/DESIGN.md, "Several machines"):

- the plan of every step (the planner times steps, and timings differ
  between machines): its kind, length, lookup proposal and burst stop;
- the drafts, the accepted count and the tokens (in the step's own lazy
  graph: no extra host round trip);
- the request itself (prompt ids, sampling, seed): only rank 0 reads the
  terminal or serves HTTP; the other ranks follow (`follow`).

A generation that rank 0 stops early (a stop string, a client gone, Ctrl-C)
ends on every rank at the next step boundary: the loop finishes the step or
burst it is in, so every rank runs the same collectives.  A rank that dies
ends the others with a one-line error; one that hangs (or a wrong hostfile)
ends them after `--dist-timeout` seconds instead of never.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import mlx.core as mx

from .errors import MTPDError, is_link_error  # noqa: F401  (re-exported)

SHARDING = ("auto", "tensor", "pipeline")
DEFAULT_TIMEOUT = 120.0  # seconds a rank waits for the others inside a generation (or to connect)
PLAN_KINDS = ("stop", "plain", "heads", "lookup")
# kind, n, match, stop_match, proposal length, proposal tokens (padded), proposal from memory
PLAN_SIZE = 5 + 64 + 1
LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR",
              "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched() -> bool:
    """Whether this process was started by `mlx.launch` (or mpirun)."""
    return any(os.environ.get(k) for k in LAUNCH_ENV)


class Watchdog:
    """Ends the process with a message when a rank waits on the others too long.

    `arm(what)` starts counting (a collective-bearing phase: connecting, a
    generation), `tick()` says progress was made, `disarm()` stops counting
    (rank 0 waiting for the user is not a hang)."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.what: Optional[str] = None
        self.last = time.monotonic()
        self._lock = threading.Lock()
        if timeout and timeout > 0:
            threading.Thread(target=self._watch, daemon=True, name="mlx_mtpd-watchdog").start()

    def arm(self, what: str) -> None:
        with self._lock:
            self.what, self.last = what, time.monotonic()

    def tick(self) -> None:
        self.last = time.monotonic()

    def disarm(self) -> None:
        with self._lock:
            self.what = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            with self._lock:
                what, idle = self.what, time.monotonic() - self.last
            if what is not None and idle > self.timeout:
                print(f"mlx_mtpd: error: rank {self.rank} waited {idle:.0f} s for the other ranks while "
                      f"{what} ({_hint(what)}); every rank stops (--dist-timeout sets the wait)",
                      file=sys.stderr, flush=True)
                if os.environ.get("MLX_MTPD_DEBUG"):
                    import faulthandler

                    faulthandler.dump_traceback(all_threads=True)
                os._exit(1)


def _hint(what: str) -> str:
    if what.startswith("connecting"):
        return ("check the hostfile: every host reachable at its address and port, "
                "and every rank started by mlx.launch")
    return "another rank stopped or hangs, or the network between them failed"


class Cluster:
    """This process's place among the ranks, and the broadcasts they agree by."""

    def __init__(self, group, timeout: float = DEFAULT_TIMEOUT, watchdog: Optional[Watchdog] = None):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.leader = self.rank == 0
        self.timeout = timeout
        self.watchdog = watchdog or Watchdog(self.rank, timeout)
        self.sync_count = 0  # host round trips spent agreeing (plans, jobs)
        self.sync_time = 0.0

    # -- broadcasts -------------------------------------------------------------
    def tensor(self, x: mx.array) -> mx.array:
        """Rank 0's `x` on every rank, lazily (inside the graph it belongs to)."""
        dtype = x.dtype
        y = x.astype(mx.int32) if dtype in (mx.uint32, mx.uint8, mx.int64, mx.uint64, mx.bool_) else x
        # The other ranks' zeros depend on their own x, so that every rank runs
        # this collective at the same point of the same graph.
        y = mx.distributed.all_sum(y if self.leader else mx.depends(mx.zeros_like(y), y), group=self.group)
        return y.astype(dtype) if y.dtype != dtype else y

    def ints(self, values: Optional[List[int]], n: int) -> List[int]:
        """Rank 0's `n` integers on every rank (one host round trip)."""
        tic = time.perf_counter()
        if self.leader:
            if len(values) != n:
                raise ValueError(f"broadcast of {len(values)} values, {n} expected")
            x = mx.array(values, mx.int32)
        else:
            x = mx.zeros((n,), mx.int32)
        out = mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)
        mx.eval(out)
        self.sync_count += 1
        self.sync_time += time.perf_counter() - tic
        return out.tolist()

    def share(self, obj: Any = None) -> Any:
        """Rank 0's JSON-able `obj` on every rank.  On rank 0 it runs under the
        watchdog (the others wait here for the next request, which may take
        any time): a rank gone between two requests ends rank 0 within
        --dist-timeout even where the link reports no error."""
        armed_here = self.leader and self.watchdog.what is None
        if armed_here:
            self.watchdog.arm("sharing a request")
        try:
            data = json.dumps(obj).encode() if self.leader else b""
            n = self.ints([len(data)] if self.leader else None, 1)[0]
            vals = self.ints(list(data) if self.leader else None, n)
        finally:
            if armed_here:
                self.watchdog.disarm()
        return obj if self.leader else json.loads(bytes(vals).decode())

    def barrier(self) -> None:
        self.ints([0] if self.leader else None, 1)

    # -- the drafting loop's agreements ----------------------------------------
    def plan(self, plan, stop_match: Optional[int]):
        """Rank 0's (kind, arg) and burst stop on every rank; None plan: stop."""
        from .suffix import Proposal

        vals = None
        if self.leader:
            vals = [0] * PLAN_SIZE
            if plan is not None:
                kind, arg = plan
                vals[0] = PLAN_KINDS.index(kind)
                vals[3] = -1 if stop_match is None else int(stop_match)
                if kind == "lookup":
                    toks = list(arg.tokens)[: PLAN_SIZE - 6]
                    vals[1], vals[2], vals[4] = len(toks), int(arg.match), len(toks)
                    vals[5 : 5 + len(toks)] = toks
                    vals[-1] = int(arg.source == "memory")
                else:
                    vals[1] = int(arg)
        vals = self.ints(vals, PLAN_SIZE)
        self.watchdog.tick()
        kind = PLAN_KINDS[vals[0]]
        if kind == "stop":
            return None, None
        stop = None if vals[3] < 0 else vals[3]
        if kind == "lookup":
            toks = vals[5 : 5 + vals[4]]
            return (kind, Proposal(toks, vals[2], "memory" if vals[-1] else "context")), stop
        return (kind, vals[1]), stop

    def seed(self, seed: Optional[int]) -> int:
        """One seed for every rank: the given one, or one drawn on rank 0."""
        if self.leader and seed is None:
            seed = int.from_bytes(os.urandom(4), "little") >> 1
        return self.ints([int(seed)] if self.leader else None, 1)[0]


def init(backend: str = "any", timeout: float = DEFAULT_TIMEOUT) -> Optional[Cluster]:
    """The cluster this process belongs to, or None when it runs alone.

    Connecting is bounded by `timeout`: a wrong hostfile or a rank that never
    started ends every rank with a message instead of waiting forever."""
    if not launched() or not mx.distributed.is_available():
        return None
    rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) or 0)
    what = f"connecting ({backend} backend)"
    # mx.distributed.init holds the GIL while it connects: the deadline is kept
    # by a small process of its own, not by a thread of this one.
    with _deadline(timeout, f"mlx_mtpd: error: rank {rank} waited {timeout:.0f} s for the other ranks while "
                            f"{what} ({_hint(what)}); every rank stops (--dist-timeout sets the wait)"):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise MTPDError(f"cannot start the {backend} backend ({e}): run under mlx.launch") from None
        if group.size() == 1:
            return None
        cluster = Cluster(group, timeout)
        cluster.barrier()
    if not cluster.leader:  # only rank 0 prints; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return cluster


@contextlib.contextmanager
def _deadline(seconds: float, message: str):
    """Kill this process with `message` unless the block ends within `seconds`."""
    if not seconds or seconds <= 0:
        yield
        return
    code = ("import os, select, sys\n"
            f"ready = select.select([sys.stdin], [], [], {float(seconds)})[0]\n"
            "if not ready:\n"
            f"    sys.stderr.write({message!r} + '\\n'); sys.stderr.flush(); os.kill({os.getpid()}, 9)\n")
    guard = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        yield
    finally:
        guard.stdin.close()  # the guard reads end-of-file and leaves
        guard.wait()


# -- loading ----------------------------------------------------------------------
def load(model: Optional[str], heads: Optional[str], dtype: Optional[str], cluster: Cluster,
         sharding: str = "auto"):
    """(model, tokenizer, heads) with the backbone sharded over the cluster.

    The heads are built from an unsharded lazy copy of the backbone (a head is
    a copy of its last layer, at full width) and replicated on every rank."""
    from mlx_lm.utils import load_model, sharded_load

    from .heads import Sharding, decoder_of
    from .utils import load_head_set, resolve_model

    if sharding not in SHARDING:
        raise MTPDError(f"--sharding must be one of {', '.join(SHARDING)} (got {sharding!r})")
    cluster.watchdog.arm("loading the model")
    try:
        # The default model is imported on first use; ranks sharing a disk take turns.
        for r in range(cluster.size):
            if r == cluster.rank:
                path = resolve_model(model, dtype)
            cluster.barrier()
        reference, _ = load_model(path, lazy=True, strict=False)
        has_tp, has_pp = hasattr(reference, "shard"), hasattr(getattr(reference, "model", None), "pipeline")
        if sharding == "auto":
            sharding = "tensor" if has_tp else "pipeline" if has_pp else None
        if sharding is None or (sharding == "tensor" and not has_tp) or (sharding == "pipeline" and not has_pp):
            kinds = [k for k, ok in (("tensor", has_tp), ("pipeline", has_pp)) if ok]
            raise MTPDError(
                f"mlx-lm cannot shard {type(reference).__module__.split('.')[-1]} models "
                + (f"by {sharding} parallelism: use --sharding {kinds[0]}" if kinds
                   else "at all: run it on one machine"))
        if sharding == "pipeline" and not (path / "model.safetensors.index.json").exists():
            raise MTPDError(f"{path} has no model.safetensors.index.json, which pipeline loading needs: "
                            "convert it with `mlx_mtpd convert` (or mlx_lm.convert)")
        group = cluster.group
        try:
            sharded, tokenizer = sharded_load(str(path), group if sharding == "pipeline" else None,
                                              group if sharding == "tensor" else None)
        except (ValueError, AssertionError) as e:
            raise MTPDError(f"cannot shard {path} over {cluster.size} ranks by {sharding} parallelism ({e})") from None
        facts = Sharding(sharding, len(decoder_of(reference).layers), group if sharding == "pipeline" else None)
        _SHARDED[id(sharded)] = sharding
        head_set = load_head_set(model, heads, path, reference)
        if head_set is not None:
            head_set.sharding = facts  # the backbone adapter learns it from the head set
        del reference
        cluster.barrier()
    finally:
        cluster.watchdog.disarm()
    return sharded, tokenizer, head_set


# How each model this process loaded sharded was split (by id: mlx-lm's models are
# dicts, not hashable), for messages and bench reports.
_SHARDED: Dict[int, str] = {}


def describe(model) -> str:
    return _SHARDED.get(id(model), "none")


# -- following rank 0 -------------------------------------------------------------
def follow(cluster: Cluster, run_job) -> None:
    """On ranks > 0: take rank 0's jobs until it says quit.  `run_job(job)`
    runs one (a dict rank 0 shared: op 'stream' or 'reset')."""
    while True:
        job = cluster.share()
        if job.get("op") == "quit":
            return
        run_job(job)


def add_args(p) -> None:
    """The options of generate, chat, server and bench under mlx.launch."""
    p.add_argument("--sharding", choices=SHARDING, default="auto",
                   help="Under mlx.launch: shard the backbone by tensor or pipeline parallelism "
                        "(auto: tensor where mlx-lm supports it for the family, else pipeline).")
    p.add_argument("--dist-backend", default="any", help="mlx.distributed backend (ring, jaccl, mpi; any).")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="Seconds a rank waits for the others (to connect, or inside a generation) "
                        "before every rank stops with a message.")


def setup(args) -> Optional[Cluster]:
    """The cluster for a CLI's parsed args (None when not under mlx.launch)."""
    return init(args.dist_backend, args.dist_timeout)


def load_for(args, cluster: Optional[Cluster]):
    """(model, tokenizer, heads) for a CLI's args: sharded under a cluster, else `utils.load`."""
    from .utils import load as load_one

    dtype = getattr(args, "dtype", None)
    if cluster is None:
        return load_one(args.model, heads=args.heads, dtype=dtype)
    return load(args.model, args.heads, dtype, cluster, args.sharding)


def seed_all(cluster: Optional[Cluster], seed: Optional[int]) -> None:
    """Seed MLX's random state: with `seed`, or under a cluster with one seed for
    every rank (drawn on rank 0 when `seed` is None)."""
    if cluster is not None:
        mx.random.seed(cluster.seed(seed))
    elif seed is not None:
        mx.random.seed(seed)
