"""VLMWrapper on a tiny random model of every registered backbone: the same numbers as plain
Hugging Face, answer-only labels, both padding sides, freezing, LoRA, checkpoints,
merged export, box frames, and bad configurations refused before any weight is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessor

from tag_lightning.answers.grammar import Step, Trace, render_trace
from tag_lightning.models import LoRAConfig, VLMConfig, VLMWrapper
from tag_lightning.models import vlm as vlm_module
from tag_lightning.models.backbones import BACKBONES

_rng = np.random.default_rng(0)
IMAGES = [_rng.integers(0, 256, (61, 37, 3), dtype=np.uint8), _rng.integers(0, 256, (287, 513, 3), dtype=np.uint8)]
PROMPTS = ["Which expression is this?", "Which facial expression does this face show? Ground every step in an AU."]
TARGETS = [
    render_trace(Trace("A broad smile.", (Step("mouth corners", (12,), "pulled up", (3, 40, 30, 55)),),
                       "AU12 indicates happiness.", "happiness")),
    "<answer> anger </answer>",
]


@pytest.fixture(scope="module", params=list(BACKBONES))
def wrapper(request, tiny_dirs) -> VLMWrapper:
    """LoRA (at init the adapters add exactly zero) with activation checkpointing, on every backbone."""
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0)
    return VLMWrapper(VLMConfig(str(tiny_dirs[request.param]), lora=lora, gradient_checkpointing=True))


@pytest.fixture(scope="module")
def full_wrapper(tiny_dirs) -> VLMWrapper:
    """Full fine-tuning in bfloat16, the tiny model's image size bounds overridden (224 -> 112 px a side)."""
    return VLMWrapper(VLMConfig(str(tiny_dirs["qwen2_5_vl"]), dtype="bfloat16", min_pixels=28 * 28,
                                max_pixels=112 * 112))


def _without_labels(batch) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


def _rows(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


# -- the same numbers as plain Hugging Face ----------------------------------------------------------


def test_logits_and_loss_equal_the_plain_model(wrapper, tiny_dirs):
    _assert_same_numbers(wrapper, tiny_dirs[wrapper.backbone.name])


def test_full_fine_tuning_logits_equal_the_plain_model(full_wrapper, tiny_dirs):
    _assert_same_numbers(full_wrapper, tiny_dirs["qwen2_5_vl"])


def _assert_same_numbers(wrapper: VLMWrapper, folder: Path) -> None:
    """The wrapper computes what plain transformers does in the same precision: a low-precision base's
    trained weights in float32 and the compute under autocast."""
    plain = AutoModelForImageTextToText.from_pretrained(folder, dtype=wrapper.dtype)
    trained = {name for name, parameter in wrapper.model.named_parameters() if parameter.requires_grad}
    for name, parameter in plain.named_parameters():
        if name in trained:
            parameter.data = parameter.data.float()

    def cast(batch) -> dict:
        return {key: value.to(wrapper.dtype) if value.is_floating_point() else value for key, value in batch.items()}

    prompts_only = wrapper.build_inputs(IMAGES, PROMPTS)
    batch = wrapper.build_inputs(IMAGES, PROMPTS, TARGETS)
    with torch.no_grad(), torch.autocast("cpu", dtype=wrapper.dtype, enabled=wrapper.dtype != torch.float32):
        torch.testing.assert_close(wrapper(prompts_only).logits, plain(**cast(prompts_only)).logits, rtol=0, atol=1e-5)
        ours, theirs = wrapper(batch), plain(**cast(batch))
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)
    kept = ours.logits.shape[1]  # the LM head ran only where an answer token is predicted
    assert kept < batch["input_ids"].shape[1]
    torch.testing.assert_close(ours.logits, theirs.logits[:, -kept:], rtol=0, atol=1e-5)


def test_tokens_are_the_chat_templates(wrapper):
    """Prompt + answer tokens equal the processor's tokens of the whole rendered conversation."""
    batch = wrapper.build_inputs(IMAGES, PROMPTS, TARGETS)
    conversations = [wrapper.processor.apply_chat_template(wrapper.backbone.messages(prompt, target), tokenize=False)
                     for prompt, target in zip(PROMPTS, TARGETS)]
    reference = wrapper.processor(text=conversations, images=[[image] for image in IMAGES], padding=True,
                                  return_tensors="pt")
    for ours, theirs in zip(_rows(batch), _rows(reference)):
        assert theirs[: len(ours)] == ours
        assert wrapper.processor.tokenizer.decode(theirs[len(ours):]).strip() == ""  # the template's closing newline


def test_labels_are_the_answer_and_its_end_of_turn(wrapper):
    batch = wrapper.build_inputs(IMAGES, PROMPTS, TARGETS)
    end_of_turn = wrapper.backbone.end_of_turn
    for row, target in enumerate(TARGETS):
        real = batch["attention_mask"][row].bool()
        labels, ids = batch["labels"][row][real], batch["input_ids"][row][real]
        answer = labels != -100
        first = int(answer.nonzero()[0])
        assert answer[first:].all() and not answer[:first].any()  # one run, to the last real token
        assert torch.equal(labels[answer], ids[answer])
        text = wrapper.processor.tokenizer.decode(ids[answer])
        assert text.strip() == target + end_of_turn
        assert (batch["labels"][row][~real] == -100).all()


