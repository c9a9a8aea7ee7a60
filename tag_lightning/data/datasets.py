"""Adapters that read FER datasets exactly as their owners distribute them and yield one sample type.

Every adapter turns its native files into `FERSample`s with unified labels (see `labels.py`). A
malformed row (bad label, missing image, broken pixel string) is an error naming its file and line,
or, with ``lenient=True``, a message in `skipped`; rows a dataset's own convention excludes
(FERPlus ties, AffectNet "uncertain", ...) are never errors and are counted in `dropped`. With
``keep_missing=True`` a row naming a missing image file is kept as a sample (the AU cache records
it as unreadable). Input that is read but not used (unknown manifest columns) is told in `notes`.
Construction only checks what it must (files exist, pixel counts); images are decoded by the caller.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
from PIL import Image

from tag_lightning.answers.labels import (
    AFFECTNET_LABELS,
    AFFECTNET_NON_EXPRESSIONS,
    DATASET_CLASSES,
    EMOTIONS,
    FERPLUS_VOTE_COLUMNS,
    RAFDB_LABELS,
    normalize_label,
)
from tag_lightning.errors import BadValue, read_yaml
from tag_lightning.images import IMAGE_SUFFIXES, ImageRef


class DatasetFormatError(BadValue):
    """A dataset file does not have the format its adapter expects; the message names file and line."""


class SkippedRow(str):
    """A row or file left out of a dataset, as its message ``source: problem``, with `source` and why in
    a word (`reason`: ``missing_image``, ``not_an_image`` or ``bad_row``) for counts and reports."""

    source: str
    reason: str

    def __new__(cls, source: str, problem: str, reason: str = "bad_row") -> SkippedRow:
        row = super().__new__(cls, f"{source}: {problem}")
        row.source, row.reason = source, reason
        return row


@dataclass(frozen=True)
class FERSample:
    """One face image with its unified label (None: unlabeled) and where it came from."""

    image: ImageRef
    label: str | None
    dataset: str
    split: str
    source: str


class FERDataset(Sequence[FERSample]):
    """Base of the adapters: the sample list, the split check and the strict/lenient error policy."""

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...] | None] = None
    """The splits the dataset ships; None: any name (the caller decides what the data is for)."""
    split_rule: ClassVar[str | None] = None
    """What in the dataset's files says a row's split: told when a split reads no image."""

    def __init__(self, split: str, lenient: bool = False, keep_missing: bool = False) -> None:
        if self.splits is not None and split not in self.splits:
            raise BadValue(f"{self.name} has no split {split!r}: expected one of {', '.join(self.splits)}")
        self.split = split
        self.lenient = lenient
        self.keep_missing = keep_missing
        self.skipped: list[SkippedRow] = []
        self.notes: list[str] = []
        self.dropped: Counter[str] = Counter()
        self._samples: list[FERSample] = []

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The unified labels this dataset can produce, in class-id order: a native dataset's fixed set;
        None for a manifest, folder or photo, whose label set is declared by the run (never read off
        the rows that happen to be present: a split without happiness would not be asked about it)."""
        return DATASET_CLASSES.get(self.name)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> FERSample:  # type: ignore[override]
        return self._samples[index]

    def __iter__(self) -> Iterator[FERSample]:
        return (self[index] for index in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, samples={len(self)}, skipped={len(self.skipped)})"

    def split_sizes(self) -> Counter[str]:
        """Samples per split, an empty split read included (what `tag prepare au-cache` reports)."""
        return Counter({self.split: len(self)})

    def _bad_row(self, source: str, problem: str, reason: str = "bad_row") -> None:
        """Strict: raise naming the row. Lenient: remember it (`skipped`) and go on."""
        row = SkippedRow(source, problem, reason)
        if not self.lenient:
            raise DatasetFormatError(str(row))
        self.skipped.append(row)

    def _add_file(self, path: Path, label: str | None, source: str, split: str | None = None) -> None:
        """Add an image file as a sample, or report the row if the file is missing (unless `keep_missing`)."""
        if not self.keep_missing and not path.is_file():
            self._bad_row(source, _not_found(path), "missing_image")
            return
        self._samples.append(FERSample(ImageRef.from_path(path), label, self.name, split or self.split, source))

    def _csv_rows(
        self, path: Path, required: Sequence[str], fieldnames: Sequence[str] | None = None,
        optional: Sequence[str] | None = None,
    ) -> Iterator[tuple[str, dict[str, str]]]:
        """Rows of a CSV file as dicts with their ``file:line``; missing cells read as "".

        With `optional` given, the file's format is fully known: any other column is told in `notes`.
        """
        with _open_existing(path) as handle:
            reader = csv.DictReader(handle, fieldnames=fieldnames, restval="")
            header = reader.fieldnames or ()
            missing = [column for column in required if column not in header]
            if missing:
                raise DatasetFormatError(f"{path}:1: missing column(s) {', '.join(missing)}; the header is {header}")
            unknown = [column for column in header if column not in (*required, *(optional or ()))]
            if optional is not None and unknown:
                self.notes.append(f"{path}:1: column(s) {', '.join(unknown)} ignored (read: "
                                  f"{', '.join((*required, *optional))})")
            for row in reader:
                yield f"{path}:{reader.line_num}", row


