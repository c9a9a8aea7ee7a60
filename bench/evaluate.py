"""Benchmark `tag test`: images/s before and with the rollout engine, and what the metrics cost.

    python bench/evaluate.py [--images 16] [--max-new-tokens 128] [--sampled-answers 4] [--repeats 3]

Runs of Lightning's test loop over the same images (the sample photos repeated, 224 px, batch 4) with
the same tiny Qwen2.5-VL (LoRA r=8, its B matrices drawn at random as after training):

- ``generation alone``: the test step only generates the greedy answers (the baseline of the metrics);
- ``tag test``: the real test step: generate, parse once, score against the label and the detector
  (claims, torchmetrics classification and faithfulness), then write metrics.json, predictions.jsonl
  and confusion_matrix.png;
- ``tag test + occlusion + sampled``: the same with the evidence-necessity test (each image asked 3
  times) and `--sampled-answers` sampled answers per image, three ways: before the rollout engine (the
  greedy answers one call a batch, the sampled answers one call per image, LoRA unmerged, as `tag test`
  did; its two occlusion re-asks are one call here), with the engine's defaults, and with the engine as the
  GPU configs set it (static cache, compiled decode step; its compilation is a warm-up run, not timed).

Runs alternate; the median of `--repeats` is reported as images/s, with the time the metrics add to
generation alone (target: <= 5%), the speed-up of the engine over the path before it, and the cost of
scoring alone per image.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.pytorch import Trainer  # noqa: E402

from tag_lightning.commands.cli import main as tag_main  # noqa: E402

from tag_lightning.commands.demo import TINY_MODEL, prepare_demo_data  # noqa: E402
from tag_lightning.data.datamodule import FERDataModule  # noqa: E402
from tag_lightning.grounding.claims import read_completion  # noqa: E402
from tag_lightning.grounding.metrics import AnswerMetrics, score_answer  # noqa: E402
from tag_lightning.models.rollout import Answers, RolloutConfig, RolloutEngine  # noqa: E402
from tag_lightning.models.sft import SFTModule  # noqa: E402
from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper  # noqa: E402
from rollout import legacy, legacy_generate  # noqa: E402  (bench/rollout.py: the code before the engine)


class GenerationOnly(SFTModule):
    """The baseline of the metrics: the test step generates the greedy answers and keeps nothing."""

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.engine.greedy([image.numpy() for image in batch["image"]], batch["prompt"], self.max_new_tokens)

    def on_test_epoch_end(self) -> None:
        pass


class BeforeTheEngine(SFTModule):
    """`tag test` as it generated before the rollout engine: greedy answers one call a batch (the two occlusion
    re-asks here in one call, where they were two), sampled answers one call per image, LoRA unmerged."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine = LegacyEngine(self.network)


class LegacyEngine:
    """The `RolloutEngine` calls the module makes, answered by the code before the engine (`bench/rollout.py`)."""

    def __init__(self, network) -> None:
        self.network = network

    def greedy(self, images, prompts, max_new_tokens):
        ids = legacy_generate(self.network, images, prompts, 1, max_new_tokens, False)
        return Answers(self.network.processor.batch_decode(ids, skip_special_tokens=True), ids)

    def sample(self, images, prompts, seeds, num_samples, max_new_tokens, temperature=1.0, top_p=1.0):
        ids = legacy(self.network, images, prompts, seeds, num_samples, max_new_tokens, True, temperature)
        return Answers(self.network.processor.batch_decode(ids, skip_special_tokens=True), ids)


def repeated_manifest(demo: Path, count: int) -> Path:
    """A manifest naming the labelled sample photos over and over, `count` rows."""
    with open(demo / "samples" / "manifest.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["label"]]
    path = demo / "bench_manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label"])
        writer.writeheader()
        for index in range(count):
            row = rows[index % len(rows)]
            writer.writerow({"path": str(demo / "samples" / row["path"]), "label": row["label"]})
    return path


