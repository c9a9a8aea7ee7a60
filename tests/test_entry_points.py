"""Bad and unusual input through the real `tag` command, in subprocesses: each case ends with the
right exit status and one line on stderr (no traceback), and loses or changes nothing.

Read-only folders: as root, file modes do not stop writes, so `read_only` sets the immutable
attribute (``chattr -R +i``: the folder and its files), which binds root too, as a read-only
mount would; as another user it removes the write bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import write_face

from tag_lightning.data.samples import ANGER, DISGUST, HAPPINESS, MULTI_FACE, SAMPLE_LABELS, SINGLE_FACE, SURPRISE
from tag_lightning.traces.template_endpoint import TemplateEndpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
LABELLED = (SURPRISE, HAPPINESS, ANGER, DISGUST)


def tag(*args, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TAG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "tag_lightning.commands.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess, *fragments: str, only: bool = True) -> str:
    """The command's one complaint, checked: exit status 2, no traceback, the `fragments` in it, and
    nothing else on stderr (`only`; Lightning commands also log progress there, so then: the last line)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr[-3000:]
    assert not only or len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content digest: compare two to show nothing changed."""
    return {str(path.relative_to(folder)): digest(path) for path in sorted(folder.rglob("*")) if path.is_file()}


@contextmanager
def read_only(folder: Path):
    """Neither `folder` nor its files can be written (nor entries added or removed) within the block."""
    paths = [folder, *folder.rglob("*")]
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root where chattr +i is unavailable: no folder can be made read-only")
        undo = lambda: subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)  # noqa: E731
    else:
        modes = {path: path.stat().st_mode for path in paths}
        for path in paths:
            path.chmod(modes[path] & 0o555)
        undo = lambda: [path.chmod(mode) for path, mode in modes.items()]  # noqa: E731
    try:
        yield folder
    finally:
        undo()


# -- the AU cache: one real build over a manifest with a missing image and an unknown column -------
@pytest.fixture(scope="module")
def photos(samples_dir, tmp_path_factory) -> Path:
    """A copy of the sample photos whose manifest also lists a missing image and has a `notes` column."""
    folder = tmp_path_factory.mktemp("photos")
    rows = ["path,label,notes"] + [f"{name},{label},posed" for name, label in SAMPLE_LABELS.items()]
    for name in SAMPLE_LABELS:
        shutil.copyfile(samples_dir / name, folder / name)
    (folder / "manifest.csv").write_text("\n".join(rows + ["gone.jpg,anger,deleted"]) + "\n")
    return folder


@pytest.fixture(scope="module")
def cache_build(photos, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return tag("prepare", "au-cache", "--images", photos / "manifest.csv", "--out", cache, "--quiet"), cache


@pytest.fixture(scope="module")
def cache(cache_build) -> Path:
    return cache_build[1]


def test_a_missing_image_becomes_an_unreadable_record_and_unknown_columns_are_told(cache_build, photos):
    result, cache = cache_build
    assert result.returncode == 0, result.stderr
    assert "8 images: 8 computed" in result.stdout and "unreadable 1" in result.stdout
    assert f"note: {photos / 'manifest.csv'}:1: column(s) notes ignored" in result.stderr
    shown = tag("prepare", "au-show", photos / HAPPINESS, "--cache", cache, "--json")
    assert json.loads(shown.stdout)["status"] == "ok"


def test_au_show_finds_records_by_content_and_names_a_changed_or_deleted_file(cache, photos, tmp_path):
    multi = json.loads(tag("prepare", "au-show", photos / MULTI_FACE, "--cache", cache, "--json").stdout)
    image = photos / SINGLE_FACE
    image.write_bytes((photos / MULTI_FACE).read_bytes())  # replaced by another cached picture: its record
    shown = json.loads(tag("prepare", "au-show", image, "--cache", cache, "--json").stdout)
    assert shown["face_box"] == multi["face_box"] and shown["faces_found"] == multi["faces_found"]

    image.write_bytes((photos / HAPPINESS).read_bytes() + b"edited")  # content the cache never saw
    drawing = tmp_path / "face.png"
    error_line(tag("prepare", "au-show", image, "--cache", cache, "--draw", drawing),
               f"{image} changed since the AU cache", "tag prepare au-cache")
    assert not drawing.exists()
    image.unlink()
    error_line(tag("prepare", "au-show", image, "--cache", cache), f"{image}: No such file or directory")


def test_a_read_only_cache_reads_and_refuses_a_build_in_one_line(cache, photos, tmp_path):
    before = snapshot(cache)
    with read_only(cache):
        shown = tag("prepare", "au-show", photos / HAPPINESS, "--cache", cache, "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "ok", shown.stderr
        error_line(tag("prepare", "au-cache", "--images", photos, "--out", cache, "--quiet"),
                   f"cannot build the AU cache {cache / 'records.sqlite'}: building a cache needs write access")
    assert snapshot(cache) == before


def test_outputs_that_cannot_be_written_are_one_line_each(cache, photos, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    error_line(tag("prepare", "au-cache", "--images", photos, "--out", a_file), f"{a_file}: exists and is not a folder")
    show = ("prepare", "au-show", photos / HAPPINESS, "--cache", cache, "--draw")
    error_line(tag(*show, a_file / "face.png"), f"{a_file}: exists and is not a folder")
    error_line(tag(*show, tmp_path / "face.txt"), "no image extension; use one of .jpg, .jpeg, .png")
    with read_only(tmp_path):
        line = error_line(tag(*show, tmp_path / "face.png"), f"{tmp_path / 'face.png'}: ")
        assert "ermi" in line  # Operation not permitted (immutable) or Permission denied
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("args, message", [
    (("prepare", "au-cache", "--images", "{tmp}/nowhere", "--out", "{tmp}/c", "--workers", "0"),
     "argument --workers: must be at least 1"),
    (("prepare", "au-cache", "--images", "{tmp}/nowhere", "--out", "{tmp}/c"), "no such folder: {tmp}/nowhere"),
    (("prepare", "au-cache", "--images", "{tmp}/list.csv", "--out", "{tmp}/c"), "no such file: {tmp}/list.csv"),
    (("prepare", "traces", "--data", "{tmp}/broken.yaml", "--cache", "{cache}", "--out", "{tmp}/t.jsonl"),
     "{tmp}/broken.yaml:3:1: not valid YAML (while parsing a flow sequence from line 2"),
    (("prepare", "au-show", "{tmp}/broken.yaml", "--cache", "{tmp}/nowhere"), "no AU cache at {tmp}/nowhere"),
    (("prepare", "au-cache", "--out", "{tmp}/c"), "the following arguments are required: --images"),
])
def test_user_mistakes_in_prepare_commands_are_one_line(cache, tmp_path, args, message):
    (tmp_path / "broken.yaml").write_text("data:\n  train_data: [a\n")
    error_line(tag(*(arg.format(tmp=tmp_path, cache=cache) for arg in args)), message.format(tmp=tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.yaml"]


# -- tag prepare traces --------------------------------------------------------------------------
@pytest.fixture
def faces(photos, tmp_path) -> Path:
    """The labelled photos as an image folder (``faces/<label>/*.jpg``) in `tmp_path`."""
    for name in LABELLED:
        (tmp_path / "faces" / SAMPLE_LABELS[name]).mkdir(parents=True)
        shutil.copyfile(photos / name, tmp_path / "faces" / SAMPLE_LABELS[name] / name)
    return tmp_path / "faces"


def test_traces_resume_by_content_whatever_the_path_text(cache, faces, tmp_path):
    out = tmp_path / "traces.jsonl"
    first = tag("prepare", "traces", "--data", "faces", "--cache", cache, "--out", out, "--quiet", cwd=tmp_path)
    assert first.returncode == 0 and "kept 4" in first.stdout, first.stderr
    written = out.read_bytes()
    again = tag("prepare", "traces", "--data", faces.resolve(), "--cache", cache, "--out", out, "--quiet")
    assert again.returncode == 0 and "kept 0" in again.stdout and "already written 4" in again.stdout
    assert out.read_bytes() == written and written.count(b"\n") == 4


class _DownTeacher(TemplateEndpoint):
    """An endpoint that is up (it lists models) but answers every chat request with HTTP 503."""

    def __init__(self):
        super().__init__(records={}, labels={})

    def respond(self, request, headers):
        return 503, {}, {"error": "overloaded"}


@pytest.fixture
def down_teacher():
    with _DownTeacher() as server:
        yield server


def test_a_dead_or_failing_teacher_stops_the_job_with_a_non_zero_exit(cache, faces, tmp_path, down_teacher):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    out = tmp_path / "traces.jsonl"
    openai = ("prepare", "traces", "--data", faces, "--cache", cache, "--out", out, "--quiet", "--teacher", "openai",
              "--model", "m", "--max-http-retries", "0")
    error_line(tag(*openai, "--base-url", f"http://127.0.0.1:{port}/v1", timeout=30),
               f"http://127.0.0.1:{port}/v1 does not answer", "refused")
    assert not out.exists()
    stopped = tag(*openai, "--base-url", down_teacher.base_url, "--max-failures-in-a-row", "2", "--concurrency", "1",
                  timeout=60)
    error_line(stopped, "no answer for 2 traces in a row", "HTTP 503", "Rerun once it answers")
    assert len(down_teacher.arrivals) == 2 and out.read_text() == ""  # one at a time: the third is never asked
    one = tag(*openai, "--base-url", down_teacher.base_url, "--limit", "1", timeout=60)
    assert "failed 1" in one.stdout
    error_line(one, "the teacher answered none of the 1 images")


# -- tag fit | predict ---------------------------------------------------------------------------
def lightning(command: str, demo_dir: Path, root: Path, *extra, cache: Path | None = None) -> list:
    """`tag COMMAND` with configs/sft.yaml + configs/data/samples.yaml aimed at the demo folder."""
    manifest = f"manifest:{demo_dir / 'samples' / 'manifest.csv'}"
    return [command, "-c", CONFIGS / "sft.yaml", "-c", CONFIGS / "data" / "samples.yaml",
            f"--model.init_args.network.init_args.config.model_path={demo_dir / 'tiny-qwen2.5-vl'}",
            f"--data.au_cache={cache or demo_dir / 'au_cache'}", f"--data.train_traces={demo_dir / 'traces.jsonl'}",
            f"--data.train_data={manifest}", f"--data.val_data={manifest}", f"--data.test_data={manifest}",
            f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
            "--model.init_args.max_new_tokens=4", *extra]


def tag_together(*commands: list) -> list[subprocess.CompletedProcess]:
    """Independent `tag` commands run side by side (each spends seconds loading torch and Lightning)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: tag(*args), commands))


def test_fit_and_export_refuse_bad_input_in_one_line_and_write_nothing(demo_dir, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    traces = tmp_path / "traces.jsonl"
    lines = (demo_dir / "traces.jsonl").read_text().splitlines()
    traces.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: [1\n")
    root = tmp_path / "run"
    bad_checkpoint, bad_export, bad_traces, bad_value, bad_yaml = tag_together(
        lightning("fit", demo_dir, root, f"--ckpt_path={garbage}"),
        ["export", "--ckpt", garbage, "--out", root / "merged"],
        lightning("fit", demo_dir, root, f"--data.train_traces={traces}"),
        lightning("fit", demo_dir, root, "--model.init_args.max_new_tokens=many"),
        lightning("fit", demo_dir, root, "-c", broken),
    )
    line = error_line(bad_checkpoint, f"--ckpt_path {garbage}: not a loadable checkpoint", only=False)
    assert "weights_only" not in line
    assert "weights_only" not in error_line(bad_export, f"{garbage}: not a loadable checkpoint")
    error_line(bad_traces, f"{traces}:3: not a trace line", only=False)
    error_line(bad_value, "tag fit: model.max_new_tokens: expected int, got 'many'", only=False)
    error_line(bad_yaml, f"{broken}:3:1: not valid YAML", "line 2")
    assert not list(root.rglob("*.ckpt")) and not (root / "merged").exists()


def test_predict_says_which_model_answered_and_never_mixes_runs(demo_dir, tmp_path):
    """Also reads the AU cache from a read-only folder (the datamodule's reader)."""
    cache = tmp_path / "ro_cache"
    shutil.copytree(demo_dir / "au_cache", cache)
    out = tmp_path / "predictions"
    predict = ("predict", demo_dir, tmp_path, "-c", CONFIGS / "predict.yaml",
               f"--trainer.callbacks.init_args.output_dir={out}")
    with read_only(cache):
        no_checkpoint, zero_shot = tag_together(lightning(*predict, cache=cache),
                                                lightning(*predict, "--zero_shot", "true", cache=cache))
    error_line(no_checkpoint, "without --ckpt_path would answer with the untrained base model", "--zero_shot true")
    assert zero_shot.returncode == 0, zero_shot.stderr[-3000:]
    assert "no checkpoint: the base model (zero-shot)" in zero_shot.stderr
    rows = [json.loads(line) for line in (out / "predictions.rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["model"] == str(demo_dir / "tiny-qwen2.5-vl") for row in rows)
    assert all(row["checkpoint"] is None for row in rows)
    assert json.loads((out / "run.json").read_text())["vlm_config"]["lora"]["r"] == 8
    before = snapshot(out)
    error_line(tag(*lightning(*predict, "--zero_shot", "true")), f"{out} holds an earlier run's predictions",
               only=False)
    assert snapshot(out) == before


def test_every_prediction_names_the_checkpoint_that_made_it(demo_dir, tmp_path):
    """The writer's part of a `tag predict --ckpt_path` run (a full one is in tests/models/test_sft.py)."""
    from tag_lightning.commands.callbacks import JSONLPredictionWriter
    from tag_lightning.models.module import VLMModule
    from tag_lightning.models.vlm import VLMConfig

    writer = JSONLPredictionWriter(str(tmp_path / "out"), per_image=False)
    trainer = SimpleNamespace(ckpt_path="run/last.ckpt", is_global_zero=True, global_rank=0)
    network = SimpleNamespace(config=VLMConfig(str(demo_dir / "tiny-qwen2.5-vl")))
    module = SimpleNamespace(network=network, provenance=lambda: VLMModule.provenance(
        SimpleNamespace(trainer=trainer, network=network, started_from=None)))
    writer.on_predict_start(trainer, module)
    writer.write_on_batch_end(trainer, module, [{"image": "a.jpg", "answer": "anger"}], [0], None, 0, 0)
    row = json.loads((tmp_path / "out" / "predictions.rank0.jsonl").read_text())
    assert row["checkpoint"] == str(Path("run/last.ckpt").resolve()) and row["answer"] == "anger"
    assert json.loads((tmp_path / "out" / "run.json").read_text())["checkpoint"] == row["checkpoint"]


# -- what a run read, and what it left out -------------------------------------------------------
def test_lenient_reading_lists_what_it_skipped_and_says_how_to_cache_the_rest(demo_dir, tmp_path):
    """A test manifest with two cached faces, a row whose image is gone and a face the cache never saw:
    strict, the bad row stops the run naming file and line; lenient, the run says what it left out
    and why, in the console, in metrics.json's counts and in the evaluation folder's excluded.jsonl."""
    samples = demo_dir / "samples"
    shutil.copyfile(samples / HAPPINESS, tmp_path / HAPPINESS)
    shutil.copyfile(samples / ANGER, tmp_path / ANGER)
    (tmp_path / "new.jpg").write_bytes((samples / DISGUST).read_bytes() + b"\0")  # content the cache never saw
    manifest = tmp_path / "test.csv"
    manifest.write_text(f"path,label\n{HAPPINESS},happiness\ngone.jpg,anger\n{ANGER},anger\nnew.jpg,disgust\n")
    test = ("test", demo_dir, tmp_path / "run", f"--data.test_data=manifest:{manifest}")
    strict, lenient = tag_together(lightning(*test), lightning(*test, "--data.lenient=true"))
    error_line(strict, f"{manifest}:3: image file not found", only=False)
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    assert "FERDataModule test: kept 2 of 4 samples (excluded: missing_image 1, not_cached 1); 1 not in the AU " \
           f"cache {demo_dir / 'au_cache'}: cache them with `tag prepare au-cache --images manifest:{manifest} " \
           f"--out {demo_dir / 'au_cache'}`" in lenient.stderr + lenient.stdout
    (folder,) = (tmp_path / "run").rglob("evaluation")
    counts = json.loads((folder / "metrics.json").read_text())["data"]["counts"]
    assert (counts["samples"], counts["kept"], counts["missing_image"], counts["not_cached"]) == (4, 2, 1, 1)
    excluded = [json.loads(line) for line in (folder / "excluded.jsonl").read_text().splitlines()]
    assert [(row["image"], row["reason"]) for row in excluded] == [(f"{manifest}:3", "missing_image"),
                                                                   (str(tmp_path / "new.jpg"), "not_cached")]


def test_predict_reads_a_folder_as_the_au_cache_does_and_refuses_an_empty_one(demo_dir, tmp_path):
    """Images in any subfolder are answered (a label-named folder labels them), a file that is not an
    image gets a report saying so; a folder without images is an error, not an empty success."""
    samples, folder = demo_dir / "samples", tmp_path / "photos"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "happiness").mkdir()
    shutil.copyfile(samples / SURPRISE, folder / "sub" / "deeper" / SURPRISE)
    shutil.copyfile(samples / HAPPINESS, folder / "happiness" / HAPPINESS)
    (folder / "sub" / "notes.txt").write_text("not a photo")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not a photo")
    out, nothing = tmp_path / "predictions", tmp_path / "nothing"
    predict = ("predict", demo_dir, tmp_path, "-c", CONFIGS / "predict.yaml", "--zero_shot", "true")
    answered, empty = tag_together(
        lightning(*predict, f"--data.predict_data={folder}", f"--trainer.callbacks.init_args.output_dir={out}"),
        lightning(*predict, f"--data.predict_data={tmp_path / 'empty'}",
                  f"--trainer.callbacks.init_args.output_dir={nothing}"))
    assert answered.returncode == 0, answered.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.rank0.jsonl").read_text().splitlines()]
    assert sorted((Path(row["image"]).name, str(row["label"])) for row in rows) == sorted(
        [(HAPPINESS, "happiness"), (SURPRISE, "None")])
    assert all(row["weights"] == "bare model" and row["checkpoint"] is None for row in rows)
    reports = [json.loads(path.read_text()) for path in (out / "images").glob("*.json")]
    (skipped,) = [report for report in reports if report["status"] == "rejected"]
    assert skipped["image"] == str(folder / "sub" / "notes.txt") and skipped["reason"] == "not_an_image"
    error_line(empty, f"no image to answer in {tmp_path / 'empty'} (skipped: not_an_image 1)", only=False)
    assert not nothing.exists()


def test_images_behind_links_are_read_and_a_link_to_nothing_is_reported(demo_dir, tmp_path):
    """A folder's images are found through a link to a folder and a link to a file, by `tag prepare
    au-cache` and `tag predict` alike; a link to a missing file is never dropped in silence: the AU
    cache records it as unreadable, and `tag predict` reports it by name among the images left out."""
    samples, elsewhere, folder = demo_dir / "samples", tmp_path / "elsewhere", tmp_path / "photos"
    elsewhere.mkdir()
    shutil.copyfile(samples / SURPRISE, elsewhere / SURPRISE)
    write_face(elsewhere / "uncached.png")  # a real image the AU cache of the demo never saw
    folder.mkdir()
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / HAPPINESS).symlink_to(samples / HAPPINESS)
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    out, cache = tmp_path / "predictions", tmp_path / "cache"
    cached, answered = tag_together(
        ["prepare", "au-cache", "--images", folder, "--out", cache, "--quiet"],
        lightning("predict", demo_dir, tmp_path, "-c", CONFIGS / "predict.yaml", "--zero_shot", "true",
                  f"--data.predict_data={folder}", f"--trainer.callbacks.init_args.output_dir={out}"))
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "4 images: 4 computed" in cached.stdout and "unreadable 1" in cached.stdout, cached.stdout
    assert answered.returncode == 0, answered.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.rank0.jsonl").read_text().splitlines()]
    assert sorted(row["image"] for row in rows) == [str(folder / HAPPINESS), str(folder / "linked" / SURPRISE)]
    reports = [json.loads(path.read_text()) for path in (out / "images").glob("*.json")]
    rejected = {report["image"]: report for report in reports if report["status"] == "rejected"}
    assert {image: report["reason"] for image, report in rejected.items()} == {
        str(folder / "gone.jpg"): "missing_image", str(folder / "linked" / "uncached.png"): "not_cached"}
    assert f"symbolic link to {tmp_path / 'deleted.jpg'}" in rejected[str(folder / "gone.jpg")]["detail"]


@pytest.mark.parametrize("args, message", [
    (("demo", "--sft-steps", "abc"), "argument --sft-steps: expected a whole number, got 'abc'"),
    (("demo", "--out", "{tmp}/a_file"), "--out {tmp}/a_file is a file"),
    (("demo", "--out", "{tmp}/demo", "--sampled-answers", "-1"), "argument --sampled-answers: must be at least 0, got -1"),
    (("demo", "--out", "{tmp}/demo", "--config", "{tmp}/missing.yaml"), "--config {tmp}/missing.yaml: no such file"),
    (("demo", "--out", "{tmp}/demo", "--config", "{tmp}/a_file"), "{tmp}/a_file:1:10: not valid YAML"),
    (("demo", "--out", "{tmp}/demo", "--libreface-weights", "{tmp}/missing.pt"),
     "--libreface-weights {tmp}/missing.pt: no such file"),
    (("demo", "--out", "{tmp}/demo", "--data", "rafdb:{tmp}/RAF-DB"), "--data rafdb:{tmp}/RAF-DB: no such file or folder"),
])
def test_demo_mistakes_name_the_option_and_the_fix(tmp_path, args, message):
    """Every option is checked before the first phase: a mistake found after SFT would cost the SFT (a
    rerun with other options is another demo), so the folder holds nothing afterwards."""
    (tmp_path / "a_file").write_text("keep: [me")
    error_line(tag(*(arg.format(tmp=tmp_path) for arg in args)), message.format(tmp=tmp_path))
    assert (tmp_path / "a_file").read_text() == "keep: [me" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("stage, gpu", [("sft", "gpu.yaml"), ("grpo", "gpu_grpo.yaml")])
def test_the_gpu_configs_validate_and_keep_checkpoints_in_optimizer_steps_and_bounded(stage, gpu):
    """`val_check_interval` counts batches: under accumulation it must be the optimizer steps meant times
    `accumulate_grad_batches`. Checkpoints every few hundred optimizer steps, and only the latest few kept."""
    import yaml

    shown = tag("fit", "-c", CONFIGS / f"{stage}.yaml", "-c", CONFIGS / "qwen2_5_vl_3b" / "model_lora.yaml",
                "-c", CONFIGS / "qwen2_5_vl_3b" / gpu, "-c", CONFIGS / "data" / "rafdb.yaml", "--print_config")
    assert shown.returncode == 0, shown.stderr[-3000:]
    trainer = yaml.safe_load(shown.stdout)["trainer"]
    validation_steps = trainer["val_check_interval"] / (trainer["accumulate_grad_batches"] or 1)
    (checkpoints,) = [c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert validation_steps in (200, 500) and checkpoints["every_n_train_steps"] in (100, 500)
    assert trainer["max_steps"] / checkpoints["every_n_train_steps"] <= 10
    assert (checkpoints["monitor"], checkpoints["mode"], checkpoints["save_top_k"]) == ("step", "max", 3)


@pytest.mark.parametrize("run", ["sft", "grpo", "grpo_ablation"])
def test_the_demo_s_compositions_in_the_paper_format_parse(run, tmp_path):
    """Every piece the demo composes by name (`commands/demo.py`), the experiment's and the paper format's
    included, parses where the demo puts it."""
    import yaml

    from tag_lightning.commands.demo import Demo, DemoSettings

    schedule = str(CONFIGS / "tiny" / "experiment_grpo_long.yaml")
    demo = Demo(DemoSettings(out=tmp_path, experiment=True, trace_format="paper", ablation=True,
                             grpo_configs=(schedule,)))
    shown = tag(*demo.fit_command(run), "--print_config")
    assert shown.returncode == 0, shown.stderr[-3000:]
    config = yaml.safe_load(shown.stdout)
    assert config["data"]["trace_format"] == "paper"
    if run == "sft":  # configs/tiny/experiment_paper_sft.yaml, composed last; --grpo-config leaves SFT alone
        assert config["trainer"]["max_steps"] == 500
        assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] != 7.5e-6
    if run.startswith("grpo"):  # the grounding reward paid as GRPO pays it, or shuffled within each group
        init_args = config["model"]["init_args"]
        assert (config["trainer"]["max_steps"], init_args["optimizer"]["init_args"]["lr"]) == (120, 7.5e-6)
        assert init_args["rewards"] == {"format": 0.5, "answer": 1.0, "grounding": 1.0}
        assert init_args["shuffled_rewards"] == (["grounding"] if run == "grpo_ablation" else None)