def _open_existing(path: Path) -> io.TextIOWrapper:
    """Open a dataset text file, BOM-tolerant, with a message that says which file was expected."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    return path.open(encoding="utf-8-sig", newline="")


def _coded_label(code: str, table: Mapping[int, str], what: str) -> str:
    try:
        return table[int(code)]
    except (ValueError, KeyError):
        raise ValueError(f"{what} {code!r} is not one of {', '.join(map(str, table))}") from None


def _image_files(folder: Path) -> list[Path]:
    """The images in `folder`, a link to a missing file among them (`_add_file` reports it)."""
    return sorted(
        path for path in folder.iterdir() if not path.is_dir() and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _files_under(root: Path) -> Iterator[Path]:
    """Every file under `root`, however nested, in path order, hidden ones left out. Links to folders
    are followed (each folder is read once, so a link to a folder above does not loop); a link to a
    missing file is listed, for the caller to report."""
    seen: set[Path] = set()

    def walk(folder: Path) -> Iterator[Path]:
        if folder.resolve() in seen:
            return
        seen.add(folder.resolve())
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_dir():
                yield from walk(path)
            else:
                yield path

    return walk(root)


def _not_found(path: Path) -> str:
    """Why `path` names no file: a link that points nowhere says so (the link itself is there to see)."""
    if path.is_symlink():
        return f"image file not found: {path} is a symbolic link to {path.readlink()}, which does not exist"
    return f"image file not found: {path}"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


class RafDB(FERDataset):
    """RAF-DB basic emotions: ``EmoLabel/list_patition_label.txt`` and ``Image/aligned|original``.

    The label file lists both splits (``train_00001.jpg 5``, ``test_0001.jpg 7``); the file-name
    prefix says which. Aligned images ship as ``train_00001_aligned.jpg``.
    """

    name = "rafdb"
    splits = ("train", "test")
    split_rule = "RAF-DB image names start with train_ or test_"

    def __init__(
        self, root: str | Path, split: str = "train", aligned: bool = True, lenient: bool = False,
        keep_missing: bool = False,
    ) -> None:
        super().__init__(split, lenient, keep_missing)
        self.root = Path(root)
        labels_path = self.root / "EmoLabel" / "list_patition_label.txt"
        image_dir = self.root / "Image" / ("aligned" if aligned else "original")
        with _open_existing(labels_path) as handle:
            for line_number, line in enumerate(handle, start=1):
                fields = line.split()
                if not fields:
                    continue
                source = f"{labels_path}:{line_number}"
                if len(fields) != 2:
                    self._bad_row(source, f"expected '<image name> <label 1-7>', got {line.strip()!r}")
                    continue
                file_name, code = fields
                if not file_name.startswith(f"{split}_"):
                    continue
                try:
                    label = _coded_label(code, RAFDB_LABELS, "RAF-DB label")
                except ValueError as err:
                    self._bad_row(source, str(err))
                    continue
                image_name = f"{Path(file_name).stem}_aligned.jpg" if aligned else file_name
                self._add_file(image_dir / image_name, label, source)


class _FERPlusRow(NamedTuple):
    number: int
    """0-based data row, the same in both files (``Image name`` is ``fer%07d.png`` of it)."""
    pixels: np.ndarray
    label: str
    source: str


class FERPlus(FERDataset):
    """FERPlus: FER2013's pixels (``fer2013.csv``) relabelled by 10 annotators (``fer2013new.csv``).

    The two files have the same row order. A row's label comes from its votes under `vote_policy`:

    - ``"majority"``: the emotion with the most votes. Rows are dropped when the top vote count is
      held by "unknown" or "NF" (not a face), or by two emotions at once (a tie), as is usual.
    - ``"strict"``: the Microsoft FERPlus repository's majority mode: single votes are discarded
      as outliers and the winner needs more than half of the remaining votes, else the row is dropped.

    Rows with an empty ``Image name`` (removed by the FERPlus authors) are dropped too. Drops are
    the dataset's own convention, never errors: `dropped` counts them by reason.
    Pixel strings are parsed and checked (2304 values in 0..255) at construction; the 48x48
    grayscale PNG bytes are built only when a sample is read.
    """

    name = "ferplus"
    splits = ("train", "val", "test")
    vote_policies = ("majority", "strict")
    _USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
    split_rule = f"FERPlus rows' Usage is {'/'.join(_USAGE.values())} for {'/'.join(_USAGE)}"
    _FOLDER = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
    """The folder names of the FERPlus repository, used in image names: ``ferplus:FER2013Train:123``."""
    SIDE = 48

    def __init__(
        self, root: str | Path, split: str = "train", vote_policy: str = "majority", lenient: bool = False,
        keep_missing: bool = False,
    ) -> None:
        super().__init__(split, lenient, keep_missing)
        if vote_policy not in self.vote_policies:
            raise BadValue(
                f"unknown vote_policy {vote_policy!r}: expected one of {', '.join(self.vote_policies)}"
            )
        self.root = Path(root)
        self.vote_policy = vote_policy
        self._rows: list[_FERPlusRow] = []
        pixels_path, votes_path = self.root / "fer2013.csv", self.root / "fer2013new.csv"
        pixel_rows = self._csv_rows(pixels_path, required=("pixels", "Usage"))
        vote_rows = self._csv_rows(votes_path, required=("Usage", "Image name", *FERPLUS_VOTE_COLUMNS))
        usage = self._USAGE[split]
        for index, (pixel_row, vote_row) in enumerate(itertools.zip_longest(pixel_rows, vote_rows)):
            if pixel_row is None or vote_row is None:
                raise DatasetFormatError(
                    f"{pixels_path} and {votes_path} must have the same rows; one ends at data row {index + 1}"
                )
            (pixel_source, pixels), (vote_source, votes) = pixel_row, vote_row
            if pixels["Usage"] != usage:
                continue
            if votes["Usage"] != usage:
                self._bad_row(vote_source, f"Usage {votes['Usage']!r} differs from {pixel_source} ({usage!r})")
            elif not votes["Image name"].strip():
                self.dropped["no image name"] += 1
            else:
                self._add_row(index, pixel_source, pixels["pixels"], vote_source, votes)

    def _add_row(
        self, number: int, pixel_source: str, pixel_text: str, vote_source: str, votes: dict[str, str]
    ) -> None:
        cells = [votes[column] for column in FERPLUS_VOTE_COLUMNS]
        try:
            counts = dict(zip(FERPLUS_VOTE_COLUMNS, map(int, cells)))
        except ValueError:
            self._bad_row(vote_source, f"vote counts must be integers, got {cells}")
            return
        label, reason = ferplus_vote(counts, self.vote_policy)
        if label is None:
            self.dropped[reason] += 1
            return
        try:
            pixels = _parse_pixels(pixel_text, self.SIDE * self.SIDE)
        except ValueError as err:
            self._bad_row(pixel_source, str(err))
            return
        self._rows.append(_FERPlusRow(number, pixels, label, pixel_source))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> FERSample:  # type: ignore[override]
        row = self._rows[index]
        image = ImageRef(name=f"ferplus:{self._FOLDER[self.split]}:{row.number}", data=self._png(row.pixels))
        return FERSample(image, row.label, self.name, self.split, row.source)

    def _png(self, pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels.reshape(self.SIDE, self.SIDE)).save(buffer, format="PNG")
        return buffer.getvalue()


def ferplus_vote(votes: Mapping[str, int], policy: str = "majority") -> tuple[str | None, str | None]:
    """The label a FERPlus vote row gets under `policy` (see `FERPlus`), as ``(label, None)``, or
    ``(None, reason)`` when the row is dropped."""
    if policy == "strict":
        votes = {column: count if count > 1 else 0 for column, count in votes.items()}
    top = max(votes.values())
    winners = [column for column, count in votes.items() if count == top]
    if top == 0 or (policy == "strict" and top * 2 <= sum(votes.values())):
        return None, "no majority"
    if "unknown" in winners:
        return None, "unknown"
    if "NF" in winners:
        return None, "not a face"
    if len(winners) > 1:
        return None, "tie"
    return winners[0], None


def _parse_pixels(text: str, count: int) -> np.ndarray:
    """The uint8 pixels of a FER2013 pixel string; numpy's C parser keeps 30k rows fast."""
    try:
        values = np.fromstring(text, dtype=np.int32, sep=" ")
    except ValueError:
        raise ValueError(f"pixels must be space-separated integers, got {text[:40]!r}...") from None
    if values.size != count:
        raise ValueError(f"expected {count} pixel values, got {values.size}")
    if values.min() < 0 or values.max() > 255:
        raise ValueError(f"pixel values must lie in 0..255, got {values.min()}..{values.max()}")
    return values.astype(np.uint8)


