"""Drawing the next token of an answer: exactly, cheaply over a 152k-token vocabulary, and from seeds
that belong to each answer rather than to the batch it happens to be generated in.

Hugging Face's sampling ends in ``torch.multinomial``, which on a 2-core CPU takes about 10 ms per
call over Qwen's 151,936-entry vocabulary (4 rows), and draws from one generator for the whole
batch, so an answer's tokens would depend on which other prompts share its `generate` call. Here
every row gets its own uniform numbers, drawn up front from a generator seeded by its key
(`row_uniforms`), and a token is drawn by inverting the row's cumulative distribution with that
row's number for the step (a cumulative sum and a binary search). `NextTokenSampler` does that as a
logits processor that leaves only the drawn token selectable, so generation runs it under greedy
decoding and everything else (KV cache, stopping, padding) stays Hugging Face's. The same processor
keeps tokens an answer must never hold (image placeholders) out; their ids live on the device once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from tag_lightning.errors import BadValue


def seed_of(key: str) -> int:
    """A 63-bit seed that is a function of `key` alone."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 2**63


def row_uniforms(keys: Sequence[str], rows_per_key: int, steps: int) -> torch.Tensor:
    """(len(keys) x rows_per_key, steps) uniform numbers in [0, 1): row r of key k's block draws its token at step t
    with ``[k * rows_per_key + r, t]``.

    Each key's block comes from its own generator, so it is a function of the key alone, whatever other
    keys share the call (resumption, other ranks, batch composition). Within a block the numbers are drawn
    step-major, the order a generator seeded with the key and sampling `rows_per_key` rows a step would
    draw them in.
    """
    blocks = []
    for key in keys:
        generator = torch.Generator().manual_seed(seed_of(key))
        blocks.append(torch.rand(steps, rows_per_key, generator=generator).T)
    return torch.cat(blocks) if blocks else torch.empty(0, steps)


class NextTokenSampler(LogitsProcessor):
    """The next token of each row: never one of `forbidden`; drawn from softmax(scores / temperature)
    within the top-p nucleus with the row's uniform number for the step when `uniforms` are given,
    else left to greedy decoding.

    `forbidden` (token ids) and `uniforms` ((rows, steps), see `row_uniforms`) are expected on the
    scores' device already: nothing is copied per token. The step is the number of tokens generated
    so far, ``input_ids.shape[1] - prompt_length``, known without reading the device. When sampling,
    the returned scores are 0 at the drawn token and -inf elsewhere, so greedy decoding emits it. The
    nucleus keeps the most probable tokens whose cumulative probability reaches `top_p` (at least
    one), as Hugging Face's top-p warper does. The scores are modified in place: `generate` hands the
    processor its own float copy of the logits.
    """

    def __init__(self, forbidden: torch.Tensor, prompt_length: int = 0, uniforms: torch.Tensor | None = None,
                 temperature: float = 1.0, top_p: float = 1.0) -> None:
        if not temperature > 0:
            raise BadValue(f"temperature must be positive, got {temperature}")
        if not 0 < top_p <= 1:
            raise BadValue(f"top_p must be in (0, 1], got {top_p}")
        self.forbidden = forbidden
        self.prompt_length = prompt_length
        self.uniforms = uniforms
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if len(self.forbidden):
            scores.index_fill_(-1, self.forbidden, float("-inf"))
        if self.uniforms is None:
            return scores
        step = input_ids.shape[1] - self.prompt_length
        if self.temperature != 1.0:
            scores.div_(self.temperature)
        probs = torch.softmax(scores, dim=-1)
        if self.top_p < 1.0:
            probs = _nucleus(probs, self.top_p)
        chosen = inverse_cdf(probs, self.uniforms[:, step : step + 1])
        return scores.fill_(float("-inf")).scatter_(1, chosen, 0.0)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(rows, 1) token ids: for each row, the first token whose cumulative weight exceeds ``u x total``.

    Two levels, so that only one block of the vocabulary is summed cumulatively: the block holding
    the draw is found from the blocks' masses, then the token within it. A token of weight 0 is never
    chosen: the draw is kept strictly below the chosen block's mass.
    """
    rows, vocab = weights.shape
    size = _block_size(vocab)
    blocks = weights.view(rows, vocab // size, size)
    block_cdf = blocks.sum(dim=-1).cumsum(dim=-1)
    draws = uniforms * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, draws, right=True).clamp(max=block_cdf.shape[1] - 1)
    within = blocks.gather(1, block.unsqueeze(-1).expand(rows, 1, size)).squeeze(1).cumsum(dim=-1)
    before = block_cdf.gather(1, block) - within[:, -1:]
    target = torch.minimum((draws - before).clamp(min=0.0), within[:, -1:] * (1 - 1e-6))
    return block * size + torch.searchsorted(within, target, right=True).clamp(max=size - 1)


def _block_size(vocab: int) -> int:
    """The smallest divisor of `vocab` at least its square root (Qwen's 151,936: 1,187); `vocab` itself
    when there is none near it, which makes one block of everything."""
    root = math.isqrt(vocab)
    for size in range(max(root, 1), 4 * root + 1):
        if vocab % size == 0:
            return size
    return vocab


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` with every token outside the top-p nucleus set to 0 (not renormalised: the draw scales)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before the token already reaches top_p
    return probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))
