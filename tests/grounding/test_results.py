"""The per-dataset results table: hand-made answers to RAF-DB and to AffectNet asked with 8 classes and with 7."""

from __future__ import annotations

import csv

import pytest

from tag_lightning.answers.labels import EMOTIONS
from tag_lightning.grounding.claims import References, read_completion
from tag_lightning.grounding.metrics import AnswerMetrics, score_answer
from tag_lightning.grounding.results import COLUMNS, results_markdown, results_table, write_results

RAFDB_LABELS = tuple(label for label in EMOTIONS if label != "contempt")


def answer(label: str, said: str | None, labels: tuple[str, ...] = EMOTIONS):
    """The score of an answer naming `said` (None: unparseable text) to a face labelled `label`."""
    text = "no tags at all" if said is None else (
        "Global analysis: A face.\nVerification loop:\nInspect cheek (AU6) → raised → <bbox>[20,40,45,55]</bbox>\n"
        f"Final conclusion: {said}.\n<answer> {said} </answer>")
    return score_answer(read_completion(text), References(label, labels, {}, frozenset(), (100, 100)))


SCORED = [
    ("rafdb", answer("happiness", "happiness", RAFDB_LABELS)),
    ("rafdb", answer("anger", None, RAFDB_LABELS)),
    ("affectnet", answer("happiness", "happiness")),
    ("affectnet", answer("contempt", "contempt")),
    ("affectnet", answer("sadness", "contempt")),
    ("affectnet", answer("contempt", None)),
    ("affectnet7", answer("happiness", "happiness", RAFDB_LABELS)),  # the 7-class question: no contempt offered
    ("affectnet7", answer("sadness", "anger", RAFDB_LABELS)),
]
DATASETS = {"rafdb": "rafdb", "affectnet": "affectnet", "affectnet7": "affectnet7", "manifest:empty.csv": "manifest"}


def pooled_figures() -> dict:
    metrics = AnswerMetrics()
    metrics.update([score for _, score in SCORED])
    return metrics.compute()


def test_one_row_per_dataset_affectnet_s_naming_its_classes_then_the_pooled_figures():
    rows = {row["dataset"]: row for row in results_table(SCORED, pooled_figures(), DATASETS)}
    assert list(rows) == ["rafdb", "affectnet (8 classes)", "affectnet7 (7 classes)", "manifest:empty.csv", "pooled"]
    rafdb, eight, seven = rows["rafdb"], rows["affectnet (8 classes)"], rows["affectnet7 (7 classes)"]
    assert (rafdb["images"], rafdb["acc"], rafdb["unparsed"], rafdb["format_valid"]) == (2, 0.5, 1, 0.5)
    assert (eight["images"], eight["acc"], eight["unparsed"]) == (4, pytest.approx(2 / 4), 1)
    assert (seven["images"], seven["acc"], seven["unparsed"], seven["format_valid"]) == (2, 0.5, 0, 1.0)
    assert seven["uar"] == pytest.approx(0.5)  # recall over the emotions present: happiness 1, sadness 0
    assert rows["manifest:empty.csv"] == {"dataset": "manifest:empty.csv", "images": 0}
    pooled = rows["pooled"]
    assert (pooled["images"], pooled["unparsed"], pooled["acc"]) == (8, 2, pytest.approx(4 / 8))
    assert set(pooled) == {"dataset", *COLUMNS}


@pytest.mark.parametrize("about, header", [
    ({"weights": "checkpoint", "checkpoint": "/runs/last.ckpt", "init_from": None, "model": "m"},
     "# Results: checkpoint /runs/last.ckpt"),
    ({"weights": "init_from", "checkpoint": None, "init_from": "/runs/sft.ckpt", "model": "m"},
     "# Results: init_from /runs/sft.ckpt"),
    ({"weights": "bare model", "checkpoint": None, "init_from": None, "model": "/models/qwen"},
     "# Results: bare model /models/qwen (zero-shot)"),
])
def test_the_markdown_names_the_weights_and_the_csv_keeps_full_precision(about, header, tmp_path):
    rows = results_table(SCORED, pooled_figures(), DATASETS)
    write_results(tmp_path, rows, about)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith(header + "\n")
    assert "| rafdb | 2 | 50.0 | " in markdown and "| manifest:empty.csv | 0 |" in markdown
    assert "asked the 7-class question" in markdown and "unparsed: " in markdown
    written = list(csv.DictReader(open(tmp_path / "results.csv", newline="")))
    assert [row["dataset"] for row in written] == [row["dataset"] for row in rows]
    assert float(written[1]["acc"]) == rows[1]["acc"] and written[3]["acc"] == ""


def test_a_table_without_affectnet_says_nothing_of_contempt():
    rows = results_table(SCORED[:2], pooled_figures(), {"rafdb": "rafdb"})
    assert "contempt" not in results_markdown(rows, {"weights": "bare model", "model": "m"})