class AffectNet(FERDataset):
    """AffectNet's manually annotated images, 8 expressions (codes 8-10 are excluded, see `dropped`).

    AffectNet's test set is not public: ``split="val"`` is the evaluation split papers report.
    Layouts: ``"csv"`` is the official one (``training.csv``/``validation.csv`` with images under
    ``Manually_Annotated_Images/``; a header-less ``validation.csv`` is accepted); ``"folders"`` is
    the common re-distribution ``train|val/<expression code>/*.jpg``; ``"auto"`` picks whichever
    is present.
    """

    name = "affectnet"
    splits = ("train", "val")
    split_rule = "AffectNet splits are training.csv or train/ and validation.csv or val/"
    layouts = ("auto", "csv", "folders")
    COLUMNS = (
        "subDirectory_filePath",
        "face_x",
        "face_y",
        "face_width",
        "face_height",
        "facial_landmarks",
        "expression",
        "valence",
        "arousal",
    )
    _CSV = {"train": "training.csv", "val": "validation.csv"}

    def __init__(
        self, root: str | Path, split: str = "train", layout: str = "auto", lenient: bool = False,
        keep_missing: bool = False,
    ) -> None:
        super().__init__(split, lenient, keep_missing)
        if layout not in self.layouts:
            raise BadValue(f"unknown AffectNet layout {layout!r}: expected one of {', '.join(self.layouts)}")
        self.root = Path(root)
        csv_path = self.root / self._CSV[split]
        if layout == "auto":
            layout = "csv" if csv_path.is_file() else "folders"
        self.layout = layout
        if layout == "csv":
            self._read_csv(csv_path)
        else:
            self._read_folders(self.root / split)

    def _read_csv(self, path: Path) -> None:
        with _open_existing(path) as handle:
            has_header = handle.readline().startswith(self.COLUMNS[0])
        image_root = self.root / "Manually_Annotated_Images"
        for source, row in self._csv_rows(path, self.COLUMNS, fieldnames=None if has_header else self.COLUMNS):
            label = self._label(row["expression"].strip(), source)
            if label is not None:
                self._add_file(image_root / row["subDirectory_filePath"], label, source)

    def _read_folders(self, split_dir: Path) -> None:
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"AffectNet: neither {self.root / self._CSV[self.split]} nor the folder {split_dir} exists"
            )
        for folder in _subfolders(split_dir):
            files = _image_files(folder)
            label = self._label(folder.name, str(folder), len(files))
            if label is not None:
                for path in files:
                    self._add_file(path, label, str(path))

    def _label(self, code: str, source: str, images: int = 1) -> str | None:
        """The unified label of an expression code; None when the code is excluded or malformed."""
        if code.isdigit() and int(code) in AFFECTNET_NON_EXPRESSIONS:
            self.dropped[AFFECTNET_NON_EXPRESSIONS[int(code)]] += images
            return None
        try:
            return _coded_label(code, AFFECTNET_LABELS, "AffectNet expression")
        except ValueError as err:
            self._bad_row(source, str(err))
            return None


