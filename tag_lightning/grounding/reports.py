"""What `tag test` leaves on disk: one folder per run with every figure, every answer and the confusion matrix.

- ``metrics.json``: every figure (`metrics.AnswerMetrics`), the counts behind them, what each
  means, the evidence-necessity figures when asked for, and what was evaluated: the model, the
  checkpoint (null: the bare model, a zero-shot baseline) and the data;
- ``predictions.jsonl``: per image its label, answer, raw text, parsed trace and each claim with
  its AU, box, IoU with the detector's box and verdict (boxes in pixels of the evaluated image);
- ``confusion_matrix.png``: the dataset's labels against the answers given;
- ``excluded.jsonl``: each test image or row left out, with why (not in the AU cache, no face, a
  row lenient reading skipped, ...); ``metrics.json`` counts them by reason under ``data.counts``,
  so an evaluation that shrank says so.

`results.py` adds the table of the figures per test dataset (``results.csv``, ``results.md``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from tag_lightning.grounding.metrics import CLASSES, CLASSIFICATION, FAITHFULNESS
from tag_lightning.grounding.viz import draw_confusion_matrix


def new_run_folder(parent: str | Path, name: str = "evaluation") -> Path:
    """`parent/name`, or `name_2`, `name_3`, ... when an earlier run's folder is there: never overwritten."""
    parent = Path(parent)
    folder, number = parent / name, 1
    while folder.exists():
        number += 1
        folder = parent / f"{name}_{number}"
    folder.mkdir(parents=True)
    return folder


def write_evaluation(folder: Path, figures: dict, rows: Sequence[dict], about: dict,
                     excluded: Sequence[dict] = ()) -> None:
    """Write the files of one evaluation run into `folder` (see the module doc)."""
    confusion = figures["confusion_matrix"]
    labels = [label for label, row in zip(CLASSES, confusion) if sum(row)]  # the labels the data holds
    answered = [index for index, name in enumerate(CLASSES)
                if name in labels or sum(row[index] for row in confusion)]  # and every answer given
    document = {
        **about,
        "figures": {name: value for name, value in figures.items() if name not in ("confusion_matrix", "counts")},
        "meaning": {**CLASSIFICATION, **FAITHFULNESS},
        "counts": figures["counts"],
        "confusion_matrix": {"rows": labels, "columns": [CLASSES[i] for i in answered],
                             "counts": [[confusion[CLASSES.index(label)][i] for i in answered] for label in labels]},
    }
    (folder / "metrics.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    for name, lines in (("predictions.jsonl", rows), ("excluded.jsonl", excluded)):
        with open(folder / name, "w", encoding="utf-8") as out:
            for line in lines:
                out.write(json.dumps(line) + "\n")
    matrix = document["confusion_matrix"]
    picture = draw_confusion_matrix(matrix["counts"], matrix["rows"], matrix["columns"])
    Image.fromarray(picture).save(folder / "confusion_matrix.png")
