"""FERDataModule: FER datasets + AU cache (+ trace JSONL) -> batches for SFT, GRPO and evaluation.

Selection (at `setup`, per split). A sample is kept when the AU cache holds a record for it whose
status is not excluded (`exclude_statuses`; an image without a record is excluded too), when it
has a label (except in the predict split: `tag predict` answers unlabeled photos too) and, for
SFT training, a trace whose boxes lie in its image. Every exclusion is counted by reason
(`counts`), listed image by image (`exclusions`: `tag predict` writes why each was left out)
and summarised in the log. Images are never annotated here: the AU cache holds the detector
settings the user chose.

AU detector settings. A run reads the AU records of one settings key of the cache (`au_settings`,
or the only one the cache holds), and keeps it: a training checkpoint records it (`state_dict`)
and a run resumed or evaluated from it with other records is refused. Every trace line records
the settings and the activation threshold it was grounded on: traces grounded on other records
are refused, and another threshold is told (SFT targets and the rewards would disagree on which
AUs are active).

Trace format. One option, `trace_format` (``per_step`` or ``paper``, `grammar.TRACE_FORMATS`),
chooses the format the prompt asks for and the SFT targets are rendered in; GRPO and evaluation ask the
same prompt. Training traces written in the other format (each line records its own, lines
without one are ``per_step``) are refused: the model would be taught one format and asked for the
other.

Items (one dict per sample; `collate` turns them into a batch of the same keys):

- every item: ``image`` (uint8 HWC RGB, `image_size` square, augmented in training),
  ``image_name``, ``dataset`` (its dataset's name in the split, `dataset_names`), ``prompt``
  (`prompts.user_prompt` with its dataset's labels, asking for `trace_format`), ``trace_format``,
  ``label`` (None: unlabeled, predict split only), ``labels`` (its dataset's labels: the answers
  allowed), ``original_size`` (the image's (width, height): `augment.Letterbox` maps boxes back to it),
  ``counted`` (False: a repeat that only pads an evaluation rank's slice, see `sampling.py`);
- ``"sft"`` items (training in stage sft) add ``trace`` (the target `Trace`) and ``target``
  (its text, rendered in ``trace_format``);
- ``"rl"`` items (training in stage rl; validation and test in both stages, as evaluation is
  generation scored against the label and the detector) add ``detector_aus`` (the record's AU
  entries: box, intensity, sides) and ``activated_aus`` (AU keys at or above
  `activation_threshold`, strongest first).

Every box is in pixels of the delivered image: traces and AU records (original-image pixels)
move with resizing and augmentation, and a target's text is rendered only afterwards. A model
wrapper that sees another frame maps the boxes of ``trace`` and re-renders it (`render_trace`);
the text in ``target`` is for models that see the delivered image as it is.

Training batches come from a `ResumableSampler`: shuffled per (seed, epoch), sharded over DDP
ranks, and resumable mid-epoch: the datamodule's state in a checkpoint says how many samples of
which epoch were trained on, and a resumed run skips exactly those. Validation, test and predict
batches come from an `EvaluationSampler`: each image is counted once over all ranks.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from tag_lightning.answers.grammar import PER_STEP, TRACE_FORMATS, Trace, line_format, render_trace
from tag_lightning.answers.labels import DATASET_CLASSES, EMOTIONS, normalize_label
from tag_lightning.answers.prompts import user_prompt
from tag_lightning.au.cache import AUCache
from tag_lightning.au.record import STATUSES, AURecord
from tag_lightning.data.augment import AugmentOptions, FaceAugment
from tag_lightning.data.datasets import FERDataset, PhotoFolder, parse_data_spec
from tag_lightning.data.sampling import EvaluationSampler, Key, ResumableSampler
from tag_lightning.errors import BadValue, UserError
from tag_lightning.images import ImageRef, content_hash, decode_image

SPLITS = ("train", "val", "test", "predict")
DEFAULT_AUGMENT = AugmentOptions()
_SPLITS_OF_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


@dataclass(frozen=True)
class _Entry:
    """A kept sample: where it is, which content it must have, and its target trace if any."""

    dataset: int
    index: int
    content_hash: str
    size: tuple[int, int]  # the original (width, height), as recorded
    trace: Trace | None


@dataclass(frozen=True)
class Exclusion:
    """A sample left out of a split: its image, why (a reason counted in `counts`), and the AU
    record's own explanation when it has one (e.g. why no face was accepted)."""

    image: str
    reason: str
    detail: str | None


