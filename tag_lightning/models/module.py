"""What the SFT and GRPO LightningModules share: everything but the training step.

- the network (a `VLMWrapper`) is injected, and sharded with FSDP2 when the strategy gives a mesh;
- the optimizer is built on the trainable parameters of `self.trainer.model` (so FSDP works);
- validation and test generate greedily, parse each answer once and score it against the label
  and the detector (`claims.py`, `metrics.py`); `tag test` writes its figures, every answer and
  the confusion matrix to a new folder (`reports.py`), a table of the figures per test dataset
  (`results.py`, computed on rank 0 from every rank's scores), with the evidence-necessity test
  (`occlusion.py`) and k sampled answers per image (the model's distribution, not only its
  greedy answer) when asked; `tag predict` writes the same scores per image; on several
  processes every rank answers its padded slice in step, and only the images counted there
  (``batch["counted"]``, `data/sampling.py`) are scored and written: each image once;
- checkpoints hold only the trainable weights, the VLM config and the random states, and a
  checkpoint built for another model set-up is refused before anything loads (`checkpoints.py`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from tag_lightning.errors import BadValue, UserError
from tag_lightning.grounding.claims import Completion, References, read_completion
from tag_lightning.grounding.metrics import AnswerMetrics, AnswerScore, SampledAnswerMetrics, score_answer
from tag_lightning.grounding.occlusion import OcclusionFlips, blur_boxes, face_area, random_boxes_like
from tag_lightning.grounding.reports import new_run_folder, write_evaluation
from tag_lightning.grounding.results import results_table, write_results
from tag_lightning.grounding.rewards import reward_values
from tag_lightning.models.checkpoints import check_fits, pack_rng_states, restore_rng_states
from tag_lightning.models.rollout import RolloutConfig, RolloutEngine
from tag_lightning.models.vlm import VLMWrapper


class VLMModule(LightningModule):
    """Base of the TAG LightningModules; subclasses define `training_step`.

    Args:
        network: the VLM wrapper to train (its config decides freezing, LoRA, dtype).
        optimizer: optimizer factory, called with the trainable parameters.
        scheduler: learning-rate scheduler factory (stepped every optimizer step), or None.
        max_new_tokens: longest generated answer in validation, test and prediction.
        occlusion_test: in `tag test`, ask each question again with the cited regions blurred and
            with as many random face regions of the same sizes blurred (evidence necessity).
        occlusion_seed: seed of the random regions (with the image's name).
        sampled_answers: in `tag test`, also sample this many answers per image at
            `sampled_temperature` (as GRPO's rollouts are drawn) and report every figure over them
            (``sampled`` in metrics.json, with the mean of each GRPO reward): what the model tends to
            say, where the greedy answer shows only its most likely path. 0: greedy answers only.
        sampled_temperature: temperature of those samples (top-p 1).
        sampled_seed: seed of those samples (with the image's name).
        rollout: how every answer is generated (KV cache, compiled decode step, sampling copy of the
            weights; `rollout.RolloutConfig`); None: its defaults.
    """

    def __init__(
        self,
        network: VLMWrapper,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 256,
        occlusion_test: bool = False,
        occlusion_seed: int = 0,
        sampled_answers: int = 0,
        sampled_temperature: float = 1.0,
        sampled_seed: int = 0,
        rollout: RolloutConfig | None = None,
    ) -> None:
        super().__init__()
        if sampled_answers < 0 or sampled_temperature <= 0:
            raise BadValue(f"sampled_answers must be >= 0 and sampled_temperature > 0, got {sampled_answers} and "
                             f"{sampled_temperature}")
        self.save_hyperparameters(ignore=["network", "optimizer", "scheduler"])  # a subclass's own arguments too
        self.network = network
        self.engine = RolloutEngine(network, rollout)  # not a submodule: it generates with `network`
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_new_tokens = max_new_tokens
        self.occlusion_test = occlusion_test
        self.occlusion_seed = occlusion_seed
        self.sampled_answers = sampled_answers
        self.sampled_temperature = sampled_temperature
        self.sampled_seed = sampled_seed
        self.val_metrics = AnswerMetrics()
        self.test_metrics = AnswerMetrics()
        self.sampled_metrics = SampledAnswerMetrics()
        self.occlusion = OcclusionFlips()
        self._test_rows: list[dict] = []  # this rank's per-image rows of the running test
        self._test_scores: list[tuple[str, AnswerScore]] = []  # and their (dataset, score), for the results table
        self.started_from: str | None = None  # a checkpoint whose weights were loaded at construction (init_from)
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
        # generation, and the rollout engine's encoding of images before it, gather the root's weights too
        register_fsdp_forward_method(model, "generate")
        register_fsdp_forward_method(model, "get_image_features")

    def on_fit_start(self) -> None:
        self.network.train()  # Hugging Face models load in eval mode, and Lightning keeps modules' modes

    def configure_optimizers(self):
        parameters = [p for p in self.trainer.model.parameters() if p.requires_grad]
        _check_master_weights(parameters, self.trainer.precision)
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

    def _answer(self, batch: dict, images: list[np.ndarray] | None = None) -> list[tuple[str, Completion, AnswerScore]]:
        """Greedy answers to a batch (or to other `images` with its prompts), each parsed and scored."""
        images = images if images is not None else [image.numpy() for image in batch["image"].cpu()]
        texts = self.engine.greedy(images, batch["prompt"], self.max_new_tokens).texts
        return self._scored(texts, self.references(batch))

    def _scored(self, texts: list[str], references: list[References]) -> list[tuple[str, Completion, AnswerScore]]:
        answered = []
        for text, reference in zip(texts, references):
            completion = self.read(text, reference)
            answered.append((text, completion, score_answer(completion, reference)))
        return answered

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_metrics.update([score for _, _, score in counted(batch, self._answer(batch))])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        answered = self._answer(batch)
        rows = [{"image": name, "dataset": dataset, "text": text, "trace": completion.trace.to_dict(),
                 "format_errors": list(completion.errors), **score.to_dict()}
                for name, dataset, (text, completion, score) in zip(batch["image_name"], batch["dataset"], answered)]
        if self.occlusion_test:
            for row, occlusion in zip(rows, self._ask_occluded(batch, answered)):
                row["occlusion"] = occlusion
        if self.sampled_answers:
            for row, samples in zip(rows, self._sample_answers(batch)):
                row["samples"] = samples
        self.test_metrics.update([score for _, _, score in counted(batch, answered)])
        self._test_rows.extend(counted(batch, rows))
        self._test_scores.extend(counted(batch, [(dataset, score) for dataset, (_, _, score)
                                                 in zip(batch["dataset"], answered)]))

    def _sample_answers(self, batch: dict) -> list[list[dict]]:
        """`sampled_answers` sampled answers per image (seeded by `sampled_seed` and the image's name),
        each scored like a greedy answer and by every GRPO reward; one list of rows per image."""
        k = self.sampled_answers
        seeds = [f"sampled:{self.sampled_seed}:{name}" for name in batch["image_name"]]
        output = self.engine.sample([image.numpy() for image in batch["image"].cpu()], batch["prompt"], seeds, k,
                                    self.max_new_tokens, temperature=self.sampled_temperature)
        per_image = []
        for index, (references, scored) in enumerate(zip(self.references(batch), batch["counted"])):
            rows = []
            for text in output.texts[index * k : (index + 1) * k]:
                completion = self.read(text, references)
                answer, rewards = score_answer(completion, references), reward_values(completion, references)
                if scored:  # not an evaluation rank's padding
                    self.sampled_metrics.update([answer], [rewards])
                rows.append({"text": text, "answer": answer.answer, "format_valid": answer.valid,
                             "box_iou": answer.box_iou, "hallucination": answer.hallucinates,
                             "claims": [claim.to_dict() for claim in answer.claims], "rewards": rewards})
            per_image.append(rows)
        return per_image

    def _ask_occluded(self, batch: dict, answered: list[tuple[str, Completion, AnswerScore]]) -> list[dict | None]:
        """Ask again with the cited regions blurred, then with as many random face regions of the same sizes.

        Only answers that cited a box are asked again: the others have nothing to occlude.
        """
        cited = [[step.box for step in completion.trace.steps if step.box is not None] for _, completion, _ in answered]
        asked = [row for row, boxes in enumerate(cited) if boxes]
        occluded: list[dict | None] = [None] * len(answered)
        cited_answers: list[str | None] = [None] * len(answered)
        random_answers: list[str | None] = [None] * len(answered)
        if asked:
            subset = {key: value[asked] if isinstance(value, torch.Tensor) else [value[row] for row in asked]
                      for key, value in batch.items()}
            images = [image.numpy() for image in subset["image"].cpu()]
            random = [random_boxes_like(cited[row], face_area(detector_aus) or (0, 0, image.shape[1], image.shape[0]),
                                        name, self.occlusion_seed)
                      for row, detector_aus, image, name in zip(asked, subset["detector_aus"], images,
                                                                subset["image_name"])]
            blurred = ([blur_boxes(image, cited[row]) for image, row in zip(images, asked)]
                       + [blur_boxes(image, boxes) for image, boxes in zip(images, random)])
            texts = self.engine.greedy(blurred, subset["prompt"] * 2, self.max_new_tokens).texts  # one call, both
            references = self.references(subset)
            with_cited, with_random = (self._scored(texts[: len(asked)], references),
                                       self._scored(texts[len(asked) :], references))
            for row, boxes, (_, _, a_cited), (_, _, a_random) in zip(asked, random, with_cited, with_random):
                cited_answers[row], random_answers[row] = a_cited.answer, a_random.answer
                occluded[row] = {"cited_boxes": [list(box) for box in cited[row]],
                                 "random_boxes": [[round(v, 1) for v in box] for box in boxes],
                                 "answer_cited_blurred": a_cited.answer, "answer_random_blurred": a_random.answer}
        answers = [score.answer for _, _, score in answered]
        self.occlusion.update(*(counted(batch, values) for values in (
            batch["label"], answers, cited_answers, random_answers, [bool(boxes) for boxes in cited])))
        return occluded

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One JSON-ready row per counted image: the generated text, its reasoning and what it is worth, boxes
        in pixels of the delivered image (`original_size` maps them back, `augment.Letterbox`)."""
        return counted(batch, [
            {"image": name, "original_size": list(size), "labels_offered": list(offered), "text": text,
             "trace": completion.trace.to_dict(), "format_errors": list(completion.errors), **score.to_dict()}
            for name, size, offered, (text, completion, score) in zip(
                batch["image_name"], batch["original_size"], batch["labels"], self._answer(batch))
        ])

    def on_validation_epoch_end(self) -> None:
        self._log_figures("val", self.val_metrics.compute())
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        figures = self.test_metrics.compute()
        self._log_figures("test", figures)
        about = self._evaluated()
        if self.occlusion_test:
            about["evidence_necessity"] = self.occlusion.compute()
            self.log_dict({f"test/{name}": about["evidence_necessity"][name]
                           for name in ("flip_cited", "flip_random", "difference")})
        if self.sampled_answers:
            about["sampled"] = {"answers_per_image": self.sampled_answers, "temperature": self.sampled_temperature,
                                "seed": self.sampled_seed, **self.sampled_metrics.compute()}
            self.log_dict({f"test/sampled/{name}": value for name, value in about["sampled"]["figures"].items()})
        rows, scores = self._on_rank_zero(self._test_rows), self._on_rank_zero(self._test_scores)
        log_dir = self.trainer.log_dir  # on every rank: a collective (the loggers' folder is broadcast)
        if self.global_rank == 0:
            folder = new_run_folder(log_dir or ".")
            write_evaluation(folder, figures, rows, about, self._excluded())
            write_results(folder, results_table(scores, figures, self.trainer.datamodule.dataset_adapters("test")),
                          about)
            rank_zero_info(f"evaluation of {len(rows)} images: {folder}")
        self.test_metrics.reset()
        self.occlusion.reset()
        self.sampled_metrics.reset()
        self._test_rows, self._test_scores = [], []

    def _log_figures(self, stage: str, figures: dict) -> None:
        shown = ("acc", "format_valid", "box_iou")  # on the progress bar too
        scalars = {name: value for name, value in figures.items() if isinstance(value, float)}
        scalars["images"] = figures["counts"]["answers"]  # how many the figures are over
        self.log_dict({f"{stage}/{name}": scalars[name] for name in shown}, prog_bar=True)
        self.log_dict({f"{stage}/{name}": value for name, value in scalars.items() if name not in shown})

    def provenance(self) -> dict:
        """Which weights answer: ``checkpoint`` (the one `--ckpt_path` loaded, else None), ``init_from``
        (the checkpoint the module started from, else None) and ``weights``, the one that was used:
        ``checkpoint``, ``init_from``, or ``bare model`` (the model folder's own weights, zero-shot)."""
        checkpoint = self.trainer.ckpt_path
        checkpoint = None if checkpoint is None else str(Path(checkpoint).resolve())
        weights = "checkpoint" if checkpoint else "init_from" if self.started_from else "bare model"
        return {"model": self.network.config.model_path, "checkpoint": checkpoint, "init_from": self.started_from,
                "weights": weights}

    def _evaluated(self) -> dict:
        """What was evaluated: the model and the weights used (`provenance`), the data."""
        datamodule = getattr(self.trainer, "datamodule", None)
        data = None
        if datamodule is not None and hasattr(datamodule, "specs"):
            data = {"specs": datamodule.specs["test"], "split": datamodule.split_names["test"],
                    "au_cache": str(datamodule.au_cache), "counts": dict(datamodule.counts.get("test", {})),
                    "labels_offered": datamodule.offered_labels("test")}  # the question each dataset was asked
        return {**self.provenance(), "vlm_config": asdict(self.network.config), "data": data,
                "module": type(self).__name__}

    def _excluded(self) -> list[dict]:
        """The test images left out (not cached, no face, rows skipped by lenient reading...), with why."""
        datamodule = getattr(self.trainer, "datamodule", None)
        return [asdict(exclusion) for exclusion in getattr(datamodule, "exclusions", {}).get("test", [])]

    def _on_rank_zero(self, values: list) -> list:
        """Every rank's per-image `values` (in rank order) on rank 0, which writes them; [] on the others.

        Only rank 0 receives them: at 10^5 images with sampled answers, a copy on every rank would be
        gigabytes each for nothing.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return values
        everyone: list[list] | None = [[] for _ in range(torch.distributed.get_world_size())] if self.global_rank == 0 \
            else None
        torch.distributed.gather_object(values, everyone, dst=0)
        return [value for rank_values in everyone or [] for value in rank_values]

    def _every_rank(self, value) -> list:
        """`value` of every rank, in rank order (one element without a process group)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [value]
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, value)
        return everyone

    # -- checkpoints -----------------------------------------------------------------------------

    def _trainable_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self._trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["vlm_config"] = asdict(self.network.config)
        checkpoint["rng_states"] = self._every_rank(pack_rng_states())  # each rank's: they differ (dropout, data)
        checkpoint["optimizer_classes"] = [f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
                                           for optimizer in self.trainer.optimizers]  # what resuming restores
        checkpoint["log_dir"] = self.logger.log_dir if self.logger is not None else None  # where a resumed run logs on

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_fits(checkpoint, self.network.config, "the checkpoint")
        missing = sorted(self._trainable_names() - set(checkpoint["state_dict"]))
        if missing:
            raise BadValue(f"the checkpoint lacks {len(missing)} trainable weights of this model (e.g. {missing[:3]}); "
                           "was it trained with the same model, LoRA and freezing settings?")
        states = checkpoint.get("rng_states")
        if isinstance(states, list):  # one a rank; a run resumed on fewer ranks takes the first ones
            restore_rng_states(states[min(self.global_rank, len(states) - 1)])
        elif states:  # a checkpoint written before states were kept per rank: rank 0's
            restore_rng_states(states)


def _check_master_weights(parameters: list[torch.Tensor], precision: str) -> None:
    """Refuse trainable weights below float32 (Lightning's `bf16-true` / `16-true` cast every weight).

    A plain optimizer updates weights in their own dtype, and a bfloat16 weight near 0.05 moves only
    in steps of 2.4e-4: an update of lr x ~1 below half of that (lr 1e-4 or 1e-6) is rounded away.
    """
    low = sorted({str(p.dtype).removeprefix("torch.") for p in parameters if p.dtype != torch.float32})
    if low:
        raise UserError(f"trainer.precision {precision} puts the trained weights in {', '.join(low)}, where an "
                        "optimizer step smaller than half the dtype's spacing is rounded away (lr 1e-4 moves almost "
                        "nothing); use precision bf16-mixed: the frozen base keeps the model's dtype and the trained "
                        "weights stay float32")


def counted(batch: dict, values: list) -> list:
    """The `values` (one per item of `batch`) of the items counted: not an evaluation rank's padding."""
    return [value for value, keep in zip(values, batch["counted"]) if keep]
