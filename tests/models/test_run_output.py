"""What every `tag` Lightning run shows and leaves: progress in optimizer steps, no library noise, and
its logs (TensorBoard events and metrics.csv) in one run folder."""

from __future__ import annotations

import csv
import warnings

import pytest
from helpers import run_python
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from tag_lightning.commands.callbacks import StepProgressBar
from tag_lightning.commands.quiet import quiet_library_noise
from tag_lightning.commands.training import ContinuedCSVLogger, TagCLI
from tag_lightning.data.datamodule import FERDataModule

# What the libraries printed on every run: tag_lightning/commands/quiet.py hides (and says why) all but tensorboardX's tip
# and the CSV logger's "not empty" warning, which `training.default_loggers` leaves no cause for.
NOISE = ["is_gradient_checkpointing", "LeafSpec", "Tip:", "tensorboardX", "LightningCLI's args parameter",
         "Using ModelCheckpoint with manual optimization", "Experiment logs directory"]


class TwoOptimizerStepsABatch(BoringModel):
    """Manual optimization with two optimizer steps per batch, as GRPO's with ``num_iterations=2``."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for _ in range(2):
            optimizer.zero_grad()
            self.manual_backward(self.step(batch))
            optimizer.step()


def train_bar_after_fit(model: LightningModule, tmp_path, **limits):
    """The training bar of `StepProgressBar` after a fit of 2 batches an epoch."""
    progress = StepProgressBar()
    trainer = Trainer(accelerator="cpu", limit_train_batches=2, limit_val_batches=0, callbacks=[progress],
                      logger=False, enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                      **limits)
    trainer.fit(model)
    return progress.train_progress_bar


@pytest.mark.parametrize("model, max_steps", [(BoringModel, 5), (TwoOptimizerStepsABatch, 6)])
def test_the_bar_counts_optimizer_steps_to_max_steps_across_epochs(model, max_steps, tmp_path):
    bar = train_bar_after_fit(model(), tmp_path, max_steps=max_steps)  # epochs of 2 batches: a bar each would end at 2
    assert (bar.total, bar.n, bar.desc) == (max_steps, max_steps, f"step {max_steps}/{max_steps}: ")


def test_without_max_steps_the_bar_is_lightnings_an_epoch_at_a_time(tmp_path):
    bar = train_bar_after_fit(BoringModel(), tmp_path, max_epochs=3)
    assert (bar.total, bar.n, bar.desc) == (2, 2, "Epoch 2: ")


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # the test's own arguments, not pytest's
@pytest.mark.parametrize("extra, bar, loggers", [
    ([], StepProgressBar, [ContinuedCSVLogger, TensorBoardLogger]),
    (["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar", "--trainer.logger=false"],
     TQDMProgressBar, []),
    (["--trainer.enable_progress_bar=false",
      '--trainer.logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "csv"}}'],
     type(None), [CSVLogger]),
])
def test_the_step_bar_and_both_loggers_are_defaults_a_users_choice_replaces(tag_args, tmp_path, extra, bar, loggers):
    args = tag_args("sft", tmp_path, "--trainer.enable_progress_bar=true", *extra)[1:]  # no subcommand: run=False
    trainer = TagCLI(LightningModule, FERDataModule, subclass_mode_model=True, args=args, run=False).trainer
    assert type(trainer.progress_bar_callback) is bar
    assert [type(logger) for logger in trainer.loggers] == loggers
    assert len({logger.log_dir for logger in trainer.loggers}) <= 1
    assert any(isinstance(callback, ModelCheckpoint) for callback in trainer.callbacks)  # configs/sft.yaml's


def test_a_fit_shows_its_steps_and_its_own_lines_without_library_noise_and_logs_into_one_folder(tag_args, tmp_path):
    """A real `tag` process (the warnings as a user sees them): 3 steps of 2 batches an epoch."""
    args = tag_args("sft", tmp_path, "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                    "--trainer.enable_progress_bar=true")
    result = run_python(["-m", "tag_lightning.commands.cli", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [noise for noise in NOISE if noise in result.stdout + result.stderr] == [], result.stderr
    run = tmp_path / "lightning_logs" / "version_0"
    for line in ("FERDataModule train: kept 4 of 7 samples", f"logs: {run} | curves: tensorboard --logdir {tmp_path}",
                 "`Trainer.fit` stopped: `max_steps=3` reached."):
        assert line in result.stderr
    assert "step 3/3: 100%" in result.stdout and "| 3/3 [" in result.stdout and "Epoch" not in result.stdout
    assert [path.name for path in run.parent.iterdir()] == ["version_0"]
    assert list(run.glob("events.out.tfevents.*")) and (run / "checkpoints" / "last.ckpt").is_file()
    assert [row["step"] for row in csv.DictReader(open(run / "metrics.csv")) if row["train/loss"]] == ["0", "1", "2"]


@pytest.mark.parametrize("command, message, module, shown", [
    ("fit", "`is_gradient_checkpointing` is deprecated", "transformers.modeling_utils", False),
    ("fit", "`is_gradient_checkpointing` is deprecated", "tag_lightning.models.vlm", True),  # not the library's
    ("fit", "Experiment logs directory runs/version_0 exists and is not empty", "lightning.fabric.loggers.csv_logs",
     True),
    ("fit", "The dirpath has changed from 'a' to 'b'", "lightning.pytorch.callbacks.model_checkpoint", True),  # resumed
    ("test", "The dirpath has changed from 'a' to 'b'", "lightning.pytorch.callbacks.model_checkpoint", False),
])
def test_only_the_known_library_notices_are_hidden(command, message, module, shown):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise(command)
        warnings.warn_explicit(message, FutureWarning if "deprecated" in message else UserWarning, "library.py", 1,
                               module=module)
    assert bool(caught) == shown
