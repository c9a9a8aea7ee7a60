"""Training entry points: LightningCLI for `tag fit|validate|test|predict`, and checkpoint export.

The model is chosen by `class_path` in the YAML (the SFT module now, GRPO next); the data is
always the `FERDataModule`. Configs compose: ``tag fit -c configs/sft.yaml -c configs/data/samples.yaml
-c configs/strategy/ddp.yaml``.

A mistake in the configuration or the command line ends in one line that leads with the key it
concerns, before anything is built; the `tag` command (`cli.main`) turns the errors raised
later (a bad file met while training) into one line too.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import shlex
import shutil
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from tag_lightning.commands.allocator import keep_freed_memory
from tag_lightning.commands.callbacks import StepProgressBar
from tag_lightning.commands.quiet import quiet_library_noise
from tag_lightning.data.datamodule import FERDataModule, checkpoint_labels
from tag_lightning.errors import UserError, describe
from tag_lightning.models.checkpoints import network_weights, read_checkpoint, saved_vlm_config
from tag_lightning.models.vlm import VLMWrapper

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

    def add_instantiator(self, instantiator: Callable, class_type: type, subclasses: bool = True,
                         prepend: bool = False) -> None:
        """Every class is built carrying our refusals out of jsonargparse (`_Refusal`)."""
        super().add_instantiator(_carrying_refusals(instantiator), class_type, subclasses, prepend)


class _Refusal(BaseException):
    """A refusal of our checks (`UserError`, a path's `OSError`) raised while a class is built, carried
    out of jsonargparse: it turns any `Exception` under an optional type (the model is one) into a plain
    `ValueError`, which no longer tells a user's mistake from a bug."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _carrying_refusals(instantiate: Callable) -> Callable:
    """The jsonargparse instantiator `instantiate`, its refusals raised as `_Refusal`."""

    @functools.wraps(instantiate)  # its signature too: jsonargparse passes the arguments it names
    def build(class_type: type, *args: Any, **kwargs: Any) -> Any:
        try:
            return instantiate(class_type, *args, **kwargs)
        except (UserError, OSError) as err:
            raise _Refusal(err) from err

    return build


def _instantiate(class_type: type, *args: Any, **kwargs: Any) -> Any:
    """jsonargparse's own instantiator."""
    return class_type(*args, **kwargs)


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
        self._check_checkpoint_choice()  # before anything reads the checkpoint
        self._ask_what_the_checkpoint_was_asked()

    def _parse_ckpt_path(self) -> None:
        """The options given win over the hyperparameters saved in ``--ckpt_path`` (LightningCLI would
        replace the former with the latter, silently dropping e.g. ``--model.init_args.occlusion_test``).

        The model's structure is still checked: the checkpoint's weights load only into the set-up
        they were trained with (`VLMModule.on_load_checkpoint`). In evaluation the checkpoint's weights
        replace whatever ``init_from`` would load, so it is not loaded. A resumed fit names each option
        that differs from the checkpoint's run, and goes on with the one given.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in _LIGHTNING_CHECKPOINT_NAMES:
            return
        init_args = self.config[subcommand]["model"].get("init_args") or {}
        if subcommand != "fit":
            if init_args.get("init_from"):
                init_args["init_from"] = None
            return
        checkpoint = read_checkpoint(ckpt_path, mmap=True)
        saved = checkpoint.get("hyper_parameters") or {}
        given = _plain(init_args)
        overridden = restored_state_overrides(checkpoint, given)
        if overridden:
            raise UserError(f"resuming {ckpt_path} restores its optimizer and scheduler as they were, so "
                            f"{'; '.join(overridden)} would not take effect: drop the option to resume, or start a "
                            "new run from its weights with --model.init_args.init_from=CKPT (without --ckpt_path), "
                            "whose optimizer starts afresh")
        changed = [f"{name} {given[name]!r} (its run: {value!r})" for name, value in saved.items()
                   if not name.startswith("_") and name in given and _plain(value) != given[name]]
        if changed:
            rank_zero_info(f"resuming {ckpt_path} with options that differ from its run's, used as given: "
                           f"{'; '.join(changed)}")

    def _add_instantiators(self) -> None:
        """Lightning's instantiators (the model's, the data's), and jsonargparse's own for every other class
        (the network, its config, ...): each carries our refusals out (`TagArgumentParser.add_instantiator`)."""
        super()._add_instantiators()
        self.parser.add_instantiator(_instantiate, object)

    def instantiate_classes(self) -> None:
        """Build the model and data: what our checks refuse becomes one line; anything else (a plain
        `ValueError` of transformers or peft too) is a bug, and shows its traceback."""
        try:
            super().instantiate_classes()
        except _Refusal as refusal:
            self.parser.error(f"bad configuration: {describe(refusal.error)}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with our logger and progress bar where the configuration chose none."""
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or os.getcwd()
            kwargs.setdefault("logger", default_loggers(root, self._resumed_run_version(root)))
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

    def _resumed_run_version(self, root: str) -> str | None:
        """The log folder's name of the run a fit resumes, when its checkpoint records one under `root`
        (`VLMModule.on_save_checkpoint`): the resumed run logs on in it, not in a new ``version_N``."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand == "fit" else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return None
        log_dir = read_checkpoint(ckpt_path, mmap=True).get("log_dir")
        if log_dir is None or Path(log_dir).parent.resolve() != (Path(root) / "lightning_logs").resolve():
            return None
        return Path(log_dir).name

    def _ask_what_the_checkpoint_was_asked(self) -> None:
        """Without ``--data.labels``, a manifest or folder is asked the question the weights were trained on:
        the label set recorded in the checkpoint the run evaluates, resumes or starts from (``init_from``)."""
        subcommand = self.config.get("subcommand")
        if subcommand is None or self.config[subcommand].get("data", {}).get("labels") is not None:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        source = ckpt_path if ckpt_path and ckpt_path not in _LIGHTNING_CHECKPOINT_NAMES else \
            (config.model.get("init_args") or {}).get("init_from")
        if source and Path(source).is_file():
            try:
                config["data"]["labels"] = checkpoint_labels(read_checkpoint(source, mmap=True))
            except ValueError:  # not a tag_lightning checkpoint: refused where it is loaded, with what to do
                return

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
        if subcommand != "predict":
            return
        init_from = (config.model.get("init_args") or {}).get("init_from")
        if config.zero_shot and init_from:
            raise UserError(f"--zero_shot true answers with the bare model, but model.init_args.init_from loads "
                            f"{init_from} (a config sets it): add --model.init_args.init_from=null for the bare "
                            "model, or drop --zero_shot to answer with those weights")
        if not ckpt_path and not init_from and not config.zero_shot:
            raise UserError("tag predict without --ckpt_path would answer with the untrained base model: give "
                            "--ckpt_path CKPT, or --zero_shot true for a deliberate zero-shot baseline")
        if ckpt_path and config.zero_shot:
            raise UserError("--zero_shot true answers with the base model: drop it, or drop --ckpt_path")


def lightning_main(argv: list[str]) -> int:
    """Run LightningCLI on `argv` (its first word is the subcommand), without the libraries' noise
    (`quiet.py`) while it runs."""
    keep_freed_memory()
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


def default_loggers(root: str, version: str | None = None) -> list[Logger]:
    """CSV (for the code that reads ``metrics.csv``) and TensorBoard (for the curves), in one run folder:
    ``root/lightning_logs/version_N``, which is ``trainer.log_dir``; `version` names the folder of a
    resumed run, whose ``metrics.csv`` is then continued.

    The version is chosen once, for both: each would pick the next free one when it first writes, and
    the second would find the first's folder. Under SLURM it is the job id, as for Lightning's default
    logger. CSV first: Lightning starts loggers in order, and CSV's warns about a folder with files in it.
    """
    table = ContinuedCSVLogger(root, version=version if version is not None else SLURMEnvironment.job_id())
    return [table, TensorBoardLogger(root, version=table.version)]


class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSV logger, except that a ``metrics.csv`` already in the run folder (a resumed run's)
    is continued: Lightning's deletes it, with a warning."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Read the existing file's columns, so that new rows are appended under them."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])


def restored_state_overrides(checkpoint: dict, given: dict) -> list[str]:
    """The optimizer and scheduler options given for a resumed fit that the checkpoint's restored states would
    silently override, as ``model.init_args.optimizer.init_args.lr 0.5 (the checkpoint's: 1e-05)``.

    Lightning restores the optimizer's state, its parameter groups' hyperparameters included, and the
    scheduler's state over whatever the configuration built.
    """
    overridden = []
    optimizer = given.get("optimizer") or {}
    saved_classes = checkpoint.get("optimizer_classes") or []
    class_path = optimizer.get("class_path") if isinstance(optimizer, dict) else None
    if class_path and saved_classes and class_path.rsplit(".", 1)[-1] != saved_classes[0].rsplit(".", 1)[-1]:
        overridden.append(f"model.init_args.optimizer.class_path {class_path} (the checkpoint's: {saved_classes[0]})")
    groups = (checkpoint.get("optimizer_states") or [{}])[0].get("param_groups") or [{}]
    restored = {**groups[0], "lr": groups[0].get("initial_lr", groups[0].get("lr"))}  # a scheduler moves "lr"
    schedulers = checkpoint.get("lr_schedulers") or [{}]
    for part, state in (("optimizer", restored), ("scheduler", schedulers[0])):
        options = given.get(part) or {}
        for name, value in ((options.get("init_args") or {}) if isinstance(options, dict) else {}).items():
            if name in state and _comparable(value) != _comparable(state[name]):
                overridden.append(f"model.init_args.{part}.init_args.{name} {value!r} (the checkpoint's: "
                                  f"{state[name]!r})")
    return overridden


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _plain(value: Any) -> Any:
    """A parsed option as plain data (jsonargparse's namespaces as dicts), to compare with saved ones."""
    return value.as_dict() if hasattr(value, "as_dict") else value


def load_network(checkpoint_path: str | Path, model_path: str | Path | None = None) -> VLMWrapper:
    """The network of a training checkpoint: its VLM config rebuilt, its trained weights loaded.

    The base model is read from `model_path` where given, else from the folder the checkpoint was
    trained from (``vlm_config.model_path``), which may be relative to another machine's folders.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    config = saved_vlm_config(checkpoint)
    if model_path is not None:
        config = replace(config, model_path=str(model_path))
    given = "--model-path" if model_path is not None else "the checkpoint's model_path"
    fix = "give the folder the checkpoint was trained from with --model-path DIR"
    try:
        network = VLMWrapper(config)
    except FileNotFoundError:  # no model folder there (`vlm._model_source`)
        raise UserError(f"{given} {config.model_path} is no model folder here: {fix}") from None
    try:
        network.load_trainable_state_dict(network_weights(checkpoint))
    except (ValueError, RuntimeError):  # another model's layers: other names (ours), other sizes (torch's)
        raise UserError(f"the checkpoint's weights do not fit the model in {config.model_path} ({given}): "
                        f"{fix}") from None
    return network


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, overwrite: bool = False,
                      model_path: str | Path | None = None) -> Path:
    """Write a merged Hugging Face folder (weights with LoRA merged, processor files) from a checkpoint.

    A folder that holds anything is refused unless `overwrite`: files of an earlier export (or of
    anything else) would mix with the new ones. The export is written into a new folder beside
    `out_dir` first (``OUT.partial``), which replaces `out_dir` only once complete and is removed
    if anything fails: nothing outside `out_dir` is ever removed. `model_path`: see `load_network`.
    """
    out = _export_folder(out_dir, checkpoint_path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty (an earlier export?): give an empty or new folder, or --overwrite "
                        "to replace what it holds")
    network = load_network(checkpoint_path, model_path)
    partial = out.with_name(f"{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.mkdir()
    except FileExistsError:
        raise UserError(f"{partial} exists (left by an export that was killed?): remove it, then export "
                        "again") from None
    try:
        network.export_merged(partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _export_folder(out_dir: str | Path, checkpoint_path: str | Path) -> Path:
    """`out_dir` as a folder an export may replace, or a clear error: never a symbolic link (replacing
    it would not replace what it points to), nor a path without a name of its own (``.``, ``..``, ``/``,
    ``a/..``), nor a folder that holds the current folder or the checkpoint."""
    out = Path(out_dir)
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link: give the folder itself, or a new one")
    if out.name in ("", ".."):
        raise UserError(f"--out {out} names no folder of its own: give a new folder's path, e.g. merged/")
    target = out.resolve()
    for held, what in ((Path.cwd(), "the current folder"), (Path(checkpoint_path).resolve(), "the checkpoint")):
        if target == held or target in held.parents:
            raise UserError(f"--out {out} holds {what}, which the export would replace: give a new folder's "
                            "path, e.g. merged/")
    return out
