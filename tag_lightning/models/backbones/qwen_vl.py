"""Qwen2.5-VL (the primary backbone) and Qwen2-VL: the same processor, template and box frame.

The model sees the image resized by Qwen's `smart_resize`: both sides multiples of
patch x merge (28 px), area within [min_pixels, max_pixels], aspect ratio kept as well as that
allows. Qwen2.5-VL was trained to ground in absolute pixels of exactly this resized image, so
that is the frame boxes are written in.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from tag_lightning.models.backbones.base import Backbone

# The chat template shipped with Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The tiny models' image size bounds: at most 224x224 px (64 visual tokens), so a CPU step stays
# cheap; Qwen's own minimum (56x56) below. A 448 px face becomes 224x224, boxes scale by 1/2.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 224 * 224


class Qwen2_5_VL(Backbone):
    name = "qwen2_5_vl"
    vision = ("model.visual",)
    projector = ("model.visual.merger",)
    language = ("model.language_model",)
    end_of_turn = "<|im_end|>"
    config_class: Any = Qwen2_5_VLConfig
    processor_class: Any = Qwen2_5_VLProcessor

    def model_image_size(self, width: int, height: int) -> tuple[int, int]:
        ip = self.processor.image_processor
        resized_height, resized_width = smart_resize(
            height, width, factor=ip.patch_size * ip.merge_size,
            min_pixels=ip.size.shortest_edge, max_pixels=ip.size.longest_edge,
        )
        return resized_width, resized_height

    def set_pixel_limits(self, min_pixels: int | None, max_pixels: int | None) -> None:
        ip = self.processor.image_processor
        ip.size = replace(
            ip.size,
            shortest_edge=ip.size.shortest_edge if min_pixels is None else min_pixels,
            longest_edge=ip.size.longest_edge if max_pixels is None else max_pixels,
        )

    @classmethod
    def tiny(cls, tokenizer: Any, text: dict[str, Any]) -> tuple[Any, Any]:
        ids = tokenizer.convert_tokens_to_ids
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope_section(head_dim)}
        config = cls.config_class(
            text_config={**text, "rope_parameters": rope,
                         "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>")},
            vision_config=cls.tiny_vision(out_hidden_size=text["hidden_size"]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=text["tie_word_embeddings"],
        )
        processor = cls.processor_class(
            image_processor=Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS),
            tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE,
        )
        return config, processor

    @staticmethod
    def tiny_vision(out_hidden_size: int) -> dict[str, Any]:
        # Window attention in block 0, full attention in the last block, as in the real model's pattern.
        return {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                "out_hidden_size": out_hidden_size, "fullatt_block_indexes": [1]}


class Qwen2_VL(Qwen2_5_VL):
    name = "qwen2_vl"
    config_class = Qwen2VLConfig
    processor_class = Qwen2VLProcessor

    @staticmethod
    def tiny_vision(out_hidden_size: int) -> dict[str, Any]:
        return {"depth": 2, "embed_dim": 32, "hidden_size": out_hidden_size, "num_heads": 2, "mlp_ratio": 2}


def _mrope_section(head_dim: int) -> list[int]:
    """Split the rotary half-dimension over (time, height, width) as Qwen does (16, 24, 24 of 64)."""
    spatial = head_dim // 2 * 3 // 8
    return [head_dim // 2 - 2 * spatial, spatial, spatial]
