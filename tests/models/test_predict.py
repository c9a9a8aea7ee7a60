"""`tag predict` on a photo or a folder: per image, a report in original-image pixels and an overlay;
for a face the AU pipeline rejected, a report that says why and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tag_lightning.answers.grammar import Step, Trace, render_trace
from tag_lightning.answers.labels import EMOTIONS
from tag_lightning.boxes import round_box
from tag_lightning.commands.callbacks import JSONLPredictionWriter
from tag_lightning.commands.cli import main
from tag_lightning.data.augment import Letterbox
from tag_lightning.data.samples import DISGUST, HAPPINESS, NO_FACE, SINGLE_FACE
from tag_lightning.grounding.claims import References, read_completion
from tag_lightning.grounding.metrics import score_answer
from tag_lightning.models.module import VLMModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OVERLAY_MIN_WIDTH = 2 * 448  # two panels of the image scaled up to 448 px


@pytest.fixture
def predict(tag_args, sft_checkpoint, tmp_path):
    """`tag predict --data.predict_data DATA` with the SFT checkpoint; returns the output folder."""
    def run(data: Path) -> Path:
        out = tmp_path / f"predictions_of_{data.stem}"
        assert main(tag_args("sft", tmp_path, "-c", str(CONFIGS / "predict.yaml"), f"--ckpt_path={sft_checkpoint}",
                             f"--data.predict_data={data}", f"--trainer.callbacks.init_args.output_dir={out}",
                             command="predict")) == 0
        return out
    return run


def reports(out: Path) -> dict[str, dict]:
    """The per-image reports, by image."""
    return {report["image"]: report
            for report in (json.loads(path.read_text()) for path in (out / "images").glob("*.json"))}


def check_answered(report: dict, out: Path, size: tuple[int, int], checkpoint: Path) -> None:
    assert report["status"] == "answered" and report["original_size"] == list(size)
    assert report["checkpoint"] == str(checkpoint.resolve()) and report["model"].endswith("tiny-qwen2.5-vl")
    assert {"label", "answer", "correct", "steps", "format_errors", "text"} <= set(report)
    boxes = [step["box"] for step in report["steps"]]
    boxes += [claim["detector_box"] for step in report["steps"] for claim in step["claims"]]
    assert all(within(box, size) for box in boxes if box is not None)
    with Image.open(out / "images" / report["overlay"]) as overlay:
        overlay.load()
        assert overlay.width >= OVERLAY_MIN_WIDTH


def within(box: list[int], size: tuple[int, int]) -> bool:
    return 0 <= box[0] <= box[2] <= size[0] and 0 <= box[1] <= box[3] <= size[1]


def test_a_photo(predict, demo_dir, sft_checkpoint):
    photo = demo_dir / "samples" / SINGLE_FACE  # 572 x 562, unlabeled
    out = predict(photo)
    (row,) = [json.loads(line) for line in (out / "predictions.rank0.jsonl").read_text().splitlines()]
    assert row["label"] is None and row["correct"] is None and row["original_size"] == [572, 562]
    report = reports(out)[str(photo)]
    check_answered(report, out, (572, 562), sft_checkpoint)
    assert report["label"] is None


def test_a_folder_with_a_faceless_and_an_uncached_photo(predict, demo_dir, sft_checkpoint, tmp_path):
    """Two photos named face.jpg (one labelled by its folder) get a report each; the others say why not."""
    samples, folder = demo_dir / "samples", tmp_path / "photos"
    (folder / "happiness").mkdir(parents=True)
    shutil.copyfile(samples / HAPPINESS, folder / "happiness" / "face.jpg")
    shutil.copyfile(samples / SINGLE_FACE, folder / "face.jpg")
    shutil.copyfile(samples / NO_FACE, folder / NO_FACE)
    (folder / "new.jpg").write_bytes((samples / DISGUST).read_bytes() + b"\0")  # content the cache never saw
    out = predict(folder)
    assert len((out / "predictions.rank0.jsonl").read_text().splitlines()) == 2
    found = {str(Path(image).relative_to(folder)): report for image, report in reports(out).items()}
    assert set(found) == {"face.jpg", "happiness/face.jpg", NO_FACE, "new.jpg"}
    check_answered(found["face.jpg"], out, (572, 562), sft_checkpoint)
    check_answered(found["happiness/face.jpg"], out, (512, 512), sft_checkpoint)
    assert found["happiness/face.jpg"]["label"] == "happiness" and found["face.jpg"]["label"] is None
    no_face, not_cached = found[NO_FACE], found["new.jpg"]
    assert (no_face["status"], no_face["reason"], no_face["detail"]) == ("rejected", "no_face", "no face detected")
    assert not_cached["status"] == "rejected" and not_cached["reason"] == "not_cached"
    assert f"tag prepare au-cache --images {folder / 'new.jpg'} --out {demo_dir / 'au_cache'}" in \
        not_cached["how_to_fix"]
    assert set(no_face) == set(not_cached) == {"image", "status", "reason", "detail", "how_to_fix"}
    assert len(list((out / "images").glob("*.png"))) == 2  # none for the rejected


def test_a_folder_of_one_label_is_asked_the_question_the_checkpoint_was_trained_on(tag_args, sft_checkpoint, demo_dir,
                                                                                   tmp_path):
    """One photo in anger/: the question does not shrink to "Choose one of: anger". Without --data.labels it offers
    what the checkpoint's training questions offered (configs/data/samples.yaml's four); with them, those."""
    folder = tmp_path / "photos" / "anger"
    folder.mkdir(parents=True)
    shutil.copy(demo_dir / "samples" / DISGUST, folder / "face.jpg")
    offered = {}
    for name, labels in (("checkpoint", "null"), ("declared", "[anger, sadness, fear]")):
        out = tmp_path / name
        assert main(tag_args("sft", tmp_path, "-c", str(CONFIGS / "predict.yaml"), f"--ckpt_path={sft_checkpoint}",
                             f"--data.predict_data={tmp_path / 'photos'}", f"--data.labels={labels}",
                             f"--trainer.callbacks.init_args.output_dir={out}", command="predict")) == 0
        (report,) = reports(out).values()
        offered[name] = report["labels_offered"]
    assert offered == {"checkpoint": ["happiness", "surprise", "disgust", "anger"],
                       "declared": ["sadness", "fear", "anger"]}


def test_nothing_to_answer_is_no_error(predict, demo_dir):
    out = predict(demo_dir / "samples" / NO_FACE)
    assert [report["reason"] for report in reports(out).values()] == ["no_face"]
    assert not list(out.glob("predictions.rank*.jsonl"))


def test_reports_tell_boxes_in_original_pixels(tmp_path):
    """A row as `predict_step` makes it, boxes in the 224 px letterbox of a 572 x 562 photo (2 px of
    padding above and below): the report maps every box back and clips what lies in the padding."""
    trace = Trace("A smile.", (Step("cheek", (6,), "raised", (40, 60, 180, 110)),
                               Step("lip corner", (12, 25), "pulled up", (60, 100, 170, 224))),
                  "AU6 + AU12 indicate happiness.", "happiness")
    detector = {"AU6": {"box": [40, 0, 180, 110]}, "AU12": {"box": [70, 120, 160, 160]}}
    references = References(None, EMOTIONS, detector, frozenset({"AU6", "AU12"}), (224, 224))
    completion = read_completion(render_trace(trace))
    answered = SimpleNamespace(_answer=lambda batch: [(completion.text, completion,
                                                       score_answer(completion, references))])
    batch = {"image": torch.zeros((1, 224, 224, 3), dtype=torch.uint8), "image_name": ["photos/a.jpg"],
             "original_size": [(572, 562)], "labels": [EMOTIONS], "counted": [True]}
    rows = VLMModule.predict_step(answered, batch, 0)
    writer = JSONLPredictionWriter(str(tmp_path))
    writer.write_on_batch_end(SimpleNamespace(global_rank=0), None, rows, [0], batch, 0, 0)
    (report,) = reports(tmp_path).values()
    letterbox = Letterbox((572, 562), 224)
    assert [step["box"] for step in report["steps"]] == [round_box(letterbox.to_original(step.box))
                                                         for step in trace.steps]
    assert report["steps"][1]["box"][3] == 562 and report["steps"][0]["claims"][0]["detector_box"][1] == 0
    assert [[(claim["au"], claim["verdict"]) for claim in step["claims"]] for step in report["steps"]] == [
        [("AU6", "supported")], [("AU12", "supported"), ("AU25", "hallucination")]]
    assert report["label"] is None and report["correct"] is None and report["answer"] == "happiness"
    with Image.open(tmp_path / "images" / report["overlay"]) as overlay:
        assert overlay.width >= OVERLAY_MIN_WIDTH
