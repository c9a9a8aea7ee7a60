"""The backbone registry: every supported VLM family by name, resolved in this one place.

A name is the family's `model_type` in config.json, so a model folder names its own backbone.
Adding a family: write its `Backbone` subclass in a new file here and add it to `BACKBONES`.
"""

from __future__ import annotations

from tag_lightning.errors import BadValue
from tag_lightning.models.backbones.base import Backbone, Frame
from tag_lightning.models.backbones.idefics3 import Idefics3
from tag_lightning.models.backbones.qwen_vl import Qwen2_5_VL, Qwen2_VL

BACKBONES: dict[str, type[Backbone]] = {backbone.name: backbone for backbone in (Qwen2_5_VL, Qwen2_VL, Idefics3)}


def resolve_backbone(name: str) -> type[Backbone]:
    """The adapter registered as `name`; a clear error listing the known names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise BadValue(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}") from None


__all__ = ["BACKBONES", "Backbone", "Frame", "resolve_backbone"]
