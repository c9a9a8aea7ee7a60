"""The evaluation metrics: hand-made answers with hand-counted figures, and 2 DDP ranks computing what 1 does."""

from __future__ import annotations

import re
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tag_lightning.grounding.claims import References, read_completion
from tag_lightning.grounding.metrics import CLASSES, NO_ANSWER, AnswerMetrics, score_answer

LABELS = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")
CHEEK, LIP_CORNER, BROW = [20, 40, 45, 55], [30, 60, 70, 75], [25, 20, 75, 35]
HAPPY_FACE = References("happiness", LABELS, {"AU6": {"box": CHEEK}, "AU12": {"box": LIP_CORNER}, "AU4": {"box": BROW}},
                        frozenset({"AU6", "AU12"}), (100, 100))


def trace(*steps: str, answer: str | None = "happiness") -> str:
    """An answer whose conclusion names the AUs its steps box (so every claim is a step's)."""
    concluded = " + ".join(re.findall(r"\((AU\d+)\)", "\n".join(steps)))
    lines = ["Global analysis: The cheeks are raised.", "Verification loop:", *steps, f"Final conclusion: {concluded}."]
    return "\n".join(lines + ([f"<answer> {answer} </answer>"] if answer else []))


def step(region: str, au: int, box: list[int]) -> str:
    return f"Inspect {region} (AU{au}) → raised → <bbox>[{','.join(map(str, box))}]</bbox>"


HAND_MADE = {
    "perfect": trace(step("cheek", 6, CHEEK), step("lip corner", 12, LIP_CORNER)),
    "hallucinated AU4": trace(step("brow", 4, BROW), step("lip corner", 12, LIP_CORNER)),
    "box off the face": trace(step("lip corner", 12, [80, 80, 99, 99])),
    "missing answer": trace(step("cheek", 6, CHEEK), answer=None),
    "garbage": "lorem ipsum <bbox>[1,2",
}


def scores():
    return [score_answer(read_completion(text), HAPPY_FACE) for text in HAND_MADE.values()]


def test_hand_made_answers_give_the_hand_counted_figures():
    metrics = AnswerMetrics()
    metrics.update(scores())
    figures = metrics.compute()
    # correct: perfect, hallucinated, off the face (3 of 5); valid: the same 3
    assert figures["acc"] == pytest.approx(3 / 5) and figures["format_valid"] == pytest.approx(3 / 5)
    assert figures["uar"] == pytest.approx(3 / 5)  # one class present: its recall
    assert figures["macro_f1"] == pytest.approx(2 * 1.0 * 0.6 / 1.6)  # precision 3/3, recall 3/5
    # claims the detector backs: 2 + 1 (not the hallucinated AU4) + 1 + 1 + 0 = 5, IoU 1 but the box off the face (0)
    assert figures["box_iou"] == pytest.approx(4 / 5) and figures["box_hit"] == pytest.approx(4 / 5)
    # claimed active: {6,12}, {4,12}, {12}, {6} (the missing answer is not neutral) -> 6, of which 5 activated
    assert figures["au_precision"] == pytest.approx(5 / 6)
    assert figures["au_recall"] == pytest.approx(5 / 10)  # 2 activated AUs per answer, 5 answers
    assert figures["hallucination_rate"] == pytest.approx(1 / 5)
    assert figures["au_emotion_consistency"] == pytest.approx(3 / 3)  # every answered happiness cites AU6 or AU12
    assert figures["counts"]["no_answer"] == 2 and figures["counts"]["answers"] == 5
    row = figures["confusion_matrix"][CLASSES.index("happiness")]
    assert row[CLASSES.index("happiness")] == 3 and row[CLASSES.index(NO_ANSWER)] == 2