class AffectNet7(AffectNet):
    """AffectNet read as the literature's 7-class figures read it: the 7 basic expressions, its contempt images
    left out (counted in `dropped`), so a 7-class evaluation asks the 7-class question."""

    name = "affectnet7"

    def _label(self, code: str, source: str, images: int = 1) -> str | None:
        label = super()._label(code, source, images)
        if label == "contempt":
            self.dropped["contempt"] += images
            return None
        return label


class ManifestCSV(FERDataset):
    """A CSV listing images: column ``path`` (relative paths resolve against the CSV's folder),
    optional ``label`` (any form `normalize_label` accepts; empty: unlabeled) and optional ``split``.

    With `split` given, only rows of that split are kept (a row with an empty split belongs to
    every split); without, all rows are kept.
    """

    name = "manifest"
    split_rule = "a manifest row's split is its split column"

    def __init__(
        self, path: str | Path, split: str | None = None, lenient: bool = False, keep_missing: bool = False
    ) -> None:
        super().__init__(split or "all", lenient, keep_missing)
        self.path = Path(path)
        for source, row in self._csv_rows(self.path, required=("path",), optional=("label", "split")):
            row_split = (row.get("split") or "").strip() or self.split
            if split is not None and row_split != split:
                continue
            if not row["path"].strip():
                self._bad_row(source, "empty path")
                continue
            try:
                label = normalize_label(row["label"]) if (row.get("label") or "").strip() else None
            except ValueError as err:
                self._bad_row(source, str(err))
                continue
            self._add_file(self.path.parent / row["path"].strip(), label, source, row_split)

    def split_sizes(self) -> Counter[str]:
        """Each row names its own split."""
        return Counter(sample.split for sample in self._samples) or super().split_sizes()


