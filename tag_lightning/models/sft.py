"""Stage 1 of TAG: supervised fine-tuning on AU-grounded reasoning traces.

The network (a `VLMWrapper`) is injected; this module only decides what a training step does
with it: move each target trace's boxes into the frame the model sees (the wrapper's `Frame`),
render the text in the batch's trace format (the datamodule's `trace_format`), and take the
cross-entropy of the answer tokens (the wrapper masks prompt and image tokens). Evaluation, the
optimizer, FSDP2 sharding and checkpoints are shared with the GRPO module (`module.py`).

The loss of an optimizer step is the mean over all answer tokens of the step, whatever its split
into micro-batches (`accumulate_grad_batches`) and ranks, as Hugging Face's `num_items_in_batch`
makes it: each micro-batch backpropagates the sum of its tokens' losses, and the gradient is
divided by the step's token count (over every rank) before the optimizer step. A mean per
micro-batch, averaged, would weigh the tokens of short traces more than those of long ones.
"""

from __future__ import annotations

import torch

from tag_lightning.answers.grammar import render_trace
from tag_lightning.models.module import VLMModule


class SFTModule(VLMModule):
    """Supervised fine-tuning of a VLM on TAG traces (the arguments are `VLMModule`'s)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._step_tokens = 0  # answer tokens of the optimizer step's micro-batches so far, on this rank

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = [image.numpy() for image in batch["image"].cpu()]
        targets = [
            render_trace(self.network.frame(image.shape[1], image.shape[0]).trace_to_model(trace), trace_format)
            for image, trace, trace_format in zip(images, batch["trace"], batch["trace_format"])
        ]
        inputs = self.network.build_inputs(images, batch["prompt"], targets)
        outputs = self.network(inputs)
        tokens = outputs.answer_tokens
        self._step_tokens += int(tokens)
        self.log("train/loss", outputs.loss, prog_bar=True, batch_size=len(images))  # this micro-batch's token mean
        self.log("train/answer_tokens", tokens.float(), reduce_fx="sum", batch_size=len(images))
        return outputs.loss * tokens  # a sum: `on_before_optimizer_step` divides the gradient by the step's tokens

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradient of token-loss sums into that of the step's token mean.

        Lightning divided each micro-batch's loss by `accumulate_grad_batches`, and data-parallel
        reduction averages over ranks: both are undone, and the sum divided by the tokens of every
        micro-batch on every rank.
        """
        tokens = torch.tensor(float(self._step_tokens), device=self.device)
        world = self.trainer.world_size
        if world > 1:
            torch.distributed.all_reduce(tokens)
        self._step_tokens = 0
        scale = self.trainer.accumulate_grad_batches * world / tokens.clamp(min=1.0)
        for parameter in self.trainer.model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale.to(parameter.grad.dtype))
