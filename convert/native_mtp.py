"""Native MTP layers that released checkpoints ship, imported as head sets.

mlx-lm's `sanitize()` drops them; here they are read from the original
safetensors shards and written as this project's head set (`mtp_heads.safetensors`
+ `mtp_config.json`) beside the converted backbone.  Each family is data: where
its MTP tensors live, what its pieces are called, and the conventions sources
disagree on (see ../shared/docs/NATIVE_MTP.md).  The decoder block of an MTP
layer is built as for trained heads, as the family's own mlx-lm layer (a copy
of the backbone's last layer, whose weights are then replaced), and its
tensors go through the family's own `sanitize()` (expert stacking, fp8
dequantization) under the last layer's name.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_mtpd.errors import MTPDError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: Tuple[str, ...]
    count_keys: Tuple[str, ...]  # config keys that give the number of MTP layers
    prefix: str  # where layer i lives; {i} = i, {ni} = num_hidden_layers + i
    enorm: str  # names under the prefix
    hnorm: str
    eh_proj: str
    final_norm: Optional[str]  # None: the family has no final norm (ERNIE)
    block: str  # the decoder block's sub-prefix ("" = every other tensor under the prefix)
    ignore: Tuple[str, ...] = ()  # copies of the embedding and the output head
    concat_order: str = "embedding_hidden"
    hidden_state: str = "post_norm"  # what depth 1 takes from the backbone (vLLM's convention)
    feedback: str = "pre_norm"  # what a looped layer takes back from itself
    zero_centred: bool = False  # norms stored as w with (1 + w) applied: shift exactly once here
    eh_bias: bool = False


FAMILIES: List[Family] = [
    Family("deepseek_v3", ("deepseek_v3", "deepseek_v32", "kimi_k2"), ("num_nextn_predict_layers",),
           "model.layers.{ni}.", "enorm", "hnorm", "eh_proj", "shared_head.norm", "",
           ignore=("shared_head.head", "embed_tokens")),
    Family("glm4_moe", ("glm4_moe", "glm4_moe_lite"), ("num_nextn_predict_layers",),
           "model.layers.{ni}.", "enorm", "hnorm", "eh_proj", "shared_head.norm", "",
           ignore=("shared_head.head", "embed_tokens")),
    # MiMo: [hidden ; embedding], and vLLM feeds it the backbone's pre-norm state.
    Family("mimo", ("mimo",), ("num_nextn_predict_layers",), "model.mtp_layers.{i}.",
           "token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm", "",
           concat_order="hidden_embedding", hidden_state="pre_norm"),
    Family("qwen3_next", ("qwen3_next", "qwen3_5", "qwen3_5_moe"),
           ("mtp_num_hidden_layers", "num_nextn_predict_layers"), "mtp.",
           "pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm", "layers.{i}.", zero_centred=True),
    Family("ernie4_5_moe", ("ernie4_5_moe",), ("num_nextn_predict_layers",), "model.",
           "mtp_emb_norm.{i}", "mtp_hidden_norm.{i}", "mtp_linear_proj.{i}", None, "mtp_block.{i}.", eh_bias=True),
    Family("exaone_moe", ("exaone_moe",), ("mtp_num_hidden_layers", "num_nextn_predict_layers"),
           "mtp.", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm", "layers.{i}."),
]


def _flat(config: Dict[str, Any]) -> Dict[str, Any]:
    """The config with a nested text_config's keys (multimodal wrappers) folded in."""
    flat = dict(config)
    for k, v in (config.get("text_config") or {}).items():
        flat.setdefault(k, v)
    return flat


def declared_layers(config: Dict[str, Any]) -> int:
    config = _flat(config)
    for fam in FAMILIES:
        for key in fam.count_keys:
            if isinstance(config.get(key), int) and config[key] > 0:
                return config[key]
    for key in ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return 0


def family_for(config: Dict[str, Any]) -> Optional[Family]:
    mt = config.get("model_type")
    return next((f for f in FAMILIES if mt in f.model_types), None)


