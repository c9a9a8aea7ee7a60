"""What one VLM family needs beyond the generic Hugging Face API, and the box frame it defines.

A `Backbone` is bound to a loaded processor. It knows how the family resizes images (so boxes can
be mapped between original-image pixels and the pixels of the image the model sees), which
modules are the vision encoder, the projector and the language model (for freezing and LoRA), how
a turn ends in its chat template, and how to build a tiny random instance of the family.
Everything else (chat templating, tokenising, generating) goes through the generic processor and
model API, so a new family is one subclass in its own file plus one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from tag_lightning.answers.grammar import Trace
from tag_lightning.boxes import Box, round_box
from tag_lightning.errors import BadValue


@dataclass(frozen=True)
class Frame:
    """Original-image pixels <-> pixels of the resized image the model sees: a per-axis scaling.

    Sizes are (width, height). Boxes are ``[x1, y1, x2, y2]`` with edges as continuous pixel
    coordinates, so the whole image maps to the whole image and the mapping inverts exactly.
    """

    original: tuple[int, int]
    model: tuple[int, int]

    def to_model(self, box: Sequence[float]) -> Box:
        return _scale(box, self.model[0] / self.original[0], self.model[1] / self.original[1])

    def to_original(self, box: Sequence[float]) -> Box:
        return _scale(box, self.original[0] / self.model[0], self.original[1] / self.model[1])

    def trace_to_model(self, trace: Trace) -> Trace:
        """The trace with every box in model pixels (rounded to integers, as the model writes them)."""
        return _map_boxes(trace, self.to_model)

    def trace_to_original(self, trace: Trace) -> Trace:
        """The trace (e.g. a parsed model answer) with every box back in original-image pixels."""
        return _map_boxes(trace, self.to_original)


def _scale(box: Sequence[float], sx: float, sy: float) -> Box:
    x1, y1, x2, y2 = box
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def _map_boxes(trace: Trace, convert: Callable[[Sequence[float]], Box]) -> Trace:
    steps = tuple(
        step if step.box is None else replace(step, box=tuple(round_box(convert(step.box)))) for step in trace.steps
    )
    return replace(trace, steps=steps)


class Backbone:
    """One VLM family. Subclasses set the class attributes and define `model_image_size` and `tiny`.

    Module names are dotted prefixes of `model.named_parameters()` as transformers builds the
    family's ``...ForConditionalGeneration`` (before any LoRA wrapping).
    """

    name: ClassVar[str]  # the registry key: the `model_type` of the family's config.json
    vision: ClassVar[tuple[str, ...]]  # the vision encoder (frozen in TAG)
    projector: ClassVar[tuple[str, ...]]  # vision -> text projection (trained in TAG), may sit inside `vision`
    language: ClassVar[tuple[str, ...]]  # the decoder layers; LoRA targets are looked for only here
    end_of_turn: ClassVar[str]  # the token closing an assistant turn in the chat template

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def model_image_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image the model sees for an original image of this size."""
        raise NotImplementedError

    def set_pixel_limits(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """Bound the resized image's area (Qwen's knob); families that resize otherwise refuse."""
        raise BadValue(
            f"the {self.name} backbone does not resize images by pixel count; leave min_pixels/max_pixels unset "
            "and set the size in the model folder's preprocessor config instead"
        )

    @classmethod
    def tiny(cls, tokenizer: Any, text: dict[str, Any]) -> tuple[Any, Any]:
        """A tiny random member of the family: (model config, processor) around `tokenizer`.

        `text` holds the language model's sizes; the vision side is chosen per family, as small
        as its processor allows. The tokenizer may be extended with the family's own tokens.
        """
        raise NotImplementedError

    def frame(self, width: int, height: int) -> Frame:
        return Frame(original=(width, height), model=self.model_image_size(width, height))

    def messages(self, prompt: str, target: str | None = None, system: str | None = None) -> list[dict]:
        """One conversation: optional system turn, the user's image and prompt, optional answer."""
        turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        turns.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
        if target is not None:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
        return turns

    @classmethod
    def is_vision_encoder(cls, parameter: str) -> bool:
        return _under(parameter, cls.vision) and not _under(parameter, cls.projector)

    @classmethod
    def is_language_model(cls, module: str) -> bool:
        return _under(module, cls.language)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)
