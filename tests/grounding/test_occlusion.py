"""Evidence necessity: the occlusion machinery, checked with a network whose answer depends on one known region."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from tag_lightning.data.datamodule import FERDataModule
from tag_lightning.grounding.occlusion import blur_boxes, random_boxes_like
from tag_lightning.models.backbones.base import Frame
from tag_lightning.models.module import VLMModule
from tag_lightning.models.rollout import Answers
from tag_lightning.models.vlm import VLMConfig

MOUTH = (96, 150, 124, 166)  # a small box on the mouth of the 224 px letterboxed sample faces


class MouthReaderNetwork(nn.Module):
    """A stand-in network (the module asks a network only for `frame` and `config`, and answers through its
    engine, `MouthReader`)."""

    config = VLMConfig("mouth-reader")

    def frame(self, width: int, height: int) -> Frame:
        return Frame((width, height), (width, height))


class MouthReader:
    """A stand-in rollout engine: it reads the mouth region, cites it, and answers happiness while the region
    holds detail, neutral once blurred."""

    def __init__(self) -> None:
        self.asked = 0

    def greedy(self, images, prompts, max_new_tokens=256) -> Answers:
        self.asked += len(images)
        texts = []
        for image in images:
            x1, y1, x2, y2 = MOUTH
            detail = float(np.abs(np.diff(image[y1:y2, x1:x2].astype(float), axis=1)).mean())
            answer = "happiness" if detail > 1.2 else "neutral"  # 2.1 to 4.8 as they are, below 0.9 blurred
            texts.append("\n".join([
                "Global analysis: The mouth decides.", "Verification loop:",
                f"Inspect lip corner (AU12) → {'pulled up' if answer == 'happiness' else 'relaxed'} → "
                f"<bbox>[{x1},{y1},{x2},{y2}]</bbox>",
                "Final conclusion: AU12.", f"<answer> {answer} </answer>"]))
        return Answers(texts=texts, token_ids=[torch.zeros(1)] * len(texts))


def test_blurring_keeps_the_image_outside_the_boxes_and_random_boxes_keep_sizes():
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    blurred = blur_boxes(image, [MOUTH])
    x1, y1, x2, y2 = MOUTH
    outside = np.ones(image.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(blurred[outside], image[outside])
    assert blurred[y1:y2, x1:x2].std() < image[y1:y2, x1:x2].std() / 4
    face = (40, 30, 190, 200)
    placed = random_boxes_like([MOUTH, (0, 0, 10, 20)], face, "a.jpg", seed=3)
    assert placed == random_boxes_like([MOUTH, (0, 0, 10, 20)], face, "a.jpg", seed=3)
    for (a1, b1, a2, b2), (c1, d1, c2, d2) in zip(placed, [MOUTH, (0, 0, 10, 20)]):
        assert (a2 - a1, b2 - b1) == pytest.approx((c2 - c1, d2 - d1))
        assert face[0] <= a1 and a2 <= face[2] and face[1] <= b1 and b2 <= face[3]


def test_answers_that_rest_on_the_cited_region_flip_when_it_is_blurred_and_rarely_otherwise(demo_dir, tmp_path):
    data = FERDataModule(str(demo_dir / "au_cache"), test_data=f"manifest:{demo_dir / 'samples' / 'manifest.csv'}",
                         image_size=224, batch_size=2, num_workers=0)
    module = VLMModule(MouthReaderNetwork(), occlusion_test=True, occlusion_seed=0)
    module.engine = network = MouthReader()
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.test(module, datamodule=data)
    assert network.asked == 3 * 4  # every image asked three times: as it is, cited blurred, random blurred
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    necessity = report["evidence_necessity"]
    assert necessity["asked"] == 4 and necessity["no_evidence"] == 0
    assert necessity["flip_cited"] == 1.0  # the cited mouth blurred: every answer becomes neutral
    assert necessity["flip_random"] < 0.5 and necessity["difference"] > 0.5
    assert set(necessity["per_class"]) == {"surprise", "happiness", "anger", "disgust"}
    rows = [json.loads(line) for line in (tmp_path / "evaluation" / "predictions.jsonl").read_text().splitlines()]
    assert all(row["occlusion"]["cited_boxes"] == [list(MOUTH)] for row in rows)
    assert report["checkpoint"] is None and report["model"] == "mouth-reader"
