"""The VLM side of TAG: one wrapper shared by SFT and GRPO, the rollout engine every answer is generated
with, backbone adapters, the tiny default model."""

from tag_lightning.models.rollout import Answers, RolloutConfig, RolloutEngine
from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper

__all__ = ["Answers", "LoRAConfig", "RolloutConfig", "RolloutEngine", "VLMConfig", "VLMWrapper"]