def network_of(demo: Path) -> VLMWrapper:
    network = VLMWrapper(VLMConfig(str(demo / TINY_MODEL), lora=LoRAConfig(r=8, alpha=16, dropout=0.0)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in network.model.named_parameters():
            if "lora_B" in name:  # trained adapters are not 0
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return network


def timed_test(module_class, demo: Path, manifest: Path, root: Path, max_new_tokens: int, **options) -> float:
    torch.manual_seed(0)
    module = module_class(network_of(demo), max_new_tokens=max_new_tokens, **options)
    data = FERDataModule(str(demo / "au_cache"), test_data=f"manifest:{manifest}", image_size=224, batch_size=4,
                         num_workers=0)
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=root, enable_progress_bar=False,
                      enable_model_summary=False)
    data.setup("test")
    if module.engine.config.compile if isinstance(module.engine, RolloutEngine) else False:
        Trainer(accelerator="cpu", logger=False, default_root_dir=root / "warm-up", enable_progress_bar=False,
                enable_model_summary=False).test(module, datamodule=data, verbose=False)  # compiles: not timed
    start = time.perf_counter()
    trainer.test(module, datamodule=data, verbose=False)
    return time.perf_counter() - start


def scoring_seconds_per_image(demo: Path, manifest: Path) -> float:
    """Parsing and scoring alone, on well-formed traces (the SFT targets), per image."""
    data = FERDataModule(str(demo / "au_cache"), train_data=f"manifest:{manifest}", val_data=f"manifest:{manifest}",
                         train_traces=str(demo / "traces.jsonl"), image_size=224, augment=None, num_workers=0)
    data.setup("fit")
    module = SFTModule(VLMWrapper(VLMConfig(str(demo / TINY_MODEL))))
    pairs = []
    for index in range(len(data.items["val"])):
        item = data.items["val"][index]
        batch = {key: [value] for key, value in item.items() if key != "image"}
        batch["image"] = torch.from_numpy(item["image"][None])
        pairs.append((data.items["train"][index]["target"], module.references(batch)[0]))
    metrics = AnswerMetrics()
    start = time.perf_counter()
    for text, references in pairs * 10:
        metrics.update([score_answer(read_completion(text), references)])
    metrics.compute()
    return (time.perf_counter() - start) / (len(pairs) * 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="test images per run (the sample photos repeated)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest generated answer")
    parser.add_argument("--sampled-answers", type=int, default=4, help="sampled answers per image where asked")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (alternating); medians reported")
    args = parser.parse_args()
    full = {"occlusion_test": True, "sampled_answers": args.sampled_answers}
    compiled = RolloutConfig(cache_implementation="static", compile=True, compile_mode="default")
    variants = {
        "generation alone": (GenerationOnly, {}),
        "tag test": (SFTModule, {}),
        "+ occlusion + sampled, before the engine": (BeforeTheEngine, full),
        "+ occlusion + sampled, engine": (SFTModule, full),
        "+ occlusion + sampled, engine compiled": (SFTModule, {**full, "rollout": compiled}),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        demo = prepare_demo_data(Path(tmp) / "demo", tag=tag_main, workers=1)
        manifest = repeated_manifest(demo, args.images)
        for repeat in range(args.repeats):
            for name, (module_class, options) in variants.items():
                root = Path(tmp) / f"{name.replace(' ', '_')}_{repeat}"
                seconds[name].append(timed_test(module_class, demo, manifest, root, args.max_new_tokens, **options))
                print(f"repeat {repeat + 1} {name}: {seconds[name][-1]:.2f} s", flush=True)
        scoring = scoring_seconds_per_image(demo, manifest)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"\ntag test benchmark: tiny Qwen2.5-VL (LoRA r=8), {args.images} images at 224 px, batch 4, greedy "
          f"answers of {args.max_new_tokens} new tokens at most, {args.sampled_answers} sampled answers per image "
          f"where asked, CPU with {torch.get_num_threads()} thread(s), median of {args.repeats} runs")
    for name, value in medians.items():
        runs = ", ".join(f"{v:.2f}" for v in seconds[name])
        print(f"{name:42s}: {args.images / value:6.2f} images/s  ({value:.2f} s; runs {runs})")
    overhead = medians["tag test"] / medians["generation alone"] - 1
    print(f"the metrics and the report add {overhead * 100:+.1f}% to generation alone (target <= +5%)")
    before = medians["+ occlusion + sampled, before the engine"]
    for name in ("+ occlusion + sampled, engine", "+ occlusion + sampled, engine compiled"):
        print(f"{name}: {before / medians[name]:.2f}x the images/s before the engine")
    print(f"scoring alone, a well-formed trace: {scoring * 1000:.2f} ms per image")


if __name__ == "__main__":
    main()