def mtp_prefixes(config: Dict[str, Any]) -> Tuple[str, ...]:
    """Where the declared MTP layers' tensors live (what the backbone must not load)."""
    fam, count = family_for(config), declared_layers(config)
    if fam is None or count == 0:
        return ()
    n = int(_flat(config).get("num_hidden_layers", 0))
    out = []
    for i in range(count):
        pre = fam.prefix.format(i=i, ni=n + i)
        if fam.block:  # the pieces are named, under a shared prefix (ERNIE's model.)
            out += [pre + x.format(i=i) + "." for x in (fam.enorm, fam.hnorm, fam.eh_proj)]
            out += [pre + fam.block.format(i=i)] + ([pre + fam.final_norm + "."] if fam.final_norm else [])
        else:
            out.append(pre)
    return tuple(out)


def classes_without_mtp(config: Dict[str, Any]):
    """mlx-lm's model classes for `config`, whose sanitize() first drops the MTP
    tensors (some families drop them only at the layer index of the full-size
    release, e.g. DeepSeek-V3's `model.layers.61`)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    prefixes = mtp_prefixes(config)
    if not prefixes:
        return model_class, args_class
    base_sanitize = getattr(model_class, "sanitize", None)

    def sanitize(self, weights):
        weights = {k: v for k, v in weights.items() if not k.startswith(prefixes)}
        return base_sanitize(self, weights) if base_sanitize else weights

    return type(model_class.__name__, (model_class,), {"sanitize": sanitize}), args_class


class _Shards:
    """Tensor names of a checkpoint's safetensors shards, loaded on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            wmap = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.folder / v for k, v in wmap.items()}
        else:
            self.where = {}
            for f in sorted(glob.glob(str(self.folder / "*.safetensors"))):
                if Path(f).name.startswith("mtp_heads"):
                    continue
                for k in _safetensors_names(Path(f)):
                    self.where[k] = Path(f)
        self._loaded: Dict[Path, Dict[str, mx.array]] = {}

    def names(self, prefix: str) -> List[str]:
        return [k for k in self.where if k.startswith(prefix)]

    def get(self, name: str) -> mx.array:
        f = self.where[name]
        if f not in self._loaded:
            self._loaded[f] = mx.load(str(f))
        return self._loaded[f][name]


def _safetensors_names(path: Path) -> List[str]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return [k for k in header if k != "__metadata__"]