class ImageFolder(FERDataset):
    """Images in ``root/<label>/`` (label names in any form `normalize_label` accepts); images
    directly in ``root`` are unlabeled. The folder is one split; `split` only names it."""

    name = "folder"

    def __init__(self, root: str | Path, split: str = "all", lenient: bool = False, keep_missing: bool = False) -> None:
        super().__init__(split, lenient, keep_missing)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no such folder: {self.root}")
        for path in _image_files(self.root):
            self._add_file(path, None, str(path))
        for folder in _subfolders(self.root):
            try:
                label = normalize_label(folder.name)
            except ValueError as err:
                self._bad_row(str(folder), str(err))
                continue
            for path in _image_files(folder):
                self._add_file(path, label, str(path))


class PhotoFolder(FERDataset):
    """Every image under ``root``, however nested and through links too (`_files_under`), as `tag prepare
    au-cache` reads a folder: what `tag predict` answers. An image in a folder named after an emotion is
    labelled with it, any other is unlabeled; a file that is not an image, or a link to a missing file
    (unless `keep_missing`), is skipped and listed in `skipped` (not an error)."""

    name = "photos"

    def __init__(self, root: str | Path, split: str = "all", lenient: bool = False, keep_missing: bool = False) -> None:
        super().__init__(split, lenient, keep_missing)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no such folder: {self.root}")
        for path in _files_under(self.root):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                self.skipped.append(SkippedRow(str(path), f"not an image file (images end in "
                                                          f"{', '.join(IMAGE_SUFFIXES)})", "not_an_image"))
            elif path.is_file() or self.keep_missing:
                self._add_file(path, _folder_label(path.parent) if path.parent != self.root else None, str(path))
            else:  # a link to a missing file: listed as a file that is not an image is
                self.skipped.append(SkippedRow(str(path), _not_found(path), "missing_image"))