def test_padding_right_for_training_left_for_generation(wrapper):
    training = wrapper.build_inputs(IMAGES, PROMPTS, TARGETS)
    generation = wrapper.build_inputs(IMAGES, PROMPTS)
    assert training["attention_mask"][:, 0].all() and not training["attention_mask"][:, -1].all()
    assert generation["attention_mask"][:, -1].all() and not generation["attention_mask"][:, 0].all()
    assert "labels" not in generation
    left = wrapper.build_inputs(IMAGES, PROMPTS, TARGETS, padding_side="left")
    assert _rows(left) == _rows(training)
    with torch.no_grad():  # positions (Qwen's 3-D rope included) ignore the padding on either side
        torch.testing.assert_close(wrapper(left).loss, wrapper(training).loss, rtol=1e-4, atol=1e-4)


# -- what trains ----------------------------------------------------------------------------------------


def test_full_fine_tuning_trains_language_model_and_projector_only(full_wrapper):
    backbone = full_wrapper.backbone
    trainable = full_wrapper.trainable_state_dict()
    for name, parameter in full_wrapper.model.named_parameters():
        assert parameter.requires_grad == (not backbone.is_vision_encoder(name)), name
        assert parameter.dtype == (torch.float32 if parameter.requires_grad else torch.bfloat16), name  # master weights
    assert any(name.startswith(backbone.projector) for name in trainable)
    assert any(name.startswith(backbone.language) for name in trainable)

    saved = {name: value.clone() for name, value in trainable.items()}
    with torch.no_grad():
        for parameter in trainable.values():
            parameter.add_(1.0)
    full_wrapper.load_trainable_state_dict(saved)
    assert all(torch.equal(value, saved[name]) for name, value in full_wrapper.trainable_state_dict().items())
    with pytest.raises(ValueError, match="missing"):
        full_wrapper.load_trainable_state_dict({name: value for name, value in saved.items() if "embed" not in name})


@pytest.mark.parametrize("name", list(BACKBONES))
def test_adapter_module_names_cover_the_model(name, tiny_dirs):
    """Every weight is vision encoder, projector or language model (or the LM head), and each part exists."""
    from transformers import AutoConfig

    backbone = BACKBONES[name]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_dirs[name]))
    parts = {"vision": [], "projector": [], "language": []}
    for parameter, _ in model.named_parameters():
        if parameter.startswith(backbone.projector):
            parts["projector"].append(parameter)
        elif backbone.is_vision_encoder(parameter):
            parts["vision"].append(parameter)
        elif backbone.is_language_model(parameter):
            parts["language"].append(parameter)
        else:
            assert parameter.startswith("lm_head"), parameter
    assert all(parts.values()), {part: len(names) for part, names in parts.items()}


