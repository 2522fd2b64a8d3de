"""MTP-D heads: cascaded multi-token-prediction modules built from the backbone.

Head k maps (hidden state h^{k-1}_j, token t_{j+k}) to h^k_j:

    h^k_j = Block_k( W_k [RMSNorm(Emb(t_{j+k})) ; RMSNorm(h^{k-1}_j)] )

and predicts t_{j+k+1} through the backbone's own output projection applied to
FinalNorm_k(h^k_j).  Block_k is one decoder layer of the backbone's own
architecture (a copy of its last layer), so every decoder-only model mlx-lm
supports gets heads without per-architecture code.  Everything that differs
between architectures is handled in `Backbone`.

A head set may declare `features`: backbone layers whose outputs feed depth 1
beside the last hidden state (EAGLE-3's fusion).  Then h^0_j is not the last
state alone but  F [RMSNorm(l_a(j)) ; ... ; RMSNorm(h_j)]  (one projection F,
initialised to pass the last state through, so a fused head starts where a
plain one does); the backbone's hidden state everywhere else (the engine's
tails, the training cache) is the concatenation of those outputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .errors import MTPDError
from .files import EVAL_FILE, HEADS_CONFIG, HEADS_WEIGHTS, atomic_dir, write_json_atomic

FORMAT_VERSION = 1
DRAFT_VOCAB_KEY = "draft_vocab"
PROBE_TOLERANCE = 0.05  # 4-bit quantization moves row norms by about 1%
LOOP_POLICIES = ("last", "cycle")


@dataclass(frozen=True)
class Sharding:
    """How mlx.distributed split a backbone (`mlx_mtpd.distributed.load`): a
    pipeline stage holds only its own layers, so the adapter is told the whole
    model's layer count and the stage group."""

    kind: str  # "tensor" or "pipeline"
    num_layers: int
    pipeline_group: Any = None


