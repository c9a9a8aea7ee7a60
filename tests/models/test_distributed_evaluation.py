"""Evaluation on 2 processes (DDP, gloo) through the real `tag` command, for both modules: it finishes,
scores each of 3 images once (2 do not split evenly: one rank's slice is padded with a repeat) and gives
the figures of 1 process, in `tag test`'s files (its per-dataset table, sampled answers and occlusion
test included) and in the validation `tag fit` logs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import run_python

from tag_lightning.commands.cli import main
from tag_lightning.data.samples import ANGER, HAPPINESS, SURPRISE

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]


@pytest.fixture
def three_faces(demo_dir, tmp_path) -> list[str]:
    """The options that make the test and validation data 3 labelled faces (batch 2: 2 + 1 on one process)."""
    manifest = tmp_path / "three.csv"
    photos = demo_dir / "samples"
    manifest.write_text("path,label\n" + "".join(f"{photos / name},{label}\n" for name, label in
                                                 ((SURPRISE, "surprise"), (HAPPINESS, "happiness"), (ANGER, "anger"))))
    return [f"--data.test_data=manifest:{manifest}", f"--data.val_data=manifest:{manifest}", "--data.batch_size=2"]


def tag(args: list[str], processes: int) -> None:
    if processes == 1:
        assert main(args) == 0
    else:
        result = run_python(["-m", "tag_lightning.commands.cli", *args, *DDP])
        assert result.returncode == 0, result.stderr[-3000:]


def evaluation(root: Path) -> tuple[dict, list[dict], str]:
    """metrics.json, predictions.jsonl's rows and results.csv of the run under `root`."""
    (folder,) = root.rglob("evaluation")
    report = json.loads((folder / "metrics.json").read_text())
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return report, rows, (folder / "results.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("module", ["sft", "grpo"])
def test_tag_test_on_two_processes_scores_and_writes_each_image_once(module, tag_args, sft_checkpoint, three_faces,
                                                                      tmp_path):
    """Both modules (GRPO's checkpoint loaded by `init_from`, as its evaluation after training does), with the
    occlusion test and 2 sampled answers per face: the files of 1 process, each image once. Only rank 0
    receives the rows (it writes them)."""
    weights = f"--ckpt_path={sft_checkpoint}" if module == "sft" else f"--model.init_args.init_from={sft_checkpoint}"
    # Batches of 1, so that each face is generated in a batch of the same shape on 1 and 2 processes: in a batch of
    # another shape, a sampled draw within rounding of a token boundary of the tiny model's near-uniform
    # distribution can go the other way (CI saw it once); rank 1 still pads its last batch.
    for processes in (1, 2):
        tag(tag_args(module, tmp_path / str(processes), weights, *three_faces, "--data.batch_size=1",
                     "--model.init_args.occlusion_test=true", "--model.init_args.sampled_answers=2", command="test"),
            processes)
    (one, one_rows, one_table), (two, two_rows, two_table) = evaluation(tmp_path / "1"), evaluation(tmp_path / "2")
    assert two["counts"]["answers"] == 3 and [row["image"] for row in two_rows] == [row["image"] for row in one_rows]
    assert len({row["image"] for row in two_rows}) == 3
    assert (two["figures"], two["counts"], two["confusion_matrix"]) == (one["figures"], one["counts"],
                                                                        one["confusion_matrix"])
    # the sampled answers' mean rewards are sums of floats, added in another order across two ranks
    assert two["sampled"].pop("figures") == pytest.approx(one["sampled"].pop("figures"), rel=1e-9)
    assert (two["sampled"], two["evidence_necessity"]) == (one["sampled"], one["evidence_necessity"])
    assert [(row["text"], row["samples"], row["occlusion"]) for row in two_rows] == \
        [(row["text"], row["samples"], row["occlusion"]) for row in one_rows]
    assert two_table == one_table  # the per-dataset table too


@pytest.mark.slow
def test_validation_during_fit_on_two_processes_gives_the_figures_of_one(tag_args, three_faces, tmp_path):
    """lr 0: both runs validate the same weights after their one step."""
    def validated(processes: int) -> dict[str, str]:
        root = tmp_path / str(processes)
        tag(tag_args("sft", root, *three_faces, "--trainer.max_steps=1", "--trainer.val_check_interval=1",
                     "--model.init_args.optimizer.init_args.lr=0"), processes)
        (row,) = [row for row in csv.DictReader(open(next(root.rglob("metrics.csv")))) if row.get("val/acc")]
        return {name: value for name, value in row.items() if name.startswith("val/")}

    one, two = validated(1), validated(2)
    assert float(two["val/images"]) == 3 and two == one
