"""Benchmark `tag prepare traces` against a vLLM-like endpoint: images/s with 1, 8 and 32 conversations in flight.

    python bench/traces.py [--images 256] [--latency 0.5] [--concurrency 1,8,32]

A local OpenAI-compatible endpoint on 127.0.0.1 (`TemplateEndpoint`) answers each chat request after
a fixed latency with a valid template trace, as a vLLM server with capacity to spare would. The
real command runs against it in a subprocess, once per concurrency, each into a fresh file. The
images are distinct-content copies of the four labelled sample photos (`replicate`: one AU cache
build of the four, records copied), so every image is asked about, once: the ideal rate is
concurrency / latency images/s. Reported per run: images/s over the job (its statistics'
`seconds`, start-up excluded), the ratio to the ideal, the client's CPU time per image (the
statistics' `cpu_seconds`: every thread of the job) and what the endpoint saw (most requests at
once, connections opened). Target: >= 0.8 of the ideal at 32 in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tag_lightning.au.build import build_au_cache  # noqa: E402
from tag_lightning.data.samples import SAMPLE_LABELS, fetch_samples  # noqa: E402
from tag_lightning.images import ImageRef  # noqa: E402
from tag_lightning.traces.builder import sidecar_paths  # noqa: E402
from tag_lightning.traces.template_endpoint import TemplateEndpoint, replicate  # noqa: E402

TARGET = 0.8  # of the ideal rate, at the highest concurrency


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the endpoint takes per answer")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated conversations in flight per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        fetch_samples(root / "samples")
        photos = [(root / "samples" / name, label) for name, label in SAMPLE_LABELS.items() if label]
        build_au_cache([ImageRef.from_path(path) for path, _ in photos], root / "au_cache", progress=False)
        manifest, records, labels = replicate(photos, root / "au_cache", root / "images", args.images)
        print(f"{args.images} images, endpoint latency {args.latency} s, {os.cpu_count()} CPUs")
        print(f"{'in flight':>9} {'images/s':>9} {'ideal':>7} {'ratio':>6} {'CPU ms/img':>10} "
              f"{'job s':>7} {'process s':>9} {'most at once':>12} {'connections':>11}")
        ratio = 0.0
        for concurrency in map(int, args.concurrency.split(",")):
            with TemplateEndpoint(records, labels, latency=args.latency) as endpoint:
                out = root / f"traces_{concurrency}.jsonl"
                command = [sys.executable, "-m", "tag_lightning.commands.cli", "prepare", "traces", "--data", str(manifest),
                           "--cache", str(root / "au_cache"), "--out", str(out), "--quiet", "--teacher", "openai",
                           "--base-url", endpoint.base_url, "--model", "template", "--concurrency", str(concurrency)]
                start = time.perf_counter()
                run = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                     capture_output=True, text=True)
                process_seconds = time.perf_counter() - start
            if run.returncode != 0:
                raise SystemExit(f"the job failed:\n{run.stderr[-2000:]}")
            stats = json.loads(sidecar_paths(out)[1].read_text())
            assert stats["kept"] == args.images == len(endpoint.arrivals), (stats["kept"], len(endpoint.arrivals))
            run = stats["last_run"]
            rate, ideal = args.images / run["seconds"], concurrency / args.latency
            ratio = rate / ideal
            print(f"{concurrency:>9} {rate:>9.2f} {ideal:>7.1f} {ratio:>6.2f} "
                  f"{1000 * run['cpu_seconds'] / args.images:>10.1f} {run['seconds']:>7.1f} "
                  f"{process_seconds:>9.1f} {endpoint.most_in_flight:>12} {endpoint.connections:>11}")
        print(f"target: >= {TARGET} of the ideal at the highest concurrency: {'met' if ratio >= TARGET else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
