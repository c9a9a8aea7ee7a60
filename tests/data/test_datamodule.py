"""FERDataModule on the real sample photos and their real AU cache: selection, items, batches,
worker processes, DDP shards and the YAML pieces."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel

from tag_lightning.answers.grammar import PAPER, Step, Trace, parse_trace, render_trace
from tag_lightning.answers.labels import EMOTIONS
from tag_lightning.answers.prompts import user_prompt
from tag_lightning.au.build import build_au_cache
from tag_lightning.au.cache import AUCache
from tag_lightning.au.record import AURecord
from tag_lightning.data.augment import AugmentOptions
from tag_lightning.data.datamodule import FERDataModule, dataset_names, load_traces
from tag_lightning.data.datasets import parse_data_spec
from tag_lightning.data.samples import ANGER, DISGUST, MULTI_FACE, NO_FACE, SAMPLE_LABELS, SINGLE_FACE
from tag_lightning.data.sampling import EvaluationSampler
from tag_lightning.errors import UserError
from tag_lightning.images import ImageRef

SIZE = 224
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


@dataclass(frozen=True)
class Workspace:
    cache: Path
    manifest: Path
    traces: Path
    records: dict[str, AURecord]  # by image name
    classes: tuple[str, ...]


def face_trace(record: AURecord, label: str) -> Trace:
    steps = (
        Step("left lip corner", (12,), "the left corner moves", tuple(record.aus["AU12"]["sides"]["left"]["box"])),
        Step("cheek", (6,), "raised", tuple(record.aus["AU6"]["box"])),
    )
    return Trace("A frontal face.", steps, f"This indicates {label}.", label)


def trace_line(record: AURecord, label: str, trace: Trace | None, au_settings: str) -> str:
    """One line as `tag prepare traces` writes it (trace text and structure, grounded on `au_settings`)."""
    return json.dumps({
        "image": record.image, "label": label, "trace": None if trace is None else render_trace(trace),
        "trace_struct": None if trace is None else trace.to_dict(), "teacher": "test", "attempts": {},
        "content_hash": record.content_hash, "dataset": "manifest", "split": "train",
        "au_settings": au_settings, "min_intensity": 1.0,
    })


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, samples_dir) -> Workspace:
    """Every sample photo (labelled, except one), a copy under another name, an image the cache never
    saw, their AU cache, and traces: three good, one with a box outside its image, one given up on."""
    root = tmp_path_factory.mktemp("datamodule")
    photos = [samples_dir / name for name in SAMPLE_LABELS]
    cache_dir = root / "au_cache"
    build_au_cache([ImageRef.from_path(path) for path in photos], cache_dir, workers=1, progress=False)
    cache = AUCache(cache_dir)
    records = {str(path): cache.get_by_name(str(path)) for path in photos}
    (root / "renamed.jpg").write_bytes((samples_dir / DISGUST).read_bytes())
    (root / "unseen.jpg").write_bytes((samples_dir / DISGUST).read_bytes() + b"\0")
    labels = {str(path): "" if path.name == MULTI_FACE else SAMPLE_LABELS[path.name] or "neutral" for path in photos}
    labels |= {str(root / "renamed.jpg"): "disgust", str(root / "unseen.jpg"): "disgust"}
    manifest = root / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{path},{label}\n" for path, label in labels.items()))
    lines = []
    for path, record in records.items():
        name, label = Path(path).name, labels[path]
        if name == ANGER:
            bad = Trace("A face.", (Step("chin", (17,), "raised", (0, 0, 600, 600)),), "Anger.", label)
            lines.append(trace_line(record, label, bad, cache.settings_key))
        elif name == SINGLE_FACE:
            lines.append(trace_line(record, label, None, cache.settings_key))
        elif record.status == "ok" and label:
            lines.append(trace_line(record, label, face_trace(record, label), cache.settings_key))
    traces = root / "traces.jsonl"
    traces.write_text("\n".join(lines) + "\n\n")
    classes = ("neutral", "happiness", "surprise", "disgust", "anger")
    return Workspace(cache_dir, manifest, traces, records, classes)


def datamodule(ws: Workspace, **overrides) -> FERDataModule:
    spec = f"manifest:{ws.manifest}"
    options = {"au_cache": str(ws.cache), "train_data": spec, "val_data": spec, "train_traces": str(ws.traces),
               "image_size": SIZE, "batch_size": 2, "num_workers": 0, "labels": list(ws.classes)}
    module = FERDataModule(**{**options, **overrides})
    module.setup("fit")
    return module


def test_setup_counts_every_exclusion(workspace):
    dm = datamodule(workspace)
    assert dm.counts["train"] == {"samples": 9, "kept": 4, "traces": 4, "bad_trace": 1, "no_trace": 1,
                                  "no_face": 1, "unlabeled": 1, "not_cached": 1}
    assert dm.counts["val"] == {"samples": 9, "kept": 6, "no_face": 1, "unlabeled": 1, "not_cached": 1}
    assert len(dm.items["train"]) == 4 and len(dm.items["val"]) == 6
    keep_faceless = datamodule(workspace, exclude_statuses=["unreadable"]).items["val"]
    assert len(keep_faceless) == 7
    faceless = [keep_faceless[i] for i in range(7) if Path(keep_faceless[i]["image_name"]).name == NO_FACE]
    assert faceless[0]["detector_aus"] == {} and faceless[0]["activated_aus"] == []


def test_a_manifest_offers_the_declared_labels_else_every_emotion_never_those_present(workspace):
    """The workspace's manifest holds 5 of the 8 labels; a declared set adds those absent and leaves out the samples
    labelled otherwise; without one, the question offers all eight."""
    declared = datamodule(workspace, labels=["Happy", "sad", "surprise", "anger", "disgust"])
    assert list(declared.offered_labels("val").values()) == [["happiness", "sadness", "surprise", "disgust", "anger"]]
    assert declared.counts["val"]["label_not_offered"] == 1  # the neutral face
    assert list(datamodule(workspace, labels=None).offered_labels("val").values()) == [list(EMOTIONS)]
    with pytest.raises(ValueError, match="unknown emotion label 'grumpy'"):
        datamodule(workspace, labels=["grumpy", "anger"])
    with pytest.raises(ValueError, match="fewer than two answers"):
        datamodule(workspace, labels=["anger"])


def test_sft_training_items_carry_the_trace_and_its_text(workspace):
    items = datamodule(workspace).items["train"]
    assert {Path(items[i]["image_name"]).name for i in range(len(items))} == {
        "0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", DISGUST, "renamed.jpg"}
    for index in range(len(items)):
        item = items[index]
        assert item["image"].shape == (SIZE, SIZE, 3) and item["image"].dtype == np.uint8
        assert item["prompt"] == user_prompt(workspace.classes)
        assert isinstance(item["trace"], Trace) and item["target"] == render_trace(item["trace"])
        parsed = parse_trace(item["target"], image_size=(SIZE, SIZE), labels=workspace.classes)
        assert parsed.valid, parsed.errors
        assert parsed.trace.answer == item["label"]


def test_each_trace_of_an_image_is_a_training_item_of_its_own(workspace, tmp_path):
    """`--traces-per-image`: every trace that fits its image trains; one that does not is left out alone."""
    lines = workspace.traces.read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    surprise = next(row for row in rows if row["label"] == "surprise")
    record = workspace.records[surprise["image"]]
    other = replace(face_trace(record, "surprise"), global_analysis="Another reading of the face.")
    outside = Trace("A face.", (Step("chin", (17,), "raised", (0, 0, 600, 600)),), "Surprise.", "surprise")
    several = tmp_path / "several.jsonl"
    settings = surprise["au_settings"]
    several.write_text("\n".join([*lines, trace_line(record, "surprise", other, settings),
                                   trace_line(record, "surprise", outside, settings)]) + "\n")
    dm = datamodule(workspace, train_traces=str(several))
    assert dm.counts["train"]["kept"] == 4 and dm.counts["train"]["traces"] == 5
    items = dm.items["train"]
    targets = [items[i]["trace"].global_analysis for i in range(len(items))
               if items[i]["image_name"] == surprise["image"]]
    assert sorted(targets) == sorted(["A frontal face.", "Another reading of the face."])


def test_in_the_paper_s_format_the_prompt_asks_for_it_and_the_targets_are_written_in_it(workspace, tmp_path):
    """Traces written with `--trace-format paper` (their structure as the builder keeps it: parsed from
    the paper's text), trained on with ``trace_format="paper"``; a file of the other format is refused."""
    rows = [json.loads(line) for line in workspace.traces.read_text().splitlines() if line.strip()]
    for row in rows:
        if row["trace_struct"] is not None:
            trace = parse_trace(render_trace(Trace.from_dict(row["trace_struct"]), PAPER)).trace
            row |= {"trace": render_trace(trace, PAPER), "trace_struct": trace.to_dict(), "trace_format": PAPER}
    paper = tmp_path / "paper.jsonl"
    paper.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dm = datamodule(workspace, train_traces=str(paper), trace_format=PAPER)
    for split in ("train", "val"):
        item = dm.items[split][0]
        assert item["prompt"] == user_prompt(workspace.classes, PAPER) and item["trace_format"] == PAPER
    items = dm.items["train"]
    for index in range(len(items)):
        item = items[index]
        assert item["target"] == render_trace(item["trace"], PAPER)
        parsed = parse_trace(item["target"], image_size=(SIZE, SIZE), labels=workspace.classes)
        assert (parsed.trace_format, parsed.errors) == (PAPER, ())
    refusal = re.escape(f"{paper}:1 holds a paper trace, but data.trace_format is per_step: set --data.trace_format=paper")
    with pytest.raises(ValueError, match=refusal + ", or rebuild"):
        datamodule(workspace, train_traces=str(paper))
    with pytest.raises(ValueError, match=r"holds a per_step trace, but data.trace_format is paper"):
        datamodule(workspace, trace_format=PAPER)  # lines without a trace_format were written per step
    with pytest.raises(ValueError, match="trace_format must be one of per_step, paper, got 'xml'"):
        FERDataModule(str(workspace.cache), trace_format="xml")


def test_evaluation_items_carry_detector_boxes_in_the_image_frame(workspace):
    items = datamodule(workspace).items["val"]
    for index in range(len(items)):
        item = items[index]
        record = workspace.records.get(item["image_name"])
        if record is None or record.size != (512, 512):
            continue  # the letterbox of a 512 px square is a plain scaling by SIZE / 512
        scale = SIZE / 512
        assert set(item["detector_aus"]) == set(record.aus)
        for key, entry in record.aus.items():
            expected = [round(value * scale) for value in entry["box"]]
            assert np.abs(np.subtract(item["detector_aus"][key]["box"], expected)).max() <= 1
            assert item["detector_aus"][key]["intensity"] == entry["intensity"]
        assert item["activated_aus"] == [key for key, _ in record.activated(1.0)]
        assert "trace" not in item and "target" not in item
    again = datamodule(workspace).items["val"]
    assert np.array_equal(items[0]["image"], again[0]["image"])  # evaluation is not augmented


def test_batches_are_tensors_and_lists_for_the_model_wrapper(workspace):
    dm = datamodule(workspace, batch_size=3)
    train = next(iter(dm.train_dataloader()))
    assert set(train) == {"image", "image_name", "dataset", "prompt", "trace_format", "label", "labels",
                          "original_size", "counted", "trace", "target"}
    assert train["image"].dtype == torch.uint8 and train["image"].shape == (3, SIZE, SIZE, 3)
    assert all(len(train[key]) == 3 for key in train)
    assert all(isinstance(trace, Trace) for trace in train["trace"])
    val = next(iter(dm.val_dataloader()))
    assert set(val) == {"image", "image_name", "dataset", "prompt", "trace_format", "label", "labels",
                        "original_size", "counted", "detector_aus", "activated_aus"}
    assert dm.transfer_batch_to_device(val, torch.device("cpu"), 0) is val


def test_a_dataset_is_named_by_its_kind_unless_two_specs_would_share_the_name(workspace, tmp_path, make_affectnet):
    """The results table's rows: ``rafdb``, ``affectnet``; manifests and a second AffectNet copy by their spec."""
    copies = [f"affectnet:{make_affectnet(tmp_path / name, [('1/a.jpg', 1)], split='val')}" for name in "ab"]
    manifest = f"manifest:{workspace.manifest}"
    read = [parse_data_spec(spec, "val") for spec in (copies[0], manifest)]
    assert dataset_names([copies[0], manifest], read) == ["affectnet", manifest]
    both = [parse_data_spec(spec, "val") for spec in copies]
    assert dataset_names(copies, both) == copies


def test_the_predict_split_answers_unlabeled_faces_and_lists_every_image_it_leaves_out(workspace, tmp_path):
    dm = FERDataModule(str(workspace.cache), test_data=f"manifest:{workspace.manifest}",
                       predict_data=f"manifest:{workspace.manifest}", image_size=SIZE, num_workers=0)
    assert dm.predict_split == "predict"
    dm.setup("predict")
    assert set(dm.items) == {"predict"}
    assert dm.counts["predict"] == {"samples": 9, "kept": 7, "no_face": 1, "not_cached": 1}
    assert {Path(e.image).name: (e.reason, e.detail) for e in dm.exclusions["predict"]} == {
        NO_FACE: ("no_face", "no face detected"),
        "unseen.jpg": ("not_cached", "no record of this image's content in the AU cache")}
    items = [dm.items["predict"][index] for index in range(7)]
    assert [Path(item["image_name"]).name for item in items if item["label"] is None] == [MULTI_FACE]
    for item in items:
        record = workspace.records.get(item["image_name"])
        assert record is None or item["original_size"] == record.size
    assert sum(len(batch["image"]) for batch in dm.predict_dataloader()) == 7
    unusable = tmp_path / "unusable.csv"
    unusable.write_text(f"path\n{workspace.manifest.parent / 'unseen.jpg'}\n")
    rejected = FERDataModule(str(workspace.cache), predict_data=f"manifest:{unusable}", num_workers=0)
    rejected.setup("predict")  # nothing to answer is no error: each image is told why
    assert len(rejected.items["predict"]) == 0 and [e.reason for e in rejected.exclusions["predict"]] == ["not_cached"]
    without = FERDataModule(str(workspace.cache), test_data=f"manifest:{workspace.manifest}", num_workers=0)
    assert without.predict_split == "test"  # the default: answer the test split, labelled images only
    without.setup("predict")
    assert set(without.items) == {"test"} and without.counts["test"]["unlabeled"] == 1


def test_rl_stage_trains_on_detector_boxes_without_traces(workspace):
    dm = datamodule(workspace, stage="rl", train_traces=None)
    assert dm.counts["train"]["kept"] == 6
    item = dm.items["train"][0]
    assert "detector_aus" in item and "trace" not in item
    assert all(0 <= v <= SIZE for entry in item["detector_aus"].values() for v in entry["box"])


def test_worker_processes_deliver_what_the_main_process_does(workspace):
    """Two workers read the AU cache over their own connections and load the same evaluation batches."""
    def batches(workers: int) -> list[dict]:
        return list(datamodule(workspace, stage="rl", num_workers=workers).val_dataloader())

    in_main, in_workers = batches(0), batches(2)
    assert len(in_main) == len(in_workers) == 3
    for one, other in zip(in_main, in_workers):
        assert torch.equal(one["image"], other["image"])
        assert one["detector_aus"] == other["detector_aus"] and one["image_name"] == other["image_name"]
    train = list(datamodule(workspace, stage="rl", num_workers=2).train_dataloader())
    assert sorted(name for batch in train for name in batch["image_name"]) == sorted(
        name for batch in in_main for name in batch["image_name"])


class NameRecorder(LightningModule):
    """Writes the image names its rank trained on."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = out
        self.seen: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen += batch["image_name"]
        return self.weight * batch["image"].float().mean()

    def on_train_epoch_end(self) -> None:
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ddp_ranks_train_on_disjoint_shards(workspace, samples_dir, tmp_path):
    """Two CPU processes (DDP, gloo): Lightning's DistributedSampler gives each rank its own half."""
    dm = FERDataModule(str(workspace.cache), train_data=f"manifest:{samples_dir / 'manifest.csv'}", stage="rl",
                       image_size=64, batch_size=1, num_workers=0)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(NameRecorder(tmp_path), datamodule=dm)
    shards = [set(json.loads((tmp_path / f"rank{rank}.json").read_text())) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]
    assert {Path(name).name for name in shards[0] | shards[1]} == {
        name for name, label in SAMPLE_LABELS.items() if label}


def test_an_image_changed_after_caching_is_refused(workspace, samples_dir, tmp_path):
    copy = tmp_path / "copy.jpg"
    copy.write_bytes((samples_dir / DISGUST).read_bytes())
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\ncopy.jpg,disgust\n")
    dm = FERDataModule(str(workspace.cache), val_data=f"manifest:{manifest}", image_size=SIZE, num_workers=0)
    dm.setup("validate")
    copy.write_bytes((samples_dir / DISGUST).read_bytes() + b"\0")
    with pytest.raises(UserError, match="changed since the AU cache .* recorded it: rebuild the cache"):
        dm.items["val"][0]


def test_misconfigurations_fail_clearly(workspace, tmp_path):
    with pytest.raises(ValueError, match="set train_traces"):
        datamodule(workspace, train_traces=None)
    with pytest.raises(ValueError, match="keep 'unreadable'"):
        FERDataModule(str(workspace.cache), exclude_statuses=["no_face"])
    with pytest.raises(ValueError, match="unknown record status"):
        FERDataModule(str(workspace.cache), exclude_statuses=["unreadable", "blurry"])
    with pytest.raises(RuntimeError, match="no test data"):
        datamodule(workspace).test_dataloader()
    with pytest.raises(FileNotFoundError, match="no AU cache"):
        datamodule(workspace, au_cache=str(tmp_path))
    unusable = tmp_path / "unusable.csv"
    unusable.write_text(f"path,label\n{workspace.manifest.parent / 'unseen.jpg'},disgust\n")
    with pytest.raises(ValueError, match=r"no usable sample, kept 0 of 1 samples \(excluded: not_cached 1\)"):
        FERDataModule(str(workspace.cache), test_data=f"manifest:{unusable}").setup("test")
    broken = tmp_path / "traces.jsonl"
    broken.write_text(workspace.traces.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"traces.jsonl:2: not a trace line"):
        load_traces(broken)


@pytest.mark.parametrize("piece", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_yaml_pieces_configure_the_datamodule_through_lightning_cli(piece, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tag"])  # LightningCLI reads `args`, not pytest's arguments
    cli = LightningCLI(BoringModel, FERDataModule, run=False, trainer_defaults={"logger": False},
                       args=["--config", str(piece), "--data.augment.rotate", "5"])
    dm = cli.datamodule
    assert isinstance(dm, FERDataModule) and dm.specs["train"] and dm.train_traces
    assert dm.augment == AugmentOptions(rotate=5.0)


@pytest.mark.parametrize("size, ranks", [(3, 2), (5, 4), (4, 2), (1, 3)])
def test_evaluation_ranks_take_equal_slices_that_count_each_sample_once_in_order(size, ranks):
    slices = [list(EvaluationSampler(range(size), ranks, rank)) for rank in range(ranks)]
    assert len({len(keys) for keys in slices}) == 1  # every rank runs as many batches
    assert [key.index for keys in slices for key in keys if not key.repeat] == list(range(size))
