"""The rollout engine's options through the real `tag` command: `tag test` (greedy, sampled and occlusion
answers) and `tag predict` say the same whatever the engine (sampled answers but for a rare draw at a
near-tie), and GRPO with the GPU configs' engine (static cache, compiled decode step) compiles once and
trains as the eager engine does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import trained_weights

from tag_lightning.commands.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ENGINES = {
    "unmerged": ["--model.init_args.rollout.merge_for_sampling=false"],
    "default": [],
    "compiled": ["--model.init_args.rollout.cache_implementation=static", "--model.init_args.rollout.compile=true",
                 "--model.init_args.rollout.compile_mode=default"],
}


def rows_of(root: Path) -> list[dict]:
    (folder,) = root.rglob("evaluation")
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tag_test_and_predict_answer_alike_with_every_engine(tag_args, sft_checkpoint, demo_dir, tmp_path):
    """Greedy answers and the occlusion test's re-asks token for token; 2 sampled answers per face drawn with
    the same numbers, so all but a rare one token for token.

    The engines add the same numbers in other orders (LoRA merged into the weights, compiled kernels), so
    the logits agree to rounding only. A sampled token is drawn by where the answer's uniform number falls
    among the tokens' cumulative probabilities; the tiny random model spreads its probability over 152k
    tokens, so a number within rounding of a boundary lands on the neighbouring token now and then (CI saw
    one answer of 8 differ from its second token on), and the answer goes its own way from there. Engines
    that drew with other numbers, or from another distribution, would share no answer."""
    options = [f"--model.init_args.init_from={sft_checkpoint}", "--model.init_args.occlusion_test=true",
               "--model.init_args.sampled_answers=2", "--model.init_args.max_new_tokens=12"]
    greedy, sampled = {}, {}
    for name, engine in ENGINES.items():
        assert main(tag_args("grpo", tmp_path / name, *options, *engine, command="test")) == 0
        rows = rows_of(tmp_path / name)
        greedy[name] = [(row["text"], row["occlusion"]) for row in rows]
        sampled[name] = [sample["text"] for row in rows for sample in row["samples"]]
    assert greedy["unmerged"] == greedy["default"] == greedy["compiled"]
    assert len(greedy["default"]) == 4 and len(set(sampled["unmerged"])) == 8  # no two draws alike by chance
    for name in ("default", "compiled"):
        alike = sum(ours == theirs for ours, theirs in zip(sampled["unmerged"], sampled[name]))
        assert alike >= 6, (name, sampled["unmerged"], sampled[name])

    predicted = {}
    for name in ("unmerged", "compiled"):
        out = tmp_path / f"predict-{name}"
        assert main(tag_args("sft", tmp_path / name, "-c", str(CONFIGS / "predict.yaml"), f"--ckpt_path={sft_checkpoint}",
                             f"--data.predict_data={demo_dir / 'samples'}", f"--trainer.callbacks.init_args.output_dir={out}",
                             *ENGINES[name], command="predict")) == 0
        predicted[name] = {path.name: json.loads(path.read_text()).get("text") for path in (out / "images").glob("*.json")}
    assert predicted["unmerged"] == predicted["compiled"] and any(predicted["compiled"].values())


@pytest.mark.slow
def test_grpo_with_the_compiled_engine_compiles_once_and_trains_as_the_eager_one(grpo_args, tmp_path, length_reward):
    """3 steps with a static cache and a compiled decode step: the graphs are built in the first step's rollout and
    none after (train/rollout/compiled_graphs stays put); its first step's weights equal, within 1e-6, those of
    a step whose rollouts the eager engine with unmerged LoRA generated (the same tokens)."""
    common = ['--model.init_args.rewards={"length": 1.0}', "--trainer.log_every_n_steps=1"]
    assert main(grpo_args(tmp_path / "compiled", *common, "--trainer.max_steps=3", *ENGINES["compiled"])) == 0
    logged = [row for row in csv.DictReader(open(next((tmp_path / "compiled").rglob("metrics.csv"))))
              if row.get("train/rollout/compiled_graphs")]
    graphs = [float(row["train/rollout/compiled_graphs"]) for row in logged]
    assert len(graphs) == 3 and graphs[0] >= 1 and graphs == [graphs[0]] * 3, graphs
    assert all(float(row["train/rollout/tokens_per_second"]) > 0 for row in logged)
    assert float(logged[-1]["train/rollout/warmup_seconds"]) > 0

    assert main(grpo_args(tmp_path / "eager", *common, "--trainer.max_steps=1", *ENGINES["unmerged"])) == 0
    first_step = next((tmp_path / "compiled").rglob("*step=1.ckpt"))
    compiled, eager = trained_weights(first_step), trained_weights(next((tmp_path / "eager").rglob("last.ckpt")))
    assert set(compiled) == set(eager)
    for name in eager:
        assert torch.allclose(compiled[name], eager[name], atol=1e-6, rtol=0), name
    loss = {name: [row["train/loss"] for row in csv.DictReader(open(next((tmp_path / name).rglob("metrics.csv"))))
                   if row.get("train/loss")][0] for name in ("compiled", "eager")}
    assert float(loss["compiled"]) == pytest.approx(float(loss["eager"]), abs=1e-6)
