"""Callbacks: where `tag predict` writes its answers (composed in by configs/predict.yaml), and the progress
bar every `tag` Lightning command shows."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from tag_lightning.boxes import round_box
from tag_lightning.data.augment import Letterbox
from tag_lightning.data.datamodule import Exclusion, FERDataModule
from tag_lightning.errors import UserError
from tag_lightning.grounding.viz import draw_answer

RUN_FILE = "run.json"
IMAGES = "images"

HOW_TO_FIX = {
    "not_cached": "images are answered from their AU records and never annotated at predict time (the cache holds "
                  "your detector settings): run `tag prepare au-cache --images {image} --out {au_cache}`, then "
                  "tag predict again",
    "no_face": "the AU pipeline found no face to ground the answer in: use a photo that shows one face",
    "low_quality": "use a sharper photo with a larger face, build the AU cache with lower quality thresholds "
                   "(`tag prepare au-cache --help`), or answer such faces anyway with "
                   "--data.exclude_statuses=[no_face,unreadable]",
    "unreadable": "the file does not decode as an image: replace it with one that does",
    "unlabeled": "the test split answers labelled images only: answer any image with --data.predict_data PATH",
    "not_an_image": "only image files are answered: convert it to one of .jpg, .png, .bmp, .webp, .tif",
    "missing_image": "the file the row or link names is not there: fix the row or link, or restore the file",
    "bad_row": "the row is malformed (see detail): fix it; without --data.lenient true such a row stops the run",
}
"""What a user can do about each reason a predict image was rejected ({image}, {au_cache} filled in)."""


class StepProgressBar(TQDMProgressBar):
    """Training progress in optimizer steps out of ``trainer.max_steps``, one bar across epochs.

    Our configs stop on ``max_steps`` and leave ``max_epochs`` unset, so Lightning's bars, which count
    the batches of each epoch, say nothing of how far the run is (its rich one shows ``Epoch 9/-2``).
    A step is ``trainer.global_step``, an optimizer step as ``max_steps`` counts them: GRPO's manual
    optimization takes several per batch, gradient accumulation one per several batches. Without
    ``max_steps`` (-1) the bar is Lightning's, an epoch at a time.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if _counts_steps(trainer):
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = trainer.global_step  # a resumed run: its speed from its own steps
            self._show_step(trainer, pl_module)

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        if not _counts_steps(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not _counts_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self._should_update(trainer.global_step, trainer.max_steps):
            self._show_step(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not _counts_steps(trainer):  # which closes the bar with `leave`: here it lasts the whole run
            super().on_train_epoch_end(trainer, pl_module)

    def _show_step(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        bar.set_description(f"step {trainer.global_step}/{trainer.max_steps}", refresh=False)
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # and redraws


def _counts_steps(trainer) -> bool:
    return trainer.max_steps != -1  # -1: no step limit


class JSONLPredictionWriter(BasePredictionWriter):
    """Write each predicted batch's rows to ``output_dir/predictions.rank<R>.jsonl`` as they come,
    and, per image, a JSON report and an overlay PNG under ``output_dir/images/``.

    Every row names the model and the weights that answered it (`VLMModule.provenance`: the
    checkpoint, the ``init_from`` it started from, and ``weights``, which of them answered, or
    ``bare model``), and ``output_dir/run.json`` records the run: those, the VLM config, the
    command line, the start time. A run never adds to an earlier run's files, which would mix the
    answers of different models: a folder that already holds predictions is refused. Rows are
    written batch by batch (flushed), so a long run that is killed keeps what it answered; one
    file per rank under DDP.

    Per image (`per_image`), named after the image's stem and a short hash of its full name (so
    two photos called ``face.jpg`` in two folders get two files, the same on every rank):

    - ``<stem>-<hash>.json``: the answer, label (null: unlabeled), model and checkpoint, each
      step (region, AUs, observation, box) with its claims (verdict, IoU, the detector's box of
      that AU), the format errors and the raw text; boxes in pixels of the ORIGINAL image;
    - ``<stem>-<hash>.png``: `viz.draw_answer` on the image the model saw;
    - for an image the data module left out (no face, low quality, not in the AU cache, ...):
      ``<stem>-<hash>.json`` with ``status: rejected``, the reason, the AU record's detail and
      how to fix it; no PNG.

    Args:
        output_dir: folder for the prediction files (created if missing; must not hold predictions).
        per_image: also write the per-image JSON reports and overlays.
    """

    def __init__(self, output_dir: str = "outputs/predictions", per_image: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.per_image = per_image
        self.provenance: dict[str, Any] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse a folder with an earlier run's predictions, before the model answers anything; then
        write the rejected images' reports (the data module has set up, and they need no model)."""
        if stage != "predict":
            return
        earlier = [path.name for path in sorted(self.output_dir.glob("predictions.rank*.jsonl"))]
        earlier += [name for name in (RUN_FILE, IMAGES) if (self.output_dir / name).exists()]
        if earlier:
            raise UserError(f"{self.output_dir} holds an earlier run's predictions ({', '.join(earlier)}); choose "
                            "another output_dir (--trainer.callbacks.init_args.output_dir=DIR) or remove them")
        trainer.strategy.barrier()  # every rank has looked before any rank writes
        datamodule = trainer.datamodule
        if self.per_image and trainer.is_global_zero and isinstance(datamodule, FERDataModule):
            self._write_rejections(datamodule.exclusions[datamodule.predict_split], datamodule.au_cache)

    def on_predict_start(self, trainer, pl_module) -> None:
        config = pl_module.network.config
        self.provenance = pl_module.provenance()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            run = {**self.provenance, "vlm_config": asdict(config), "command": sys.argv,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _write_json(self.output_dir / RUN_FILE, run)
        answered_by = {"checkpoint": self.provenance["checkpoint"],
                       "init_from": f"no checkpoint: the weights of init_from {self.provenance['init_from']}",
                       "bare model": "no checkpoint: the base model (zero-shot)"}[self.provenance["weights"]]
        rank_zero_info(f"predictions: {self.output_dir} | model {config.model_path} | {answered_by}")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.output_dir / f"predictions.rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as out:
            for row in prediction:
                out.write(json.dumps({**row, **self.provenance}) + "\n")
        if self.per_image:  # `prediction` holds the counted images' rows only (`VLMModule.predict_step`)
            images = [image for image, counted in zip(batch["image"].numpy(), batch["counted"]) if counted]
            for row, image in zip(prediction, images):
                self._write_answer(row, image)

    def _write_answer(self, row: dict, image: np.ndarray) -> None:
        """The image's report (boxes in original pixels) and its overlay (on the image the model saw)."""
        overlay = self._image_file(row["image"], ".png")
        report = {**answer_report(row, Letterbox(tuple(row["original_size"]), image.shape[1])), **self.provenance,
                  "overlay": overlay.name}
        _write_json(self._image_file(row["image"], ".json"), report)
        Image.fromarray(draw_answer(image, row["trace"]["steps"], row["claims"], row["answer"], row["label"],
                                    row["format_errors"])).save(overlay)

    def _write_rejections(self, exclusions: list[Exclusion], au_cache: str) -> None:
        """A report per image left out: why, in the AU record's words too, and what to do about it."""
        for exclusion in exclusions:
            how_to_fix = HOW_TO_FIX.get(exclusion.reason, "").format(image=exclusion.image, au_cache=au_cache)
            _write_json(self._image_file(exclusion.image, ".json"),
                        {"image": exclusion.image, "status": "rejected", "reason": exclusion.reason,
                         "detail": exclusion.detail, "how_to_fix": how_to_fix})
        if exclusions:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(Counter(e.reason for e in exclusions).items()))
            rank_zero_info(f"rejected {len(exclusions)} images ({reasons}): {self.output_dir / IMAGES}/*.json say why")

    def _image_file(self, image: str, suffix: str) -> Path:
        """``output_dir/images/<stem>-<hash><suffix>``; creates the folder."""
        folder = self.output_dir / IMAGES
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{image_file_stem(image)}{suffix}"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def image_file_stem(image: str) -> str:
    """A file name for an image's reports: its stem made safe, then a short hash of its full name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(image).stem)[:80]
    return f"{stem}-{hashlib.blake2b(image.encode(), digest_size=4).hexdigest()}"


def answer_report(row: dict, letterbox: Letterbox) -> dict:
    """What `tag predict` tells about one answered image (a `predict_step` row), boxes in pixels of the
    original image (`letterbox` maps them from the image the model saw)."""
    def original(box: list[int] | None) -> list[int] | None:
        return None if box is None else round_box(letterbox.to_original(box))

    trace = row["trace"]
    steps = [
        {"region": step["region"], "aus": [f"AU{au}" for au in step["aus"]], "observation": step["observation"],
         "box": original(step["box"]),
         "claims": [{"au": claim["au"], "claimed": claim["polarity"], "verdict": claim["verdict"], "iou": claim["iou"],
                     "detector_box": original(claim["detector_box"])}
                    for claim in row["claims"] if claim["step"] == number]}
        for number, step in enumerate(trace["steps"], start=1)
    ]
    return {"image": row["image"], "status": "answered", "labels_offered": row["labels_offered"], "label": row["label"],
            "answer": row["answer"], "correct": row["correct"], "original_size": row["original_size"],
            "global_analysis": trace["global_analysis"], "steps": steps, "conclusion": trace["conclusion"],
            "format_errors": row["format_errors"], "text": row["text"]}
