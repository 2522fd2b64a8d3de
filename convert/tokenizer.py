"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata.

Byte-level BPE ('gpt2': Llama 3, Qwen, SmolLM) is rebuilt here; SentencePiece
('llama': Gemma, Llama 2, Mistral) through transformers' own GGUF tokenizer
support.  A file without a chat template gets its family's (Gemma's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from mlx_mtpd.errors import MTPDError

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> how HF splits text
# before byte-level BPE.  Patterns are the ones the original tokenizers use.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    # digits one by one, then GPT-2's byte-level regex
    "smollm": "digits+bytelevel",
    "starcoder": "digits+bytelevel",
    "refact": "digits+bytelevel",
    "codeshell": "digits+bytelevel",
    # GPT-2's byte-level regex alone
    "gpt2": "bytelevel",
    "gpt-2": "bytelevel",
    "default": "bytelevel",
    "olmo": "bytelevel",
    "phi-2": "bytelevel",
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

CONTROL, USER_DEFINED = 3, 4

# Gemma's chat format (a system message goes before the first user turn's text),
# for GGUF files that carry no template.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
DEFAULT_TEMPLATES = {"gemma3": GEMMA_TEMPLATE}


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise MTPDError(
            f"GGUF tokenizer pre-tokenizer {pre!r} is not supported yet "
            f"(known: {', '.join(sorted(PRE_TOKENIZERS))}): convert from the "
            "Hugging Face checkpoint with --hf-path instead"
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "bytelevel":
        return byte_level
    if kind == "digits+bytelevel":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(kind), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_tokenizer(meta: Dict[str, Any], out: Path) -> None:
    """Write tokenizer files for a GGUF tokenizer: byte-level BPE ('gpt2') here,
    SentencePiece ('llama') through transformers' builders."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_tokenizer(meta, out)
    if kind != "gpt2":
        raise MTPDError(
            f"GGUF tokenizer model {kind!r} is not supported yet (byte-level BPE 'gpt2' "
            "and SentencePiece 'llama'): convert from the Hugging Face checkpoint with --hf-path"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise MTPDError("GGUF metadata has no tokenizer (tokenizer.ggml.tokens/merges)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(tokens[i], special=(t == CONTROL), normalized=False)
        for i, t in enumerate(types)
        if t in (CONTROL, USER_DEFINED)
    ]
    tok.add_tokens(added)

    def special(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    bos = special("bos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        bos_id = vocab[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        add_bos_token=add_bos,
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get("context_length", 8192)),
    )
    if meta.get("tokenizer.chat_template"):
        fast.chat_template = meta["tokenizer.chat_template"]
    fast.save_pretrained(str(out))


def _sentencepiece_tokenizer(meta: Dict[str, Any], out: Path) -> None:
    """transformers' GGUF tokenizer builders, fed from the metadata already read
    (its own GGUF reader needs PyTorch)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    groups = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = groups["tokenizer"], groups["tokenizer_config"]
    config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to a SentencePiece vocabulary
    tokens = tokenizer.get("tokens") or []
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and int(i) < len(tokens):
            config[name] = tokens[int(i)]
    try:
        backend, _ = convert_gguf_tokenizer(meta.get("general.architecture"), tokenizer)
    except Exception as e:  # transformers raises many kinds on a tokenizer it cannot rebuild
        raise MTPDError(
            f"cannot rebuild this GGUF's SentencePiece tokenizer ({type(e).__name__}: {e}): "
            "convert from the Hugging Face checkpoint with --hf-path"
        ) from None
    template = config.pop("chat_template", None) or DEFAULT_TEMPLATES.get(meta.get("general.architecture"))
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   model_max_length=int(meta.get("context_length", 8192)), **config)
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out))
