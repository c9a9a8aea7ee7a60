"""The next-token sampler: the distribution it draws from, the nucleus, and tokens it never emits."""

from __future__ import annotations

import torch

from tag_lightning.models.sampling import NextTokenSampler

DRAWS = 20_000


def frequencies(sampler: NextTokenSampler, logits: list[float]) -> torch.Tensor:
    """How often each token is drawn, over DRAWS rows of the same logits."""
    torch.manual_seed(0)
    scores = sampler(torch.zeros(DRAWS, 1, dtype=torch.long), torch.tensor([logits]).repeat(DRAWS, 1))
    assert ((scores == 0).sum(dim=1) == 1).all() and torch.isinf(scores).sum() == DRAWS * (len(logits) - 1)
    return torch.bincount(scores.argmax(dim=1), minlength=len(logits)) / DRAWS


def test_it_samples_the_tempered_softmax():
    logits = [2.0, 1.0, 0.0, -1.0]
    for temperature in (1.0, 0.5):
        expected = torch.softmax(torch.tensor(logits) / temperature, dim=0)
        assert torch.allclose(frequencies(NextTokenSampler(sample=True, temperature=temperature), logits),
                              expected, atol=0.01)


def test_the_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().tolist()  # 0.5 < 0.6, 0.5 + 0.3 >= 0.6: keep two
    drawn = frequencies(NextTokenSampler(sample=True, top_p=0.6), logits)
    assert torch.allclose(drawn, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)


def test_forbidden_and_impossible_tokens_are_never_emitted():
    logits = [0.0, 9.0, float("-inf"), 1.0]  # token 1 is by far the likeliest, but forbidden
    drawn = frequencies(NextTokenSampler(forbidden=[1], sample=True), logits)
    assert drawn[1] == 0 and drawn[2] == 0 and drawn.sum() == 1
    greedy = NextTokenSampler(forbidden=[1])(torch.zeros(1, 1, dtype=torch.long), torch.tensor([logits]))
    assert int(greedy.argmax()) == 3
