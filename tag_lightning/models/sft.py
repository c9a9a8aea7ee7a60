"""Stage 1 of TAG: supervised fine-tuning on AU-grounded reasoning traces.

The network (a `VLMWrapper`) is injected; this module only decides what a training step does
with it: move each target trace's boxes into the frame the model sees (the wrapper's `Frame`),
render the text in the batch's trace format (the datamodule's `trace_format`), and take the
cross-entropy of the answer tokens (the wrapper masks prompt and image tokens). Evaluation, the
optimizer, FSDP2 sharding and checkpoints are shared with the GRPO module (`module.py`).
"""

from __future__ import annotations

import torch

from tag_lightning.answers.grammar import render_trace
from tag_lightning.models.module import VLMModule


class SFTModule(VLMModule):
    """Supervised fine-tuning of a VLM on TAG traces (the arguments are `VLMModule`'s)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = [image.numpy() for image in batch["image"].cpu()]
        targets = [
            render_trace(self.network.frame(image.shape[1], image.shape[0]).trace_to_model(trace), trace_format)
            for image, trace, trace_format in zip(images, batch["trace"], batch["trace_format"])
        ]
        inputs = self.network.build_inputs(images, batch["prompt"], targets)
        loss = self.network(inputs).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log("train/answer_tokens", (inputs["labels"] != -100).sum().float(), reduce_fx="sum",
                 batch_size=len(images))
        return loss
