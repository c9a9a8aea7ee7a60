"""Training entry points: LightningCLI for `tag fit|validate|test|predict`, and checkpoint export.

The model is chosen by `class_path` in the YAML (the SFT module now, GRPO next); the data is
always the `FERDataModule`. Configs compose: ``tag fit -c configs/sft.yaml -c configs/data/samples.yaml
-c configs/strategy/ddp.yaml``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from tag_lightning.data.datamodule import FERDataModule
from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper


class TagCLI(LightningCLI):
    """LightningCLI whose configuration mistakes end in one clear line, before any training starts."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:  # raised by our configs' checks (VLMConfig, datamodule)
            self.parser.error(f"bad configuration: {err}")


def lightning_main(argv: list[str]) -> int:
    """Run LightningCLI on `argv` (its first word is the subcommand).

    `argv` is not always the process's command line (`tag demo` runs a fit too), which
    LightningCLI warns about; here that is intended.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        _run(argv)
    return 0


def _run(argv: list[str]) -> None:
    TagCLI(
        LightningModule,
        FERDataModule,
        subclass_mode_model=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "tag", "description": "Train and evaluate TAG models (LightningCLI)."},
    )


def load_network(checkpoint_path: str | Path) -> VLMWrapper:
    """The network of a training checkpoint: its VLM config rebuilt, its trained weights loaded."""
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a checkpoint is data: anything unloadable is the user's file
        raise ValueError(f"{checkpoint_path}: not a loadable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or "vlm_config" not in checkpoint:
        raise ValueError(f"{checkpoint_path} is not a tag_lightning training checkpoint (it has no vlm_config)")
    fields = dict(checkpoint["vlm_config"])
    if fields.get("lora"):
        fields["lora"] = LoRAConfig(**{**fields["lora"], "target_modules": tuple(fields["lora"]["target_modules"])})
    network = VLMWrapper(VLMConfig(**fields))
    prefix = "network.model."
    network.load_trainable_state_dict(
        {name[len(prefix):]: value for name, value in checkpoint["state_dict"].items() if name.startswith(prefix)}
    )
    return network


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write a merged Hugging Face folder (weights with LoRA merged, processor files) from a checkpoint."""
    return load_network(checkpoint_path).export_merged(out_dir)
