"""Benchmark GRPO's rollouts: the path before the rollout engine against the engine, in one run.

    python bench/rollout.py [--repeats 3] [--new-tokens 128]             # the CPU: tiny model and 36-layer proxy
    python bench/rollout.py --device cuda --scale recipe                  # a GPU: the random Qwen2.5-VL-3B

One GRPO rollout is 2 faces x G=8 sampled answers (the recipe's `gpu_grpo.yaml`: batch 2, 8 generations),
at temperature 1, the faces the sample photos at 224 px (448 px at recipe scale), the prompt the RAF-DB
question. Variants:

- (a) the path before the engine: one `generate` call per face, its image encoded G times, LoRA
  unmerged under autocast, a dynamic KV cache, and a sampler that copied its forbidden-token list to
  the device every token and drew from torch's global generator (written out here as it was);
- (b) the engine's defaults (`RolloutConfig()`): one call for all 16 rows, each image encoded once,
  the LoRA merged into a sampling copy, a dynamic cache; also (b, LoRA unmerged), to show that part;
- (c) the engine as the GPU configs set it: (b) with a static cache and a compiled decode step
  (torch.compile; CUDA graphs on a GPU, mode reduce-overhead).

Models (`--scale cpu`, the default): the tiny model of the demo (2 layers of width 64, LoRA r=8), and a
proxy of Qwen2.5-VL-3B's decode on a CPU: the same narrow width but the 3B's 36 decoder layers with
r=64 LoRA on the 7 projections, which on one CPU thread is bound by the work per token the way the 3B
is bound by dispatch on a GPU. LoRA B matrices are drawn at random (after training they are not 0),
so the adapters cost what trained ones cost. `--scale recipe` runs the random 3B of
`bench/real_size.py` (built once in --out) in bfloat16 with the recipe's LoRA (r=64), 512 new tokens,
then a full GRPO step of the recipe with (c) (`--grpo-steps`, through `bench/real_size.py`; on a GPU the
prepared device run is `python bench/rollout.py --device cuda --scale recipe`).

Each variant is warmed up once (for (c): compilation, reported apart with the graphs it built), then
runs `--repeats` times, variants alternating; every run times the rollout with `--new-tokens` new
tokens and with 1 (the prefill and one token), so a decode step is (t_N - t_1) / (N - 1). Medians
are reported, with the ratio of tokens/s against (a), and the graphs compiled after warm-up
(recompiles; 0 is the target). Greedy answers of every variant are compared token for token.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tag_lightning.answers.labels import EMOTIONS  # noqa: E402
from tag_lightning.answers.prompts import user_prompt  # noqa: E402
from tag_lightning.commands.allocator import keep_freed_memory  # noqa: E402
from tag_lightning.data.samples import ANGER, SURPRISE, fetch_samples  # noqa: E402
from tag_lightning.models.rollout import RolloutConfig, RolloutEngine  # noqa: E402
from tag_lightning.models.sampling import seed_of  # noqa: E402
from tag_lightning.models.tiny import build_tiny_model  # noqa: E402
from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper  # noqa: E402

G = 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = {
    "(b) one call": RolloutConfig(),
    "(b) one call, LoRA unmerged": RolloutConfig(merge_for_sampling=False),
    "(c) one call, static cache, compiled step": RolloutConfig(cache_implementation="static", compile=True),
}


# -- (a): the path before the engine, as it was ----------------------------------------------------


class LegacySampler(LogitsProcessor):
    """The sampler before the engine: forbidden ids copied to the device every token, one number a row from
    torch's global generator, a cumulative sum over the whole vocabulary."""

    def __init__(self, forbidden: list[int], sample: bool, temperature: float) -> None:
        self.forbidden, self.sample, self.temperature = torch.tensor(forbidden, dtype=torch.long), sample, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.index_fill(-1, self.forbidden.to(scores.device), float("-inf"))
        if not self.sample:
            return scores
        cdf = torch.softmax(scores.float() / self.temperature, dim=-1).cumsum(dim=-1)
        draws = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        chosen = torch.searchsorted(cdf, draws, right=True).clamp(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def legacy_generate(network: VLMWrapper, images, prompts, rows: int, new_tokens: int, sample: bool,
                    temperature: float = 1.0) -> list[torch.Tensor]:
    """`VLMWrapper.generate` before the engine: one call, each prompt and its image repeated `rows` times."""
    index = [i for i in range(len(prompts)) for _ in range(rows)]
    with torch.no_grad():
        inputs = network.on_device(network.build_inputs([images[i] for i in index], [prompts[i] for i in index],
                                                        padding_side="left"))
        with network.autocast():
            sequences = network.model.generate(
                **inputs, max_new_tokens=new_tokens, use_cache=True, do_sample=False, repetition_penalty=1.0,
                eos_token_id=network.end_ids, pad_token_id=network.processor.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([LegacySampler(network.placeholder_ids, sample, temperature)]),
                disable_compile=True)
    return [_through_end(network, row) for row in sequences[:, inputs["input_ids"].shape[1]:].cpu()]


def legacy(network: VLMWrapper, images, prompts, seeds, rows: int, new_tokens: int, sample: bool,
           temperature: float = 1.0) -> list[torch.Tensor]:
    """(a): one call per face under its seed (GRPO's rollouts and `tag test`'s sampled answers before the engine)."""
    answers = []
    for image, prompt, seed in zip(images, prompts, seeds):
        with torch.random.fork_rng(devices=[network.device] if network.device.type == "cuda" else []):
            torch.manual_seed(seed_of(seed))
            answers += legacy_generate(network, [image], [prompt], rows, new_tokens, sample, temperature)
    return answers


def _through_end(network: VLMWrapper, tokens: torch.Tensor) -> torch.Tensor:
    ends = torch.isin(tokens, torch.tensor(network.end_ids)).nonzero()
    return tokens[: int(ends[0]) + 1] if len(ends) else tokens


# -- measuring -------------------------------------------------------------------------------------


def now(device: torch.device) -> float:
    """The time once the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def rollout(name: str, network: VLMWrapper, engines: dict, images, prompts, seeds, new_tokens: int) -> int:
    """One rollout of variant `name`; returns the tokens generated."""
    if name.startswith("(a)"):
        answers = legacy(network, images, prompts, seeds, G, new_tokens, sample=True)
    else:
        answers = engines[name].sample(images, prompts, seeds, G, new_tokens).token_ids
    return sum(len(ids) for ids in answers)


def measure(network: VLMWrapper, images, prompts, new_tokens: int, repeats: int, variants: dict) -> dict:
    """Every variant's medians, warm-up and recompiles on `network`."""
    device = network.device
    engines = {name: RolloutEngine(network, config) for name, config in variants.items()}
    names = ["(a) before the engine", *variants]
    seeds = [f"bench:{index}" for index in range(len(images))]
    warmup, graphs = {}, {}
    for name in names:  # warm-up: compilation (c, at the cache length it will run with), first allocations (all)
        start = now(device)
        compiled = name in engines and engines[name].config.compile
        rollout(name, network, engines, images, prompts, seeds, new_tokens if compiled else min(new_tokens, 16))
        rollout(name, network, engines, images, prompts, seeds, 1)
        warmup[name] = now(device) - start
        graphs[name] = engines[name].stats.compiled_graphs if name in engines else 0
    runs = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            timed = []
            for tokens_asked in (new_tokens, 1):
                start = now(device)
                tokens = rollout(name, network, engines, images, prompts, seeds, tokens_asked)
                timed.append((tokens, now(device) - start))
            (tokens, seconds), (_, prefill) = timed
            runs[name].append((tokens / seconds, (seconds - prefill) / max(new_tokens - 1, 1) * 1000, tokens))
    results = {}
    for name in names:
        results[name] = {
            "tokens_per_s": statistics.median(run[0] for run in runs[name]),
            "ms_per_decode_step": statistics.median(run[1] for run in runs[name]),
            "tokens": runs[name][-1][2], "warmup_s": warmup[name], "graphs": graphs[name],
            "recompiles": (engines[name].stats.compiled_graphs - graphs[name]) if name in engines else 0,
        }
    results["greedy identical"] = greedy_identical(network, engines, images, prompts, min(new_tokens, 64))
    return results


def greedy_identical(network: VLMWrapper, engines: dict, images, prompts, new_tokens: int) -> bool:
    """Whether every variant's greedy answers are token for token (a)'s."""
    reference = legacy_generate(network, images, prompts, 1, new_tokens, sample=False)
    for engine in engines.values():
        answers = engine.greedy(images, prompts, new_tokens).token_ids
        if not all(torch.equal(ours, theirs) for ours, theirs in zip(answers, reference)):
            return False
    return True


def report(title: str, results: dict) -> None:
    baseline = results["(a) before the engine"]["tokens_per_s"]
    print(f"\n{title}")
    print("| variant | tokens/s | ms per decode step | x (a) tokens/s | warm-up s | graphs | recompiles |")
    print("|---|---|---|---|---|---|---|")
    for name, figures in results.items():
        if name == "greedy identical":
            continue
        print(f"| {name} | {figures['tokens_per_s']:.0f} | {figures['ms_per_decode_step']:.1f} | "
              f"{figures['tokens_per_s'] / baseline:.2f} | {figures['warmup_s']:.1f} | {figures['graphs']} | "
              f"{figures['recompiles']} |")
    print(f"greedy answers token-identical across the variants: {'yes' if results['greedy identical'] else 'NO'}")


# -- models ----------------------------------------------------------------------------------------


def wrapper(model_dir: Path, rank: int, dtype: str, device: str) -> VLMWrapper:
    network = VLMWrapper(VLMConfig(str(model_dir), dtype=dtype, lora=LoRAConfig(r=rank, alpha=2 * rank, dropout=0.0,
                                                                                target_modules=TARGETS)))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in network.model.named_parameters():
        if "lora_B" in name:  # trained adapters are not 0
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return network.to(device).eval()


def faces(folder: Path, size: int) -> list[np.ndarray]:
    fetch_samples(folder)
    return [np.asarray(Image.open(folder / name).convert("RGB").resize((size, size))) for name in (SURPRISE, ANGER)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["cpu", "recipe"], default="cpu",
                        help="cpu (default): the tiny model and the 36-layer proxy; recipe: the random Qwen2.5-VL-3B "
                             "at the recipe's size (bfloat16, LoRA r=64, 448 px faces)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="new tokens per answer (default: 128 at cpu scale, 512 at recipe scale)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default: 3 cpu, 1 recipe)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    parser.add_argument("--out", type=Path, default=Path("outputs/real_size"),
                        help="recipe scale: where bench/real_size.py's model folder is, or is built (7.5 GB)")
    parser.add_argument("--grpo-steps", type=int, default=None,
                        help="then run this many GRPO steps of the recipe with the engine of gpu_grpo.yaml, (c), through "
                             "bench/real_size.py (default: 2 at recipe scale, 0 at cpu scale)")
    args = parser.parse_args()
    recipe = args.scale == "recipe"
    new_tokens = args.new_tokens or (512 if recipe else 128)
    repeats = args.repeats or (1 if recipe else 3)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `tag` runs (large logits blocks kept, not re-faulted)
    prompt = user_prompt(EMOTIONS[:7])  # RAF-DB's seven classes
    with tempfile.TemporaryDirectory() as tmp:
        images = faces(Path(tmp) / "samples", 448 if recipe else 224)
        prompts = [prompt] * len(images)
        if recipe:
            from real_size import build_model

            model_dir = args.out.resolve() / "model"
            if not (model_dir / "config.json").is_file():
                build_model(model_dir)
            models = {"random Qwen2.5-VL-3B, bfloat16, LoRA r=64": (model_dir, 64, "bfloat16")}
        else:
            models = {
                "tiny model (2 layers, width 64), LoRA r=8": (build_tiny_model(Path(tmp) / "tiny"), 8, "float32"),
                "proxy (36 layers, width 64), LoRA r=64": (
                    build_tiny_model(Path(tmp) / "proxy", text={"num_hidden_layers": 36}), 64, "float32"),
            }
        device = torch.device(args.device)
        where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
        variants = {name: config for name, config in VARIANTS.items() if not (recipe and "unmerged" in name)}
        for title, (model_dir, rank, dtype) in models.items():
            network = wrapper(model_dir, rank, dtype, args.device)
            results = measure(network, images, prompts, new_tokens, repeats, variants)
            report(f"{title}: {len(images)} faces x {G} answers, up to {new_tokens} new tokens, {where}, median of "
                   f"{repeats}", results)
            if device.type == "cuda":
                print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 1024**3:.2f} GB")
            del network
    grpo_steps = args.grpo_steps if args.grpo_steps is not None else (2 if recipe else 0)
    if grpo_steps:
        command = [sys.executable, str(Path(__file__).with_name("real_size.py")), "--out", str(args.out),
                   "--stages", "grpo", "--steps", str(grpo_steps), "--scale", "recipe" if recipe else "cpu"]
        print(f"\n$ {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