class FERItems(Dataset):
    """The kept samples of one split as items of one kind ("sft" or "rl"), decoded and augmented."""

    def __init__(
        self,
        datasets: Sequence[FERDataset],
        names: Sequence[str],
        entries: Sequence[_Entry],
        cache: AUCache,
        kind: Literal["sft", "rl"],
        augment: FaceAugment,
        seed: int = 0,
        activation_threshold: float = 1.0,
        trace_format: str = PER_STEP,
        labels: Sequence[tuple[str, ...]] = (),
    ) -> None:
        self.datasets = list(datasets)
        self.names = list(names)
        self.entries = list(entries)
        self.cache = cache
        self.kind = kind
        self.augment = augment
        self.seed = seed
        self.activation_threshold = activation_threshold
        self.trace_format = trace_format
        self.labels = list(labels)  # the answers each dataset's question offers
        self.prompts = [user_prompt(offered, trace_format) for offered in self.labels]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | Key) -> dict:
        """The item at `key`: an index, or a sampler's `Key`."""
        epoch, index, repeat = key if isinstance(key, Key) else Key(0, key)
        entry = self.entries[index]
        sample = self.datasets[entry.dataset][entry.index]
        data = sample.image.read_bytes()
        if content_hash(data) != entry.content_hash:  # the user's file changed under a finished cache
            raise UserError(
                f"{sample.image.name} changed since the AU cache {self.cache.root} recorded it: rebuild the cache over "
                f"the data that holds it (`tag prepare au-cache --images DATA --out {self.cache.root}`, and the traces "
                "made from it for training), then run again"
            )
        image, size = _decode(data, sample.image.name, max(entry.size), self.augment.image_size)
        # A function of (seed, epoch, sample): the same whatever the worker, prefetching or resumption.
        rng = np.random.default_rng([self.seed, epoch, index])
        item = {"image_name": sample.image.name, "dataset": self.names[entry.dataset],
                "prompt": self.prompts[entry.dataset], "trace_format": self.trace_format, "label": sample.label,
                "labels": self.labels[entry.dataset], "original_size": entry.size, "counted": not repeat}
        if self.kind == "sft":
            out = self.augment(image, size, rng, trace=entry.trace)
            item.update(trace=out.trace, target=render_trace(out.trace, self.trace_format))
        else:
            record = self.cache.get(entry.content_hash)
            out = self.augment(image, size, rng, aus=record.aus, landmarks=record.landmarks)
            activated = [key for key, _ in record.activated(self.activation_threshold) if key in out.aus]
            item.update(detector_aus=out.aus, activated_aus=activated)
        return {"image": out.image, **item}


def collate(items: list[dict]) -> dict:
    """A batch with the items' keys: images stacked into one uint8 (B, H, W, 3) tensor, the rest as
    lists (prompts and targets stay text: the model wrapper tokenises)."""
    batch = {key: [item[key] for item in items] for key in items[0]}
    batch["image"] = torch.from_numpy(np.stack(batch["image"]))
    return batch


