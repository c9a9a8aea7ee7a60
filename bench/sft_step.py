"""Benchmark the SFT module's training throughput against a plain PyTorch loop.

    python bench/sft_step.py [--steps 20] [--warmup 3] [--repeats 3] [--batch-size 4]

Both loops train the same tiny Qwen2.5-VL (LoRA, vision frozen) on the same pre-drawn batches of
the sample photos with the same optimizer and the same per-step work (frame conversion, trace
rendering, tokenisation, the wrapper's answer-only loss); the only difference is Lightning's
machinery around the step. Prints training tokens/s (attention-mask tokens) of each, the median
over repeats (runs alternate), and the SFT module's overhead. Target: overhead <= 10%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.pytorch import Callback, Trainer  # noqa: E402

from tag_lightning.answers.grammar import render_trace  # noqa: E402
from tag_lightning.commands.cli import main as tag_main  # noqa: E402
from tag_lightning.commands.demo import TINY_MODEL, prepare_demo_data  # noqa: E402
from tag_lightning.data.datamodule import FERDataModule  # noqa: E402
from tag_lightning.models.sft import SFTModule  # noqa: E402
from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper  # noqa: E402


class FixedBatches(FERDataModule):
    """The datamodule's batch handling (batches stay on the CPU for the wrapper) over pre-drawn batches."""

    def __init__(self, batches: list[dict]) -> None:
        super().__init__(au_cache="unused")
        self.batches = batches

    def setup(self, stage: str | None = None) -> None:
        pass

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None, collate_fn=lambda batch: batch)


def draw_batches(demo: Path, batch_size: int, count: int) -> list[dict]:
    data = FERDataModule(str(demo / "au_cache"), train_data=f"manifest:{demo / 'samples' / 'manifest.csv'}",
                         train_traces=str(demo / "traces.jsonl"), image_size=224, batch_size=batch_size,
                         num_workers=0)
    data.setup("fit")
    batches = []
    while len(batches) < count:
        batches.extend(batch for batch in data.train_dataloader() if len(batch["image"]) == batch_size)
    return batches[:count]


def network(demo: Path) -> VLMWrapper:
    torch.manual_seed(0)
    return VLMWrapper(VLMConfig(str(demo / TINY_MODEL), lora=LoRAConfig(r=8, alpha=16, dropout=0.0)))


def step_inputs(net: VLMWrapper, batch: dict):
    """The work both loops do per step before the forward pass (SFTModule.training_step's)."""
    images = [image.numpy() for image in batch["image"]]
    targets = [render_trace(net.frame(im.shape[1], im.shape[0]).trace_to_model(t), f)
               for im, t, f in zip(images, batch["trace"], batch["trace_format"])]
    return net.build_inputs(images, batch["prompt"], targets)


def plain_loop(demo: Path, batches: list[dict], warmup: int) -> float:
    net = network(demo)
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    tokens, start = 0, None
    for index, batch in enumerate(batches):
        if index == warmup:
            start = time.perf_counter()
        inputs = step_inputs(net, batch)
        loss = net(inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            tokens += int(inputs["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


class _Clock(Callback):
    def __init__(self, warmup: int, batches: list[dict], net: VLMWrapper) -> None:
        self.warmup, self.start = warmup, None
        self.tokens = sum(int(step_inputs(net, b)["attention_mask"].sum()) for b in batches[warmup:])

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:
        self.seconds = time.perf_counter() - self.start


def lightning_loop(demo: Path, batches: list[dict], warmup: int) -> float:
    net = network(demo)
    module = SFTModule(net, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
    clock = _Clock(warmup, batches, net)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[clock])
    trainer.fit(module, datamodule=FixedBatches(batches))
    return clock.tokens / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop (alternating); medians reported")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = prepare_demo_data(Path(tmp) / "demo", tag=tag_main, workers=1)
        batches = draw_batches(demo, args.batch_size, args.warmup + args.steps)
        plain, lightning = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(demo, batches, args.warmup))
            lightning.append(lightning_loop(demo, batches, args.warmup))
    plain_tps, lightning_tps = statistics.median(plain), statistics.median(lightning)
    overhead = plain_tps / lightning_tps - 1
    print(f"\nSFT step benchmark (tiny Qwen2.5-VL, LoRA r=8, batch {args.batch_size}, {args.steps} timed steps, "
          f"median of {args.repeats})")
    print(f"plain PyTorch loop : {plain_tps:8.1f} tokens/s   runs: {', '.join(f'{v:.1f}' for v in plain)}")
    print(f"SFTModule (Trainer): {lightning_tps:8.1f} tokens/s   runs: {', '.join(f'{v:.1f}' for v in lightning)}")
    print(f"overhead: {overhead * 100:+.1f}%  (target <= +10%; ratio SFTModule/plain = {lightning_tps / plain_tps:.3f})")


if __name__ == "__main__":
    main()