def _folder_label(folder: Path) -> str | None:
    try:
        return normalize_label(folder.name)
    except ValueError:
        return None


class ImageFile(FERDataset):
    """One unlabeled image file: a photo to answer (`tag predict --data.predict_data photo.jpg`)."""

    name = "image"

    def __init__(self, path: str | Path, split: str = "all", lenient: bool = False, keep_missing: bool = False) -> None:
        super().__init__(split, lenient, keep_missing)
        self.path = Path(path)
        self._add_file(self.path, None, str(self.path))


ADAPTERS: dict[str, type[FERDataset]] = {
    adapter.name: adapter
    for adapter in (RafDB, FERPlus, AffectNet, AffectNet7, ManifestCSV, ImageFolder, ImageFile)
}
_SPEC_FORMS = ("rafdb:ROOT, ferplus:ROOT, affectnet:ROOT, affectnet7:ROOT, manifest:FILE.csv, folder:DIR, "
               "image:FILE, or a YAML data config")


class CombinedDataset(FERDataset):
    """Several datasets read as one, in order (a YAML data config may list several per split)."""

    name = "combined"

    def __init__(self, parts: Sequence[FERDataset]) -> None:
        super().__init__(split="+".join(dict.fromkeys(part.split for part in parts)))
        self.parts = list(parts)
        self._starts = list(itertools.accumulate((len(part) for part in self.parts), initial=0))
        for part in self.parts:
            self.skipped += part.skipped
            self.notes += part.notes
            self.dropped.update(part.dropped)

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Every part's labels, when each part has a fixed set; else None (declared by the run)."""
        if any(part.classes is None for part in self.parts):
            return None
        return tuple(label for label in EMOTIONS if any(label in part.classes for part in self.parts))

    def __len__(self) -> int:
        return self._starts[-1]

    def split_sizes(self) -> Counter[str]:
        sizes: Counter[str] = Counter()
        for part in self.parts:
            sizes.update(part.split_sizes())  # `update`, unlike `+`, keeps an empty split's 0
        return sizes

    def __getitem__(self, index: int) -> FERSample:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self._starts, index) - 1
        return self.parts[part][index - self._starts[part]]


ROLES = ("train", "val", "test")
"""What a data config names data for: ``{role}_data`` read in ``{role}_split``."""


def data_config_dataset(
    path: Path, role: str | None = None, lenient: bool = False, keep_missing: bool = False
) -> FERDataset:
    """The datasets a LightningCLI data config (``configs/data/*.yaml``) names for one role.

    `role` is ``train`` (default), ``val`` or ``test``: the config's ``{role}_data`` spec(s) are
    read in its ``{role}_split`` (default: the role's own name).
    """
    role = role or "train"
    if role not in ROLES:
        raise BadValue(f"{path}: a data config has train, val and test data; got split {role!r}")
    return _read_data_config(path, (role,), lenient, keep_missing)


def _read_data_config(path: Path, roles: Sequence[str], lenient: bool, keep_missing: bool) -> FERDataset:
    """What a data config's `roles` read, each distinct (spec, split) once."""
    uses = _data_config_uses(path, roles)
    if not uses:
        names = [f"{role}_data" for role in roles]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise BadValue(f"{path} names no {listed}")
    parts = [parse_data_spec(spec, split, lenient, keep_missing) for spec, split in uses]
    return parts[0] if len(parts) == 1 else CombinedDataset(parts)


