"""The next-token sampler: the distribution it draws from, the nucleus, tokens it never emits, and seeds per row."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tag_lightning.models.sampling import NextTokenSampler, _block_size, inverse_cdf, row_uniforms

DRAWS = 20_000
NONE = torch.tensor([], dtype=torch.long)


def frequencies(logits: list[float], forbidden: list[int] = (), **options) -> torch.Tensor:
    """How often each token is drawn, over DRAWS rows of the same logits."""
    uniforms = torch.rand(DRAWS, 1, generator=torch.Generator().manual_seed(0))
    sampler = NextTokenSampler(torch.tensor(forbidden, dtype=torch.long), 1, uniforms, **options)
    scores = sampler(torch.zeros(DRAWS, 1, dtype=torch.long), torch.tensor([logits]).repeat(DRAWS, 1))
    assert ((scores == 0).sum(dim=1) == 1).all() and torch.isinf(scores).sum() == DRAWS * (len(logits) - 1)
    return torch.bincount(scores.argmax(dim=1), minlength=len(logits)) / DRAWS


def test_it_samples_the_tempered_softmax():
    logits = [2.0, 1.0, 0.0, -1.0]
    for temperature in (1.0, 0.5):
        expected = torch.softmax(torch.tensor(logits) / temperature, dim=0)
        assert torch.allclose(frequencies(logits, temperature=temperature), expected, atol=0.01)


def test_it_samples_a_large_vocabulary_in_blocks_exactly():
    """A large vocabulary is drawn block by block (Qwen's 151,936 tokens: 128 blocks of 1,187; here 4,096 in 64
    blocks of 64): the same distribution, block edges included."""
    assert _block_size(151_936) == 1_187 and _block_size(4_096) == 64 and _block_size(7_919) == 7_919  # a prime
    logits = torch.full((4_096,), -30.0)
    chosen = {7: 1.0, 63: 0.5, 64: 0.0, 3_000: 2.0, 4_095: 1.5}
    for token, value in chosen.items():
        logits[token] = value
    drawn = frequencies(logits.tolist())
    expected = torch.softmax(logits, dim=0)
    for token in chosen:
        assert abs(float(drawn[token]) - float(expected[token])) < 0.01, token


def test_the_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().tolist()  # 0.5 < 0.6, 0.5 + 0.3 >= 0.6: keep two
    assert torch.allclose(frequencies(logits, top_p=0.6), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)


def test_forbidden_and_impossible_tokens_are_never_emitted():
    logits = [0.0, 9.0, float("-inf"), 1.0]  # token 1 is by far the likeliest, but forbidden
    drawn = frequencies(logits, forbidden=[1])
    assert drawn[1] == 0 and drawn[2] == 0 and drawn.sum() == 1
    greedy = NextTokenSampler(torch.tensor([1]))(torch.zeros(1, 1, dtype=torch.long), torch.tensor([logits]))
    assert int(greedy.argmax()) == 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.0, 1e-30, 1e-8, 0.3, 1.0, 5.0]), min_size=1, max_size=64),
       st.sampled_from([0.0, 1e-9, 0.5, 1 - 1e-7, 0.99999994]))
def test_a_token_of_weight_zero_is_never_drawn(weights, uniform):
    weights = torch.tensor(weights)
    if weights.sum() == 0:
        weights[-1] = 1.0
    token = int(inverse_cdf(weights[None], torch.tensor([[uniform]])))
    assert weights[token] > 0


def test_the_step_picks_each_row_s_own_number():
    """Row r draws its step-t token with uniforms[r, t]: the same numbers give the same tokens, at any step."""
    uniforms = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    sampler = NextTokenSampler(NONE, prompt_length=3, uniforms=uniforms)
    logits = torch.zeros(2, 2)  # two equally likely tokens: u < 0.5 draws token 0
    assert sampler(torch.zeros(2, 3, dtype=torch.long), logits.clone()).argmax(1).tolist() == [0, 1]
    assert sampler(torch.zeros(2, 4, dtype=torch.long), logits.clone()).argmax(1).tolist() == [1, 0]


def test_a_key_s_numbers_do_not_depend_on_the_other_keys():
    alone = row_uniforms(["face-b"], 4, 16)
    batched = row_uniforms(["face-a", "face-b", "face-c"], 4, 16)
    assert torch.equal(batched[4:8], alone)
    assert not torch.equal(batched[:4], alone)
    assert alone.shape == (4, 16) and ((alone >= 0) & (alone < 1)).all()
