"""What the SFT and GRPO LightningModules share: everything but the training step.

- the network (a `VLMWrapper`) is injected, and sharded with FSDP2 when the strategy gives a mesh;
- the optimizer is built on the trainable parameters of `self.trainer.model` (so FSDP works);
- validation and test generate greedily, parse each answer once and score it against the label
  and the detector (`claims.py`), and `tag predict` writes the same scores per image;
- checkpoints hold only the trainable weights, the VLM config and the random states, and a
  checkpoint built for another model set-up is refused before anything loads (`checkpoints.py`).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from tag_lightning.claims import Completion, References, read_completion
from tag_lightning.metrics import AnswerScore, GroundedAnswerMetrics, score_answer
from tag_lightning.models.checkpoints import check_fits, pack_rng_states, restore_rng_states
from tag_lightning.models.vlm import VLMWrapper


class VLMModule(LightningModule):
    """Base of the TAG LightningModules; subclasses define `training_step`.

    Args:
        network: the VLM wrapper to train (its config decides freezing, LoRA, dtype).
        optimizer: optimizer factory, called with the trainable parameters.
        scheduler: learning-rate scheduler factory (stepped every optimizer step), or None.
        max_new_tokens: longest generated answer in validation, test and prediction.
    """

    def __init__(
        self,
        network: VLMWrapper,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        super().__init__()
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
        if self.device_mesh is not None:
            self.shard(self.network.model)

    def shard(self, model: torch.nn.Module) -> None:
        """`fully_shard` every transformer block of `model`, then its root, over the data-parallel mesh."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = self.device_mesh["data_parallel"]
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

    # -- reading answers -------------------------------------------------------------------------

    def references(self, batch: dict) -> list[References]:
        """Each sample's label, allowed labels and detector AUs, in pixels of its delivered image."""
        return [
            References(label, tuple(labels), detector_aus, frozenset(activated), (image.shape[1], image.shape[0]))
            for label, labels, detector_aus, activated, image in zip(
                batch["label"], batch["labels"], batch["detector_aus"], batch["activated_aus"], batch["image"])
        ]

    def read(self, text: str, references: References) -> Completion:
        """Parse a generated answer, its boxes mapped from the model's frame to the delivered image's."""
        return read_completion(text, self.network.frame(*references.image_size).trace_to_original)

    # -- evaluation ------------------------------------------------------------------------------

    def _answer(self, batch: dict) -> list[tuple[str, AnswerScore]]:
        """Greedy answers to a batch, each with its score against the label and the detector."""
        images = [image.numpy() for image in batch["image"].cpu()]
        output = self.network.generate(images, batch["prompt"], max_new_tokens=self.max_new_tokens)
        return [(text, score_answer(self.read(text, references), references))
                for text, references in zip(output.texts, self.references(batch))]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_metrics.update([score for _, score in self._answer(batch)])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_metrics.update([score for _, score in self._answer(batch)])

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

    def _trainable_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self._trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["vlm_config"] = asdict(self.network.config)
        checkpoint["rng_states"] = pack_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_fits(checkpoint, self.network.config, "the checkpoint")
        missing = sorted(self._trainable_names() - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} trainable weights of this model (e.g. {missing[:3]}); "
                             "was it trained with the same model, LoRA and freezing settings?")
        if checkpoint.get("rng_states"):
            restore_rng_states(checkpoint["rng_states"])
