"""How the model tests drive the real `tag` command: the repository's configs pointed at a prepared demo folder."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def tag_args(demo_dir):
    """A function: `tag <command> -c configs/<config>.yaml -c configs/data/samples.yaml [-c strategy] ...`
    aimed at the session's demo folder, its outputs under `root`."""

    def build(config: str, root: Path, *extra: str, strategy: str | None = None, command: str = "fit") -> list[str]:
        args = [command, "-c", str(CONFIGS / f"{config}.yaml"), "-c", str(CONFIGS / "data" / "samples.yaml")]
        if strategy:
            args += ["-c", str(CONFIGS / "strategy" / f"{strategy}.yaml")]
        manifest = f"manifest:{demo_dir / 'samples' / 'manifest.csv'}"
        return args + [
            f"--model.init_args.network.init_args.config.model_path={demo_dir / 'tiny-qwen2.5-vl'}",
            f"--data.au_cache={demo_dir / 'au_cache'}",
            f"--data.train_data={manifest}", f"--data.val_data={manifest}", f"--data.test_data={manifest}",
            f"--data.train_traces={demo_dir / 'traces.jsonl'}",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.max_new_tokens=8",
            *extra,
        ]

    return build


@pytest.fixture(scope="session")
def sft_checkpoint(tag_args, tmp_path_factory) -> Path:
    """A 2-step SFT checkpoint of the tiny model (LoRA r=8 as configs/sft.yaml): GRPO's and evaluation's start."""
    from helpers import newest_last_checkpoint

    from tag_lightning.commands.cli import main

    root = tmp_path_factory.mktemp("sft")
    assert main(tag_args("sft", root, "--trainer.max_steps=2", "--trainer.limit_val_batches=0")) == 0
    return newest_last_checkpoint(root)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny random model folder of every registered backbone, by name."""
    from tag_lightning.models.backbones import BACKBONES
    from tag_lightning.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_model(root / name, backbone=name) for name in BACKBONES}


@pytest.fixture
def length_reward(monkeypatch):
    """The tests' completion-length reward registered as ``length`` (the TAG rewards are 0 on the tiny model's text)."""
    from helpers import completion_length

    from tag_lightning.grounding.rewards import REWARDS

    monkeypatch.setitem(REWARDS, "length", completion_length)


@pytest.fixture
def grpo_args(tag_args, sft_checkpoint):
    """`tag fit -c configs/grpo.yaml -c configs/data/samples.yaml` from the SFT checkpoint, small and quick."""
    def build(root, *extra, **options):
        return tag_args("grpo", root, f"--model.init_args.init_from={sft_checkpoint}",
                        "--model.init_args.max_completion_length=12", "--trainer.limit_val_batches=0",
                        "--trainer.val_check_interval=null", "--trainer.callbacks.init_args.every_n_train_steps=1",
                        *extra, **options)
    return build