def test_per_answer_verdicts():
    perfect, hallucinated, off_face, missing, garbage = scores()
    assert [claim.verdict for claim in hallucinated.claims] == ["hallucination", "supported"]
    assert off_face.claims[0].iou == 0.0 and off_face.claims[0].verdict == "supported"
    assert missing.answer is None and missing.consistent is None and not missing.valid
    assert garbage.claims == () and garbage.box_iou is None
    assert hallucinated.box_iou == 1.0  # its hallucinated AU4 box is left to hallucination_rate
    assert perfect.to_dict()["claims"][0] == {"step": 1, "au": "AU6", "polarity": "active", "box": CHEEK,
                                              "detector_box": CHEEK, "iou": 1.0, "verdict": "supported"}


def _rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metrics = AnswerMetrics()
    metrics.update(scores()[rank::2])  # 3 answers on rank 0, 2 on rank 1
    results[rank] = metrics.compute()
    dist.destroy_process_group()


def test_two_ddp_ranks_compute_every_figure_of_one_process():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2)
    single = AnswerMetrics()
    single.update(scores())
    expected = single.compute()
    for rank in (0, 1):
        assert results[rank].keys() == expected.keys()
        for name, value in expected.items():
            assert results[rank][name] == (pytest.approx(value) if isinstance(value, float) else value), name


def test_sampled_answers_are_counted_as_answers_and_each_reward_is_averaged():
    """The five hand-made answers as five samples of one face (`tag test --model.init_args.sampled_answers`)."""
    from tag_lightning.grounding.metrics import SampledAnswerMetrics
    from tag_lightning.grounding.rewards import reward_values

    completions = [read_completion(text) for text in HAND_MADE.values()]
    sampled = SampledAnswerMetrics()
    sampled.update([score_answer(c, HAPPY_FACE) for c in completions[:2]],
                   [reward_values(c, HAPPY_FACE) for c in completions[:2]])
    sampled.update([score_answer(c, HAPPY_FACE) for c in completions[2:]],
                   [reward_values(c, HAPPY_FACE) for c in completions[2:]])
    result = sampled.compute()
    figures = result["figures"]
    assert figures["hallucination_rate"] == pytest.approx(1 / 5) and figures["format_valid"] == pytest.approx(3 / 5)
    assert figures["box_iou"] == pytest.approx(4 / 5) and result["counts"]["answers"] == 5
    # grounding, the face's evidence being AU6 and AU12: perfect 2/2, AU4 hallucinated 1/(2 + 1) (AU12 boxed, AU6
    # not cited, one wrong claim), box off the face 0, missing answer 0 (the grammar rejects it), garbage 0
    assert figures["reward/grounding"] == pytest.approx((1 + 1 / 3) / 5)
    assert figures["reward/answer"] == pytest.approx(3 / 5)
    # format: perfect, hallucinated and off-the-face pass all four checks; the missing answer fails grammar and
    # answer (2/4); garbage passes none
    assert figures["reward/format"] == pytest.approx((1 + 1 + 1 + 0.5 + 0) / 5)


def test_an_answer_in_the_papers_format_scores_as_the_same_answer_per_step():
    """The perfect answer, its AUs listed in the conclusion instead of on the steps; the counts say how many
    answers were read in the paper's format."""
    paper = "\n".join(["Global analysis: The cheeks are raised.", "Verification loop:",
                       f"Inspect cheeks → raised → <bbox>[{','.join(map(str, CHEEK))}]</bbox>",
                       f"Inspect lip corners → raised → <bbox>[{','.join(map(str, LIP_CORNER))}]</bbox>",
                       "Final conclusion: Combined AU6 + AU12 indicate happiness.", "<answer> happiness </answer>"])
    per_step, in_paper = (score_answer(read_completion(text), HAPPY_FACE) for text in (HAND_MADE["perfect"], paper))
    assert (per_step.trace_format, in_paper.trace_format) == ("per_step", "paper")
    assert {**in_paper.to_dict(), "trace_format": "per_step"} == per_step.to_dict()
    metrics = AnswerMetrics(sync=False)
    metrics.update([per_step, in_paper])
    figures = metrics.compute()
    assert figures["counts"]["paper_format"] == 1 and figures["counts"]["answers"] == 2
    assert figures["format_valid"] == figures["box_iou"] == figures["au_recall"] == 1.0
