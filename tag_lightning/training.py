"""Training entry points: LightningCLI for `tag fit|validate|test|predict`, and checkpoint export.

The model is chosen by `class_path` in the YAML (the SFT module now, GRPO next); the data is
always the `FERDataModule`. Configs compose: ``tag fit -c configs/sft.yaml -c configs/data/samples.yaml
-c configs/strategy/ddp.yaml``.

A mistake in the configuration or the command line ends in one line that leads with the key it
concerns, before anything is built; the `tag` command (`cli.main`) turns the errors raised
later (a bad file met while training) into one line too.
"""

from __future__ import annotations

import os
import re
import shlex
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from tag_lightning.callbacks import StepProgressBar
from tag_lightning.data.datamodule import FERDataModule
from tag_lightning.errors import UserError, describe
from tag_lightning.models.checkpoints import network_weights, read_checkpoint, saved_vlm_config
from tag_lightning.models.vlm import VLMWrapper
from tag_lightning.quiet import quiet_library_noise

# `ckpt_path` values Lightning resolves itself rather than reading a file.
_LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")


def config_error_line(message: str) -> str:
    """jsonargparse's report cut to its first real problem, led by the key it concerns.

    A bad value under a union type (every model init arg) comes as a nested report of each
    subtype tried, with the value's repr; only the innermost message names the mistake.
    """
    keys, problem = [], None
    for line in (raw.strip().removeprefix("- ") for raw in message.splitlines()):
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if key:
            keys.append(key.group(1))
            line = key.group(2)
        if line and not _REPORT_SCAFFOLD.match(line):
            problem = line
            break
    problem = _EXPECTED_LITERAL.sub(r"expected one of \1, got '\2'", problem or message.strip())
    problem = _EXPECTED_TYPE.sub(r"expected \1, got '\2'", problem)
    return f"{'.'.join(keys)}: {problem}" if keys else problem


_REPORT_SCAFFOLD = re.compile(r"Does not validate against any of the Union subtypes|Subtypes: |Errors:$|Given value|"
                              r"Problem with given class_path|Expected a <class 'NoneType'>")
_EXPECTED_LITERAL = re.compile(r"Expected an? typing\.Literal\[(.*)\]\. Got value: (.*)")
_EXPECTED_TYPE = re.compile(r"Expected an? <class '(?:[\w.]+\.)?(\w+)'>\. Got value: (.*)")


class TagArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, its complaints in one line (like `tag prepare`'s)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse tries alternatives with such parsers and catches their errors
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        self.exit(2, f"error: {prog}: {config_error_line(message)} (see `{prog} --help`)\n")


class TagCLI(LightningCLI):
    """LightningCLI whose configuration mistakes end in one clear line, before any training starts.

    `tag predict` answers with a trained checkpoint (``--ckpt_path``); answering with the base
    model is a zero-shot baseline that must be asked for (``--zero_shot true``).

    Where the configuration leaves them to Lightning, the trainer gets `StepProgressBar` and
    `default_loggers` (TensorBoard and CSV in one run folder); a user's own choice stands.
    """

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument("--zero_shot", type=bool, default=False,
                                help="answer with the base model, no checkpoint: a deliberate zero-shot baseline")
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        self._check_checkpoint_choice()  # before Lightning reads the checkpoint's hyperparameters

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:  # raised by our configs' checks (VLMConfig, datamodule)
            self.parser.error(f"bad configuration: {config_error_line(str(err))}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with our logger and progress bar where the configuration chose none."""
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            kwargs.setdefault("logger", default_loggers(config.get("default_root_dir") or os.getcwd()))
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, StepProgressBar()])
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Say where this run's logs go, and how to see its curves."""
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                view = f"tensorboard --logdir {shlex.quote(logger.save_dir)}"
                rank_zero_info(f"logs: {logger.log_dir} | curves: {view}")
                break

    def _check_checkpoint_choice(self) -> None:
        """A checkpoint that cannot load, or a prediction without one, fails before the model is built."""
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in _LIGHTNING_CHECKPOINT_NAMES:
            try:
                read_checkpoint(ckpt_path, mmap=True)
            except (OSError, ValueError) as err:
                raise UserError(f"--ckpt_path {describe(err)}") from None
        if subcommand == "predict" and not ckpt_path and not config.zero_shot:
            raise UserError("tag predict without --ckpt_path would answer with the untrained base model: give "
                            "--ckpt_path CKPT, or --zero_shot true for a deliberate zero-shot baseline")
        if subcommand == "predict" and ckpt_path and config.zero_shot:
            raise UserError("--zero_shot true answers with the base model: drop it, or drop --ckpt_path")


def lightning_main(argv: list[str]) -> int:
    """Run LightningCLI on `argv` (its first word is the subcommand), without the libraries' noise
    (`quiet.py`) while it runs."""
    with warnings.catch_warnings():
        quiet_library_noise(argv[0])
        try:
            _run(argv)
        except MisconfigurationException as err:  # Lightning's word for a setting that cannot work here
            raise UserError(str(err)) from None
    return 0


def _run(argv: list[str]) -> None:
    TagCLI(
        LightningModule,
        FERDataModule,
        subclass_mode_model=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_class=TagArgumentParser,
        parser_kwargs={"prog": "tag", "description": "Train and evaluate TAG models (LightningCLI)."},
    )


def default_loggers(root: str) -> list[Logger]:
    """CSV (for the code that reads ``metrics.csv``) and TensorBoard (for the curves), in one run folder:
    ``root/lightning_logs/version_N``, which is ``trainer.log_dir``.

    The version is chosen once, for both: each would pick the next free one when it first writes, and
    the second would find the first's folder. Under SLURM it is the job id, as for Lightning's default
    logger. CSV first: Lightning starts loggers in order, and CSV's warns about a folder with files in it.
    """
    csv = CSVLogger(root, version=SLURMEnvironment.job_id())
    return [csv, TensorBoardLogger(root, version=csv.version)]


def load_network(checkpoint_path: str | Path) -> VLMWrapper:
    """The network of a training checkpoint: its VLM config rebuilt, its trained weights loaded."""
    checkpoint = read_checkpoint(checkpoint_path)
    network = VLMWrapper(saved_vlm_config(checkpoint))
    network.load_trainable_state_dict(network_weights(checkpoint))
    return network


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write a merged Hugging Face folder (weights with LoRA merged, processor files) from a checkpoint."""
    return load_network(checkpoint_path).export_merged(out_dir)
