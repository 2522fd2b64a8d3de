"""`mlx_mtpd server`: an OpenAI-compatible HTTP server that drafts with MTP heads.

Endpoints as `mlx_lm.server`: POST /v1/chat/completions and /v1/completions
(streaming with server-sent events, or not), GET /v1/models and /health.  The
acceptance statistics of each answer are in its `usage.mtp`.  One model, one
worker thread.  A request alone is served by the speculative loop (heads,
lookup), keeping its caches for the next turn of the conversation.  When more
requests come, they decode together in a running batch (mlx-lm's
BatchGenerator, `batching.py`): the answer under way moves into it (its
prompt and the tokens already sent are prefilled; it goes on exactly as it
would have), requests join and leave between steps, and recent
conversations' caches are kept, so a client resending its conversation pays
only for the new tokens even when others came in between.  Requests beyond
--max-batch wait in arrival order; beyond --max-queue they get 429 with
Retry-After.  A client that disconnects stops its generation.  Binds
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional

from .errors import MTPDError

MAX_BODY = 16 * 1024 * 1024
MIN_ADOPT = 48  # a new conversation's state starts from a kept cache only when it holds this many tokens

# Fields a client may send.  OpenAI's that change the answer but are not
# implemented are accepted only at their neutral value.
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stream", "stream_options",
                 "stop", "seed", "n", "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "logprobs": False,
           "top_logprobs": 0, "echo": False, "suffix": None, "best_of": 1}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _number(body, name, lo, hi, default, integer=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'} (got {v!r})")
    if not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be between {lo} and {hi} (got {v})")
    return v


def parse_request(body: Any, kind: str, max_context: Optional[int]) -> Dict[str, Any]:
    """Validate a request body; returns the generation parameters or raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field '{unknown[0]}' (this server takes: {', '.join(sorted(allowed))})")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in (neutral, None) and not (name == "logit_bias" and not body[name]):
            raise BadRequest(f"'{name}' = {body[name]!r} is not supported by this server")
    limit = max_context or 1 << 20
    req: Dict[str, Any] = {
        "max_tokens": _number(body, "max_completion_tokens", 1, limit, None, integer=True)
        or _number(body, "max_tokens", 1, limit, 512, integer=True),
        "temp": float(_number(body, "temperature", 0, 2, 0.0)),
        "top_p": float(_number(body, "top_p", 0, 1, 0.0)),
        "top_k": _number(body, "top_k", 0, 1 << 20, 0, integer=True),
        "min_p": float(_number(body, "min_p", 0, 1, 0.0)),
        "seed": _number(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True),
    }
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false (got {stream!r})")
    req["stream"] = stream
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise BadRequest("'stream_options' takes only {\"include_usage\": true|false}")
    req["include_usage"] = bool(opts.get("include_usage", False))
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 non-empty strings")
    req["stop"] = stop
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise BadRequest(f"messages[{i}] needs a role of system, user or assistant")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise BadRequest(f"messages[{i}].content must be a string")
            clean.append({"role": m["role"], "content": content})
        req["messages"] = clean
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string")
        req["prompt"] = prompt
    return req


class Job:
    def __init__(self, kind: str, req: Dict[str, Any]):
        self.kind, self.req = kind, req
        self.events: "queue.Queue" = queue.Queue()
        self.cancelled = threading.Event()
        self.arrived = time.perf_counter()