class FERDataModule(LightningDataModule):
    """FER images with their AU records, and traces for SFT, as batches for training and evaluation.

    Args:
        au_cache: folder of the AU cache built over these images (`tag prepare au-cache`).
        train_data: dataset spec(s) of the training samples, e.g. ``rafdb:/data/RAF-DB``
            (forms: rafdb:ROOT, ferplus:ROOT, affectnet:ROOT, manifest:FILE.csv, folder:DIR).
        val_data: dataset spec(s) of the validation samples.
        test_data: dataset spec(s) of the test samples.
        predict_data: images `tag predict` answers: an image file, a folder of images, or a dataset
            spec (read in its adapter's default split; labels optional); default: the test split.
        train_split: split of `train_data` to read.
        val_split: split of `val_data` to read (RAF-DB has none but ``test``).
        test_split: split of `test_data` to read (AffectNet's evaluation split is ``val``).
        train_traces: trace JSONL of the training samples (`tag prepare traces`); needed in stage sft.
        stage: ``sft``: training items carry a target trace; ``rl``: they carry the detector's AU
            boxes for the rewards. Validation and test items always carry the detector's AU boxes.
        trace_format: the reasoning format the prompt asks for and SFT targets are written in:
            ``per_step`` (ours: every step names its AU ids) or ``paper`` (TAG's: steps name a region
            and a box, the conclusion lists the AUs). `train_traces` must hold traces of this format
            (``tag prepare traces --trace-format``).
        image_size: side of the square images delivered (letterboxed).
        augment: random training augmentation (None: training images are only letterboxed).
        au_settings: the AU cache's settings key whose records this run reads (`tag prepare au-cache`
            prints it); None: the only settings the cache holds.
        exclude_statuses: AU record statuses whose images are left out (``unreadable`` must be one).
        activation_threshold: AU intensity at which an AU counts as activated (rl items); the traces'
            ``--min-intensity`` should be the same.
        batch_size: samples per batch.
        num_workers: dataloader worker processes (0: load in the main process).
        seed: base of the augmentation randomness (combined with torch's per-worker seed).
        lenient: skip malformed dataset rows (listed by the adapters) instead of failing.
        labels: the answers the question offers for a manifest, a folder or a photo (sources with no fixed
            label set), in any form `normalize_label` accepts; None: the label set of the checkpoint a run
            evaluates or starts from (`tag test`, `tag predict`, GRPO's ``init_from``; `tag` fills it in),
            else all eight unified emotions. Never the labels a split happens to hold. RAF-DB, FERPlus and
            AffectNet offer their own classes (``affectnet7:ROOT``: AffectNet's 7 without contempt).
            Samples labelled with an answer not offered are left out (``label_not_offered``).
    """

    def __init__(
        self,
        au_cache: str,
        train_data: str | list[str] | None = None,
        val_data: str | list[str] | None = None,
        test_data: str | list[str] | None = None,
        predict_data: str | list[str] | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        train_traces: str | None = None,
        stage: Literal["sft", "rl"] = "sft",
        trace_format: Literal["per_step", "paper"] = PER_STEP,
        image_size: int = 448,
        augment: AugmentOptions | None = DEFAULT_AUGMENT,
        au_settings: str | None = None,
        exclude_statuses: tuple[str, ...] = ("no_face", "low_quality", "unreadable"),
        activation_threshold: float = 1.0,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        lenient: bool = False,
        labels: list[str] | None = None,
    ) -> None:
        super().__init__()
        unknown = set(exclude_statuses) - set(STATUSES)
        if unknown:
            raise BadValue(f"unknown record status(es) {sorted(unknown)} in exclude_statuses: expected {STATUSES}")
        if "unreadable" not in exclude_statuses:
            raise BadValue("unreadable images cannot be loaded: keep 'unreadable' in exclude_statuses")
        if stage not in ("sft", "rl"):
            raise BadValue(f"stage must be 'sft' or 'rl', got {stage!r}")
        if trace_format not in TRACE_FORMATS:
            raise BadValue(f"trace_format must be one of {', '.join(TRACE_FORMATS)}, got {trace_format!r}: set "
                           f"--data.trace_format to one of them")
        self.save_hyperparameters()
        self.au_cache = au_cache
        self.specs = {"train": _as_list(train_data), "val": _as_list(val_data), "test": _as_list(test_data),
                      "predict": _as_list(predict_data)}
        self.split_names = {"train": train_split, "val": val_split, "test": test_split, "predict": None}
        self.train_traces = train_traces
        self.stage = stage
        self.trace_format = trace_format
        self.image_size = image_size
        self.augment = augment
        self.au_settings = au_settings  # resolved at setup: the key read
        self.exclude_statuses = tuple(exclude_statuses)
        self.activation_threshold = activation_threshold
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.lenient = lenient
        self.labels = declared_labels(labels)
        self.items: dict[str, FERItems] = {}
        self._consumed = (0, 0)  # (epoch, training samples consumed in it), for mid-epoch resumption
        self._resume: tuple[int, int] | None = None
        self.counts: dict[str, Counter] = {}
        """Per split: ``samples``, ``kept`` and one count per exclusion reason."""
        self.exclusions: dict[str, list[Exclusion]] = {}
        """Per split: every sample left out, with why."""

    def kind(self, split: str) -> Literal["sft", "rl"]:
        """The item kind a split yields (see the module doc)."""
        return "sft" if self.stage == "sft" and split == "train" else "rl"

    @property
    def predict_split(self) -> str:
        """The split `tag predict` answers: ``predict`` when `predict_data` is set, else ``test``."""
        return "predict" if self.specs["predict"] else "test"

    def setup(self, stage: str | None = None) -> None:
        splits = SPLITS if stage is None else self._splits_of(stage)
        wanted = [split for split in splits if self.specs[split] and split not in self.items]
        if not wanted:
            return
        # One OpenCV thread per process: each dataloader worker is already a core's worth of work,
        # and a worker that resizes OpenCV's thread pool inherited over fork can deadlock.
        cv2.setNumThreads(1)
        cache = AUCache(self.au_cache)
        self.au_settings = cache.use_settings(self.au_settings)
        for split in wanted:
            self.items[split], self.counts[split], self.exclusions[split] = self._build(split, cache)
            rank_zero_info(f"FERDataModule {split}: {_describe(self.counts[split])}"
                           f"{self._how_to_cache(split, self.counts[split])}")

    def _read(self, spec: str, split: str) -> FERDataset:
        """The dataset a spec names; for `tag predict` a folder is read as `tag prepare au-cache` reads it
        (`PhotoFolder`: nested folders, files that are not images listed)."""
        if split == "predict" and Path(spec).expanduser().is_dir():
            return PhotoFolder(Path(spec).expanduser(), lenient=self.lenient)
        return parse_data_spec(spec, self.split_names[split], self.lenient)

    def _how_to_cache(self, split: str, counts: Counter) -> str:
        """For a split with images not in the AU cache: the command that caches them."""
        if not counts["not_cached"]:
            return ""
        images = " ".join(self.specs[split]) if len(self.specs[split]) == 1 else "DATA"
        return (f"; {counts['not_cached']} not in the AU cache {self.au_cache}: cache them with `tag prepare au-cache "
                f"--images {images} --out {self.au_cache}`")

    def _splits_of(self, stage: str) -> tuple[str, ...]:
        return (self.predict_split,) if stage == "predict" else _SPLITS_OF_STAGE[stage]

    def _build(self, split: str, cache: AUCache) -> tuple[FERItems, Counter, list[Exclusion]]:
        kind = self.kind(split)
        traces = None
        if kind == "sft":
            if self.train_traces is None:
                raise BadValue("stage sft trains on traces: set train_traces (a `tag prepare traces` JSONL)")
            traces = load_traces(self.train_traces)  # first: it names a damaged line
            check_trace_grounding(self.train_traces, self.au_settings, self.activation_threshold)
            check_trace_format(self.train_traces, self.trace_format)
        datasets = [self._read(spec, split) for spec in self.specs[split]]
        offered = [self.offered(dataset) for dataset in datasets]
        entries, counts, exclusions = [], Counter(), []
        for dataset in datasets:  # rows the reader left out (lenient reading, files that are not images)
            for row in dataset.skipped:
                counts[row.reason] += 1
                exclusions.append(Exclusion(row.source, row.reason, row.removeprefix(f"{row.source}: ")))
        if split == "predict" and not any(len(dataset) for dataset in datasets):
            found = f" (skipped: {', '.join(f'{reason} {n}' for reason, n in sorted(counts.items()))})" if counts else ""
            raise BadValue(f"no image to answer in {', '.join(self.specs[split])}{found}: give an image, a folder "
                           "of images or a dataset spec as --data.predict_data")
        for number, dataset in enumerate(datasets):
            for index, sample in enumerate(dataset):
                record = _find_record(cache, sample.image)
                reason = self._exclusion(record, sample.label, traces, needs_label=split != "predict",
                                         offered=offered[number])
                counts[reason or "kept"] += 1
                if reason is None:  # in SFT, one entry per trace of the image that fits it
                    targets = [None] if traces is None else [
                        trace for trace in traces[record.content_hash] if trace_fits(trace, record.size)]
                    entries += [_Entry(number, index, record.content_hash, record.size, trace) for trace in targets]
                else:
                    detail = "no record of this image's content in the AU cache" if record is None else record.reason
                    exclusions.append(Exclusion(sample.image.name, reason, detail))
        counts["samples"] = sum(len(dataset) + len(dataset.skipped) for dataset in datasets)
        if traces is not None:
            counts["traces"] = len(entries)
        if not entries and split != "predict":  # a wholly rejected predict split is still told image by image
            raise BadValue(f"FERDataModule {split}: no usable sample, {_describe(counts)}{self._how_to_cache(split, counts)}")
        augment = FaceAugment(self.image_size, self.augment if split == "train" else None)
        items = FERItems(datasets, dataset_names(self.specs[split], datasets), entries, cache, kind, augment,
                         self.seed, self.activation_threshold, self.trace_format, offered)
        return items, counts, exclusions

    def offered(self, dataset: FERDataset) -> tuple[str, ...]:
        """The answers `dataset`'s question offers: its fixed classes, else the run's `labels`, else all eight."""
        return dataset.classes or self.labels or EMOTIONS

    def offered_labels(self, split: str) -> dict[str, list[str]]:
        """The answers each dataset of a split was asked to choose from, by name: what an evaluation records."""
        items = self._items(split)
        return {name: list(labels) for name, labels in zip(items.names, items.labels)}

    def _exclusion(
        self, record: AURecord | None, label: str | None, traces: dict[str, list[Trace]] | None, needs_label: bool,
        offered: Sequence[str],
    ) -> str | None:
        """Why a sample is left out, or None when it is kept."""
        if record is None:
            return "not_cached"
        if record.status in self.exclude_statuses:
            return record.status
        if label is None and needs_label:
            return "unlabeled"
        if label is not None and label not in offered:
            return "label_not_offered"  # its question could not be answered right
        if traces is None:
            return None
        found = traces.get(record.content_hash)
        if not found:
            return "no_trace"
        return None if any(trace_fits(trace, record.size) for trace in found) else "bad_trace"

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """The batch as it is: its images go through the model wrapper's processor on the CPU first,
        which moves its own tensors (and Lightning's default mover refuses frozen `Trace`s)."""
        return batch

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableSampler(self._items("train"), *self._ranks(), shuffle=True, seed=self.seed)
        if self._resume is not None:
            sampler.resume(*self._resume)
            self._resume = None
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.predict_split)

    def dataset_adapters(self, split: str) -> dict[str, str]:
        """The datasets of a split in spec order, by name (items' ``dataset``), each with its adapter's
        name (``affectnet``, ``manifest``, ...): what the per-dataset results table reports on."""
        items = self._items(split)
        return {name: dataset.name for name, dataset in zip(items.names, items.datasets)}

    def _ranks(self) -> tuple[int, int]:
        """(processes, this one's rank)."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _evaluation_loader(self, split: str) -> DataLoader:
        return self._loader(split, EvaluationSampler(self._items(split), *self._ranks()))

    def _items(self, split: str) -> FERItems:
        if split not in self.items:
            raise RuntimeError(f"no {split} data: set {split}_data and call setup() first")
        return self.items[split]

    def _loader(self, split: str, sampler: ResumableSampler | EvaluationSampler) -> DataLoader:
        return DataLoader(
            self._items(split),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    # -- resuming mid-epoch ----------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count the training batches the loop actually consumes (not those prefetched)."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            self._consumed = (epoch, (self._consumed[1] if self._consumed[0] == epoch else 0) + len(batch["image"]))
        return batch

    def state_dict(self) -> dict:
        """Saved in training checkpoints: how far into which epoch training got (on this rank), the AU
        settings trained on, and the answers the training questions offered (a manifest evaluated with the
        checkpoint is asked the same question: `checkpoint_labels`)."""
        offered = self.items["train"].labels if "train" in self.items else []
        trained = {label for labels in offered for label in labels}
        return {"epoch": self._consumed[0], "samples_done": self._consumed[1], "au_settings": self.au_settings,
                "labels": [label for label in EMOTIONS if label in trained] or None}

    def load_state_dict(self, state: dict) -> None:
        """Refuses a checkpoint trained on other AU records than this run reads (restored after `setup`)."""
        recorded = state.get("au_settings")
        if recorded is not None and self.au_settings is not None and recorded != self.au_settings:
            raise UserError(f"the checkpoint was trained on AU settings {recorded}, but this run reads {self.au_settings} "
                            f"from the AU cache {self.au_cache}: set --data.au_settings {recorded}, or rebuild the AU "
                            "cache with the checkpoint's detector settings")
        self._consumed = (state["epoch"], state["samples_done"])
        self._resume = self._consumed


def declared_labels(labels: Sequence[str] | None) -> tuple[str, ...] | None:
    """`labels` as unified names in class-id order, or a clear error (unknown, or fewer than two)."""
    if labels is None:
        return None
    try:
        names = {normalize_label(label) for label in labels}
    except ValueError as err:
        raise BadValue(f"data.labels: {err}") from None
    if len(names) < 2:
        raise BadValue(f"data.labels {list(labels)} offers fewer than two answers: name at least two expressions")
    return tuple(label for label in EMOTIONS if label in names)


def checkpoint_labels(checkpoint: dict) -> list[str] | None:
    """The answers the training questions of a checkpoint offered (`FERDataModule.state_dict`); None if unknown."""
    return (checkpoint.get(FERDataModule.__qualname__) or {}).get("labels")


def load_traces(path: str | Path) -> dict[str, list[Trace]]:
    """Traces of a `tag prepare traces` JSONL by content hash, in file order (an image may have several,
    ``--traces-per-image``); lines without a trace are skipped."""
    traces: dict[str, list[Trace]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row.get("trace_struct") is not None:
                    traces.setdefault(row["content_hash"], []).append(Trace.from_dict(row["trace_struct"]))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise BadValue(f"{path}:{number}: not a trace line ({type(err).__name__}: {err})") from err
    return traces


def check_trace_grounding(path: str | Path, au_settings: str | None, activation_threshold: float) -> None:
    """Refuse traces grounded on other AU records than the run reads; tell another activation threshold."""
    thresholds = set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            row = json.loads(line) if line.strip() else {}
            if row.get("trace_struct") is None:
                continue
            if row.get("au_settings") != au_settings:
                grounded = row.get("au_settings") or "settings it does not record"
                raise UserError(f"{path}:{number} was grounded on AU settings {grounded}, but this run reads "
                                f"{au_settings} from the AU cache: rebuild the traces (`tag prepare traces --cache ... "
                                f"--au-settings {au_settings}`), or set --data.au_settings to theirs")
            thresholds.add(row.get("min_intensity"))
    if thresholds - {activation_threshold}:
        rank_zero_warn(f"{path} was built with --min-intensity {sorted(thresholds, key=str)}, but activation_threshold "
                       f"is {activation_threshold}: SFT targets and the rewards and metrics call different AUs active")


def check_trace_format(path: str | Path, trace_format: str) -> None:
    """Refuse training traces written in another format than the prompt asks for (`line_format`)."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            row = json.loads(line) if line.strip() else {}
            held = line_format(row)
            if row.get("trace_struct") is not None and held != trace_format:
                raise BadValue(f"{path}:{number} holds a {held} trace, but data.trace_format is {trace_format}: set "
                               f"--data.trace_format={held}, or rebuild the traces with `tag prepare traces ... "
                               f"--trace-format {trace_format}`")


