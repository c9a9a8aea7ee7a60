"""One set of AU detector settings per run, through the real `tag` command: a cache rebuilt with other
detector settings never switches a run's records behind its back; traces, cache and checkpoint that
disagree are refused in one line that says what to rebuild; another activation threshold is told."""

from __future__ import annotations

import json
import shutil

import torch
from helpers import newest_last_checkpoint
from test_entry_points import error_line, lightning, tag, tag_together

from tag_lightning.au.cache import AUCache
from tag_lightning.au.detectors import build_libreface_net


def test_a_run_reads_the_au_settings_it_names_and_refuses_records_traces_or_checkpoints_of_others(
        demo_dir, tmp_path):
    cache = tmp_path / "au_cache"
    shutil.copytree(demo_dir / "au_cache", cache)  # blendshape AUs, the demo's traces are grounded on them
    blendshape = AUCache(cache).settings_key
    traces = [json.loads(line) for line in (demo_dir / "traces.jsonl").read_text().splitlines()]
    assert {(line["au_settings"], line["min_intensity"]) for line in traces} == {(blendshape, 1.0)}

    torch.manual_seed(0)
    weights = tmp_path / "combined_resnet.pt"
    torch.save({"model": build_libreface_net().state_dict()}, weights)
    build = tag("prepare", "au-cache", "--images", demo_dir / "samples" / "manifest.csv", "--out", cache,
                "--libreface-weights", weights, "--quiet")
    assert build.returncode == 0, build.stderr
    libreface = AUCache(cache).settings_key
    assert libreface != blendshape and f"AU settings {libreface}" in build.stdout

    root = tmp_path / "run"
    short = ("--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    unnamed, other_traces, named = tag_together(
        lightning("fit", demo_dir, root / "unnamed", *short, cache=cache),
        lightning("fit", demo_dir, root / "libreface", *short, f"--data.au_settings={libreface}", cache=cache),
        lightning("fit", demo_dir, root / "named", *short, f"--data.au_settings={blendshape}",
                  "--data.activation_threshold=1.5", cache=cache),
    )
    error_line(unnamed, f"the AU cache {cache} holds records of 2 AU detector settings",
               f"{blendshape} (blendshape)", f"{libreface} (libreface + blendshape)", "--data.au_settings", only=False)
    error_line(other_traces, f"traces.jsonl:1 was grounded on AU settings {blendshape}, but this run reads "
               f"{libreface}", "rebuild the traces", only=False)
    assert named.returncode == 0, named.stderr[-3000:]
    assert "--min-intensity [1.0], but activation_threshold is 1.5" in named.stderr
    checkpoint = newest_last_checkpoint(root / "named")
    assert torch.load(checkpoint, weights_only=True)["FERDataModule"]["au_settings"] == blendshape

    evaluated = tag(*lightning("test", demo_dir, root / "test", f"--ckpt_path={checkpoint}",
                               f"--data.au_settings={libreface}", cache=cache))
    error_line(evaluated, f"the checkpoint was trained on AU settings {blendshape}, but this run reads {libreface}",
               only=False)