def _data_config_uses(path: Path, roles: Sequence[str]) -> list[tuple[str, str]]:
    """The distinct (spec, split) pairs a data config reads for `roles`."""
    document = read_yaml(path) or {}
    if not isinstance(document, dict):
        raise DatasetFormatError(f"{path}: a data config is a mapping (data: train_data: ...), "
                                 f"not a {type(document).__name__}")
    section = document.get("data", document)
    uses = {}
    for role in roles:
        specs = section.get(f"{role}_data") or []
        for spec in [specs] if isinstance(specs, str) else specs:
            uses[(spec, section.get(f"{role}_split", role))] = None
    return list(uses)


def parse_data_spec(
    spec: str, split: str | None = None, lenient: bool = False, keep_missing: bool = False
) -> FERDataset:
    """The dataset a command-line spec such as ``rafdb:/data/RAF-DB`` names; without `split`,
    each adapter's default (``train``; all rows for manifests and folders).

    A bare path is accepted too: an existing ``.csv`` file is a manifest, an existing folder an
    image folder (``DIR/<label>/*.jpg``), an existing image file one unlabeled image, a ``.yaml``
    file a data config (`split` then names its role: train, val or test; see
    `data_config_dataset`). `lenient` and `keep_missing`: see the module's doc.
    """
    resolved = resolve_data_spec(spec)
    if resolved is None:
        return data_config_dataset(Path(spec).expanduser(), split, lenient, keep_missing)
    adapter, location = resolved
    options: dict[str, object] = {"lenient": lenient, "keep_missing": keep_missing}
    if split is not None:
        options["split"] = split
    return adapter(location, **options)


def resolve_data_spec(spec: str) -> tuple[type[FERDataset], Path] | None:
    """The adapter a spec names and the path it reads (see `parse_data_spec`); None for a data config."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        return None
    if path.suffix.lower() == ".csv" and path.is_file():
        spec = f"manifest:{spec}"
    elif path.is_dir():
        spec = f"folder:{spec}"
    elif path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        spec = f"image:{spec}"
    kind, separator, location = spec.partition(":")
    if not separator and not path.exists():  # a bare path that is not there
        raise FileNotFoundError(f"no such {'file' if path.suffix else 'folder'}: {spec} (a data spec is a path or "
                                f"one of {_SPEC_FORMS})")
    adapter = ADAPTERS.get(kind.strip().lower())
    if not separator or adapter is None or not location.strip():
        raise BadValue(f"bad data spec {spec!r}: expected one of {_SPEC_FORMS}")
    return adapter, Path(location.strip()).expanduser()


def read_every_split(spec: str, lenient: bool = False, keep_missing: bool = False) -> FERDataset:
    """Every split of the dataset a spec names, as one dataset whose samples keep their split: an
    AU cache over it serves a data config's validation and test data too, not just its training data.
    A data config itself gives the data of its three roles (each spec in its role's split).

    A split missing on disk (an AffectNet copy without ``val/``) is told in `notes`, unless every
    split is. Manifests, folders, images and data configs are read as `parse_data_spec` reads them.
    """
    resolved = resolve_data_spec(spec)
    if resolved is None:  # a data config: what each of its roles reads
        return _read_data_config(Path(spec).expanduser(), ROLES, lenient, keep_missing)
    if resolved[0].splits is None:
        return parse_data_spec(spec, lenient=lenient, keep_missing=keep_missing)
    adapter, location = resolved
    parts, missing = [], {}
    for split in adapter.splits:
        try:
            parts.append(adapter(location, split=split, lenient=lenient, keep_missing=keep_missing))
        except FileNotFoundError as err:
            missing[split] = err
    if not parts:
        raise next(iter(missing.values()))
    dataset = CombinedDataset(parts)
    dataset.notes += [f"{spec} has no {split} split ({err})" for split, err in missing.items()]
    return dataset