def test_lora_adapts_the_language_model_and_trains_the_projector(wrapper, tmp_path):
    backbone = wrapper.backbone
    trainable = wrapper.trainable_state_dict()
    adapters = [name for name in trainable if "lora_" in name]
    assert adapters and len(adapters) + sum(".modules_to_save." in name for name in trainable) == len(trainable)
    base_name = "base_model.model."
    assert all(backbone.is_language_model(name.removeprefix(base_name)) for name in adapters)
    assert not any("lora_" in name and not backbone.is_language_model(name.removeprefix(base_name))
                   for name, _ in wrapper.model.named_parameters())

    wrapper.train()
    wrapper(wrapper.build_inputs(IMAGES, PROMPTS, TARGETS)).loss.backward()  # through checkpointed layers
    wrapper.eval()
    parameters = dict(wrapper.model.named_parameters())
    assert all(parameters[name].grad is not None and parameters[name].grad.abs().sum() > 0
               for name in trainable if "lora_B" in name or ".modules_to_save." in name)
    assert all(parameter.grad is None for name, parameter in parameters.items() if name not in trainable)

    saved = {name: value.clone() for name, value in trainable.items()}
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.add_(0.01 * torch.randn_like(parameter))
    prompts_only = wrapper.build_inputs(IMAGES, PROMPTS)
    with torch.no_grad():
        trained = wrapper(prompts_only).logits

    out = wrapper.export_merged(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert {"tokenizer.json", "processor_config.json", "chat_template.jinja"} <= {path.name for path in out.iterdir()}
    with torch.no_grad():
        torch.testing.assert_close(merged(**prompts_only).logits, trained, rtol=0, atol=1e-4)

    wrapper.load_trainable_state_dict(saved)
    with torch.no_grad():
        assert not torch.allclose(wrapper(prompts_only).logits, trained)


# -- box frames -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(37, 61), (513, 287), (1000, 999), (61, 37), (448, 448)])
def test_boxes_round_trip_and_scale_with_the_resized_image(wrapper, size):
    width, height = size
    frame = wrapper.frame(width, height)
    model_width, model_height = frame.model
    box = (0.13 * width, 0.21 * height, 0.77 * width, 0.9 * height)
    np.testing.assert_allclose(frame.to_original(frame.to_model(box)), box, atol=1e-6)
    assert frame.to_model((0, 0, width, height)) == pytest.approx((0, 0, model_width, model_height))
    assert frame.to_model(box) == pytest.approx((box[0] * model_width / width, box[1] * model_height / height,
                                                 box[2] * model_width / width, box[3] * model_height / height))
    assert model_width / model_height == pytest.approx(width / height, rel=0.35)  # the aspect ratio roughly kept

    trace = Trace("g", (Step("mouth", (12,), "up", tuple(round(v) for v in box)), Step("nose", (9,), "x", None)),
                  "c", "happiness")
    back = frame.trace_to_original(frame.trace_to_model(trace))
    half_model_pixel = 0.5 * max(width / model_width, height / model_height)
    assert np.abs(np.subtract(back.steps[0].box, trace.steps[0].box)).max() <= half_model_pixel + 0.5
    assert back.steps[1].box is None and back.steps[0].aus == (12,)

    batch = wrapper.build_inputs([np.zeros((height, width, 3), np.uint8)], ["?"])
    if "image_grid_thw" in batch:  # Qwen reports the resized size: the frame is exactly it
        _, rows, columns = batch["image_grid_thw"][0].tolist()
        patch = wrapper.processor.image_processor.patch_size
        assert (columns * patch, rows * patch) == frame.model


def test_pixel_limits_override_the_folders(full_wrapper, tmp_path):
    assert full_wrapper.frame(448, 448).model == (112, 112)
    grid = full_wrapper.build_inputs([np.zeros((448, 448, 3), np.uint8)], ["?"])["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]
    out = full_wrapper.export_merged(tmp_path / "export")  # the processor as trained with, limits included
    saved = json.loads((out / "processor_config.json").read_text())["image_processor"]["size"]
    assert saved == {"shortest_edge": 28 * 28, "longest_edge": 112 * 112}


def test_real_qwen_limits_keep_integer_boxes_within_a_pixel():
    """With Qwen2.5-VL's own limits a face keeps about its size, so integer boxes survive within 1 px."""
    real = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)  # Qwen2.5-VL's preprocessor
    backbone = BACKBONES["qwen2_5_vl"](SimpleNamespace(image_processor=real))
    for width, height in [(37, 61), (513, 287), (1000, 999)]:
        frame = backbone.frame(width, height)
        box = (width // 7, height // 5, width - 3, height - 2)
        trace = Trace("g", (Step("m", (12,), "o", box),), "c", "x")
        back = frame.trace_to_original(frame.trace_to_model(trace)).steps[0].box
        assert np.abs(np.subtract(back, box)).max() <= 1
    assert backbone.frame(1000, 999).model == (1008, 1008)


# -- bad configurations fail early and say what to do -----------------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the configuration was checked")

    monkeypatch.setattr(vlm_module.AutoModelForImageTextToText, "from_pretrained", refuse)


def test_unknown_choices_list_the_known_ones():
    with pytest.raises(ValueError, match="known backbones: qwen2_5_vl, qwen2_vl, idefics3"):
        VLMConfig("anything", backbone="llava9")
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        VLMConfig("anything", dtype="fp8")
    with pytest.raises(ValueError, match="sdpa, eager, flash_attention_2"):
        VLMConfig("anything", attn_implementation="flash")
    with pytest.raises(ValueError, match="freeze_vision=True"):
        VLMConfig("anything", lora=LoRAConfig(), freeze_vision=False)


def test_missing_model_folder_says_how_to_make_one(tmp_path, no_weights):
    with pytest.raises(FileNotFoundError, match="tag prepare tiny-model --out"):
        VLMWrapper(VLMConfig(str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VLMWrapper(VLMConfig(str(tmp_path)))


def test_unregistered_model_type_is_refused(tmp_path, no_weights):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="'llava' model, for which no backbone is registered.*qwen2_5_vl"):
        VLMWrapper(VLMConfig(str(tmp_path)))


def test_lora_target_outside_the_language_model_lists_candidates(tiny_dirs, no_weights):
    lora = LoRAConfig(target_modules=("q_proj", "qkv"))  # qkv exists, but only in Qwen's vision encoder
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear layer.*candidates: down_proj, gate_proj, k_proj"):
        VLMWrapper(VLMConfig(str(tiny_dirs["qwen2_5_vl"]), lora=lora))


def test_pixel_limits_only_where_the_backbone_has_them():
    with pytest.raises(ValueError, match="idefics3 backbone does not resize images by pixel count"):
        BACKBONES["idefics3"](processor=None).set_pixel_limits(None, 224 * 224)
