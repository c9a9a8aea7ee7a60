"""Benchmark `tag test`: is evaluation generation-bound?

    python bench/evaluate.py [--images 16] [--max-new-tokens 128] [--repeats 3]

Three runs of Lightning's test loop over the same images (the sample photos repeated, 224 px,
batch 4) with the same tiny Qwen2.5-VL (LoRA r=8, greedy):

- ``generation alone``: the test step only generates the answers (the baseline);
- ``tag test``: the real test step: generate, parse once, score against the label and the
  detector (claims, torchmetrics classification and faithfulness), then write metrics.json,
  predictions.jsonl and confusion_matrix.png;
- ``tag test + occlusion``: the same with the evidence-necessity test (each image asked 3 times).

Runs alternate; the median of `--repeats` is reported as images/s, with the time the metrics add
to generation alone (target: <= 5%) and the cost of scoring alone per image.
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
from tag_lightning.models.sft import SFTModule  # noqa: E402
from tag_lightning.models.vlm import LoRAConfig, VLMConfig, VLMWrapper  # noqa: E402


class GenerationOnly(SFTModule):
    """The baseline: the test step generates and keeps nothing."""

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.network.generate([image.numpy() for image in batch["image"]], batch["prompt"],
                              max_new_tokens=self.max_new_tokens)

    def on_test_epoch_end(self) -> None:
        pass


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


def timed_test(module_class, demo: Path, manifest: Path, root: Path, max_new_tokens: int, **options) -> float:
    torch.manual_seed(0)
    network = VLMWrapper(VLMConfig(str(demo / TINY_MODEL), lora=LoRAConfig(r=8, alpha=16, dropout=0.0)))
    module = module_class(network, max_new_tokens=max_new_tokens, **options)
    data = FERDataModule(str(demo / "au_cache"), test_data=f"manifest:{manifest}", image_size=224, batch_size=4,
                         num_workers=0)
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=root, enable_progress_bar=False,
                      enable_model_summary=False)
    data.setup("test")
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
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (alternating); medians reported")
    args = parser.parse_args()
    variants = {
        "generation alone": (GenerationOnly, {}),
        "tag test": (SFTModule, {}),
        "tag test + occlusion": (SFTModule, {"occlusion_test": True}),
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
    print(f"\ntag test benchmark: tiny Qwen2.5-VL, {args.images} images at 224 px, batch 4, greedy, "
          f"{args.max_new_tokens} new tokens at most, median of {args.repeats} runs")
    for name, value in medians.items():
        runs = ", ".join(f"{v:.2f}" for v in seconds[name])
        print(f"{name:22s}: {args.images / value:6.2f} images/s  ({value:.2f} s; runs {runs})")
    overhead = medians["tag test"] / medians["generation alone"] - 1
    print(f"the metrics and the report add {overhead * 100:+.1f}% to generation alone (target <= +5%)")
    print(f"occlusion test: {medians['tag test + occlusion'] / medians['tag test']:.2f}x the time of tag test")
    print(f"scoring alone, a well-formed trace: {scoring * 1000:.2f} ms per image")


if __name__ == "__main__":
    main()
