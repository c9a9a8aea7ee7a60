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
