"""What a tag_lightning training checkpoint holds beyond Lightning's own state, and whether it fits a model.

A checkpoint keeps only the trainable weights (LoRA adapters and projector, or every trainable
weight), the `VLMConfig` they were trained under (``vlm_config``) and the random states. Loading
one into a differently built network would fail deep inside ``load_state_dict`` (another LoRA
rank) or, worse, train on silently (another LoRA alpha scales the adapters differently), so the
structure is compared first and a mismatch is refused naming the fields.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tag_lightning.errors import BadValue
from tag_lightning.models.vlm import LoRAConfig, VLMConfig

STRUCTURAL_FIELDS = ("model_path", "backbone", "freeze_vision", "lora", "lora.r", "lora.alpha", "lora.target_modules")
"""The `VLMConfig` fields that decide which weights train and what they mean (dtype, kernels and
pixel limits may change between runs)."""


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A training checkpoint as data (``weights_only``: a checkpoint never runs code), or a clear error.

    With `mmap` the tensors stay on disk: a cheap check that a file is a checkpoint at all.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as err:  # a checkpoint is data: anything unloadable is the user's file
        # torch's own message suggests weights_only=False, i.e. running the file's code: never pass that on
        raise BadValue(f"{path}: not a loadable checkpoint (torch cannot read it as data: {type(err).__name__}); "
                       "give one written by `tag fit`") from None
    if not isinstance(checkpoint, dict) or "vlm_config" not in checkpoint:
        raise BadValue(f"{path} is not a tag_lightning training checkpoint (it has no vlm_config)")
    return checkpoint


def network_weights(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's trained weights, named as in the network's model (`VLMWrapper.load_trainable_state_dict`)."""
    prefix = "network.model."
    return {name[len(prefix):]: value for name, value in checkpoint["state_dict"].items() if name.startswith(prefix)}


def saved_vlm_config(checkpoint: Mapping[str, Any]) -> VLMConfig:
    """The `VLMConfig` the checkpoint was trained under."""
    fields = dict(checkpoint["vlm_config"])
    if fields.get("lora"):
        fields["lora"] = LoRAConfig(**{**fields["lora"], "target_modules": tuple(fields["lora"]["target_modules"])})
    return VLMConfig(**fields)


def structural_differences(saved: Mapping[str, Any], config: VLMConfig) -> list[str]:
    """``field: checkpoint X, configured Y`` for every structural field that differs."""
    current = asdict(config)
    differences = []
    for name in STRUCTURAL_FIELDS:
        before, now = _field(saved, name), _field(current, name)
        if name == "lora" and (before is None) != (now is None):
            differences.append(f"lora: checkpoint {'none' if before is None else 'LoRA'}, "
                               f"configured {'none' if now is None else 'LoRA'}")
        elif name != "lora" and _comparable(before) != _comparable(now):
            differences.append(f"{name}: checkpoint {before!r}, configured {now!r}")
    return differences


def check_fits(checkpoint: Mapping[str, Any], config: VLMConfig, what: str) -> None:
    """Refuse a checkpoint whose network was built otherwise than `config` says (`what` names it)."""
    differences = structural_differences(checkpoint.get("vlm_config") or {}, config)
    if differences:
        raise BadValue(f"{what} was trained with another model set-up ({'; '.join(differences)}); configure "
                       "the same values, or start a new run instead of loading it")


def pack_rng_states() -> dict[str, Any]:
    """This process's torch (CPU and its CUDA device's), numpy and Python random states, as tensors and plain
    values (loadable with ``weights_only``)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])


def _field(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value
