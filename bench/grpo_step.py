"""Benchmark a GRPO step of `GRPOModule` against TRL 1.16's `GRPOTrainer` on the same work.

    pip install -e ".[bench]"      # TRL 1.16 is the baseline
    python bench/grpo_step.py [--steps 6] [--warmup 2] [--repeats 3]

Both train the same tiny random Qwen2.5-VL (the demo's, LoRA r=8 on the language model, vision
frozen, float32) on the same two sample photos per step (224 px, the datamodule's ``rl`` items,
no augmentation) with the same prompt, G=4 completions of 64 new tokens each (sampled at
temperature 1, no end of sequence is likely from a random model, so every completion is 64
tokens), the same TAG rewards (format, answer, grounding), beta=0, loss_type ``dapo``, AdamW at
the same learning rate and no gradient clipping difference (max_grad_norm 1.0 on both).

Each (trainer, repeat) runs in a fresh process, alternating, so each peak memory (max RSS) is its
own. Per step, the time goes to: ``rollout`` (generation, decoding and rewards), ``logps`` (the
policy's forward pass to completion log-probs) and ``backward + optimizer`` (the rest of the
step). Prints the median seconds per step of each, their ratio (target: GRPOModule <= 0.7 x TRL),
rollout tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tag_lightning.commands.cli import main as tag_main  # noqa: E402

from tag_lightning.commands.demo import TINY_MODEL, prepare_demo_data  # noqa: E402
from tag_lightning.data.datamodule import FERDataModule  # noqa: E402
from tag_lightning.grounding.claims import References, read_completion  # noqa: E402
from tag_lightning.grounding.rewards import DEFAULT_WEIGHTS, REWARDS  # noqa: E402

G, NEW_TOKENS, PROMPTS_PER_STEP, LR = 4, 64, 2, 1e-4
LORA = dict(r=8, alpha=16, dropout=0.0)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Timer:
    """Wraps callables and adds up the seconds spent in them, per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


def draw_samples(demo: Path, count: int) -> list[dict]:
    """`count` rl items of the sample photos (224 px, no augmentation), cycling over the labelled photos."""
    data = FERDataModule(str(demo / "au_cache"), train_data=f"manifest:{demo / 'samples' / 'manifest.csv'}",
                         stage="rl", image_size=224, augment=None, batch_size=1, num_workers=0)
    data.setup("fit")
    items = [data.items["train"][index] for index in range(len(data.items["train"]))]
    return [items[index % len(items)] for index in range(count)]


# -- ours ----------------------------------------------------------------------------------------


def run_ours(demo: Path, samples: list[dict], warmup: int) -> dict:
    from lightning.pytorch import Callback, Trainer

    from tag_lightning.data.datamodule import collate
    from tag_lightning.models.grpo import GRPOModule
    from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper

    class FixedBatches(FERDataModule):
        def __init__(self, batches):
            super().__init__(au_cache="unused", stage="rl")
            self.batches = batches

        def setup(self, stage=None):
            pass

        def train_dataloader(self):
            return torch.utils.data.DataLoader(self.batches, batch_size=None, collate_fn=lambda batch: batch)

    class StepClock(Callback):
        def __init__(self):
            self.steps, self.start = [], None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.start = time.perf_counter()
            if batch_idx == warmup:
                self.base = dict(timer.seconds)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.steps.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    network = VLMWrapper(VLMConfig(str(demo / TINY_MODEL), lora=LoRAConfig(**LORA, target_modules=TARGETS)))
    module = GRPOModule(network, optimizer=lambda params: torch.optim.AdamW(params, lr=LR), num_generations=G,
                        max_completion_length=NEW_TOKENS, beta=0.0, loss_type="dapo", log_completions=False)
    batches = [collate(samples[i:i + PROMPTS_PER_STEP]) for i in range(0, len(samples), PROMPTS_PER_STEP)]
    timer, clock = Timer(), StepClock()
    tokens = []  # completion tokens per generate call
    generate = network.generate

    def counted_generate(*args, **kwargs):
        output = generate(*args, **kwargs)
        tokens.append(sum(len(ids) for ids in output.token_ids))
        return output

    network.generate = counted_generate
    timer.wrap(module, "_rollout", "rollout")
    timer.wrap(network, "generate", "generate")
    timer.wrap(network, "answer_logprobs", "logps")
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[clock])
    trainer.fit(module, datamodule=FixedBatches(batches))
    seconds = {k: v - clock.base.get(k, 0.0) for k, v in timer.seconds.items()}
    return _report(clock.steps, seconds, sum(tokens[warmup * PROMPTS_PER_STEP:]), warmup)


# -- TRL -----------------------------------------------------------------------------------------


