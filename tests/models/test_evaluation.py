"""`tag test` writes what it measured, for an SFT checkpoint, a GRPO checkpoint and a bare model folder, and a
table of it per test dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import build_affectnet, newest_last_checkpoint
from PIL import Image

from tag_lightning.commands.cli import main
from tag_lightning.answers.labels import EMOTIONS
from tag_lightning.data.samples import ANGER, DISGUST, HAPPINESS, SURPRISE
from tag_lightning.grounding.metrics import CLASSIFICATION, FAITHFULNESS

LABELS = {"surprise", "happiness", "anger", "disgust"}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def evaluation_of(root: Path) -> Path:
    (folder,) = root.rglob("evaluation")
    return folder


def check_report(folder: Path, checkpoint: Path | None, module: str) -> dict:
    report = json.loads((folder / "metrics.json").read_text())
    assert set(report["figures"]) == set(CLASSIFICATION) | set(FAITHFULNESS)
    assert report["counts"]["answers"] == 4 and report["meaning"]["box_iou"] == FAITHFULNESS["box_iou"]
    assert report["checkpoint"] == (None if checkpoint is None else str(checkpoint.resolve()))
    assert report["module"] == module
    assert report["model"].endswith("tiny-qwen2.5-vl") and report["data"]["specs"][0].startswith("manifest:")
    assert set(report["confusion_matrix"]["rows"]) == LABELS
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {row["label"] for row in rows} == LABELS
    assert {"image", "text", "trace", "answer", "claims", "format_valid", "box_iou"} <= set(rows[0])
    with Image.open(folder / "confusion_matrix.png") as picture:
        picture.verify()
    return report


def test_an_sft_checkpoint(tag_args, sft_checkpoint, tmp_path):
    assert main(tag_args("sft", tmp_path, f"--ckpt_path={sft_checkpoint}", command="test")) == 0
    check_report(evaluation_of(tmp_path), sft_checkpoint, "SFTModule")


def test_options_given_beside_a_checkpoint_win_over_its_saved_ones(tag_args, sft_checkpoint, demo_dir, tmp_path):
    """The checkpoint was trained with max_new_tokens 8 and no occlusion test; the command line says 3 and true."""
    from transformers import AutoTokenizer

    assert main(tag_args("sft", tmp_path, f"--ckpt_path={sft_checkpoint}", "--model.init_args.occlusion_test=true",
                         "--model.init_args.max_new_tokens=3", command="test")) == 0
    report = check_report(evaluation_of(tmp_path), sft_checkpoint, "SFTModule")
    assert report["weights"] == "checkpoint" and report["init_from"] is None
    assert {"flip_cited", "flip_random", "difference"} <= set(report["evidence_necessity"])
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "tiny-qwen2.5-vl")
    rows = [json.loads(line) for line in (evaluation_of(tmp_path) / "predictions.jsonl").read_text().splitlines()]
    assert max(len(tokenizer(row["text"], add_special_tokens=False).input_ids) for row in rows) <= 3


def test_a_run_that_starts_from_init_from_says_so(tag_args, sft_checkpoint, tmp_path, capsys):
    """`tag test -c configs/grpo.yaml` without --ckpt_path answers with init_from's weights: not a bare model.
    `tag predict --zero_shot true` with an init_from set is refused: it would not be the bare model."""
    grpo = [f"--model.init_args.init_from={sft_checkpoint}", "--model.init_args.num_generations=2"]
    assert main(tag_args("grpo", tmp_path, *grpo, command="test")) == 0
    report = check_report(evaluation_of(tmp_path), None, "GRPOModule")
    assert report["weights"] == "init_from" and report["init_from"] == str(sft_checkpoint.resolve())
    assert main(tag_args("grpo", tmp_path, *grpo, "-c", str(CONFIGS / "predict.yaml"), "--zero_shot=true",
                         command="predict")) == 2
    assert "--zero_shot true answers with the bare model, but model.init_args.init_from loads" in \
        capsys.readouterr().err


def test_a_grpo_checkpoint_and_a_second_run_in_its_own_folder(tag_args, sft_checkpoint, tmp_path):
    grpo = ["--model.init_args.max_completion_length=8", "--model.init_args.num_generations=2"]
    assert main(tag_args("grpo", tmp_path / "fit", f"--model.init_args.init_from={sft_checkpoint}", *grpo,
                         "--trainer.max_steps=1", "--trainer.limit_val_batches=0")) == 0
    checkpoint = newest_last_checkpoint(tmp_path / "fit")
    common = [f"--ckpt_path={checkpoint}", "--trainer.logger=false"]  # no logger: both runs share one root
    assert main(tag_args("grpo", tmp_path / "test", *grpo, *common, command="test")) == 0
    assert main(tag_args("grpo", tmp_path / "test", *grpo, *common, command="test")) == 0
    first, second = tmp_path / "test" / "evaluation", tmp_path / "test" / "evaluation_2"
    assert check_report(first, checkpoint, "GRPOModule") and check_report(second, checkpoint, "GRPOModule")


@pytest.mark.slow
def test_a_bare_model_folder_is_a_zero_shot_baseline_and_the_occlusion_test_reports(tag_args, tmp_path):
    assert main(tag_args("sft", tmp_path, "--model.init_args.occlusion_test=true", command="test")) == 0
    report = check_report(evaluation_of(tmp_path), None, "SFTModule")
    necessity = report["evidence_necessity"]
    assert {"flip_cited", "flip_random", "difference", "no_evidence", "per_class"} <= set(necessity)
    assert necessity["asked"] + necessity["no_evidence"] == 4


def test_sampled_answers_of_trained_weights_are_scored_and_reported(tag_args, sft_checkpoint, tmp_path):
    """`--model.init_args.sampled_answers 3`: three seeded samples per face, each in predictions.jsonl, and
    metrics.json's ``sampled`` figures are their counts. The SFT weights are loaded with GRPO's init_from:
    beside --ckpt_path the checkpoint's saved options still win over the command line's (an open issue)."""
    options = ["--model.init_args.sampled_answers=3", "--model.init_args.sampled_temperature=1.0",
               "--model.init_args.max_new_tokens=48", f"--model.init_args.init_from={sft_checkpoint}"]
    assert main(tag_args("grpo", tmp_path / "a", *options, command="test")) == 0
    folder = evaluation_of(tmp_path / "a")
    sampled = check_report(folder, None, "GRPOModule")["sampled"]
    assert (sampled["answers_per_image"], sampled["temperature"]) == (3, 1.0)
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    samples = [sample for row in rows for sample in row["samples"]]
    assert [len(row["samples"]) for row in rows] == [3] * 4 and sampled["counts"]["answers"] == 12
    figures = sampled["figures"]
    assert figures["hallucination_rate"] == pytest.approx(sum(s["hallucination"] for s in samples) / 12)
    assert figures["format_valid"] == pytest.approx(sum(s["format_valid"] for s in samples) / 12)
    for reward in ("format", "answer", "grounding"):
        assert figures[f"reward/{reward}"] == pytest.approx(sum(s["rewards"][reward] for s in samples) / 12)
    assert main(tag_args("grpo", tmp_path / "b", *options, command="test")) == 0
    again = [json.loads(line) for line in (evaluation_of(tmp_path / "b") / "predictions.jsonl").read_text().splitlines()]
    assert [row["samples"] for row in again] == [row["samples"] for row in rows]  # seeded


def test_a_test_set_without_happiness_is_still_asked_about_it(tag_args, sft_checkpoint, demo_dir, tmp_path):
    """A manifest of three faces, none happy: the question offers what the checkpoint was trained to answer (the
    four of configs/data/samples.yaml), or every emotion for a bare model, not the three labels present."""
    photos = demo_dir / "samples"
    manifest = tmp_path / "three.csv"
    manifest.write_text("path,label\n" + "".join(f"{photos / name},{label}\n" for name, label in
                                                 ((SURPRISE, "surprise"), (ANGER, "anger"), (DISGUST, "disgust"))))
    common = [f"--data.test_data=manifest:{manifest}", "--data.labels=null"]
    assert main(tag_args("sft", tmp_path / "trained", f"--ckpt_path={sft_checkpoint}", *common, command="test")) == 0
    assert main(tag_args("sft", tmp_path / "bare", *common, command="test")) == 0
    offered = {run: list(json.loads((evaluation_of(tmp_path / run) / "metrics.json").read_text())["data"]
                         ["labels_offered"].values()) for run in ("trained", "bare")}
    assert offered == {"trained": [["happiness", "surprise", "disgust", "anger"]], "bare": [list(EMOTIONS)]}


def test_a_spec_given_twice_counts_its_images_once(tag_args, sft_checkpoint, demo_dir, tmp_path):
    manifest = f"manifest:{demo_dir / 'samples' / 'manifest.csv'}"
    assert main(tag_args("sft", tmp_path, f"--ckpt_path={sft_checkpoint}", f"--data.test_data=[{manifest}, {manifest}]",
                         command="test")) == 0
    assert json.loads((evaluation_of(tmp_path) / "metrics.json").read_text())["counts"]["answers"] == 4


def test_an_image_changed_after_its_au_record_is_one_line_naming_the_rebuild(tag_args, sft_checkpoint, demo_dir,
                                                                            tmp_path, capsys):
    """The sample photos copied and cached; one photo is then edited: `tag test` stops with one line that names the
    photo and the command that rebuilds the cache, not a traceback calling it a bug."""
    import shutil

    from PIL import Image

    shutil.copytree(demo_dir / "samples", tmp_path / "samples")
    assert main(["prepare", "au-cache", "--images", str(tmp_path / "samples" / "manifest.csv"), "--out",
                 str(tmp_path / "au_cache"), "--workers", "1"]) == 0
    photo = tmp_path / "samples" / ANGER
    with Image.open(photo) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo)
    capsys.readouterr()
    assert main(tag_args("sft", tmp_path / "run", f"--ckpt_path={sft_checkpoint}", f"--data.au_cache={tmp_path / 'au_cache'}",
                         f"--data.test_data=manifest:{tmp_path / 'samples' / 'manifest.csv'}", command="test")) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and "this is a bug" not in err, err
    assert ANGER in line and f"tag prepare au-cache --images DATA --out {tmp_path / 'au_cache'}" in line


@pytest.fixture(scope="module")
def affectnet(demo_dir, tmp_path_factory) -> Path:
    """AffectNet's validation split in its native layout: the four posed sample photos with their expression codes,
    and two more faces labelled contempt (copies: the demo's AU cache knows their content)."""
    photos = demo_dir / "samples"
    faces = ((SURPRISE, 3), (HAPPINESS, 1), (ANGER, 6), (DISGUST, 5), (HAPPINESS, 7), (ANGER, 7))
    rows = [(f"{code}/face{number}.jpg", code) for number, (_, code) in enumerate(faces)]
    return build_affectnet(tmp_path_factory.mktemp("affectnet"), rows, split="val",
                           photos=[photos / name for name, _ in faces])


@pytest.fixture(scope="module")
def tables(tag_args, demo_dir, affectnet, tmp_path_factory) -> dict[str, Path]:
    """The evaluation folders of the bare model's `tag test` over the samples' manifest and AffectNet together
    (``both``), and over each alone. AffectNet is given as a data config, which reads it in its own split
    (val), as the README's per-dataset table over RAF-DB's test and AffectNet's val split does."""
    root = tmp_path_factory.mktemp("tables")
    specs = {"manifest": f"manifest:{demo_dir / 'samples' / 'manifest.csv'}"}
    for adapter in ("affectnet", "affectnet7"):
        config = root / f"{adapter}.yaml"
        config.write_text(f"data:\n  test_data: {adapter}:{affectnet}\n  test_split: val\n")
        specs[adapter] = str(config)
    runs = {"both": [specs["manifest"], specs["affectnet"]], "manifest": [specs["manifest"]],
            "affectnet": [specs["affectnet"]], "affectnet7": [specs["affectnet7"]]}
    for run, given in runs.items():
        assert main(tag_args("sft", root / run, f"--data.test_data={json.dumps(given)}",
                             "--model.init_args.max_new_tokens=4", command="test")) == 0
    return {run: evaluation_of(root / run) for run in runs}


def table(folder: Path) -> dict[str, dict]:
    return {row.pop("dataset"): row for row in csv.DictReader(open(folder / "results.csv", newline=""))}


def test_two_test_sets_give_one_row_each_and_the_pooled_row_with_the_figures_of_separate_runs(tables, demo_dir):
    both, manifest, affectnet = (table(tables[run]) for run in ("both", "manifest", "affectnet"))
    name = f"manifest:{demo_dir / 'samples' / 'manifest.csv'}"
    assert list(both) == [name, "affectnet (8 classes)", "pooled"]
    assert list(manifest) == [name, "pooled"] and manifest[name] == manifest["pooled"]
    pooled = manifest.pop("pooled"), affectnet.pop("pooled"), both.pop("pooled")
    assert both == {**manifest, **affectnet}  # each dataset's figures, as if evaluated alone
    report = json.loads((tables["both"] / "metrics.json").read_text())
    assert int(pooled[2]["images"]) == report["counts"]["answers"] == 4 + 6
    assert int(pooled[2]["unparsed"]) == report["counts"]["no_answer"]
    for column in ("acc", "uar", "macro_f1", "format_valid", "box_iou", "hallucination_rate", "au_precision"):
        assert float(pooled[2][column]) == report["figures"][column]
    rows = [json.loads(line) for line in (tables["both"] / "predictions.jsonl").read_text().splitlines()]
    assert [row["dataset"] for row in rows] == [name] * 4 + ["affectnet"] * 6
    markdown = (tables["both"] / "results.md").read_text()
    assert markdown.startswith(f"# Results: bare model {demo_dir / 'tiny-qwen2.5-vl'} (zero-shot)\n")


def test_affectnet_is_asked_the_8_class_question_and_as_affectnet7_the_7_class_one(tables):
    """The literature's 7-class AffectNet figure asks the 7-class question (contempt not offered) over the images
    not labelled contempt; every evaluation records the answers its question offered."""
    eight, seven = table(tables["affectnet"]), table(tables["affectnet7"])
    assert list(eight) == ["affectnet (8 classes)", "pooled"] and list(seven) == ["affectnet7 (7 classes)", "pooled"]
    assert (eight["affectnet (8 classes)"]["images"], seven["affectnet7 (7 classes)"]["images"]) == ("6", "4")
    offered = {run: json.loads((tables[run] / "metrics.json").read_text())["data"]["labels_offered"]
               for run in ("affectnet", "affectnet7", "both")}
    assert offered["affectnet"] == {"affectnet": list(EMOTIONS)}
    assert offered["affectnet7"] == {"affectnet7": [label for label in EMOTIONS if label != "contempt"]}
    assert list(offered["both"].values())[0] == ["happiness", "surprise", "disgust", "anger"]  # samples.yaml's
    report = json.loads((tables["affectnet7"] / "metrics.json").read_text())
    assert report["data"]["counts"]["samples"] == 4  # the two contempt faces are not read
    assert "asked the 7-class question" in (tables["affectnet7"] / "results.md").read_text()
