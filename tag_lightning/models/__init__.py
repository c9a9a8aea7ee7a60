"""The VLM side of TAG: one wrapper shared by SFT and GRPO, backbone adapters, the tiny default model."""

from tag_lightning.models.vlm import GenerationOutput, LoRAConfig, VLMConfig, VLMWrapper

__all__ = ["GenerationOutput", "LoRAConfig", "VLMConfig", "VLMWrapper"]
