"""Callbacks the configs compose in: where `tag predict` writes its answers."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter


class JSONLPredictionWriter(BasePredictionWriter):
    """Append each predicted batch's rows to ``output_dir/predictions.rank<R>.jsonl`` as it comes.

    Written batch by batch (flushed), so a long prediction run that is killed keeps what it
    answered; one file per rank under DDP.

    Args:
        output_dir: folder for the prediction files (created if missing).
    """

    def __init__(self, output_dir: str = "outputs/predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / f"predictions.rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as out:
            for row in prediction:
                out.write(json.dumps(row) + "\n")