class Backbone:
    """The few things the heads need from any mlx-lm decoder-only model.

    - `forward(tokens, cache)` returns logits and the hidden state *before* the
      final norm (the state fed to depth 1), captured generically at the input
      of the model's final norm module.
    - `project(x)` is the model's output projection (tied or untied, with
      logit soft-capping where the architecture has it).
    """

    def __init__(self, model: nn.Module, features: Optional[List[int]] = None,
                 sharding: Optional[Sharding] = None):
        self.model = model
        inner = decoder_of(model)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
            raise MTPDError(
                f"{type(model).__module__} has no model.layers/model.norm: "
                "MTP heads need a decoder-only transformer"
            )
        self.inner = inner
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        lm = getattr(model, "language_model", None)  # wrapped text models (Qwen3.5)
        self.lm_head = model.lm_head if "lm_head" in model else (
            lm.lm_head if lm is not None and "lm_head" in lm else None)
        args = getattr(model, "args", None)
        self.softcap = getattr(args, "final_logit_softcapping", None)
        self.model_type = getattr(args, "model_type", type(model).__module__.split(".")[-1])
        self.hidden_size = int(self.embed.weight.shape[-1] * _pack_factor(self.embed))
        self.vocab_size = int(self.embed.weight.shape[0])
        self._tap_norm()
        # Sharded over mlx.distributed (distributed.load): a pipeline stage holds
        # only its own layers, and a tensor-parallel lm_head one slice of the vocabulary.
        self.num_layers = sharding.num_layers if sharding is not None else len(inner.layers)
        self.pipeline_group = sharding.pipeline_group if sharding is not None else None
        self.vocab_group = (getattr(lm if lm is not None else model, "sharding_group", None)
                            if self.lm_head is not None else None)
        self.features = check_features(features, self.num_layers)
        for i in self.features:
            if (layer := self._local_layer(i)) is not None:
                _tap_output(layer)

    def _local_layer(self, i: int) -> Optional[nn.Module]:
        """Decoder layer i, or None where another pipeline stage holds it."""
        layers = self.inner.layers
        return layers[i] if i < len(layers) else None

    def _tap_norm(self) -> None:
        # Record the final norm's input without changing the parameter tree:
        # swap the instance's class for a subclass whose __call__ stores it.
        norm = self.norm
        if getattr(type(norm), "_mtpd_tap", False):
            self.norm_class = type(norm).__mro__[1]
            return
        base = type(norm)
        self.norm_class = base

        def tapped(module, x):
            module.__dict__["_mtpd_last_input"] = x
            return base.__call__(module, x)

        norm.__class__ = type(f"Tapped{base.__name__}", (base,), {"__call__": tapped, "_mtpd_tap": True})

    def forward(self, tokens: mx.array, cache: List[Any]):
        logits, hidden = self.forward_batch(tokens[None], cache)
        return logits[0], hidden[0]

    def forward_batch(self, tokens: mx.array, cache: Optional[List[Any]] = None):
        """(logits, hidden) of a (B, L) batch; hidden is the pre-norm last state,
        after the outputs of the `features` layers when there are any."""
        logits = self.model(tokens, cache=cache)
        return logits, self.captured()

    def captured(self) -> mx.array:
        """The hidden state of the forward that just ran (see `forward_batch`)."""
        hidden = self.norm.__dict__.pop("_mtpd_last_input")
        if not self.features:
            return hidden
        parts = [layer.__dict__.pop("_mtpd_output", None) if (layer := self._local_layer(i)) is not None
                 else None for i in self.features]
        if self.pipeline_group is not None:
            # each feature layer ran on one stage: the others add zeros
            # (after the stage's own sends and the gather of the last state: the
            # same order of collectives on every stage)
            parts = mx.depends(mx.concatenate([mx.zeros_like(hidden) if x is None else x for x in parts], axis=-1),
                               hidden)
            return mx.concatenate([mx.distributed.all_sum(parts, group=self.pipeline_group), hidden], axis=-1)
        if any(not isinstance(x, mx.array) or x.shape != hidden.shape for x in parts):
            raise MTPDError(
                f"the {self.model_type} layers do not return the hidden state alone, so their "
                "outputs cannot feed fused heads: train heads without --features"
            )
        return mx.concatenate(parts + [hidden], axis=-1)

    def last_state(self, hidden: mx.array) -> mx.array:
        """The last pre-norm state out of a (possibly fused) hidden state."""
        return hidden[..., -self.hidden_size :] if self.features else hidden

    def project(self, x: mx.array) -> mx.array:
        logits = self.lm_head(x) if self.lm_head is not None else self.embed.as_linear(x)
        if self.vocab_group is not None:  # a vocabulary slice per rank (tensor parallel)
            from mlx_lm.models.base import gather_last_axis

            logits = gather_last_axis(logits, self.vocab_group)
        return self._cap(logits)

    def _cap(self, logits: mx.array) -> mx.array:
        if self.softcap:
            logits = mx.tanh(logits / self.softcap) * self.softcap
        return logits

    def projection_rows(self, ids: Optional[mx.array]):
        """The output projection restricted to rows `ids` (None: the full vocabulary;
        (B, U): rows per sequence, applied to a (B, L, H) batch)."""
        if ids is None:
            return self.project
        if self.vocab_group is not None:  # the rows are spread over the ranks
            return lambda x: self.project(x)[..., ids]
        layer = self.lm_head if self.lm_head is not None else self.embed
        quantized = isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        if quantized:
            w, s = layer.weight[ids], layer.scales[ids]
            b = layer.biases[ids] if layer.get("biases") is not None else None
            gs, bits, mode = layer.group_size, layer.bits, getattr(layer, "mode", "affine")
        if ids.ndim == 2:  # one row set per sequence (training): x (B, L, H) -> (B, L, U)
            w = mx.dequantize(w, s, b, group_size=gs, bits=bits, mode=mode) if quantized else layer.weight[ids]
            wt = w.swapaxes(-1, -2)

            def proj(x):
                return self._cap(x @ wt.astype(x.dtype))
        elif quantized:

            def proj(x):
                return self._cap(
                    mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=bits, mode=mode)
                )
        else:
            w = layer.weight[ids]

            def proj(x):
                return self._cap(x @ w.T)

        return proj

    def embed_tokens(self, tokens: mx.array) -> mx.array:
        return self.embed(tokens)

    def embedding_rows(self, ids: mx.array) -> mx.array:
        """Rows of the (possibly quantized) embedding table as float32."""
        return self.embed(ids).astype(mx.float32)

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies the backbone a head set was made for.  The embedding
        probe (norms of 32 fixed rows) survives quantization and dtype casts
        within a few percent, and differs between any two trained models."""
        ids = mx.array([int(i * (self.vocab_size - 1) / 31) for i in range(32)])
        norms = mx.sqrt((self.embedding_rows(ids) ** 2).sum(-1))
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_layers": self.num_layers,
            "embedding_probe": [round(float(x), 5) for x in norms.tolist()],
        }


def decoder_of(model: nn.Module) -> Optional[nn.Module]:
    """The decoder (embeddings, layers, final norm) inside an mlx-lm model, also
    inside the wrappers of multimodal text models (Qwen3.5)."""
    inner = getattr(model, "model", None)
    if inner is None and hasattr(model, "language_model"):
        inner = model.language_model.model
    return inner


def check_features(features, num_layers: int) -> List[int]:
    """Layer indices for fused heads: distinct, in [0, num_layers - 1) (the last
    layer's output is the last state, always taken), in increasing order."""
    features = [int(i) for i in (features or [])]
    bad = [i for i in features if not 0 <= i < num_layers - 1]
    if bad or len(set(features)) != len(features):
        raise MTPDError(
            f"features {features}: give distinct layer indices between 0 and {num_layers - 2} "
            f"(the backbone has {num_layers} layers; its last state is always used)"
        )
    return sorted(features)


def parse_features(text: Optional[str]) -> List[int]:
    """`--features 2,15,27` (empty or `none`: no fusion)."""
    if not text or text.strip().lower() == "none":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MTPDError(f"--features takes layer indices separated by commas, e.g. 2,15,27 (got {text!r})") from None


def _tap_output(layer: nn.Module) -> None:
    """Record a decoder layer's output, as `_tap_norm` records the norm's input."""
    if getattr(type(layer), "_mtpd_tap", False):
        return
    base = type(layer)

    def tapped(module, *args, **kwargs):
        out = base.__call__(module, *args, **kwargs)
        module.__dict__["_mtpd_output"] = out
        return out

    layer.__class__ = type(f"Tapped{base.__name__}", (base,), {"__call__": tapped, "_mtpd_tap": True})


def _pack_factor(layer) -> int:
    return 32 // layer.bits if isinstance(layer, (nn.QuantizedEmbedding, nn.QuantizedLinear)) else 1


def _dequantized(block: nn.Module) -> nn.Module:
    """Replace quantized linears in a copied block by float ones (heads stay float)."""
    from mlx_lm.utils import dequantize_model

    return dequantize_model(block)


class MTPHead(nn.Module):
    def __init__(self, block: nn.Module, final_norm: Optional[nn.Module], hidden_size: int, eps: float = 1e-6,
                 concat_order: str = "embedding_hidden", eh_bias: bool = False):
        super().__init__()
        self.enorm = nn.RMSNorm(hidden_size, eps=eps)
        self.hnorm = nn.RMSNorm(hidden_size, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=eh_bias)
        self.block = block
        self.norm = final_norm if final_norm is not None else nn.Identity()  # ERNIE has none
        if concat_order not in ("embedding_hidden", "hidden_embedding"):
            raise MTPDError(f"unknown concat_order {concat_order!r}")
        object.__setattr__(self, "hidden_first", concat_order == "hidden_embedding")  # MiMo

    def __call__(self, hidden: mx.array, emb: mx.array, cache=None) -> mx.array:
        """hidden, emb: (L, H) or (B, L, H) for consecutive positions; returns h^k
        of the same shape.  Attention is causal within the depth's own stream."""
        from mlx_lm.models.base import create_attention_mask

        batched = hidden.ndim == 3
        parts = [self.enorm(emb), self.hnorm(hidden)]
        x = self.eh_proj(mx.concatenate(parts[::-1] if self.hidden_first else parts, axis=-1))
        x = x if batched else x[None]
        # an array mask: some layers (DeepSeek-V3's MLA) take no "causal" shorthand
        mask = create_attention_mask(x, cache, return_array=True)
        out = self.block(x, mask, cache)
        return out if batched else out[0]


class FeatureFusion(nn.Module):
    """Depth 1's entry for fused heads: [l_a ; ... ; h] (each RMS-normalised) -> H."""

    def __init__(self, parts: int, hidden_size: int, eps: float = 1e-6, dtype=mx.float32):
        super().__init__()
        self.norms = [nn.RMSNorm(hidden_size, eps=eps) for _ in range(parts)]
        for n in self.norms:
            n.weight = n.weight.astype(dtype)
        self.proj = nn.Linear(parts * hidden_size, hidden_size, bias=False)
        # pass-through: the last state alone, normalised (the head's own hnorm
        # of it is then what a head without fusion computes)
        eye = mx.eye(hidden_size, dtype=dtype)
        self.proj.weight = mx.concatenate([mx.zeros((hidden_size, (parts - 1) * hidden_size), dtype), eye], axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        parts = mx.split(x, len(self.norms), axis=-1)
        return self.proj(mx.concatenate([n(p) for n, p in zip(self.norms, parts)], axis=-1))


class HeadSet(nn.Module):
    """K trained heads plus how to use them: loop policy, draft vocabulary,
    fingerprint, and the fusion of backbone features into depth 1 (`fuse`)."""

    def __init__(self, heads: List[MTPHead], config: Dict[str, Any], draft_ids: Optional[mx.array] = None,
                 fuse: Optional[FeatureFusion] = None):
        super().__init__()
        self.heads = heads
        if fuse is not None:
            self.fuse = fuse
        # Plain attributes, outside the module tree (a dict or array attribute
        # would otherwise join the parameters the optimizer walks).
        object.__setattr__(self, "config", config)
        # Token ids the heads draft over (None: the whole vocabulary).  Stored
        # beside the weights as `draft_vocab`; not a parameter.
        self.set_draft_vocab(draft_ids)
        object.__setattr__(self, "path", None)  # the folder it was loaded from (load_heads)
        # the backbone it drafts for is sharded so (mlx_mtpd.distributed.load); None: one process
        object.__setattr__(self, "sharding", None)
        # sampling temperature -> the factor on it the heads draft at (eval-heads, `draft_temperature`)
        object.__setattr__(self, "draft_scales", {})

    def set_draft_vocab(self, ids: Optional[mx.array]) -> None:
        object.__setattr__(self, "_draft_ids", None if ids is None else ids.astype(mx.int32))
        self.config["draft_vocab_size"] = None if ids is None else int(ids.size)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def draft_temperature(self, temp: float) -> float:
        """The temperature the heads draw sampled drafts at when the backbone samples
        at `temp`: `temp` times the factor measured nearest it (eval-heads: the one
        that maximizes the expected acceptance sum_x min(p(x), q(x))), else `temp`.
        Any q keeps speculative sampling exact; a head less sure than the backbone
        overlaps it more when drafting cooler."""
        if temp <= 0 or not self.draft_scales:
            return temp
        nearest = min(self.draft_scales, key=lambda t: (abs(t - temp), t))
        return temp * self.draft_scales[nearest]

    @property
    def features(self) -> List[int]:
        """Backbone layers whose outputs depth 1 takes beside the last state."""
        return list(self.config.get("features") or [])

    def add_fusion(self, backbone: "Backbone", features: List[int]) -> None:
        """Give a head set without fusion a pass-through fusion of `features`:
        its drafts stay what they were until it trains."""
        if self.features:
            raise MTPDError(f"this head set already fuses layers {self.features}")
        if self.config.get("hidden_state", "pre_norm") == "post_norm":
            raise MTPDError("native MTP heads take the backbone's normed state: they cannot fuse features")
        features = check_features(features, len(backbone.inner.layers))
        if features:
            self.fuse = _new_fusion(backbone, len(features) + 1)
            self.config["features"] = features

    @property
    def draft_ids(self) -> Optional[mx.array]:
        return self._draft_ids

    def entry_hidden(self, backbone: "Backbone"):
        """What depth 1 takes from the backbone's pre-norm hidden state: itself
        (`hidden_state: pre_norm`) or the backbone's final norm of it (`post_norm`,
        the convention of most native MTP layers)."""
        if "fuse" in self:
            return self.fuse
        if self.config.get("hidden_state", "pre_norm") != "post_norm":
            return None
        norm, base = backbone.norm, backbone.norm_class
        return lambda h: base.__call__(norm, h)

    @property
    def feedback_post_norm(self) -> bool:
        """Whether depth k+1 takes depth k's state after its final norm (else before)."""
        return self.config.get("feedback", "pre_norm") == "post_norm"

    def head_for_depth(self, depth: int, loop: Optional[str] = None) -> MTPHead:
        """Depth d (1-based) > K loops the trained heads: `last` or `cycle`."""
        loop = loop or self.config.get("loop", "last")
        if loop not in LOOP_POLICIES:
            raise MTPDError(f"unknown loop policy {loop!r}: choose from {', '.join(LOOP_POLICIES)}")
        k = self.num_heads
        if depth <= k:
            return self.heads[depth - 1]
        return self.heads[k - 1] if loop == "last" else self.heads[(depth - 1) % k]


def new_head(backbone: Backbone, config: Optional[Dict[str, Any]] = None) -> MTPHead:
    """A head initialised as docs/DESIGN.md says: a copy of the last decoder layer and
    the final norm, with W = [0 ; I] so the hidden path passes through.
    `config` (a head set's) may ask for the layouts of native MTP layers:
    `concat_order`, `eh_bias`, `final_norm: false`."""
    config = config or {}
    last = backbone.inner.layers[-1]
    block = _dequantized(copy.deepcopy(last))
    final_norm = None
    if config.get("final_norm", True):
        final_norm = copy.deepcopy(backbone.norm)
        final_norm.__class__ = backbone.norm_class  # a plain copy, without the tap
    h = backbone.hidden_size
    eps = float(getattr(backbone.norm, "eps", 1e-6))
    head = MTPHead(block, final_norm, h, eps, config.get("concat_order", "embedding_hidden"),
                   bool(config.get("eh_bias", False)))
    dtype = _compute_dtype(backbone)
    eye = mx.eye(h, dtype=dtype)
    head.eh_proj.weight = mx.concatenate([mx.zeros((h, h), dtype=dtype), eye], axis=1)
    head.enorm.weight = head.enorm.weight.astype(dtype)
    head.hnorm.weight = head.hnorm.weight.astype(dtype)
    return head


def _new_fusion(backbone: Backbone, parts: int) -> FeatureFusion:
    eps = float(getattr(backbone.norm, "eps", 1e-6))
    return FeatureFusion(parts, backbone.hidden_size, eps, _compute_dtype(backbone))


def _compute_dtype(backbone: Backbone):
    norm_w = backbone.norm.weight
    return norm_w.dtype if mx.issubdtype(norm_w.dtype, mx.floating) else mx.float32


def init_heads(
    model: nn.Module,
    num_heads: int,
    *,
    loop: str = "last",
    draft_vocab: Optional[int] = None,
    features: Optional[List[int]] = None,
) -> HeadSet:
    if num_heads < 1:
        raise MTPDError(f"--num-heads must be at least 1 (got {num_heads})")
    if loop not in LOOP_POLICIES:
        raise MTPDError(f"unknown loop policy {loop!r}: choose from {', '.join(LOOP_POLICIES)}")
    backbone = Backbone(model)
    heads = [new_head(backbone) for _ in range(num_heads)]
    config = {
        "format_version": FORMAT_VERSION,
        "num_heads": num_heads,
        "loop": loop,
        "hidden_state": "pre_norm",
        "concat_order": "embedding_hidden",
        "backbone": backbone.fingerprint(),
        "trained": False,
    }
    hs = HeadSet(heads, config, _draft_vocab(backbone, draft_vocab))
    if features:
        hs.add_fusion(backbone, features)
    mx.eval(hs.parameters())
    return hs


def _draft_vocab(backbone: Backbone, size: Optional[int]) -> Optional[mx.array]:
    """Byte-level BPE gives low ids to early (frequent) merges: the first `size`
    ids are a fair draft vocabulary until training counts real frequencies."""
    if size is None or size <= 0 or size >= backbone.vocab_size:
        return None
    return mx.arange(size, dtype=mx.int32)


def _head_skeleton(backbone: Backbone, config: Dict[str, Any], draft_ids) -> HeadSet:
    heads = [new_head(backbone, config) for _ in range(int(config["num_heads"]))]
    features = check_features(config.get("features"), len(backbone.inner.layers))
    fuse = _new_fusion(backbone, len(features) + 1) if features else None
    return HeadSet(heads, config, draft_ids, fuse)


def _weights_to_save(head_set: HeadSet) -> Dict[str, mx.array]:
    weights = dict(tree_flatten(head_set.parameters()))
    if head_set.draft_ids is not None:
        weights[DRAFT_VOCAB_KEY] = head_set.draft_ids
    return weights


def write_head_files(head_set: HeadSet, folder: Path, dtype: Optional[str] = None) -> None:
    """Write mtp_heads.safetensors + mtp_config.json into `folder`, each under a
    temporary name first and renamed, so a reader never sees half a file.
    `dtype` stores float weights at that precision (e.g. float16 to ship)."""
    folder = Path(folder)
    weights = _weights_to_save(head_set)
    if dtype is not None:
        t = getattr(mx, dtype)
        weights = {k: v.astype(t) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    _write_head_pair(folder, weights, head_set.config)


def _write_head_pair(folder: Path, weights: Dict[str, mx.array], config: Dict[str, Any]) -> None:
    """The weights and then the config, each under a temporary name renamed into
    place: a reader never sees half a file."""
    tmp = Path(folder) / ".mtp_heads.tmp.safetensors"  # mlx appends .safetensors otherwise
    mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    tmp.rename(Path(folder) / HEADS_WEIGHTS)
    write_json_atomic(Path(folder) / HEADS_CONFIG, config)


def save_heads(head_set: HeadSet, out: Path, force: bool = True, dtype: Optional[str] = None) -> Path:
    """Save a head set: into an existing model folder beside the backbone, or as
    a new folder built whole and renamed into place."""
    out = Path(out)
    if out.exists() and (out / "config.json").exists():
        write_head_files(head_set, out, dtype)
        return out
    with atomic_dir(out, force=force) as tmp:
        write_head_files(head_set, tmp, dtype)
    return out


def check_fingerprint(config: Dict[str, Any], backbone: Backbone, where: Path) -> None:
    compare_fingerprints(config.get("backbone", {}), backbone.fingerprint(), where)


def compare_fingerprints(want: Dict[str, Any], have: Dict[str, Any], where: Path) -> None:
    """Refuse `where` (made for the backbone `want` describes) on the backbone `have` describes."""
    for key in ("model_type", "hidden_size", "vocab_size", "num_layers"):
        if key in want and want[key] != have[key]:
            raise MTPDError(
                f"head set {where} was made for another backbone ({key}: "
                f"{want[key]!r} there, {have[key]!r} here): use heads made for this model"
            )
    probe_want, probe_have = want.get("embedding_probe"), have["embedding_probe"]
    if probe_want is not None:
        worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(probe_want, probe_have))
        if worst > PROBE_TOLERANCE:
            raise MTPDError(
                f"head set {where} was made for another backbone (its embedding differs by "
                f"{worst:.0%}): use heads made for this model"
            )


def draft_scales(head_dir: Optional[Path]) -> Dict[float, float]:
    """{sampling temperature: the factor the heads draft at} from the head set's
    eval.json (eval-heads --temp: `draft_temperature`), {} when not measured."""
    if head_dir is None:
        return {}
    try:
        rec = json.loads((Path(head_dir) / EVAL_FILE).read_text()).get("draft_temperature") or {}
        return {float(t): float(r["scale"]) for t, r in rec.items() if float(t) > 0 and float(r["scale"]) > 0}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def load_heads(path: Path, model: nn.Module) -> HeadSet:
    path = Path(path)
    cfg_file, w_file = path / HEADS_CONFIG, path / HEADS_WEIGHTS
    if not path.exists():
        raise MTPDError(f"heads folder {path} not found: check --heads")
    if not cfg_file.exists() or not w_file.exists():
        raise MTPDError(
            f"{path} holds no head set ({HEADS_CONFIG} and {HEADS_WEIGHTS} needed): "
            "create one with `mlx_mtpd init-heads` or train one"
        )
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise MTPDError(f"{cfg_file} is not valid JSON ({e})") from None
    backbone = Backbone(model)
    check_fingerprint(config, backbone, path)
    try:
        weights = mx.load(str(w_file))
    except Exception as e:
        raise MTPDError(f"{w_file} is truncated or corrupt ({e})") from None
    draft_ids = weights.pop(DRAFT_VOCAB_KEY, None)
    if draft_ids is not None and (draft_ids.ndim != 1 or int(draft_ids.max()) >= backbone.vocab_size):
        raise MTPDError(f"{w_file}: draft_vocab holds ids outside this backbone's vocabulary")
    head_set = _head_skeleton(backbone, config, draft_ids)
    if "quantization" in config:
        q = config["quantization"]
        nn.quantize(head_set, group_size=q["group_size"], bits=q["bits"],
                    class_predicate=lambda p, m: isinstance(m, nn.Linear) and f"{p}.scales" in weights)
    try:
        head_set.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MTPDError(f"{w_file} does not match {HEADS_CONFIG} or this backbone ({e})") from None
    # Heads may be stored at 16 bits; they compute in the backbone's dtype.
    dtype = _compute_dtype(backbone)
    head_set.update(tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v,
                             head_set.parameters()))
    mx.eval(head_set.parameters())
    object.__setattr__(head_set, "path", path)  # where its evaluation (eval.json) lives
    object.__setattr__(head_set, "draft_scales", draft_scales(path))
    return head_set


def quantize_head_file(src: Path, dst: Path, bits: int, group_size: int) -> None:
    """Quantize a head file's linear weights to `bits` (16: keep them float)."""
    config = json.loads((Path(src) / HEADS_CONFIG).read_text())
    weights = mx.load(str(Path(src) / HEADS_WEIGHTS))
    if bits < 16:
        out = {}
        for k, v in weights.items():
            if k.endswith("proj.weight") and v.ndim == 2 and v.shape[-1] % group_size == 0:
                stem = k[: -len(".weight")]
                out[k], out[f"{stem}.scales"], out[f"{stem}.biases"] = mx.quantize(
                    v, group_size=group_size, bits=bits
                )
            else:
                out[k] = v
        weights = out
        config["quantization"] = {"group_size": group_size, "bits": bits}
    _write_head_pair(Path(dst), weights, config)


__all__ = [
    "Backbone",
    "FeatureFusion",
    "MTPHead",
    "HeadSet",
    "init_heads",
    "save_heads",
    "load_heads",
]
