"""The 3B GPU recipe's precision on CPU: its trainer settings run, and its trained weights move.

`configs/qwen2_5_vl_3b/*` load the frozen base in bfloat16 and train with `bf16-mixed`: the trained
weights stay float32 (the wrapper keeps them so) while the compute is bfloat16. Each test composes
those files through the real `tag fit`, pointed at the tiny model and CPU, for a few optimizer steps
at the configs' learning rates (SFT 1e-4, GRPO 1e-6), and compares with the same run in float32:
every trained tensor must move by at least half as much. Trained weights in bfloat16 (the old
`bf16-true`) round such updates away; that setting is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REPO, completion_length, trained_weights

from tag_lightning.commands.cli import main
from tag_lightning.grounding.rewards import REWARDS

RECIPE_CONFIGS = REPO / "configs" / "qwen2_5_vl_3b"
RECIPE = {"sft": "gpu.yaml", "grpo": "gpu_grpo.yaml"}
STEPS = 2  # lora_A moves from the second step on (B starts at 0)
FLOAT32 = ["--trainer.precision=32-true", "--model.init_args.network.init_args.config.dtype=float32"]


@pytest.fixture
def recipe_args(tag_args, demo_dir, monkeypatch):
    """`tag fit -c configs/<stage>.yaml -c configs/data/samples.yaml -c configs/qwen2_5_vl_3b/model_lora.yaml
    -c configs/qwen2_5_vl_3b/<gpu config>` on the tiny model and CPU, a checkpoint every step."""
    monkeypatch.setitem(REWARDS, "length", completion_length)  # the TAG rewards are 0 on the tiny model's text

    def build(stage: str, root, *extra: str) -> list[str]:
        args = tag_args(stage, root, "--trainer.accelerator=cpu", "--trainer.devices=1",
                        f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0",
                        "--trainer.callbacks.init_args.every_n_train_steps=1", *extra)
        if stage == "grpo":
            args += ["--model.init_args.init_from=null", '--model.init_args.rewards={"length": 1.0}',
                     "--model.init_args.max_completion_length=8"]
        # the recipe's files go right after the stage and data configs, before the tiny-model overrides
        return args[:5] + ["-c", str(RECIPE_CONFIGS / "model_lora.yaml"), "-c", str(RECIPE_CONFIGS / RECIPE[stage])] + args[5:]

    return build


def moved(root) -> dict[str, float]:
    """How far each trained tensor moved from the first optimizer step's checkpoint to the last's (L2 norm)."""
    by_step = {torch.load(path, weights_only=True)["global_step"]: path for path in root.rglob("*step=*.ckpt")}
    first, last = trained_weights(by_step[1]), trained_weights(by_step[STEPS])
    return {name: float((last[name].float() - first[name].float()).norm()) for name in first}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_the_gpu_recipe_moves_every_trained_tensor_as_float32_does(recipe_args, tmp_path, stage):
    assert main(recipe_args(stage, tmp_path / "recipe")) == 0  # the recipe's own precision (bf16-mixed)
    assert main(recipe_args(stage, tmp_path / "float32", *FLOAT32)) == 0
    recipe, reference = moved(tmp_path / "recipe"), moved(tmp_path / "float32")
    assert set(recipe) == set(reference) and any("lora_A" in name for name in recipe)
    assert any("merger" in name for name in recipe)  # the projector trains too
    for name, distance in reference.items():
        assert distance > 0, f"{name} did not move in float32"
        assert recipe[name] >= 0.5 * distance, (name, recipe[name], distance)


def test_bf16_true_is_refused_in_one_line(recipe_args, tmp_path, capsys):
    assert main(recipe_args("sft", tmp_path, "--trainer.precision=bf16-true")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: trainer.precision bf16-true puts the trained weights in bfloat16"), error
    assert "use precision bf16-mixed" in error
    assert not list(tmp_path.rglob("*.ckpt"))