def extract(src: Path, config: Dict[str, Any], model: nn.Module, hidden_state: Optional[str] = None):
    """The checkpoint's native MTP layers as a HeadSet, or None when it declares none.

    Raises MTPDError (the caller converts the backbone anyway) when layers are
    declared but missing, of the wrong shape, or of an unknown family.
    """
    from mlx_mtpd.heads import FORMAT_VERSION, Backbone, HeadSet, new_head

    count = declared_layers(config)
    if count == 0:
        return None
    fam = family_for(config)
    if fam is None:
        raise MTPDError(
            f"the config declares {count} MTP layer(s) but {config.get('model_type')!r} is not a known MTP "
            f"family ({', '.join(f.name for f in FAMILIES)}): converted the backbone without heads"
        )
    if fam.name == "qwen3_next" and count > 1:
        raise MTPDError(f"{count} stacked MTP layers in one {fam.name} module are not supported yet: "
                        "converted the backbone without heads")
    if hidden_state not in (None, "pre", "post"):
        raise MTPDError(f"--mtp-hidden must be pre or post (got {hidden_state!r})")
    shards = _Shards(src)
    backbone = Backbone(model)
    n_layers = int(_flat(config).get("num_hidden_layers", len(backbone.inner.layers)))
    last = len(backbone.inner.layers) - 1
    hcfg = {
        "format_version": FORMAT_VERSION,
        "num_heads": count,
        "loop": "last",
        "hidden_state": {"pre": "pre_norm", "post": "post_norm"}.get(hidden_state, fam.hidden_state),
        "feedback": fam.feedback,
        "concat_order": fam.concat_order,
        "eh_bias": fam.eh_bias,
        "final_norm": fam.final_norm is not None,
        "backbone": _fingerprint(backbone, shards),
        "trained": True,
        "source": "native",
        "family": fam.name,
    }
    weights: Dict[str, mx.array] = {}
    for i in range(count):
        pre = fam.prefix.format(i=i, ni=n_layers + i)
        present = shards.names(pre)
        if not present:
            raise MTPDError(
                f"the config declares {count} MTP layer(s) but the checkpoint has no {pre}* tensors "
                "(some releases declare MTP without shipping it): converted the backbone without heads"
            )

        def need(name: str, pre=pre, i=i) -> mx.array:
            key = pre + name.format(i=i)
            if key not in shards.where:
                raise MTPDError(f"MTP layer {i} is incomplete ({key} is missing): converted the backbone "
                                "without heads")
            return shards.get(key)

        shift = (lambda w: w.astype(mx.float32) + 1.0) if fam.zero_centred else (lambda w: w)
        out = f"heads.{i}."
        weights[out + "enorm.weight"] = shift(need(fam.enorm + ".weight"))
        weights[out + "hnorm.weight"] = shift(need(fam.hnorm + ".weight"))
        weights[out + "eh_proj.weight"] = need(fam.eh_proj + ".weight")
        if fam.eh_bias:
            weights[out + "eh_proj.bias"] = need(fam.eh_proj + ".bias")
        if fam.final_norm is not None:
            weights[out + "norm.weight"] = shift(need(fam.final_norm + ".weight"))
        named = {pre + x.format(i=i) for x in (fam.enorm, fam.hnorm, fam.eh_proj)}
        named |= {pre + fam.final_norm} if fam.final_norm else set()
        skip = tuple(pre + x for x in fam.ignore)
        block_pre = pre + fam.block.format(i=i)
        raw = {}
        for k in shards.names(block_pre):
            if any(k.startswith(n + ".") for n in named) or k.startswith(skip):
                continue
            raw[f"model.layers.{last}." + k[len(block_pre):]] = shards.get(k)
        if not raw:
            raise MTPDError(f"MTP layer {i} has no decoder block under {block_pre}: converted the backbone "
                            "without heads")
        # The family's own sanitize: expert stacking, fp8 blocks, its norm conventions.
        clean = model.sanitize(dict(raw)) if hasattr(model, "sanitize") else raw
        tag = f"layers.{last}."  # under model. (or language_model.model. for wrapped text models)
        raw_by_name = {_after(k, tag): v for k, v in raw.items()}
        for k, v in clean.items():
            name = _after(k, tag)
            if name is None:
                continue
            if fam.zero_centred and v.ndim == 1 and name.rsplit(".", 2)[-2].endswith("norm") \
                    and name in raw_by_name and mx.array_equal(v, raw_by_name[name]).item():
                # (1 + w) norms become plain ones exactly once: mlx-lm's sanitize shifts
                # them only when it recognizes a raw checkpoint, which a lone block may
                # not look like; what it left as it was is shifted here.
                v = v.astype(mx.float32) + 1.0
            weights[out + "block." + name] = v
    heads = HeadSet([new_head(backbone, hcfg) for _ in range(count)], hcfg, None)
    try:
        heads.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MTPDError(f"the MTP layers do not fit this {fam.name} model ({e}): converted the backbone "
                        "without heads") from None
    dtype = backbone.norm.weight.dtype
    from mlx.utils import tree_map

    heads.update(tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v,
                          heads.parameters()))
    mx.eval(heads.parameters())
    return heads


def _after(key: str, tag: str) -> Optional[str]:
    """What follows `tag` in `key` when tag starts a dotted component, else None."""
    i = key.find(tag)
    if i == 0 or (i > 0 and key[i - 1] == "."):
        return key[i + len(tag):]
    return None


def _fingerprint(backbone, shards: _Shards) -> Dict[str, Any]:
    """The backbone's fingerprint, its embedding probe taken from the source
    checkpoint's own embedding (so --mtp-only can tell another model's heads)."""
    fp = backbone.fingerprint()
    name = next((k for k in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                             "model.embed.weight", "transformer.wte.weight") if k in shards.where), None)
    if name is not None:
        emb = shards.get(name).astype(mx.float32)
        ids = mx.array([int(i * (emb.shape[0] - 1) / 31) for i in range(32)])
        fp["embedding_probe"] = [round(float(x), 5) for x in mx.sqrt((emb[ids] ** 2).sum(-1)).tolist()]
    return fp