def run_trl(demo: Path, samples: list[dict], warmup: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tag_lightning.models.backbones import resolve_backbone

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(demo / TINY_MODEL)
    model = AutoModelForImageTextToText.from_pretrained(demo / TINY_MODEL, dtype=torch.float32)
    frame = resolve_backbone("qwen2_5_vl")(processor).frame(224, 224)
    references = {}
    rows = []
    for index, item in enumerate(samples):
        key = f"{index}:{item['image_name']}"
        references[key] = References(item["label"], tuple(item["labels"]), item["detector_aus"],
                                     frozenset(item["activated_aus"]), (224, 224))
        rows.append({"prompt": [{"role": "user", "content": item["prompt"]}], "image": Image.fromarray(item["image"]),
                     "key": key})

    def tag_reward(name):
        def reward(prompts, completions, key, **_):
            return [REWARDS[name](read_completion(c[0]["content"], frame.trace_to_original), references[k]).value
                    for c, k in zip(completions, key)]
        reward.__name__ = name
        return reward

    timer = Timer()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.steps, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            if state.global_step == warmup:
                self.base = dict(timer.seconds)

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, per_device_train_batch_size=G * PROMPTS_PER_STEP,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=NEW_TOKENS, temperature=1.0,
        top_p=1.0, beta=0.0, loss_type="dapo", learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, max_steps=len(samples) // PROMPTS_PER_STEP, logging_steps=1,
        report_to="none", save_strategy="no", remove_unused_columns=False, shuffle_dataset=False,
        reward_weights=[DEFAULT_WEIGHTS[name] for name in REWARDS], dataloader_num_workers=0, seed=0,
    )
    trainer = GRPOTrainer(
        model=model, processing_class=processor, reward_funcs=[tag_reward(name) for name in REWARDS], args=config,
        train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules=list(TARGETS), task_type="CAUSAL_LM"),
    )
    clock = StepClock()
    timer.wrap(trainer, "_generate_and_score_completions", "rollout")
    timer.wrap(trainer, "_generate", "generate")
    timer.wrap(trainer, "_get_per_token_logps_and_entropies", "logps")
    trainer.add_callback(clock)
    trainer.train()
    seconds = {k: v - clock.base.get(k, 0.0) for k, v in timer.seconds.items()}
    generated = [row.get("completions/mean_length") for row in trainer.state.log_history[warmup:]]
    tokens = sum(length * G * PROMPTS_PER_STEP for length in generated if length is not None)
    return _report(clock.steps, seconds, tokens, warmup)


def _report(steps: list[float], seconds: dict[str, float], tokens: float, warmup: int) -> dict:
    timed = steps[warmup:]
    total = sum(timed)
    rollout, logps = seconds.get("rollout", 0.0), seconds.get("logps", 0.0)
    return {
        "step_s": statistics.median(timed),
        "rollout_tokens_per_s": tokens / seconds["generate"],
        "phases_s_per_step": {"rollout": rollout / len(timed), "logps": logps / len(timed),
                              "backward + optimizer": (total - rollout - logps) / len(timed)},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# -- driver ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer (alternating); medians reported")
    parser.add_argument("--run", choices=("ours", "trl"), help=argparse.SUPPRESS)  # one run in this process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        demo, samples = pickle.loads(Path(args.data).read_bytes())
        result = (run_ours if args.run == "ours" else run_trl)(Path(demo), samples, args.warmup)
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        demo = prepare_demo_data(Path(tmp) / "demo", tag=tag_main, workers=1)
        data = Path(tmp) / "samples.pkl"
        data.write_bytes(pickle.dumps((str(demo), draw_samples(demo, (args.warmup + args.steps) * PROMPTS_PER_STEP))))
        results: dict[str, list[dict]] = {"ours": [], "trl": []}
        for repeat in range(args.repeats):
            for name in ("ours", "trl"):
                command = [sys.executable, __file__, "--run", name, "--data", str(data), "--warmup", str(args.warmup)]
                done = subprocess.run(command, capture_output=True, text=True)
                line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{name} run failed:\n{done.stderr[-3000:]}")
                results[name].append(json.loads(line[len("RESULT "):]))
                print(f"repeat {repeat + 1} {name}: {results[name][-1]['step_s']:.2f} s/step", flush=True)
    print(f"\nGRPO step benchmark: tiny Qwen2.5-VL, LoRA r=8, {PROMPTS_PER_STEP} prompts x G={G}, {NEW_TOKENS} new "
          f"tokens, beta=0, dapo, {args.steps} timed steps after {args.warmup}, median of {args.repeats} runs")
    medians = {}
    for name, label in (("ours", "GRPOModule"), ("trl", "TRL GRPOTrainer")):
        runs = results[name]
        medians[name] = statistics.median(run["step_s"] for run in runs)
        phases = {phase: statistics.median(run["phases_s_per_step"][phase] for run in runs)
                  for phase in runs[0]["phases_s_per_step"]}
        each = ", ".join(f"{run['step_s']:.2f}" for run in runs)
        print(f"{label:16s}: {medians[name]:6.2f} s/step (runs {each}); "
              f"rollout {statistics.median(r['rollout_tokens_per_s'] for r in runs):6.1f} tokens/s; "
              f"peak RSS {statistics.median(r['peak_rss_mb'] for r in runs):6.0f} MB")
        print(" " * 18 + "per step: " + ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in phases.items()))
    print(f"ratio GRPOModule / TRL = {medians['ours'] / medians['trl']:.3f}  (target <= 0.7)")


if __name__ == "__main__":
    main()
