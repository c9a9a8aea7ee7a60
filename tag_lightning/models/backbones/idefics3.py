"""Idefics3, the architecture of SmolVLM: the non-Qwen family that keeps the backbone API honest.

Its processor resizes the image so the longest side is `size["longest_edge"]` (aspect ratio
kept, the short side rounded to an even number), then cuts it into square tiles plus a
downscaled global view. The family was not trained to ground in pixels, so we define its box
frame as that aspect-preserving resize: the scale at which the tiles show the face.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken
from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

from tag_lightning.models.backbones.base import Backbone

# Tokens the processor writes around and between image tiles (SmolVLM's tokenizer has them).
IMAGE_TOKENS = (
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
)

# Tiny sizes: 56 px tiles of 14 px patches, 2x2 pixel shuffle -> 4 tokens a tile; a face is
# resized to 112 px on its long side, so at most 2x2 tiles + the global view (20 tokens).
TINY_TILE, TINY_PATCH, TINY_SCALE_FACTOR, TINY_LONGEST_EDGE = 56, 14, 2, 112


class Idefics3(Backbone):
    name = "idefics3"
    vision = ("model.vision_model",)
    projector = ("model.connector",)
    language = ("model.text_model",)
    end_of_turn = "<end_of_utterance>"

    def model_image_size(self, width: int, height: int) -> tuple[int, int]:
        ip = self.processor.image_processor
        if not ip.do_image_splitting:  # the processor then squashes the image into one square tile
            tile = ip.max_image_size["longest_edge"]
            return tile, tile
        longest = ip.size.longest_edge
        if width >= height:
            return longest, _even(int(longest / (width / height)))
        return _even(int(longest * (width / height))), longest

    @classmethod
    def tiny(cls, tokenizer: Any, text: dict[str, Any]) -> tuple[Any, Any]:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in IMAGE_TOKENS],
                             special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids
        config = Idefics3Config(
            text_config={"model_type": "llama", **text, "bos_token_id": tokenizer.pad_token_id,
                         "eos_token_id": ids(cls.end_of_turn), "pad_token_id": tokenizer.pad_token_id},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": TINY_TILE, "patch_size": TINY_PATCH},
            scale_factor=TINY_SCALE_FACTOR, image_token_id=ids("<image>"),
            tie_word_embeddings=text["tie_word_embeddings"],
        )
        processor = Idefics3Processor(
            image_processor=Idefics3ImageProcessor(size={"longest_edge": TINY_LONGEST_EDGE},
                                                   max_image_size={"longest_edge": TINY_TILE}),
            tokenizer=tokenizer,
            image_seq_len=(TINY_TILE // TINY_PATCH) ** 2 // TINY_SCALE_FACTOR**2,
            chat_template=DEFAULT_CHAT_TEMPLATE,
        )
        return config, processor


def _even(value: int) -> int:
    return max(value + value % 2, 1)
