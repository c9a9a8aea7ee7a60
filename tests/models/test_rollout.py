"""The rollout engine on tiny random models: what it generates (every backbone), seeds that do not depend
on the batch, Qwen's 3-D positions under batching and padding, the sampling copy of the weights, and
compilation that happens once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tag_lightning.answers.prompts import user_prompt
from tag_lightning.errors import BadValue
from tag_lightning.models import LoRAConfig, RolloutConfig, RolloutEngine, VLMConfig, VLMWrapper
from tag_lightning.models.backbones import BACKBONES

_rng = np.random.default_rng(0)
IMAGES = [_rng.integers(0, 256, size, dtype=np.uint8) for size in ((61, 37, 3), (287, 513, 3), (224, 224, 3))]
PROMPTS = ["Which expression is this?", user_prompt(["happiness", "anger"]), user_prompt(["surprise"])]
SEEDS = ["0:0:a.jpg", "0:0:b.jpg", "0:0:c.jpg"]
COMPILED = RolloutConfig(cache_implementation="static", compile=True, compile_mode="default")


def lora_wrapper(folder, dtype: str = "float32") -> VLMWrapper:
    """LoRA r=4 with adapters that change the answers (B drawn at random, as after training)."""
    wrapper = VLMWrapper(VLMConfig(str(folder), dtype=dtype, lora=LoRAConfig(r=4, alpha=8, dropout=0.0)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in wrapper.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return wrapper.eval()


@pytest.fixture(scope="module")
def wrapper(tiny_dirs) -> VLMWrapper:
    return lora_wrapper(tiny_dirs["qwen2_5_vl"])


@pytest.mark.parametrize("name", list(BACKBONES))
def test_answers_on_every_backbone(name, tiny_dirs):
    """Greedy: the first token is one forward pass's argmax, and a second call says the same; sampled: n answers
    a prompt, nothing after an end token, each text its tokens decoded (images encoded once or per row)."""
    network = lora_wrapper(tiny_dirs[name])
    engine = RolloutEngine(network)
    greedy = engine.greedy(IMAGES[:2], PROMPTS[:2], max_new_tokens=5)
    assert greedy.texts == engine.greedy(IMAGES[:2], PROMPTS[:2], max_new_tokens=5).texts
    with torch.no_grad():
        logits = network(network.build_inputs(IMAGES[:2], PROMPTS[:2])).logits[:, -1]
    forbidden = torch.tensor(network.placeholder_ids, dtype=torch.long)
    first = logits.index_fill(-1, forbidden, float("-inf")).argmax(-1).tolist() if len(forbidden) else \
        logits.argmax(-1).tolist()
    assert [int(ids[0]) for ids in greedy.token_ids] == first

    sampled = engine.sample(IMAGES[:2], PROMPTS[:2], SEEDS[:2], 3, max_new_tokens=5, top_p=0.9)
    assert len(sampled.texts) == len(sampled.token_ids) == 6
    for ids, text in zip(sampled.token_ids, sampled.texts):
        ended = torch.isin(ids, torch.tensor(network.end_ids))
        assert len(ids) <= 5 and not ended[:-1].any()
        assert text == network.processor.decode(ids, skip_special_tokens=True)


def test_bad_options_are_refused():
    with pytest.raises(BadValue, match="cache_implementation 'paged'"):
        RolloutConfig(cache_implementation="paged")
    with pytest.raises(BadValue, match="compile needs rollout.cache_implementation static"):
        RolloutConfig(compile=True)


def test_a_face_s_answers_do_not_depend_on_what_shares_the_call(tiny_dirs):
    """Sampled alone or beside two other faces (other sizes, other prompt lengths, so left-padded), a face's
    answers are the same tokens: its uniform numbers come from its own seed.

    The tiny model's LM head is scaled up so that its distributions are peaked: on its near-uniform
    distribution over 152k tokens, the rounding differences of another batch shape move a draw across a
    token boundary every few dozen tokens, which says nothing about the seeds."""
    network = lora_wrapper(tiny_dirs["qwen2_5_vl"])
    with torch.no_grad():
        network.model.get_base_model().lm_head.weight.mul_(30.0)
    for config in (RolloutConfig(), RolloutConfig(cache_implementation="static")):
        engine = RolloutEngine(network, config)
        together = engine.sample(IMAGES, PROMPTS, SEEDS, 4, max_new_tokens=24)
        alone = engine.sample(IMAGES[1:2], PROMPTS[1:2], SEEDS[1:2], 4, max_new_tokens=24)
        assert [ids.tolist() for ids in together.token_ids[4:8]] == [ids.tolist() for ids in alone.token_ids]
        assert len({tuple(ids.tolist()) for ids in alone.token_ids}) > 1  # sampled, not one greedy answer
        other_seed = engine.sample(IMAGES[1:2], PROMPTS[1:2], ["0:1:b.jpg"], 4, max_new_tokens=24)
        assert [ids.tolist() for ids in other_seed.token_ids] != [ids.tolist() for ids in alone.token_ids]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_qwen_3d_positions_of_a_batched_padded_call_are_each_image_s_own(wrapper, cache):
    """Three images of different sizes (so different grids of image tokens) and prompts of different lengths
    (so left padding) in one call, each prompt's rows repeated: every row's multimodal rope positions, in the
    prefill and the first decode step, equal those of its image and prompt generated alone."""
    language_model = wrapper.model.get_base_model().model  # Qwen2_5_VLModel: takes the positions and the mask
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    hook = language_model.register_forward_pre_hook(record, with_kwargs=True)
    engine = RolloutEngine(wrapper, RolloutConfig(cache_implementation=cache))
    try:
        engine.sample(IMAGES, PROMPTS, SEEDS, 2, max_new_tokens=2)
        batched, batched_step = seen[:2]
        real = wrapper.build_inputs(IMAGES, PROMPTS, padding_side="left")["attention_mask"].bool()
        assert not real.all()  # some prompts are left-padded
        for index in range(3):
            seen.clear()
            engine.sample(IMAGES[index : index + 1], PROMPTS[index : index + 1], SEEDS[index : index + 1], 2, 2)
            alone, alone_step = seen[:2]
            for row in (2 * index, 2 * index + 1):
                assert torch.equal(batched[..., row, real[index]], alone[..., 0, :]), (index, row)
                assert torch.equal(batched_step[..., row, :], alone_step[..., 0, :]), (index, row)
    finally:
        hook.remove()
    spatial = alone[-2:, 0]  # the last image's height and width positions differ across its image tokens
    assert (spatial[0] != spatial[1]).any()


def test_the_sampling_copy_never_moves_the_training_weights(tiny_dirs):
    """50 rounds of an optimizer-like step on the adapters and a generate call from the merged sampling copy
    (bfloat16 base): every frozen base weight is the same Parameter, bit for bit, and the copy follows the
    adapters (it is rebuilt only when they changed). Merging in place and unmerging, as PEFT's
    merge_adapter/unmerge_adapter do, drifts the bfloat16 base in as many rounds (TRL issue 6688)."""
    network = lora_wrapper(tiny_dirs["qwen2_5_vl"], dtype="bfloat16")
    frozen = {name: (parameter, parameter.detach().clone()) for name, parameter in network.model.named_parameters()
              if not parameter.requires_grad}
    adapters = [parameter for name, parameter in network.model.named_parameters() if "lora_" in name]
    engine = RolloutEngine(network)
    generator = torch.Generator().manual_seed(1)
    answers = set()
    for _ in range(50):
        with torch.no_grad():
            for parameter in adapters:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        answers.add(tuple(engine.greedy(IMAGES[2:], PROMPTS[2:], max_new_tokens=3).token_ids[0].tolist()))
    current = dict(network.model.named_parameters())
    for name, (parameter, snapshot) in frozen.items():
        assert current[name] is parameter and torch.equal(parameter, snapshot), name
    assert len(answers) > 1  # the copy was refreshed as the adapters moved
    lora_layers = [module for module in network.model.modules() if hasattr(module, "get_delta_weight")]
    expected = [(layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
                for layer in lora_layers]
    with engine._sampling_copy.swapped_in():  # what a decode step reads: W + scale * B @ A, rounded once
        for layer, weight in zip(lora_layers, expected):
            assert torch.equal(layer.base_layer.weight, weight)
    after = dict(network.model.named_parameters())
    assert all(after[name] is parameter for name, (parameter, _) in frozen.items())  # and back after it

    for _ in range(50):
        network.model.merge_adapter()
        network.model.unmerge_adapter()
    drift = max(float((parameter.float() - snapshot.float()).abs().max()) for parameter, snapshot in frozen.values())
    assert drift > 0


@pytest.mark.slow
def test_a_compiled_decode_step_answers_as_the_eager_one_and_compiles_once(wrapper):
    """Static cache + torch.compile (inductor): the same greedy and sampled tokens as the dynamic eager path, and
    one graph for three calls (the second and third reuse it: no recompilation)."""
    eager, compiled = RolloutEngine(wrapper), RolloutEngine(wrapper, COMPILED)
    def tokens(answers) -> list[list[int]]:
        return [ids.tolist() for ids in answers.token_ids]

    for _ in range(2):
        assert tokens(compiled.greedy(IMAGES, PROMPTS, 6)) == tokens(eager.greedy(IMAGES, PROMPTS, 6))
    assert tokens(compiled.sample(IMAGES, PROMPTS, SEEDS, 1, 6)) == tokens(eager.sample(IMAGES, PROMPTS, SEEDS, 1, 6))
    assert compiled.stats.compiled_graphs == 1 and compiled.stats.calls == 3 and compiled.stats.warmup_seconds > 0
    assert compiled.stats.steady_tokens > 0
