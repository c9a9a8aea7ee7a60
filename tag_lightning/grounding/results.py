"""The results table of `tag test`: one row per test dataset and a pooled row, as FER papers compare models.

Papers report accuracy per test set (RAF-DB, FERPlus, AffectNet), AffectNet both with its 8
classes and with 7 (contempt left out), and put zero-shot baselines in the same table. So a run
writes, beside `reports.py`'s files:

- ``results.csv``: a ``dataset`` column, then `COLUMNS` (shares in 0..1, full precision);
- ``results.md``: the same table in percent, under a header naming the weights that answered
  (``weights`` of `VLMModule.provenance`: a checkpoint, init_from, or the bare model, zero-shot).

Rows: each dataset of the test split in spec order (named as `datamodule.dataset_names` names
them), then ``pooled``, which is the run's own pooled figures (metrics.json), so one spec gives its
row and an identical pooled row. An AffectNet row says how many classes its question offered:
``affectnet (8 classes)``, or ``affectnet7 (7 classes)`` for ``affectnet7:ROOT``, which asks the
literature's 7-class question and leaves the contempt images out (a 7-class figure computed from
answers to the 8-class question would count a contempt answer against the model that was offered it).

Each dataset's figures are `AnswerMetrics`' own, over the scores gathered onto one process.
Answers are read strictly (`claims.read_completion`): one that names no emotion is counted in
``unparsed`` and counts as wrong.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from tag_lightning.answers.labels import DATASET_CLASSES
from tag_lightning.grounding.metrics import CLASSIFICATION, FAITHFULNESS, AnswerMetrics, AnswerScore

SHARES = ("acc", "uar", "macro_f1", "format_valid", "hallucination_rate", "au_precision", "au_recall")
"""The figures that are shares (percent in results.md)."""
COLUMNS = ("images", "acc", "uar", "macro_f1", "format_valid", "unparsed", "box_iou", "hallucination_rate",
           "au_precision", "au_recall")
MEANING = {
    "images": "images answered",
    **CLASSIFICATION,
    "format_valid": FAITHFULNESS["format_valid"],
    "unparsed": "answers that name no emotion (read strictly, no substring search); counted as wrong",
    **{name: FAITHFULNESS[name] for name in ("box_iou", "hallucination_rate", "au_precision", "au_recall")},
}
POOLED = "pooled"
CLASSES_NAMED = ("affectnet", "affectnet7")
"""Adapters whose rows name the number of classes their question offered (AffectNet is reported with 8 and 7)."""
WEIGHTS = {"checkpoint": "checkpoint {checkpoint}", "init_from": "init_from {init_from}",
           "bare model": "bare model {model} (zero-shot)"}


def results_table(scored: Sequence[tuple[str, AnswerScore]], pooled: Mapping, datasets: Mapping[str, str]
                  ) -> list[dict]:
    """The rows of the table (see the module doc): `scored` holds each answer's (dataset name, score),
    `pooled` the run's `AnswerMetrics` figures, `datasets` each dataset name with its adapter's name."""
    by_dataset: dict[str, list[AnswerScore]] = {name: [] for name in datasets}
    for name, score in scored:
        by_dataset[name].append(score)
    rows = []
    for name, scores in by_dataset.items():
        adapter = datasets[name]
        shown = f"{name} ({len(DATASET_CLASSES[adapter])} classes)" if adapter in CLASSES_NAMED else name
        rows.append(_row(shown, scores))
    return [*rows, _table_row(POOLED, pooled)]


def _row(name: str, scores: Sequence[AnswerScore]) -> dict:
    """A dataset's row; a dataset with no answer scored has only its name and 0 images."""
    if not scores:
        return {"dataset": name, "images": 0}
    metrics = AnswerMetrics(sync=False)  # the scores are already every process's
    metrics.update(scores)
    return _table_row(name, metrics.compute())


def _table_row(name: str, figures: Mapping) -> dict:
    counts = figures["counts"]
    return {"dataset": name, "images": int(counts["answers"]), "unparsed": int(counts["no_answer"]),
            **{column: figures[column] for column in COLUMNS if column not in ("images", "unparsed")}}


def write_results(folder: Path, rows: Sequence[dict], about: Mapping) -> None:
    """Write ``results.csv`` and ``results.md`` into `folder`; `about` is metrics.json's provenance."""
    with open(folder / "results.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=("dataset", *COLUMNS), restval="")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "results.md").write_text(results_markdown(rows, about), encoding="utf-8")


def results_markdown(rows: Sequence[dict], about: Mapping) -> str:
    """The table in percent, under the weights that answered and above what each column means."""
    lines = [f"# Results: {WEIGHTS[about['weights']].format(**about)}", "",
             "| dataset | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join([row["dataset"], *(_shown(column, row.get(column)) for column in COLUMNS)]) + " |"
              for row in rows]
    lines += ["", "Shares in percent; box_iou from 0 to 1. One row per test dataset, then all of them pooled."]
    if any(row["dataset"].endswith("(7 classes)") for row in rows):
        lines.append("The 7-class AffectNet row asked the 7-class question and left out the images labelled "
                     "contempt, as the literature reports AffectNet.")
    lines += ["", *(f"- {column}: {meaning}" for column, meaning in MEANING.items())]
    return "\n".join(lines) + "\n"


def _shown(column: str, value: float | int | None) -> str:
    if value is None:
        return ""
    if column in SHARES:
        return f"{100 * value:.1f}"
    return f"{value:.3f}" if column == "box_iou" else str(value)
