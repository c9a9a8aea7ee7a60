"""The SFT stage through the real CLI and configs: fit, exact resume, DDP, FSDP2, export, bad configs."""

from __future__ import annotations

import csv
import errno
import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import REPO, newest_last_checkpoint, run_python, trained_weights

from tag_lightning.commands.cli import main

CONFIGS = REPO / "configs"


@pytest.fixture
def fit_args(tag_args):
    """`tag fit` (or `command`) on configs/sft.yaml + configs/data/samples.yaml, aimed at the demo folder."""
    return lambda root, *extra, **options: tag_args("sft", root, *extra, **options)


def test_fast_dev_run(fit_args, tmp_path):
    assert main(fit_args(tmp_path, "--trainer.fast_dev_run=true")) == 0


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(fit_args, tmp_path):
    """Stopped mid-epoch after step 3 and resumed to step 6 == 6 steps in one go (batch 1, 4 samples an epoch)."""
    common = ["--data.batch_size=1", "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0",
              "--trainer.callbacks.init_args.every_n_train_steps=1"]
    main(fit_args(tmp_path / "whole", *common, "--trainer.max_steps=6"))
    main(fit_args(tmp_path / "parts", *common, "--trainer.max_steps=3"))
    first_part = newest_last_checkpoint(tmp_path / "parts")
    assert torch.load(first_part, weights_only=True)["global_step"] == 3
    initial = trained_weights(first_part)  # read now: the resumed run writes its last.ckpt in the same folder
    main(fit_args(tmp_path / "parts", *common, "--trainer.max_steps=6", f"--ckpt_path={first_part}"))
    (run,) = (tmp_path / "parts" / "lightning_logs").iterdir()  # the resumed run logs on in its run's folder
    steps = [row["step"] for row in csv.DictReader(open(run / "metrics.csv")) if row["train/loss"]]
    assert steps == ["0", "1", "2", "3", "4", "5"]
    whole = trained_weights(newest_last_checkpoint(tmp_path / "whole"))
    resumed_checkpoint = newest_last_checkpoint(tmp_path / "parts")
    assert torch.load(resumed_checkpoint, weights_only=True)["global_step"] == 6
    resumed = trained_weights(resumed_checkpoint)
    assert set(whole) == set(resumed) and whole
    assert any(not torch.equal(initial[k], whole[k]) for k in whole), "training changed nothing"
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_checkpoints_hold_only_trained_weights_and_export_a_plain_hf_model(fit_args, demo_dir, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert main(fit_args(tmp_path, "--trainer.max_steps=2", "--trainer.limit_val_batches=0")) == 0
    checkpoint = newest_last_checkpoint(tmp_path)
    state = trained_weights(checkpoint)
    assert state and all("lora_" in name or "merger" in name for name in state), sorted(state)[:5]
    assert checkpoint.stat().st_size < 5_000_000  # the 40 MB embedding stays out
    for command in ("validate", "test"):  # evaluation restores the trained weights over the base model
        assert main(fit_args(tmp_path, f"--ckpt_path={checkpoint}", command=command)) == 0
    predictions = tmp_path / "predictions"
    assert main(fit_args(tmp_path, "-c", str(CONFIGS / "predict.yaml"), f"--ckpt_path={checkpoint}",
                         f"--trainer.callbacks.init_args.output_dir={predictions}", command="predict")) == 0
    rows = [json.loads(line) for line in (predictions / "predictions.rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"image", "label", "answer", "correct", "format_valid", "text"} <= set(rows[0])
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(checkpoint), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")  # a second export never mixes with what the folder holds
    assert main(["export", "--ckpt", str(checkpoint), "--out", str(out)]) == 2
    assert f"--out {out} is not empty" in capsys.readouterr().err and (out / "notes.txt").exists()
    assert main(["export", "--ckpt", str(checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    model = AutoModelForImageTextToText.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    base = AutoModelForImageTextToText.from_pretrained(demo_dir / "tiny-qwen2.5-vl")
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, base.state_dict()[name])]
    assert any("layers" in name for name in changed), "the merged LoRA deltas are missing"


def test_a_resumed_fit_logs_on_in_its_folder_says_which_options_changed_and_no_false_warning(fit_args, tmp_path,
                                                                                               caplog):
    common = ["--data.batch_size=1", "--trainer.limit_val_batches=0", "--trainer.val_check_interval=null"]
    assert main(fit_args(tmp_path, *common, "--trainer.max_steps=1")) == 0
    checkpoint = newest_last_checkpoint(tmp_path)
    for name in ("lightning.pytorch", "lightning.fabric"):  # where `rank_zero_info` logs (they do not propagate)
        logging.getLogger(name).addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(fit_args(tmp_path, *common, "--trainer.max_steps=2", "--model.init_args.max_new_tokens=5",
                                 f"--ckpt_path={checkpoint}")) == 0
    finally:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).removeHandler(caplog.handler)
    assert f"resuming {checkpoint} with options that differ from its run's, used as given: max_new_tokens 5 " \
           "(its run: 8)" in caplog.text
    assert not [w for w in caught if "not resumable" in str(w.message)], [str(w.message) for w in caught]
    assert [path.name for path in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")))
    assert [row["step"] for row in rows if row["train/loss"]] == ["0", "1"]


@pytest.mark.parametrize("override, told", [
    ("--model.init_args.optimizer.init_args.lr=0.5", "model.init_args.optimizer.init_args.lr 0.5 (the checkpoint's: 0.0001)"),
    ("--model.init_args.optimizer.class_path=torch.optim.SGD", "model.init_args.optimizer.class_path torch.optim.SGD "
                                                               "(the checkpoint's: torch.optim.adamw.AdamW)"),
])
def test_resuming_with_another_optimizer_setting_is_refused_in_one_line(fit_args, tmp_path, capsys, override, told):
    """Lightning restores the checkpoint's optimizer state over the configured one: a changed learning rate or
    optimizer would be silently ignored, so it is refused, with both ways out."""
    common = ["--data.batch_size=1", "--trainer.limit_val_batches=0", "--trainer.val_check_interval=null"]
    assert main(fit_args(tmp_path, *common, "--trainer.max_steps=1")) == 0
    checkpoint = newest_last_checkpoint(tmp_path)
    capsys.readouterr()
    assert main(fit_args(tmp_path, *common, "--trainer.max_steps=2", override, f"--ckpt_path={checkpoint}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and told in err and "--model.init_args.init_from=CKPT" in err, err
    state = torch.load(checkpoint, weights_only=True)
    assert state["optimizer_classes"] == ["torch.optim.adamw.AdamW"] and len(state["rng_states"]) == 1


@pytest.mark.parametrize("override, message", [
    ("--model.init_args.network.init_args.config.backbone=llama9", "known backbones"),
    ("--model.init_args.network.init_args.config.model_path=/nowhere/model", "tag prepare tiny-model"),
    ("--model.init_args.network.init_args.config.lora.target_modules=[qkv]", "match no linear layer"),
])
def test_bad_configs_fail_before_training_with_what_to_fix(fit_args, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(tmp_path, override))
    assert exit_.value.code != 0
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def _paper_traces(demo_dir, out):
    """The demo faces' template traces in the paper's format, written by `tag prepare traces --trace-format paper`."""
    assert main(["prepare", "traces", "--data", str(demo_dir / "samples" / "manifest.csv"), "--cache",
                 str(demo_dir / "au_cache"), "--out", str(out), "--trace-format", "paper", "--quiet"]) == 0
    return out


def test_fit_refuses_traces_of_another_format_than_the_prompt_asks_for(fit_args, demo_dir, tmp_path, capsys):
    traces = _paper_traces(demo_dir, tmp_path / "paper.jsonl")
    capsys.readouterr()
    assert main(fit_args(tmp_path, f"--data.train_traces={traces}", "--trainer.max_steps=1")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {traces}:1 holds a paper trace, but data.trace_format is per_step: set --data.trace_format=paper, "
        "or rebuild the traces with `tag prepare traces ... --trace-format per_step`")
    assert not list(tmp_path.rglob("*.ckpt"))


# Measured once on 2 busy CPU cores (the tiny configs: lr 3e-3, batch 4; validation every 25 steps):
# greedy format_valid on the four faces 0 at steps 25-100, 0.5 at 125 (box_iou 0.84, acc 0.75), as the
# per-step format (0 at 100, 1.0 at 150: configs/tiny/sft.yaml); at 150: 1.0 (box_iou 0.98, acc 1.0), and
# `tag test` on that checkpoint read all 4 answers as the paper's format. 150 steps took ~45 min on the
# busy machine (estimated ~4 min unloaded, as the demo's SFT); 126-149 were not measured.
PAPER_STEPS = 150


@pytest.mark.slow
def test_sft_on_template_traces_in_the_paper_s_format_learns_to_write_it(fit_args, demo_dir, tmp_path):
    """The acceptance test of the paper's format: the tiny model trained by SFT on template traces in
    TAG's format writes that format on every demo face, as it does ours."""
    paper = [f"--data.train_traces={_paper_traces(demo_dir, tmp_path / 'paper.jsonl')}", "--data.trace_format=paper",
             "-c", str(CONFIGS / "tiny" / "sft.yaml"), "--model.init_args.max_new_tokens=256"]
    assert main(fit_args(tmp_path, *paper, f"--trainer.max_steps={PAPER_STEPS}", "--trainer.limit_val_batches=0")) == 0
    checkpoint = newest_last_checkpoint(tmp_path)
    assert main(fit_args(tmp_path, *paper, f"--ckpt_path={checkpoint}", command="test")) == 0
    (report,) = tmp_path.rglob("metrics.json")
    report = json.loads(report.read_text())
    assert report["figures"]["format_valid"] == 1.0
    assert report["counts"]["answers"] == report["counts"]["paper_format"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_cpu_processes(fit_args, tmp_path, strategy):
    """DDP and FSDP2 (ModelParallelStrategy) on 2 CPU processes with gloo, through the real configs."""
    result = run_python(["-m", "tag_lightning.commands.cli", *fit_args(
        tmp_path, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
        "--trainer.accelerator=cpu", strategy=strategy)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in result.stderr + result.stdout


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_the_weights_of_one(fit_args, tmp_path):
    """One step of FSDP2 with batch 1 on each of 2 processes == one process accumulating 2 batches of 1: the
    same two faces (the sampler shards one permutation), the mean over both faces' answer tokens. SGD at
    lr 1.0, so the step is the gradient itself; weights within 1e-5 (FSDP2 reduce-scatters the gradients,
    summing in another order)."""
    common = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.val_check_interval=null",
              "--trainer.accelerator=cpu", "--data.batch_size=1", "--trainer.callbacks.init_args.every_n_train_steps=1",
              "--model.init_args.optimizer.class_path=torch.optim.SGD", "--model.init_args.optimizer.init_args.lr=1.0"]
    runs = {"one": fit_args(tmp_path / "one", *common, "--trainer.accumulate_grad_batches=2"),
            "two": fit_args(tmp_path / "two", *common, strategy="fsdp2")}
    for name, args in runs.items():
        result = run_python(["-m", "tag_lightning.commands.cli", *args])
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (trained_weights(newest_last_checkpoint(tmp_path / name)) for name in runs)
    assert set(one) == set(two) and any("lora_B" in name and one[name].any() for name in one), "nothing trained"
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), (name, float((one[name] - two[name]).abs().max()))


def test_a_step_s_update_does_not_depend_on_how_its_traces_are_split(fit_args, demo_dir, tmp_path):
    """The four faces' traces (of different lengths) in one batch of 4, or in 4 batches of 1 accumulated: the
    same update, the gradient of the mean over all 4 traces' answer tokens (SGD at lr 1.0: the step is the
    gradient). A mean per micro-batch, averaged, would weigh the short traces' tokens more."""
    lengths = {len(json.loads(line)["trace"]) for line in (demo_dir / "traces.jsonl").read_text().splitlines()}
    assert len(lengths) == 4  # four lengths
    common = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.val_check_interval=null",
              "--trainer.callbacks.init_args.every_n_train_steps=1",
              "--model.init_args.optimizer.class_path=torch.optim.SGD", "--model.init_args.optimizer.init_args.lr=1.0"]
    assert main(fit_args(tmp_path / "whole", *common, "--data.batch_size=4")) == 0
    assert main(fit_args(tmp_path / "split", *common, "--data.batch_size=1", "--trainer.accumulate_grad_batches=4")) == 0
    whole, split = (trained_weights(newest_last_checkpoint(tmp_path / name)) for name in ("whole", "split"))
    assert any(whole[name].any() for name in whole if "lora_B" in name), "nothing trained"
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6, rtol=0), (name, float((whole[name] - split[name]).abs().max()))


def test_export_refuses_a_missing_or_garbage_checkpoint(tmp_path, capsys):
    assert main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["export", "--ckpt", str(garbage), "--out", str(tmp_path / "out")]) == 2
    assert "not a loadable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out, message", [
    (".", "names no folder of its own"), ("..", "names no folder of its own"), ("/", "names no folder of its own"),
    ("victim/sub/..", "names no folder of its own"), ("link", "is a symbolic link"),
    ("../work", "holds the current folder"), ("run", "holds the checkpoint"), ("run/checkpoints", "holds the checkpoint"),
])
def test_export_refuses_an_out_whose_replacement_would_remove_other_files(sft_checkpoint, tmp_path, monkeypatch,
                                                                         capsys, out, message):
    """--overwrite replaces --out: a path without a folder of its own, a link (to the user's `victim` folder)
    or a folder holding the current one or the checkpoint is refused before anything is written or removed."""
    work = tmp_path / "work"
    checkpoint = work / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copyfile(sft_checkpoint, checkpoint)
    (work / "victim" / "sub").mkdir(parents=True)
    (work / "victim" / "keep.txt").write_text("mine")
    (work / "link").symlink_to(work / "victim", target_is_directory=True)
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["export", "--ckpt", str(checkpoint), "--out", out, "--overwrite"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --out {out} {message}"), line
    assert sorted(tmp_path.rglob("*")) == before and (work / "victim" / "keep.txt").read_text() == "mine"


def test_export_of_a_checkpoint_trained_elsewhere_reads_the_model_folder_given(sft_checkpoint, demo_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """The checkpoint records its model folder as given when it was trained (here relative to another
    folder): without it here the export says to give --model-path, which it then reads."""
    from transformers import AutoModelForImageTextToText

    checkpoint = torch.load(sft_checkpoint, weights_only=True)
    checkpoint["vlm_config"]["model_path"] = "models/tiny"
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["export", "--ckpt", str(moved), "--out", "merged"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: the checkpoint's model_path models/tiny is no model folder here: give the folder the checkpoint "
        "was trained from with --model-path DIR")
    assert main(["export", "--ckpt", str(moved), "--out", "merged", "--model-path",
                 str(demo_dir / "tiny-qwen2.5-vl")]) == 0
    AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged", "moved.ckpt"]


def test_a_failed_export_removes_its_partial_folder_and_leaves_out_as_it_was(sft_checkpoint, tmp_path, monkeypatch,
                                                                             capsys):
    from tag_lightning.models.vlm import VLMWrapper

    out = tmp_path / "merged"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier export")

    def full_disk(network, folder):  # as save_pretrained fails on a full disk
        Path(folder).mkdir(exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(VLMWrapper, "export_merged", full_disk)
    assert main(["export", "--ckpt", str(sft_checkpoint), "--out", str(out), "--overwrite"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]
    assert [path.name for path in out.iterdir()] == ["earlier.txt"]


def test_a_value_error_of_a_library_while_building_the_model_is_a_bug(fit_args, tmp_path, monkeypatch, capsys):
    """Only our checks' refusals (`UserError`, a path's `OSError`) are configuration mistakes: a plain
    ValueError raised while the model is built (here by peft) shows its traceback and exits with 1."""
    def broken(*args, **kwargs):
        raise ValueError("peft's own bug")

    monkeypatch.setattr("tag_lightning.models.vlm.get_peft_model", broken)
    assert main(fit_args(tmp_path, "--trainer.max_steps=1")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: peft's own bug" in err and "bad configuration" not in err
    assert not list(tmp_path.rglob("*.ckpt"))