class TextSink:
    """One answer's text as its client sees it: a stop string ends it, and the end
    of the text is held back while it could still become one."""

    def __init__(self, job: Job):
        self.job, self.text, self.sent = job, "", 0
        self.stops = job.req["stop"]
        self.hold = max((len(x) for x in self.stops), default=1) - 1
        self.finish: Optional[str] = None

    def add(self, piece: str, final: bool = False) -> bool:
        """Append a piece of text; True when a stop string ended the answer."""
        self.text += piece
        hit = min((i for i in (self.text.find(x) for x in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.text, self.finish = self.text[:hit], "stop"
            self._send(len(self.text))
            return True
        self._send(len(self.text) if final else len(self.text) - self.hold)
        return False

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.job.events.put(("text", self.text[self.sent:upto]))
            self.sent = upto

    def close(self, finish: str, usage: Dict[str, Any]) -> None:
        self._send(len(self.text))
        self.job.events.put(("done", self.text, self.finish or finish, usage))


def _mtp_usage(st, tps: float, batched: int = 0, in_batch: Optional[Dict[str, int]] = None,
               heads_in_batch: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """`batched`: tokens decoded in the running batch; `in_batch` / `heads_in_batch`: its
    drafting steps there from its conversation / with the heads (steps, drafted, accepted
    tokens), when it drafted."""
    in_batch, by_heads = in_batch or {}, heads_in_batch or {}
    # a batch step: one token, or a draft's accepted ones and one
    forwards = batched - in_batch.get("accepted", 0) - by_heads.get("accepted", 0)
    steps = {k: v for k, v in (("batch", forwards - in_batch.get("steps", 0) - by_heads.get("steps", 0)),
                               ("batch-lookup", in_batch.get("steps", 0)),
                               ("batch-heads", by_heads.get("steps", 0))) if v}
    usage = {
        "mean_accepted_length": st.mean_accepted_length if st else 1.0,
        "acceptance_rates": st.acceptance_rates if st else [],
        "acceptance_by_position": st.cumulative_acceptance if st else [],
        "backbone_forwards": ((st.forwards + 1) if st else 0) + forwards,
        "steps_by_source": (dict(st.sources) if st else {}) | steps,
        "num_draft": st.num_draft if st else 0,
        "generation_tps": tps,
    }
    for key, counts in (("batch_lookup", in_batch), ("batch_heads", by_heads)):
        if counts:
            usage[key] = {k: counts[k] for k in ("steps", "drafted", "accepted")}
    return usage


class Worker:
    """The one thread that touches the model (the main thread, where MLX's
    streams and the model live).  Jobs in arrival order: one alone through the
    speculative loop, several together in the running batch (`max_batch` at a
    time; 0: one at a time, no batch)."""

    def __init__(self, session, max_batch: int = 8, max_queue: int = 64, cache_size: int = 10,
                 cache_bytes: int = 1 << 30, batch_heads: bool = False):
        from .batching import batchable

        self.session = session
        self.batch_heads = batch_heads  # the rows of the running batch draft with the heads too
        self.jobs: "queue.Queue[Job]" = queue.Queue()
        self.served = 0
        self.max_queue = max_queue
        self.max_batch = max_batch if max_batch > 1 and session.cluster is None and \
            batchable(session.model, session.kv) else 0
        # Recent conversations' caches, shared by both paths: an answer served alone
        # leaves a copy, a batch row leaves its own, and either path starts from the
        # longest kept prefix (none under a cluster: every rank would need the same).
        from .batching import kept_caches, plain_caches

        self.kept = kept_caches(cache_size, cache_bytes) if session.cluster is None and cache_size > 0 and \
            plain_caches(session.state.cache) else None
        # The speculative loop's states of other conversations served alone (heads
        # and all: a conversation that comes back goes on with its heads' context),
        # most recent last, bounded like the kept caches.
        self.states: list = []
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        self.batch = None  # made on first need
        self.waiting: "list[Job]" = []  # taken from the queue, waiting for room in the batch or for it to drain
        self.busy = False  # a request under way (alone or in the batch)

    def queued(self) -> int:
        """Requests waiting: in the queue, and in the batch beyond --max-batch (the
        generator holds them, prefilled as rows free)."""
        extra = max(len(self.batch) - self.max_batch, 0) if self.batch is not None else 0
        return self.jobs.qsize() + len(self.waiting) + extra

    def running(self) -> int:
        return min(len(self.batch), self.max_batch) if self.batch is not None and len(self.batch) \
            else int(self.busy)

    def _batches(self, job: Job) -> bool:
        """Whether `job` may decode in the batch (a seeded request is served alone:
        its random numbers are its own)."""
        return self.max_batch > 0 and job.req["seed"] is None

    def _next(self, block: bool) -> Optional[Job]:
        if self.waiting:
            return self.waiting.pop(0)
        try:
            job = self.jobs.get(block=block)
        except queue.Empty:
            return None
        return None if job.cancelled.is_set() else job

    def run(self) -> None:
        while True:
            if self.batch is not None and len(self.batch):
                self._admit()
                try:
                    self.batch.step(self._row_done)
                except Exception as e:  # every request in the batch learns what broke; serving goes on
                    err = f"{type(e).__name__}: {e}"
                    self.batch.fail(lambda row, _, err=err: row.job.events.put(("error", 500, err)))
                continue
            job = self._next(block=True)
            if job is None:
                continue
            others = self.jobs.qsize() + len(self.waiting)
            if self._batches(job) and others:
                self._guard(job, lambda j: self._join(j, self._encode(j)))
            else:
                self._guard(job, self._serve)

    def _guard(self, job: Job, fn) -> None:
        self.busy = True
        try:
            fn(job)
        except BadRequest as e:
            job.events.put(("error", e.status, str(e)))
        except MTPDError as e:
            job.events.put(("error", 400, str(e)))
        except Exception as e:  # keep serving; the client learns what broke
            job.events.put(("error", 500, f"{type(e).__name__}: {e}"))
            from .distributed import is_link_error

            if is_link_error(e):  # another rank is gone: so is this server
                raise
        finally:
            self.busy = False

    def _admit(self) -> None:
        """Queued requests join the batch while it has room, in arrival order; a
        request that cannot batch waits until the batch has drained."""
        while not self.batch.full():
            job = self._next(block=False)
            if job is None:
                return
            if not self._batches(job):
                self.waiting.insert(0, job)
                return
            self._guard(job, lambda j: self._join(j, self._encode(j)))

    def _encode(self, job: Job):
        s, req = self.session, job.req
        ids = s.encode_messages(req["messages"]) if job.kind == "chat" else s.tokenizer.encode(req["prompt"])
        if s.max_context is not None and len(ids) >= s.max_context:
            raise BadRequest(f"the prompt is {len(ids)} tokens and the context holds {s.max_context}: shorten it")
        return ids

    def _join(self, job: Job, ids, sink: Optional[TextSink] = None, answer=(), first=None) -> None:
        from .batching import Batch

        s, req = self.session, job.req
        if self.batch is None:
            # rows draft from their own conversations (and with --batch-heads with the heads), as
            # --draft says, where it pays
            heads = s.heads if self.batch_heads and s.planner.uses_heads else None
            draft = s.num_draft not in (0, "0") and (s.planner.uses_lookup or heads is not None)
            self.batch = Batch(s.model, s.tokenizer, self.max_batch, self.kept, draft=draft, heads=heads,
                               lookup=s.planner.uses_lookup)
        max_tokens = req["max_tokens"]
        if s.max_context is not None:
            max_tokens = min(max_tokens, s.max_context - len(ids))
        self.batch.add(job, sink or TextSink(job), ids, max_tokens, req, answer,
                       extra={"first": first, "tic": time.perf_counter()})

    def _row_done(self, row, finish: str) -> None:
        self.served += 1
        if finish == "interrupted":
            return
        first = row.extra.get("first")  # the part decoded alone before the hand-over
        st = first["stats"] if first else None
        batched = row.generated - (first["tokens"] if first else 0)
        seconds = time.perf_counter() - row.extra["tic"] + (first["seconds"] if first else 0.0)
        usage = {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.generated,
            "total_tokens": row.prompt_tokens + row.generated,
            "prompt_tokens_cached": first["cached"] if first else row.cached,
            "mtp": _mtp_usage(st, row.generated / max(seconds, 1e-9), batched, row.extra.get("lookup"),
                              row.extra.get("heads")),
        }
        row.sink.close("stop" if finish == "stop" else finish, usage)

    def _resume(self, ids) -> None:
        """Before an answer served alone: go on from the state that holds the longest
        prefix of `ids`.  The session's state serves a turn that extends its
        conversation; another conversation's request takes a kept state of its own
        (or a new one), and the session's joins the kept ones.  When the kept
        caches (left by the batch) hold still more of `ids`, the state starts
        from them (the heads start after them)."""
        s = self.session
        if s.cluster is not None or self.cache_size <= 0:
            return
        st = s.state
        own = st.common_prefix(ids)
        # the same conversation: a next turn, or its last request again (another answer)
        same = own >= min(st.length, st.prompt_len - 1)
        if not same:  # another conversation: keep this one's state
            best = max(self.states, key=lambda x: x.common_prefix(ids), default=None)
            if best is not None and best.common_prefix(ids) > own:
                self.states.remove(best)
            else:
                best = s.new_state()
            self.states.append(st)
            s.state = st = best
            self._bound_states()
        if self.kept is not None:
            from .batching import nearest

            # a new state prefills a short shared prefix (a system prompt) itself: its
            # heads then see it
            cache, n = nearest(self.kept, ids, beyond=st.common_prefix(ids) or MIN_ADOPT - 1)
            if cache is not None:
                st.adopt(cache, ids[:n])
        st.prompt_len = len(ids)

    def _bound_states(self) -> None:
        """At most --prompt-cache-size kept states and --prompt-cache-bytes of them."""
        def nbytes(st):
            caches = list(st.cache) + list(st.depths.caches)
            return sum(getattr(c, "nbytes", 0) for c in caches) + sum(h.nbytes for h in st.hist) + \
                sum(t.nbytes for t in st.depths.tail if t is not None)

        while self.states and (len(self.states) > self.cache_size or
                               sum(nbytes(x) for x in self.states) > self.cache_bytes):
            self.states.pop(0)

    def _keep(self) -> None:
        """After an answer served alone (or moved into the batch): a copy of the
        session's caches joins the kept ones, for this conversation's next turn."""
        st = self.session.state
        if self.kept is not None:
            from .batching import keep

            keep(self.kept, st.tokens[:st.length], st.cache)

    def _serve(self, job: Job) -> None:
        """A request alone, through the speculative loop; when others arrive and it
        may batch, it moves into the batch with what it has answered so far."""
        s, req = self.session, job.req
        ids = self._encode(job)
        sink = TextSink(job)
        batches = self._batches(job)

        def stop() -> bool:
            return job.cancelled.is_set() or (batches and self.jobs.qsize() > 0)

        finish, last, answer = None, None, []
        tic = time.perf_counter()
        self._resume(ids)
        for r in s.stream(ids, max_tokens=req["max_tokens"], should_stop=stop, seed=req["seed"],
                          temp=req["temp"], top_p=req["top_p"], top_k=req["top_k"], min_p=req["min_p"]):
            last = r
            answer.append(r.token)
            if sink.add(r.text, final=r.finish_reason is not None):
                finish = "stop"
                break
        if finish is None and last is not None and last.finish_reason == "interrupted" and not job.cancelled.is_set():
            if last.token not in s.tokenizer.eos_token_ids and len(answer) < req["max_tokens"]:
                self._keep()
                cached = s.turns[-1].prompt_tokens - s.turns[-1].new_prompt_tokens if s.turns else 0
                self._join(job, ids, sink, answer, first={
                    "stats": last.stats, "tokens": len(answer), "seconds": time.perf_counter() - tic,
                    "cached": cached})
                return
        self.served += 1
        self._keep()
        if finish is None:
            finish = last.finish_reason if last is not None and last.finish_reason != "interrupted" else "stop"
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": last.generation_tokens if last is not None else 0,
            "total_tokens": len(ids) + (last.generation_tokens if last is not None else 0),
            "prompt_tokens_cached": s.turns[-1].prompt_tokens - s.turns[-1].new_prompt_tokens if s.turns else 0,
            "mtp": _mtp_usage(last.stats if last is not None else None,
                              last.generation_tps if last is not None else 0.0),
        }
        sink.close(finish, usage)


class _HTTPServer(ThreadingHTTPServer):
    # Connections waiting to be accepted: socketserver's default of 5 resets clients
    # when many connect at once while the worker holds the interpreter.
    request_queue_size = 256
    daemon_threads = True


def make_handler(worker: Worker, model_id: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "mlx_mtpd"

        def log_message(self, fmt, *args):  # one line per request on stderr, as http.server does
            if not getattr(self.server, "quiet", False):
                super().log_message(fmt, *args)

        def _json(self, status: int, obj: Dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._json(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self):
            if self.path in ("/health", "/v1/health"):
                kept = worker.kept
                self._json(200, {"status": "ok", "queued": worker.queued(), "running": worker.running(),
                                 "max_batch": worker.max_batch or 1, "max_queue": worker.max_queue,
                                 "kept_caches": len(kept) if kept is not None else 0,
                                 "kept_cache_bytes": kept.nbytes if kept is not None else 0,
                                 "served": worker.served})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [
                    {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "mlx_mtpd"}]})
            else:
                self._error(404, f"no such endpoint: GET {self.path}")

        def do_POST(self):
            kinds = {"/v1/chat/completions": "chat", "/chat/completions": "chat",
                     "/v1/completions": "text", "/completions": "text"}
            if self.path not in kinds:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(min(length, MAX_BODY))
                return self._error(404, f"no such endpoint: POST {self.path}")
            kind = kinds[self.path]
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._error(400, "bad Content-Length header")
            if length > MAX_BODY:
                self.close_connection = True
                return self._error(413, f"request body over {MAX_BODY} bytes")
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return self._error(400, f"malformed JSON: {e}")
            try:
                req = parse_request(body, kind, worker.session.max_context)
            except BadRequest as e:
                return self._error(e.status, str(e))
            if worker.queued() >= worker.max_queue:
                wait = max(1, round(worker.queued() / max(worker.max_batch, 1) * 2))
                self.send_response(429)
                data = json.dumps({"error": {"message": f"the server is full ({worker.queued()} requests wait): "
                                                        f"retry in {wait} s", "type": "rate_limit_error",
                                             "code": 429}}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", str(wait))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            job = Job(kind, req)
            worker.jobs.put(job)
            if req["stream"]:
                self._stream(job, kind)
            else:
                self._complete(job, kind)

        def _complete(self, job: Job, kind: str) -> None:
            while True:
                ev = job.events.get()
                if ev[0] == "error":
                    return self._error(ev[1], ev[2])
                if ev[0] == "done":
                    _, text, finish, usage = ev
                    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish} if kind == "chat"
                              else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
                    return self._json(200, {
                        "id": _new_id(kind), "object": "chat.completion" if kind == "chat" else "text_completion",
                        "created": int(time.time()), "model": model_id, "choices": [choice], "usage": usage})

        def _stream(self, job: Job, kind: str) -> None:
            cid, created = _new_id(kind), int(time.time())
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            started = False

            def chunk(delta_text: Optional[str], finish=None, usage=None, choices=True):
                c = {"id": cid, "object": obj, "created": created, "model": model_id}
                if choices:
                    if kind == "chat":
                        delta = {} if delta_text is None else {"content": delta_text}
                        if not started:
                            delta = {"role": "assistant", **delta}
                        c["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
                    else:
                        c["choices"] = [{"index": 0, "text": delta_text or "", "finish_reason": finish,
                                         "logprobs": None}]
                else:
                    c["choices"] = []
                if usage is not None:
                    c["usage"] = usage
                return c

            try:
                while True:
                    ev = job.events.get()
                    if ev[0] == "error":
                        if not started:
                            return self._error(ev[1], ev[2])
                        self._send_event({"error": {"message": ev[2], "code": ev[1]}})
                        break
                    if not started:
                        self.send_response(200)
                        self.send_header("Content-Type", "text/event-stream")
                        self.send_header("Cache-Control", "no-cache")
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.close_connection = True
                    if ev[0] == "text":
                        if ev[1]:
                            self._send_event(chunk(ev[1]))
                            started = True
                        continue
                    _, _, finish, usage = ev
                    self._send_event(chunk(None, finish))
                    started = True
                    if job.req["include_usage"]:
                        self._send_event(chunk(None, usage=usage, choices=False))
                    break
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                job.cancelled.set()  # the worker stops after its current step
                self.close_connection = True

        def _send_event(self, obj: Dict) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

    return Handler


def _new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def setup_arg_parser() -> argparse.ArgumentParser:
    from .generate import add_draft_args
    from .kvcache import add_kv_args

    p = argparse.ArgumentParser(prog="mlx_mtpd server", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="MLX model folder or hub id (default: SmolLM2-135M-Instruct).")
    p.add_argument("--heads", default=None, help="Head set folder (default: the model folder's, if any).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
    p.add_argument("--port", type=int, default=8080, help="Port (default 8080; 0 picks a free one).")
    add_draft_args(p)
    add_kv_args(p)
    p.add_argument("--loop", choices=("last", "cycle"), default=None)
    p.add_argument("--max-context", type=int, default=None, help="Context size in tokens (default: the model's).")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    p.add_argument("--quiet", action="store_true", help="No request log lines.")
    p.add_argument("--max-batch", type=int, default=8,
                   help="Requests decoded together at most (default 8; 1: one at a time); more wait in arrival order.")
    p.add_argument("--max-queue", type=int, default=64,
                   help="Requests waiting at most (default 64); more get 429 with Retry-After.")
    p.add_argument("--prompt-cache-size", type=int, default=10,
                   help="Recent conversations whose caches the batch keeps for their next turn (default 10).")
    p.add_argument("--prompt-cache-bytes", type=int, default=1 << 30,
                   help="At most this many bytes of kept caches (default 1 GiB; the oldest go first).")
    p.add_argument("--batch-heads", action="store_true",
                   help="Let the running batch's rows draft with the MTP heads too (off: only a request alone "
                        "does; on a 2-core CPU they made 8 clients 0.82x of mlx_lm.server against 0.96x).")
    p.add_argument("--draft-memory", action="store_true",
                   help="Draft also from earlier requests' answers (off: clients never draft from "
                        "each other's conversations; turn on for one user or trusted clients).")
    from .distributed import add_args

    add_args(p)
    return p


def serve(session, host: str, port: int, model_id: str, quiet: bool = False, max_batch: int = 8,
          max_queue: int = 64, cache_size: int = 10, cache_bytes: int = 1 << 30, batch_heads: bool = False):
    """Start the HTTP threads; the caller runs `worker.run()` on its own thread."""
    worker = Worker(session, max_batch, max_queue, cache_size, cache_bytes, batch_heads)
    httpd = _HTTPServer((host, port), make_handler(worker, model_id))
    httpd.quiet = quiet
    threading.Thread(target=httpd.serve_forever, daemon=True, name="mlx_mtpd-http").start()
    return httpd, worker


def main(argv=None) -> None:
    from . import blas  # noqa: F401  (binds OpenBLAS before mlx loads)
    from .errors import run_main

    args = setup_arg_parser().parse_args(argv)

    def run():
        from pathlib import Path

        from . import distributed
        from .generate import parse_num_draft
        from .kvcache import KVOptions
        from .session import Session

        from .tree import parse_tree

        num_draft = parse_num_draft(args.num_draft)
        tree = parse_tree(args.tree)
        if not 0 <= args.port < 65536:
            raise MTPDError(f"--port must be in 0..65535 (got {args.port})")
        if args.max_batch < 1 or args.max_queue < 1 or args.prompt_cache_size < 0:
            raise MTPDError("--max-batch and --max-queue must be at least 1, --prompt-cache-size at least 0")
        cluster = distributed.setup(args)
        distributed.seed_all(cluster, None)  # one random state on every rank
        model, tokenizer, heads = distributed.load_for(args, cluster)
        session = Session(model, tokenizer, heads, num_draft=num_draft, draft=args.draft, loop=args.loop,
                          max_context=args.max_context, memory=args.draft_memory, cluster=cluster, tree=tree,
                          kv=KVOptions.from_args(args))
        if cluster is not None and not cluster.leader:
            session.follow()
            return
        model_id = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
        try:
            httpd, worker = serve(session, args.host, args.port, model_id, args.quiet, args.max_batch,
                                  args.max_queue, args.prompt_cache_size, args.prompt_cache_bytes, args.batch_heads)
        except OSError as e:
            raise MTPDError(f"cannot listen on {args.host}:{args.port} ({e.strerror}): pick another --port") from None
        host, port = httpd.server_address[:2]
        heads_note = f"{heads.num_heads} MTP head(s)" if heads is not None else "no MTP heads"
        if cluster is not None:
            heads_note += f", {cluster.size} ranks ({distributed.describe(model)} parallel)"
        batch_note = f"up to {worker.max_batch} requests together" if worker.max_batch else "one request at a time"
        print(f"mlx_mtpd server: {model_id}, {heads_note}, drafting {session.draft}, {batch_note}, "
              f"listening on http://{host}:{port}", file=sys.stderr, flush=True)
        try:
            worker.run()
        finally:
            session.close()
            httpd.shutdown()
            httpd.server_close()

    run_main("server", run)


if __name__ == "__main__":
    main()
