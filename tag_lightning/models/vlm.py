"""VLMWrapper: the one network the SFT and GRPO LightningModules share.

It owns a Hugging Face image-text-to-text model and its processor. It turns images, prompts and
target answers into model inputs (chat template, answer-only labels, the padding side each use
needs), runs the model, scores answers, and saves what training changed (generating is
`rollout.RolloutEngine`'s). Everything family-specific
is asked of the backbone adapter (`backbones/`): the box frame, which modules are vision encoder,
projector and language model, how a turn ends. Training choices (dtype, attention kernel, frozen
vision encoder, LoRA, activation checkpointing) are applied once, here, at construction; bad
choices fail before any weight is loaded.

`dtype` is the frozen base's: the weights that train (LoRA adapters, projector, or the whole
language model) are always kept in float32, since an optimizer step on bfloat16 weights rounds
away every update under half a bfloat16 step (at lr 1e-6 nearly all of them). A low-precision
base then runs under autocast in that dtype, so frozen and trained weights meet in one matmul.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BatchFeature, PretrainedConfig
from transformers.utils import ModelOutput

from tag_lightning.errors import BadValue
from tag_lightning.models.backbones import BACKBONES, Backbone, Frame, resolve_backbone

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager", "flash_attention_2")
IGNORE_INDEX = -100  # the label of every token that is not part of the answer
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class LoRAConfig:
    """Low-rank adapters on the language model's linear layers; the vision encoder never gets any.

    `target_modules` are layer names (``q_proj``) or dotted name suffixes (``self_attn.q_proj``),
    looked up in the language model only. With LoRA the projector is trained in full beside the
    adapters (TAG trains it) and every other weight stays frozen.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class VLMConfig:
    """Which model to load and how to train it.

    Args:
        model_path: a saved model folder (``tag prepare tiny-model --out DIR`` writes the tiny
            default); a hub id such as ``Qwen/Qwen2.5-VL-3B-Instruct`` is handed to transformers,
            which fetches it only where it can.
        backbone: a registered backbone name; None: the folder's ``config.json`` model_type.
        dtype: dtype of the frozen weights and of the compute (autocast): float32, bfloat16 or float16;
            the trained weights stay float32 either way.
        attn_implementation: attention kernel: sdpa, eager or flash_attention_2.
        freeze_vision: keep the vision encoder frozen (TAG: language model and projector train).
        lora: train LoRA adapters instead of the whole language model; None: full fine-tuning.
        gradient_checkpointing: recompute activations in the backward pass (memory for time).
        min_pixels: smallest resized image area the model sees (Qwen backbones); None: the folder's.
        max_pixels: largest resized image area the model sees (Qwen backbones); None: the folder's.
        system_prompt: a system turn opening every conversation; None: the chat template's default.
    """

    model_path: str
    backbone: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    freeze_vision: bool = True
    lora: LoRAConfig | None = None
    gradient_checkpointing: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise BadValue(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.attn_implementation not in ATTENTION:
            raise BadValue(f"attn_implementation {self.attn_implementation!r} is not one of {', '.join(ATTENTION)}")
        if self.backbone is not None:
            resolve_backbone(self.backbone)
        if self.lora is not None and not self.freeze_vision:
            raise BadValue("with LoRA the vision encoder stays frozen (adapters go on the language model only): "
                           "set freeze_vision=True, or lora=None to fine-tune in full")


class VLMWrapper(nn.Module):
    """A VLM and its processor, set up for training and generation as `config` says."""

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        source = _model_source(config.model_path)
        hf_config = _load_config(source, config.model_path)
        backbone = _backbone(config.backbone, hf_config.model_type, source)
        lora_targets = _lora_targets(hf_config, backbone, config.lora) if config.lora else []
        self.processor = AutoProcessor.from_pretrained(source)
        self.backbone: Backbone = backbone(self.processor)
        if config.min_pixels is not None or config.max_pixels is not None:
            self.backbone.set_pixel_limits(config.min_pixels, config.max_pixels)

        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=DTYPES[config.dtype], attn_implementation=config.attn_implementation
        )
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(not (config.freeze_vision and self.backbone.is_vision_encoder(name)))
        if config.gradient_checkpointing:
            # Also makes the embedding output require grad, so checkpointed layers pass gradients
            # back to LoRA adapters even though the embedding itself is frozen.
            model.activation_checkpointing_enable()
        if config.lora:
            model = get_peft_model(model, LoraConfig(
                r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                target_modules=lora_targets, modules_to_save=list(self.backbone.projector),
            ))
        for parameter in model.parameters():
            if parameter.requires_grad:  # master weights in float32 (see the module doc)
                parameter.data = parameter.data.float()
        self.model = model
        tokenizer = self.processor.tokenizer
        generation_ends = model.generation_config.eos_token_id
        generation_ends = [generation_ends] if isinstance(generation_ends, int) else list(generation_ends or [])
        self.end_ids = sorted({tokenizer.convert_tokens_to_ids(self.backbone.end_of_turn), *generation_ends})
        # Placeholders the processor expands into image features: an answer holding one could not be fed
        # back to the model (GRPO scores its samples that way), so generation never emits them.
        self.placeholder_ids = sorted({getattr(self.processor, name) for name in ("image_token_id", "video_token_id")
                                       if isinstance(getattr(self.processor, name, None), int)})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base's dtype, which the inputs and the compute take."""
        return DTYPES[self.config.dtype]

    def autocast(self) -> torch.autocast:
        """Compute in the base's dtype; off for a float32 base (then nothing differs in dtype)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def frame(self, width: int, height: int) -> Frame:
        """Box conversion between an image of this size and the resized image the model sees."""
        return self.backbone.frame(width, height)

    # -- inputs ----------------------------------------------------------------------------------

    def build_inputs(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        targets: Sequence[str] | Sequence[Sequence[int]] | None = None,
        padding_side: str | None = None,
    ) -> BatchFeature:
        """Model inputs for one image (HWC uint8 RGB) and prompt per sample, and labels with `targets`.

        Each prompt is rendered by the chat template as the user's turn (after the optional
        system turn) up to the assistant's generation prompt and processed with its image. A
        text target is tokenised on its own and appended through the template's end-of-turn
        token: exactly the tokens the model would have to generate after that prompt. A target
        given as token ids (a sampled answer, `rollout.Answers.token_ids`) is appended as it is.
        `labels` are -100 except on those answer tokens. Padding is on the right with targets
        (training) and on the left without (generation) unless `padding_side` says otherwise.
        """
        if len(images) != len(prompts) or (targets is not None and len(targets) != len(prompts)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and "
                             f"{'no' if targets is None else len(targets)} targets; give one of each per sample")
        side = padding_side or ("left" if targets is None else "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side {side!r} is not 'left' or 'right'")
        prompt_texts = [self._render(prompt, None, add_generation_prompt=True) for prompt in prompts]
        encoded = self.processor(
            text=prompt_texts, images=[[Image.fromarray(np.asarray(image))] for image in images],
            padding=True, return_tensors="pt",
        )
        answers = None
        if targets is not None:
            answers = [self._answer_ids(*sample) for sample in zip(prompts, targets, prompt_texts)]
        return self._collate(encoded, answers, side)

    def _answer_ids(self, prompt: str, target: str | Sequence[int], prompt_text: str) -> list[int]:
        if not isinstance(target, str):
            return [int(token) for token in target]
        text = self._answer_text(prompt, target, prompt_text)
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, prompt: str, target: str | None, add_generation_prompt: bool) -> str:
        messages = self.backbone.messages(prompt, target, system=self.config.system_prompt)
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _answer_text(self, prompt: str, target: str, prompt_text: str) -> str:
        """What the template writes after the generation prompt for `target`, through the end of the turn."""
        full = self._render(prompt, target, add_generation_prompt=False)
        end = full.rfind(self.backbone.end_of_turn)
        if not full.startswith(prompt_text) or end < len(prompt_text):
            raise BadValue(
                f"the chat template of {self.config.model_path} does not render the answer after its generation "
                f"prompt, closed by {self.backbone.end_of_turn!r}; cannot tell which tokens are the answer"
            )
        return full[len(prompt_text) : end + len(self.backbone.end_of_turn)]

    def _collate(self, encoded: BatchFeature, answers: list[list[int]] | None, side: str) -> BatchFeature:
        """Append each answer to its unpadded prompt and pad the batch again on `side`.

        Integer tensors shaped like `input_ids` are per-token inputs (e.g. Qwen's
        `mm_token_type_ids`): they follow the tokens, 0 for answer tokens (text).
        """
        kept = encoded["attention_mask"].bool()
        per_token = [key for key, value in encoded.items()
                     if key != "attention_mask" and value.shape == kept.shape and not value.is_floating_point()]
        columns: dict[str, list[Tensor]] = {key: [] for key in (*per_token, "attention_mask")}
        if answers is not None:
            columns["labels"] = []
        for row in range(kept.shape[0]):
            answer = torch.tensor(answers[row] if answers is not None else [], dtype=torch.long)
            for key in per_token:
                tail = answer if key == "input_ids" else torch.zeros_like(answer)
                columns[key].append(torch.cat([encoded[key][row][kept[row]], tail]))
            length = int(kept[row].sum()) + len(answer)
            columns["attention_mask"].append(torch.ones(length, dtype=torch.long))
            if answers is not None:
                columns["labels"].append(torch.cat([torch.full((length - len(answer),), IGNORE_INDEX), answer]))
        padding = {"input_ids": self.processor.tokenizer.pad_token_id, "labels": IGNORE_INDEX}
        batch = {key: pad_sequence(values, batch_first=True, padding_value=padding.get(key, 0), padding_side=side)
                 for key, values in columns.items()}
        batch.update({key: value for key, value in encoded.items() if key not in batch})  # the images' tensors
        return BatchFeature(batch)

    # -- running ---------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Tensor]) -> ModelOutput:
        """The model's outputs on a `build_inputs` batch.

        With `labels`, `loss` is the mean cross-entropy of the answer tokens and `answer_tokens` how
        many there are (so ``loss * answer_tokens`` is their sum), and the LM head runs only on
        positions that predict an answer token: `logits` then cover the last K = (length - first
        label column + 1) positions, so ``logits[:, :-1]`` predicts ``labels[:, -K + 1:]``. Without
        labels, `logits` cover every position.
        """
        inputs = self.on_device(batch)
        if "labels" not in inputs:
            with self.autocast():
                return self.model(**inputs, use_cache=False)
        outputs, logits, answers = self._answer_logits(self.model, inputs)
        outputs["loss"] = F.cross_entropy(logits.flatten(0, 1), answers.flatten(), ignore_index=IGNORE_INDEX)
        outputs["answer_tokens"] = (answers != IGNORE_INDEX).sum()
        return outputs

    def answer_logprobs(
        self, batch: Mapping[str, Tensor], temperature: float = 1.0, model: nn.Module | None = None
    ) -> tuple[Tensor, Tensor]:
        """Log-probability of each answer token of a `build_inputs` batch with targets, and where they are.

        Returns ``(logps, mask)``, both (B, K) over the last K label columns (as in `forward`):
        `mask` is 1 on answer tokens, and `logps` is 0 elsewhere. The distribution is the one
        `generate` samples from: logits divided by `temperature`, image placeholders excluded.
        Only the answer positions go through the LM head and the log-softmax (GRPO's policy, old
        and reference passes). `model` scores under another copy of this network's model (GRPO's
        frozen reference).
        """
        _, logits, answers = self._answer_logits(model or self.model, self.on_device(batch))
        if temperature != 1.0:
            logits = logits / temperature
        if self.placeholder_ids:
            logits = logits.index_fill(-1, torch.tensor(self.placeholder_ids, device=logits.device), float("-inf"))
        mask = answers != IGNORE_INDEX
        picked = logits.gather(-1, answers.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logps = (picked - logits.logsumexp(dim=-1)) * mask
        return logps, mask.to(logps.dtype)

    def _answer_logits(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[ModelOutput, Tensor, Tensor]:
        """The model's outputs, float logits predicting the label columns from the first answer on, and those labels."""
        labels = inputs.pop("labels")
        answer_columns = (labels != IGNORE_INDEX).any(dim=0).nonzero()
        if len(answer_columns) == 0:
            raise ValueError("nothing to learn: every label is -100")
        start = max(int(answer_columns[0]), 1)  # a token in column 0 has nothing before it to predict it
        with self.autocast():
            outputs = model(**inputs, use_cache=False, logits_to_keep=labels.shape[1] - start + 1)
        return outputs, outputs.logits[:, :-1].float(), labels[:, start:]

    def on_device(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """`batch` on the model's device, its floating tensors (pixels) in the base's dtype."""
        device, dtype = self.device, self.dtype
        return {key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
                for key, value in batch.items()}

    # -- saving ----------------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only what training changes: LoRA adapters and the projector with LoRA, else every trainable weight."""
        parameters = self.model.named_parameters()
        return {name: parameter.detach() for name, parameter in parameters if parameter.requires_grad}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a `trainable_state_dict` of a wrapper built with the same config; names must match exactly."""
        expected = {name for name, parameter in self.model.named_parameters() if parameter.requires_grad}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"the state does not fit this wrapper's trainable weights: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); was it saved "
                             "with the same model, LoRA and freezing settings?")
        self.model.load_state_dict(dict(state), strict=False)

    def export_merged(self, out_dir: str | Path) -> Path:
        """Write a plain Hugging Face folder: weights (LoRA merged in), processor files, generation config.

        With LoRA the merge happens on a copy (this wrapper keeps training), which briefly needs
        the model's memory twice.
        """
        model = copy.deepcopy(self.model).merge_and_unload() if self.config.lora else self.model
        out = Path(out_dir)
        model.save_pretrained(out)
        self.processor.save_pretrained(out)
        return out


def _model_source(path: str) -> str:
    """`path` if it is a saved model folder, a hub id as it is; otherwise a clear error."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return str(folder)
    if folder.is_dir():
        raise FileNotFoundError(f"{folder} has no config.json, so it is not a saved model folder; give the folder "
                                "that save_pretrained wrote (model and processor files)")
    if _HUB_ID.fullmatch(path) and not folder.parent.exists():
        return path
    raise FileNotFoundError(f"no model folder at {folder}: build the tiny default with "
                            f"`tag prepare tiny-model --out {folder}`, or set model_path to a saved model folder")


def _load_config(source: str, path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        raise FileNotFoundError(f"{path!r} is no model folder, and the hub did not serve it ({err}); build the "
                                f"tiny default with `tag prepare tiny-model --out DIR` or give a local path") from err


def _backbone(name: str | None, model_type: str, source: str) -> type[Backbone]:
    if name is not None:
        return resolve_backbone(name)
    if model_type not in BACKBONES:
        raise BadValue(f"{source} is a {model_type!r} model, for which no backbone is registered (known "
                       f"backbones: {', '.join(BACKBONES)}); add an adapter in tag_lightning/models/backbones "
                       "or set backbone to a compatible one")
    return BACKBONES[model_type]


def _lora_targets(hf_config: PretrainedConfig, backbone: type[Backbone], lora: LoRAConfig) -> list[str]:
    """Full names of the language model's linear layers LoRA wraps, found on a weightless skeleton."""
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(hf_config)
    layers = [name for name, module in skeleton.named_modules()
              if isinstance(module, nn.Linear) and backbone.is_language_model(name)]
    unmatched = [target for target in lora.target_modules if not any(_named(layer, target) for layer in layers)]
    if unmatched:
        candidates = sorted({layer.rsplit(".", 1)[-1] for layer in layers})
        raise BadValue(f"LoRA target_modules {unmatched} match no linear layer of the {backbone.name} language "
                       f"model; candidates: {', '.join(candidates)}")
    return [layer for layer in layers if any(_named(layer, target) for target in lora.target_modules)]


def _named(module: str, target: str) -> bool:
    return module == target or module.endswith("." + target)
