"""Callbacks the configs compose in: where `tag predict` writes its answers."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from tag_lightning.errors import UserError

RUN_FILE = "run.json"


class JSONLPredictionWriter(BasePredictionWriter):
    """Write each predicted batch's rows to ``output_dir/predictions.rank<R>.jsonl`` as they come.

    Every row names the model and the checkpoint that answered it (``checkpoint`` is null for a
    zero-shot run), and ``output_dir/run.json`` records the run: model, checkpoint, VLM config,
    command line, start time. A run never adds to an earlier run's files, which would mix the
    answers of different models: a folder that already holds predictions is refused. Rows are
    written batch by batch (flushed), so a long run that is killed keeps what it answered; one
    file per rank under DDP.

    Args:
        output_dir: folder for the prediction files (created if missing; must not hold predictions).
    """

    def __init__(self, output_dir: str = "outputs/predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.provenance: dict[str, Any] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse a folder with an earlier run's predictions, before the model answers anything."""
        if stage != "predict":
            return
        earlier = [path.name for path in sorted(self.output_dir.glob("predictions.rank*.jsonl"))]
        earlier += [RUN_FILE] if (self.output_dir / RUN_FILE).exists() else []
        if earlier:
            raise UserError(f"{self.output_dir} holds an earlier run's predictions ({', '.join(earlier)}); choose "
                            "another output_dir (--trainer.callbacks.init_args.output_dir=DIR) or remove them")
        trainer.strategy.barrier()  # every rank has looked before any rank writes

    def on_predict_start(self, trainer, pl_module) -> None:
        config = pl_module.network.config
        checkpoint = None if trainer.ckpt_path is None else str(Path(trainer.ckpt_path).resolve())
        self.provenance = {"model": config.model_path, "checkpoint": checkpoint}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            run = {**self.provenance, "vlm_config": asdict(config), "command": sys.argv,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (self.output_dir / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        answered_by = checkpoint or "no checkpoint: the base model (zero-shot)"
        rank_zero_info(f"predictions: {self.output_dir} | model {config.model_path} | {answered_by}")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.output_dir / f"predictions.rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as out:
            for row in prediction:
                out.write(json.dumps({**row, **self.provenance}) + "\n")
