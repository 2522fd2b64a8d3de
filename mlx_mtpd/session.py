"""A conversation with one model: the caches and the draft planner kept between
turns, so that each turn prefills only its new tokens and `--num-draft auto`
keeps what it measured.  `mlx_mtpd chat` and `mlx_mtpd server` both use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Generator, List, Optional, Sequence, Union

import mlx.core as mx

from .engine import DraftPlanner, DraftState, SpecStats
from .suffix import AnswerMemory
from .errors import MTPDError
from .streaming import GenerationResponse, stream_generate


def context_length(model) -> Optional[int]:
    """The model's context window from its config, if it states one."""
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class Turn:
    """What one answer cost and how drafting went."""

    prompt_tokens: int
    new_prompt_tokens: int
    generation_tokens: int
    tokens_per_s: float  # decoding, after the first token (as mlx-lm reports it)
    prompt_tps: float
    stats: SpecStats
    finish_reason: str

    @property
    def seconds(self) -> float:
        return self.generation_tokens / self.tokens_per_s if self.tokens_per_s else 0.0


@dataclass
class Session:
    model: object
    tokenizer: object
    heads: Optional[object] = None
    num_draft: Union[int, str] = "auto"
    draft: Optional[str] = None  # default: heads+lookup with heads, prompt-lookup without
    loop: Optional[str] = None
    max_draft: int = 6
    max_context: Optional[int] = None
    # Draft also from this session's earlier answers when they have left the
    # context (trimmed turns, a reset, the server's earlier requests).
    memory: bool = False
    # Under mlx.launch (distributed.Cluster): rank 0 shares every answer's
    # request with the other ranks, which run it in `follow()`.
    cluster: Optional[object] = None
    # Head drafts as trees: "auto", None (chains) or widths per depth (mlx_mtpd.tree).
    tree: object = "auto"
    # mlx-lm's KV cache options (mlx_mtpd.kvcache.KVOptions); None: mlx-lm's defaults.
    kv: Optional[object] = None
    turns: List[Turn] = field(default_factory=list)

    def __post_init__(self):
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        if not isinstance(self.tokenizer, TokenizerWrapper):
            self.tokenizer = TokenizerWrapper(self.tokenizer)
        if self.draft is None:
            self.draft = "heads+lookup" if self.heads is not None else "prompt-lookup"
        if self.heads is None and self.draft != "prompt-lookup" and self.num_draft not in (0, "0"):
            if self.num_draft != "auto":
                raise MTPDError(f"--draft {self.draft} needs MTP heads: pass --heads, or --draft prompt-lookup")
            self.draft = "prompt-lookup"
        self.planner = DraftPlanner(self.num_draft, self.draft, max_draft=self.max_draft, tree=self.tree)
        if self.cluster is None:  # under a cluster rank 0 plans from what it measures itself
            from .costs import seed_planner

            seed_planner(self.planner, self.model, self.tokenizer, self.heads)
        self.state = self.new_state()
        if self.memory and self.planner.uses_lookup:
            self.state.memory = AnswerMemory()
        self.max_context = self.max_context or context_length(self.model)
        self.total = SpecStats()

    def new_state(self) -> DraftState:
        """An empty state for another conversation (the server keeps several); it
        shares the answer memory of the current one, if any."""
        depth = self.planner.num_draft if self.planner.uses_heads else 0
        st = DraftState(self.model, self.heads if depth else None, depth, self.loop, self.kv)
        current = getattr(self, "state", None)
        if current is not None:
            st.memory = current.memory
        return st

    def reset(self) -> None:
        """Forget the cached conversation (what the planner measured stays)."""
        if self.cluster is not None and self.cluster.leader:
            self.cluster.share({"op": "reset"})
        self.state.reset()

    def close(self) -> None:
        """Rank 0: release the other ranks (their `follow()` returns)."""
        if self.cluster is not None and self.cluster.leader:
            self.cluster.share({"op": "quit"})

    def follow(self) -> None:
        """Ranks > 0: run rank 0's requests until it closes the session."""
        from .distributed import follow

        def run(job):
            if job["op"] == "reset":
                self.state.reset()
                return
            try:
                for _ in self.stream(job["ids"], max_tokens=job["max_tokens"], seed=job["seed"],
                                     **job["sampling"]):
                    pass
            except MTPDError:  # rank 0 met the same error and reported it
                pass

        follow(self.cluster, run)

    def encode_messages(self, messages: Sequence[Dict[str, str]]) -> List[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(list(messages), add_generation_prompt=True)
            return list(ids) if not isinstance(ids, str) else tok.encode(ids, add_special_tokens=False)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return tok.encode(text)

    def fit_messages(self, messages: List[Dict[str, str]], max_tokens: int):
        """Drop the oldest turns (never the system message or the last one) until
        the prompt and `max_tokens` fit the context.  Returns (messages, ids,
        dropped); raises when the last message alone does not fit.  What a
        dropped user turn said stays a draft source (the answer memory, which
        already holds the answers), so a long conversation keeps drafting from
        all of itself."""
        msgs = list(messages)
        dropped = 0
        ids = self.encode_messages(msgs)
        if self.max_context is None:
            return msgs, ids, 0
        while len(ids) + min(max_tokens, 16) > self.max_context:
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(msgs) - first <= 1:
                raise MTPDError(
                    f"the message is {len(ids)} tokens and the context holds {self.max_context}: shorten it"
                )
            self._remember(msgs.pop(first))
            # never leave an assistant message first after the system prompt
            while len(msgs) - first > 1 and msgs[first]["role"] == "assistant":
                self._remember(msgs.pop(first))
            dropped += 1
            ids = self.encode_messages(msgs)
        return msgs, ids, dropped

    def _remember(self, message: Dict[str, str]) -> None:
        """A user turn leaving the context joins the answer memory (answers are
        there since they were generated)."""
        memory = self.state.memory
        if memory is not None and message.get("role") == "user" and message.get("content"):
            memory.add(self.tokenizer.encode(message["content"], add_special_tokens=False))

    def stream(self, prompt: Union[List[int], mx.array], max_tokens: int = 512, should_stop=None,
               seed: Optional[int] = None, **sampling) -> Generator[GenerationResponse, None, None]:
        """Stream one answer to `prompt` (token ids holding the whole conversation).

        `should_stop()` is checked after every token (a Ctrl-C flag, a closed
        connection); the last response carries finish_reason ('stop', 'length'
        or 'interrupted').  `seed` seeds MLX's random state first (every rank's).
        """
        ids = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
        if self.max_context is not None:
            room = self.max_context - len(ids)
            if room <= 0:
                raise MTPDError(f"the prompt is {len(ids)} tokens and the context holds {self.max_context}")
            max_tokens = min(max_tokens, room) if max_tokens > 0 else room
        if self.cluster is not None and self.cluster.leader:
            self.cluster.share({"op": "stream", "ids": [int(t) for t in ids], "max_tokens": int(max_tokens),
                                "seed": seed, "sampling": sampling})
        if seed is not None:
            mx.random.seed(seed % (1 << 32))
        cached = self.state.common_prefix(ids)
        last = None
        answer: List[int] = []
        gen = stream_generate(self.model, self.tokenizer, mx.array(ids), max_tokens=max_tokens, heads=self.heads,
                              loop=self.loop, state=self.state, planner=self.planner, cluster=self.cluster,
                              kv=self.state.kv, **sampling)
        try:
            for last in gen:
                answer.append(last.token)
                if last.finish_reason is None and should_stop is not None and should_stop():
                    last.finish_reason = "interrupted"
                    yield last
                    break
                yield last
        finally:
            gen.close()
            if self.state.memory is not None:
                self.state.memory.add(answer)
        if last is not None:
            self.total.add(last.stats)
            self.turns.append(Turn(len(ids), len(ids) - cached, last.generation_tokens, last.generation_tps,
                                   last.prompt_tps, last.stats, last.finish_reason or "stop"))

    def speedup_estimate(self, turn: Optional[Turn] = None) -> Optional[float]:
        """Tokens/s of an answer over the planner's measured plain-decoding rate."""
        turn = turn or (self.turns[-1] if self.turns else None)
        plain = self.planner.plain_tokens_per_s
        if turn is None or not plain or not turn.seconds:
            return None
        return turn.tokens_per_s / plain

    def summary(self) -> Dict:
        seconds = sum(t.seconds for t in self.turns)
        tokens = sum(t.generation_tokens for t in self.turns)
        return {
            "turns": len(self.turns),
            "generation_tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "plain_tokens_per_s_measured": self.planner.plain_tokens_per_s,
            **self.total.as_dict(),
        }
