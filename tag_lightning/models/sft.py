"""Stage 1 of TAG: supervised fine-tuning on AU-grounded reasoning traces.

The network (a `VLMWrapper`) is injected; this module only decides what a step does with it.
A training step moves each target trace's boxes into the frame the model sees (the wrapper's
`Frame`), renders the text, and takes the cross-entropy of the answer tokens (the wrapper masks
prompt and image tokens). Validation and test generate greedily, parse the answers with the
trace grammar, and score accuracy, format validity and box IoU against the detector's AU boxes.

Checkpoints hold only what trains (LoRA adapters and projector, or every trainable weight),
the wrapper's config, and the random states, so a resumed run continues exactly.
"""

from __future__ import annotations

import random
from dataclasses import asdict

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from tag_lightning.data.labels import EMOTIONS
from tag_lightning.data.traces import render_trace
from tag_lightning.metrics import AnswerScore, GroundedAnswerMetrics, score_answer
from tag_lightning.models.vlm import VLMWrapper


class SFTModule(LightningModule):
    """Supervised fine-tuning of a VLM on TAG traces.

    Args:
        network: the VLM wrapper to train (its config decides freezing, LoRA, dtype).
        optimizer: optimizer factory, called with the trainable parameters.
        scheduler: learning-rate scheduler factory (stepped every optimizer step), or None.
        max_new_tokens: longest generated answer in validation and test.
    """

    def __init__(
        self,
        network: VLMWrapper,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network", "optimizer", "scheduler"])
        self.network = network
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_new_tokens = max_new_tokens
        self.val_metrics = GroundedAnswerMetrics()
        self.test_metrics = GroundedAnswerMetrics()
        self.strict_loading = False  # checkpoints hold only the trainable weights (see on_save_checkpoint)

    # -- model set-up ----------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Shard with FSDP2 when the strategy gives a device mesh (`ModelParallelStrategy`)."""
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = self.device_mesh["data_parallel"]
        model = self.network.model
        blocks = set(getattr(model, "_no_split_modules", None) or model.get_base_model()._no_split_modules)
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, "generate")  # generation must gather the root's weights too

    def on_fit_start(self) -> None:
        self.network.train()  # Hugging Face models load in eval mode, and Lightning keeps modules' modes

    def configure_optimizers(self):
        parameters = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(parameters)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    # -- steps -----------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = [image.numpy() for image in batch["image"].cpu()]
        targets = [
            render_trace(self.network.frame(image.shape[1], image.shape[0]).trace_to_model(trace))
            for image, trace in zip(images, batch["trace"])
        ]
        inputs = self.network.build_inputs(images, batch["prompt"], targets)
        loss = self.network(inputs).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log("train/answer_tokens", (inputs["labels"] != -100).sum().float(), reduce_fx="sum",
                 batch_size=len(images))
        return loss

    def _answer(self, batch: dict) -> list[tuple[str, AnswerScore]]:
        """Greedy answers to a batch, each with its score against the label and the detector."""
        images = [image.numpy() for image in batch["image"].cpu()]
        output = self.network.generate(images, batch["prompt"], max_new_tokens=self.max_new_tokens)
        return [
            (text, score_answer(text, label, detector_aus, EMOTIONS,
                                to_image_frame=self.network.frame(image.shape[1], image.shape[0]).trace_to_original))
            for text, label, detector_aus, image in zip(output.texts, batch["label"], batch["detector_aus"], images)
        ]

    def _evaluate(self, batch: dict, metrics: GroundedAnswerMetrics) -> None:
        metrics.update([score for _, score in self._answer(batch)])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One JSON-ready row per image: the generated text and what it is worth."""
        return [
            {"image": name, "label": label, "answer": score.answer, "correct": score.correct,
             "format_valid": score.valid, "box_iou": score.box_iou, "text": text}
            for name, label, (text, score) in zip(batch["image_name"], batch["label"], self._answer(batch))
        ]

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: GroundedAnswerMetrics) -> None:
        self.log_dict({f"{stage}/{name}": value.float() for name, value in metrics.compute().items()}, prog_bar=True)
        metrics.reset()

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["vlm_config"] = asdict(self.network.config)
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        # tensors and plain values only, so the checkpoint loads with torch.load(weights_only=True)
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        missing = sorted(trainable - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} trainable weights of this model (e.g. {missing[:3]}); "
                             "was it trained with the same model, LoRA and freezing settings?")
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            kind, keys, position, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
            random.setstate(states["python"])