def trace_fits(trace: Trace, size: tuple[int, int] | None) -> bool:
    """Whether every step of `trace` has a non-empty box inside a `size` (width, height) image."""
    if size is None or not trace.steps:
        return False
    width, height = size
    return all(
        step.box is not None and 0 <= step.box[0] < step.box[2] <= width and 0 <= step.box[1] < step.box[3] <= height
        for step in trace.steps
    )


def _decode(data: bytes, name: str, longest_side: int, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels at most about twice `image_size`, for the letterbox's bilinear resize, decoded cheaply.

    An image at least twice as large is decoded at reduced size (JPEG draft mode, then area
    averaging); a smaller one fully, as area averaging by a fraction costs more than decoding.
    """
    return decode_image(data, name, max_side=image_size if longest_side >= 2 * image_size else None)


def _find_record(cache: AUCache, image: ImageRef) -> AURecord | None:
    """The image's record: by name (no file read), else by content (a cache built under other names)."""
    record = cache.get_by_name(image.name)
    if record is not None:
        return record
    try:
        data = image.read_bytes()
    except OSError:
        return None
    return cache.get(content_hash(data))


def dataset_names(specs: Sequence[str], datasets: Sequence[FERDataset]) -> list[str]:
    """What each spec's dataset is called in items, predictions and the results table: its adapter's name
    (``rafdb``, ``ferplus``, ``affectnet``) for the only native dataset of its kind in the split, else the
    spec as written (two manifests, or two AffectNet copies, stay apart)."""
    kinds = Counter(dataset.name for dataset in datasets)
    return [dataset.name if dataset.name in DATASET_CLASSES and kinds[dataset.name] == 1 else spec
            for spec, dataset in zip(specs, datasets)]


def _as_list(specs: str | list[str] | None) -> list[str]:
    """The specs given, each once: a spec given twice would count every image twice."""
    return list(dict.fromkeys([specs] if isinstance(specs, str) else specs or []))


def _describe(counts: Counter) -> str:
    excluded = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())
                         if reason not in ("samples", "kept", "traces"))
    traces = f" with {counts['traces']} traces" if "traces" in counts else ""
    return f"kept {counts['kept']} of {counts['samples']} samples{traces}" + (f" (excluded: {excluded})" if excluded else "")
