"""The demo's evidence report: ``report.html``, one self-contained page, and ``metrics.json``.

The page embeds everything it shows (PNG pictures as base64 data, curves as inline SVG), so it
opens from disk in any browser with no network. It reads only what the demo's commands left on
disk: each stage's evaluation folder (`reports.write_evaluation`), the training runs' logged
``metrics.csv``, the AU cache and the AU drawings.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tag_lightning.grounding.metrics import CLASSIFICATION, FAITHFULNESS

STAGES = {"before_sft": "untrained", "after_sft": "after SFT", "after_grpo": "after GRPO",
          "after_grpo_ablation": "after the matched-variance ablation"}
"""The names the report gives a demo's evaluated stages (a GRPO run of several seeds adds ``_seed<N>``)."""


def stage_title(stage: str) -> str:
    """``after_grpo_seed1`` -> "after GRPO, seed 1"."""
    base, _, seed = stage.partition("_seed")
    return STAGES[base] + (f", seed {seed}" if seed else "")


def evaluated_stages(demo) -> list[str]:
    """The demo's evaluated stages, in order: before and after SFT, then after each GRPO run."""
    return ["before_sft", "after_sft", *(f"after_{run}" for run in demo.grpo_runs())]
SAMPLED_SHOWN = ("hallucination_rate", "box_iou", "format_valid", "acc", "reward/grounding", "reward/format",
                 "reward/answer")
"""The figures of the sampled answers the report shows."""
EXPERIMENT_NOTE = (
    "A controlled experiment, with flaws made on purpose: the template teacher wrote {per_image} traces per face, {flawed} of them with the face's "
    "deliberate grounding flaw (an AU the detector does not activate, or a box on another region) and all naming the "
    "right label, so TAG's filter (label and format) kept them all, as it would keep a VLM teacher's. SFT learns "
    "that mix; the question is whether GRPO's grounding reward removes the flawed evidence, and whether the same "
    "GRPO with each grounding reward paid to a random answer of the group (the ablation) does not. Greedy answers "
    "show the model's most likely answer; sampled ones ({sampled} per face at temperature {temperature}) show how "
    "much of its probability the flaw still holds. A tiny model on four faces: this tests that the reward moves the "
    "model's evidence, not TAG's accuracy on real data.")
MEANINGS = {**CLASSIFICATION, **FAITHFULNESS}
FACES_SHOWN = 12
"""Faces drawn with the model's answer in the report (the first of the test data)."""
SMOOTHING = 8
"""Steps in the running mean drawn over GRPO's rewards: a step's reward depends on which faces it sampled."""
CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")
TINY_MODEL_NOTE = ("The model is a tiny randomly initialised Qwen2.5-VL (about 10M parameters) trained for minutes "
                   "on a handful of faces and tested on the same faces, so these figures show the machinery of TAG "
                   "working end to end, not how well the method recognises expressions.")


def write_report(demo, state) -> Path:
    """Write ``metrics.json`` and ``report.html`` into the demo's folder; returns the page's path."""
    evaluations = {stage: folder for stage in evaluated_stages(demo) if (folder := demo.evaluation(stage)) is not None}
    documents = {stage: json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
                 for stage, folder in evaluations.items()}
    rows = {stage: _read_rows(folder) for stage, folder in evaluations.items()}
    flaws = teacher_flaws(demo.traces)
    metrics = {
        "model": demo.model, "tiny_random_model": demo.settings.model is None, "data": demo.data,
        "experiment": {"traces_per_image": demo.settings.traces_per_image, "error_rate": demo.settings.error_rate,
                       "error_kinds": list(demo.settings.error_kinds),
                       "filter": "paper" if demo.settings.error_rate else "grounded", "ablation": demo.settings.ablation,
                       "rollout_seeds": list(demo.settings.rollout_seeds)},
        "stages": {stage: document["figures"] for stage, document in documents.items()},
        "sampled": {stage: document["sampled"] for stage, document in documents.items() if "sampled" in document},
        "faces": face_fates(flaws, rows),
        "over_seeds": over_seeds(documents, face_fates(flaws, rows)),
        "weights": {stage: {key: document.get(key) for key in ("weights", "checkpoint", "init_from")}
                    for stage, document in documents.items()},
        "meaning": MEANINGS,
        "evaluations": {stage: str(folder) for stage, folder in evaluations.items()},
    }
    (demo.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    sections = [
        _section("What was measured", _experiment_note(demo, metrics) + _seeds_table(metrics["over_seeds"])
                 + _metrics_table(metrics["stages"]) + _sampled_table(metrics["sampled"])
                 + _weights_list(metrics["weights"])),
        _section("The flawed evidence, face by face", _fates_table(metrics["faces"], list(rows))),
        _section("Training curves", _curves(demo)),
        _section("The evidence, face by face", _faces(demo, evaluations)),
        _section("The AU cache", _au_cache(demo)),
        _section("The commands of each phase", _commands(state)),
    ]
    note = f"<p class='note'>{html.escape(TINY_MODEL_NOTE)}</p>" if demo.settings.model is None else ""
    page = _PAGE.format(style=_STYLE, model=html.escape(demo.model), data=html.escape(demo.data), note=note,
                        sections="\n".join(sections))
    path = demo.out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# -- the metrics table -----------------------------------------------------------------------------

def _metrics_table(stages: dict[str, dict]) -> str:
    names = [name for name in MEANINGS if any(name in figures for figures in stages.values())]
    head = "".join(f"<th>{html.escape(stage_title(stage))}</th>" for stage in stages)
    rows = []
    for name in names:
        cells = "".join(f"<td class='num'>{_number(figures.get(name))}</td>" for figures in stages.values())
        rows.append(f"<tr><th>{name}</th>{cells}<td class='meaning'>{html.escape(MEANINGS[name])}</td></tr>")
    return f"<table><tr><th>metric</th>{head}<th>what it means</th></tr>{''.join(rows)}</table>"


def _seeds_table(summary: dict[str, dict]) -> str:
    """The experiment's figures after SFT, and after GRPO and the ablation as mean [min, max] over the seeds."""
    runs = [run for run in ("after_grpo", "after_grpo_ablation") if run in summary]
    if not runs or "after_sft" not in summary:
        return ""
    seeds = len(next(iter(summary[runs[0]].values()))["seeds"])
    head = "".join(f"<th>{html.escape(STAGES[run])}</th>" for run in runs)
    rows = []
    for name, before in summary["after_sft"].items():
        cells = "".join("<td class='num'>" + (f"{summary[run][name]['mean']:.3f} [{summary[run][name]['min']:.3f}, "
                                              f"{summary[run][name]['max']:.3f}]" if name in summary[run] else "-")
                        + "</td>" for run in runs)
        rows.append(f"<tr><th>{html.escape(name)}</th><td class='num'>{before['mean']:.3f}</td>{cells}</tr>")
    return (f"<h3>Over {seeds} rollout seed(s): mean [min, max]</h3><table><tr><th>figure</th><th>after SFT</th>"
            f"{head}</tr>{''.join(rows)}</table>")


def _weights_list(weights: dict[str, dict]) -> str:
    """Which weights answered in each stage: a checkpoint, the init_from it started from, or the bare model."""
    items = "".join(f"<li>{html.escape(stage_title(stage))}: {html.escape(used['weights'] or '?')}"
                    + (f" <code>{html.escape(used[used['weights']])}</code>" if used["weights"] in used else "")
                    + "</li>" for stage, used in weights.items())
    return f"<p>Weights evaluated:</p><ul>{items}</ul>"


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _experiment_note(demo, metrics: dict) -> str:
    if not demo.settings.error_rate:
        return ""
    sampled = next(iter(metrics["sampled"].values()), {})
    text = EXPERIMENT_NOTE.format(per_image=demo.settings.traces_per_image,
                                  flawed=round(demo.settings.error_rate * demo.settings.traces_per_image),
                                  sampled=sampled.get("answers_per_image", 0), temperature=sampled.get("temperature", "-"))
    return f"<p class='note'>{html.escape(text)}</p>"


def _sampled_table(sampled: dict[str, dict]) -> str:
    if not sampled:
        return ""
    head = "".join(f"<th>{html.escape(stage_title(stage))}</th>" for stage in sampled)
    rows = "".join(
        f"<tr><th>{name}</th>" + "".join(f"<td class='num'>{_number(s['figures'].get(name))}</td>" for s in sampled.values())
        + "</tr>" for name in SAMPLED_SHOWN)
    return ("<h3>Sampled answers (the model's distribution, not only its greedy answer)</h3>"
            f"<table><tr><th>figure over the samples</th>{head}</tr>{rows}</table>")


# -- the fate of each face's flaw ----------------------------------------------------------------

def teacher_flaws(traces: Path) -> dict[str, dict]:
    """Per image (by name): how many traces it got, and the flaw some of them carry (None: all grounded)."""
    flaws: dict[str, dict] = {}
    if not traces.is_file():
        return flaws
    for line in traces.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            entry = flaws.setdefault(row["image"], {"traces": 0, "flawed": 0, "flaw": None})
            entry["traces"] += 1
            if row.get("flaw"):
                entry["flawed"] += 1
                entry["flaw"] = row["flaw"]
    return flaws


def flawed_claims(claims: Sequence[dict]) -> list[str]:
    """The claims of an answer that the grounding reward scores below a grounded one: hallucinated or missed
    AUs, and boxes that miss their AU's region (IoU below 0.5)."""
    return [f"{claim['au']} {claim['verdict']}" if claim["verdict"] in ("hallucination", "miss")
            else f"{claim['au']} box IoU {claim['iou']:.2f}" for claim in claims
            if claim["verdict"] in ("hallucination", "miss") or (claim["box"] is not None and claim["iou"] < 0.5)]


def face_fates(flaws: dict[str, dict], rows: dict[str, list[dict]]) -> list[dict]:
    """Per face: the teacher's flaw, and at each evaluated stage the greedy answer's flawed claims and the share
    of its sampled answers that carry one."""
    faces = []
    for image in sorted({row["image"] for stage_rows in rows.values() for row in stage_rows}):
        fate = {"image": image, "teacher_flaw": flaws.get(image, {}).get("flaw"),
                "flawed_traces": flaws.get(image, {}).get("flawed", 0), "traces": flaws.get(image, {}).get("traces", 0)}
        for stage, stage_rows in rows.items():
            row = next((row for row in stage_rows if row["image"] == image), None)
            if row is None:
                continue
            samples = row.get("samples") or []
            fate[stage] = {"greedy": flawed_claims(row["claims"]),
                           "sampled_flawed": (sum(bool(flawed_claims(s["claims"])) for s in samples) / len(samples)
                                              if samples else None)}
            extra = (fate["teacher_flaw"] or {}).get("au") if (fate["teacher_flaw"] or {}).get("kind") == \
                "grounded_extra" else None
            if extra is not None:  # the placebo: does the answer keep the teacher's grounded extra step?
                fate[stage]["greedy_extra"] = cites(row["claims"], extra)
                fate[stage]["sampled_extra"] = (sum(cites(s["claims"], extra) for s in samples) / len(samples)
                                                if samples else None)
        faces.append(fate)
    return faces


def cites(claims: Sequence[dict], au: str) -> bool:
    """Whether an answer's step claims `au` (a boxed claim: the extra step, not a mention in prose)."""
    return any(claim["au"] == au and claim["step"] is not None for claim in claims)


def over_seeds(documents: dict[str, dict], faces: list[dict]) -> dict[str, dict]:
    """For GRPO and its ablation, each figure's mean, minimum and maximum over the rollout seeds, beside after SFT.

    Figures: the greedy ``hallucination_rate``, the sampled answers' ``hallucination_rate``, ``au_recall``,
    ``box_iou`` and rewards, and for the placebo the share of sampled answers keeping the grounded extra step
    (``extra_step``, over the faces that have one).
    """
    def figures(stage: str) -> dict[str, float]:
        document = documents[stage]
        sampled = (document.get("sampled") or {}).get("figures", {})
        found = {"greedy/hallucination_rate": document["figures"]["hallucination_rate"],
                 **{f"sampled/{name}": sampled[name] for name in ("hallucination_rate", "au_recall", "box_iou",
                                                                  "reward/grounding") if name in sampled}}
        shares = [face[stage]["sampled_extra"] for face in faces
                  if face.get(stage, {}).get("sampled_extra") is not None]
        if shares:
            found["sampled/extra_step"] = sum(shares) / len(shares)
        return found

    summary = {}
    if "after_sft" in documents:
        summary["after_sft"] = {name: {"mean": value, "min": value, "max": value, "seeds": [value]}
                                for name, value in figures("after_sft").items()}
    for kind in ("after_grpo", "after_grpo_ablation"):
        stages = [stage for stage in documents if stage == kind or (stage.startswith(kind + "_seed"))]
        if not stages:
            continue
        per_seed = [figures(stage) for stage in stages]
        summary[kind] = {name: {"mean": sum(found[name] for found in per_seed) / len(per_seed),
                                "min": min(found[name] for found in per_seed),
                                "max": max(found[name] for found in per_seed),
                                "seeds": [found[name] for found in per_seed]}
                         for name in per_seed[0] if all(name in found for found in per_seed)}
    return summary


def _describe_flaw(flaw: dict | None) -> str:
    if flaw is None:
        return "none"
    if flaw["kind"] == "hallucination":
        return f"claims {flaw['au']} (measured intensity {flaw['measured_intensity']})"
    if flaw["kind"] == "grounded_extra":
        return f"a grounded extra step on {flaw['au']} (a placebo; intensity {flaw['measured_intensity']})"
    if flaw["kind"] == "swapped_au":
        return (f"step {flaw['step']} names {flaw['au']} (measured intensity {flaw['measured_intensity']}) in place of "
                f"{', '.join(flaw['aus'])}")
    return f"step {flaw['step']} ({', '.join(flaw['aus'])}) boxed on another region"


def _fates_table(faces: list[dict], stages: list[str]) -> str:
    trained = [stage for stage in stages if stage != "before_sft"]
    if not faces or not trained:
        return "<p>No trained stage was evaluated.</p>"
    head = "".join(f"<th>{html.escape(stage_title(stage))}</th>" for stage in trained)
    body = []
    for face in faces:
        cells = []
        for stage in trained:
            fate = face.get(stage)
            if fate is None:
                cells.append("<td>-</td>")
                continue
            greedy = ", ".join(fate["greedy"]) or "grounded"
            share = "" if fate["sampled_flawed"] is None else f"<br>{fate['sampled_flawed']:.0%} of samples flawed"
            cells.append(f"<td>greedy: {html.escape(greedy)}{share}</td>")
        flaw = f"{_describe_flaw(face['teacher_flaw'])} in {face['flawed_traces']} of {face['traces']} traces"
        body.append(f"<tr><th>{html.escape(Path(face['image']).name)}</th><td>{html.escape(flaw)}</td>{''.join(cells)}</tr>")
    legend = ("<p>A flawed claim is one the grounding reward scores below a grounded one: an AU the detector does not "
              "activate (hallucination), or a box with IoU below 0.5 against its AU's region.</p>")
    return legend + f"<table><tr><th>face</th><th>the teacher's flaw</th>{head}</tr>{''.join(body)}</table>"


# -- curves --------------------------------------------------------------------------------------

def logged_series(run_root: Path, names: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """Each named column of a training run's ``metrics.csv`` files as (step, value) points.

    A resumed run logs into a new version folder; its points replace the earlier folder's at the
    same steps.
    """
    points: dict[str, dict[float, float]] = {name: {} for name in names}
    for path in sorted(run_root.rglob("metrics.csv"), key=lambda path: path.stat().st_mtime):
        with open(path, newline="", encoding="utf-8") as rows:
            for row in csv.DictReader(rows):
                for name in names:
                    if row.get(name):
                        points[name][float(row["step"])] = float(row[name])
    return {name: sorted(series.items()) for name, series in points.items() if series}


def running_mean(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Each point's value replaced by the mean of it and the `window` - 1 points before it (fewer at the start)."""
    values = [value for _, value in points]
    means = []
    for index, (x, _) in enumerate(points):
        recent = values[max(0, index - window + 1): index + 1]
        means.append((x, sum(recent) / len(recent)))
    return means


def _curves(demo) -> str:
    sft = logged_series(demo.out / "sft", ["train/loss"])
    sft_val = logged_series(demo.out / "sft", ["val/format_valid", "val/box_iou", "val/acc"])
    total = logged_series(demo.out / "grpo", ["train/reward"]).get("train/reward", [])
    rewards = logged_series(demo.out / "grpo", [f"train/rewards/{name}/mean" for name in ("format", "answer", "grounding")])
    grounding = {name: running_mean(line, SMOOTHING)
                 for run, name in (("grpo", "GRPO"), ("grpo_ablation", "ablation: paid shuffled"))
                 for line in logged_series(demo.out / run, ["train/rewards/grounding/mean"]).values()}
    smoothed = f"mean of {SMOOTHING} steps"
    charts = [
        line_chart("SFT: training loss", sft, "optimizer step"),
        line_chart("SFT: validation answers (greedy)", sft_val, "optimizer step"),
        line_chart("GRPO: weighted total reward of the sampled answers",
                   {"each step": total, smoothed: running_mean(total, SMOOTHING)} if total else {}, "optimizer step"),
        line_chart(f"GRPO: each reward of the sampled answers (0 to 1), {smoothed}",
                   {name.split("/")[2]: running_mean(line, SMOOTHING) for name, line in rewards.items()},
                   "optimizer step"),
        line_chart(f"GRPO: grounding reward of the sampled answers, {smoothed}", grounding, "optimizer step"),
    ]
    return "<div class='charts'>" + "".join(charts) + "</div>"


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str,
               width: int = 520, height: int = 280) -> str:
    """An inline SVG line chart of `series` (name -> (x, y) points), with axes, ranges and a legend."""
    left, right, top, bottom = 56, 12, 30, 44 + 14 * ((len(series) + 1) // 2)
    points = [point for line in series.values() for point in line]
    if not points:
        return (f"<svg width='{width}' height='60'><text x='4' y='20'>"
                f"{html.escape(title)}: nothing was logged</text></svg>")
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0

    def place(x: float, y: float) -> str:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)
        return f"{px:.1f},{py:.1f}"

    parts = [f"<svg width='{width}' height='{height}' font-size='11' "
             f"font-family='sans-serif'>",
             f"<text x='{left}' y='16' font-size='13'>{html.escape(title)}</text>",
             f"<rect x='{left}' y='{top}' width='{width - left - right}' height='{height - top - bottom}' "
             "fill='none' stroke='#999'/>"]
    for value, anchor in ((y0, height - bottom), (y1, top)):
        parts.append(f"<text x='{left - 4}' y='{anchor + 4}' text-anchor='end'>{value:.3g}</text>")
    for value, anchor in ((x0, left), (x1, width - right)):
        parts.append(f"<text x='{anchor}' y='{height - bottom + 14}' text-anchor='middle'>{value:.0f}</text>")
    parts.append(f"<text x='{(left + width - right) / 2}' y='{height - bottom + 28}' "
                 f"text-anchor='middle'>{html.escape(x_label)}</text>")
    for index, (name, line) in enumerate(series.items()):
        colour = CURVE_COLOURS[index % len(CURVE_COLOURS)]
        drawn = " ".join(place(x, y) for x, y in line)
        if len(line) == 1:
            parts.append(f"<circle cx='{drawn.split(',')[0]}' cy='{drawn.split(',')[1]}' r='3' fill='{colour}'/>")
        else:
            parts.append(f"<polyline points='{drawn}' fill='none' stroke='{colour}' stroke-width='1.5'/>")
        legend_x, legend_y = left + (index % 2) * 230, height - bottom + 46 + (index // 2) * 14
        parts.append(f"<rect x='{legend_x}' y='{legend_y - 4}' width='10' height='3' fill='{colour}'/>"
                     f"<text x='{legend_x + 14}' y='{legend_y}'>{html.escape(name)} "
                     f"(last {line[-1][1]:.3g})</text>")
    parts.append("</svg>")
    return "".join(parts)


# -- faces ---------------------------------------------------------------------------------------

def _faces(demo, evaluations: dict[str, Path | None]) -> str:
    """Per face, the answer of each trained stage drawn over the image it saw, and its text."""
    from tag_lightning.grounding.viz import draw_answer

    shown = [stage for stage in evaluations if stage != "before_sft"]
    if not shown:
        return "<p>No trained stage was evaluated.</p>"
    answers = {stage: {row["image"]: row for row in _read_rows(evaluations[stage])} for stage in shown}
    faces = list(answers[shown[-1]].values())[:FACES_SHOWN]
    images = _evaluated_images(demo, evaluations[shown[-1]], [face["image"] for face in faces])
    blocks = []
    for face in faces:
        figures = []
        for stage in shown:
            answer = answers[stage].get(face["image"])
            if answer is None:
                continue
            picture = "" if answer["image"] not in images else _png(draw_answer(
                images[answer["image"]], answer["trace"]["steps"], answer["claims"], answer["answer"],
                answer["label"], answer.get("format_errors", ())))
            figures.append(f"<figure>{picture}<figcaption>{html.escape(stage_title(stage))}: "
                           f"<pre>{html.escape(answer['text'])}</pre></figcaption></figure>")
        blocks.append(f"<h3>{html.escape(Path(face['image']).name)} (label: {html.escape(str(face['label']))})</h3>"
                      + "".join(figures))
    legend = ("<p>Left half of each picture: the model's boxes, coloured by the verdict of the claim rule "
              "(supported, hallucination, miss, unverified). Right half: the detector's boxes of the same AUs.</p>")
    return legend + "".join(blocks)


def _read_rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.jsonl", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _evaluated_images(demo, folder: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The images the model saw (letterboxed to the run's `image_size`), by name."""
    from tag_lightning.data.augment import FaceAugment
    from tag_lightning.data.datasets import parse_data_spec
    from tag_lightning.images import UnreadableImage, load_image

    config = yaml.safe_load((folder.parent / "config.yaml").read_text(encoding="utf-8"))
    letterbox = FaceAugment(int(config["data"]["image_size"]))
    split = config["data"].get("test_split")
    wanted = set(names)
    images = {}
    for sample in parse_data_spec(demo.data, split):
        if sample.image.name in wanted:
            try:
                rgb = load_image(sample.image)
            except UnreadableImage as err:  # changed or removed since the test: its answer is shown without it
                print(f"report: {err}", file=sys.stderr)
                continue
            images[sample.image.name] = letterbox.transform(rgb, [], (rgb.shape[1], rgb.shape[0]))[0]
    return images


# -- the AU cache --------------------------------------------------------------------------------

def _au_cache(demo) -> str:
    from tag_lightning.au.cache import AUCache

    cache = AUCache(demo.au_cache)
    statuses, sources, activated = Counter(), Counter(), Counter()
    faces = 0
    for content_hash in cache.content_hashes():
        record = cache.get(content_hash)
        statuses[record.status] += 1
        if record.has_face:
            faces += 1
            sources.update(entry["source"] for entry in record.aus.values() if entry.get("source"))
            activated.update(key for key, _ in record.activated())
    counts = ", ".join(f"{status} {count}" for status, count in statuses.most_common())
    common = ", ".join(f"{key} ({count})" for key, count in activated.most_common(8)) or "none"
    summary = (f"<p>{sum(statuses.values())} images: {counts}. AU intensities from: "
               f"{', '.join(f'{source} ({count} AUs)' for source, count in sources.most_common()) or '-'}. "
               f"Most often activated (intensity at least 1, over {faces} faces): {common}.</p>")
    drawings = sorted(demo.drawings.glob("*.png"))
    pictures = "".join(f"<figure>{_png(np.asarray(Image.open(path).convert('RGB')), 320)}<figcaption>"
                       f"{html.escape(path.name)}</figcaption></figure>" for path in drawings)
    return summary + (f"<p>The detector's activated AUs and their regions:</p><div class='row'>{pictures}</div>"
                      if pictures else "")


# -- commands ------------------------------------------------------------------------------------

def _commands(state) -> str:
    items = []
    for name, finished in state.finished.items():
        commands = "\n".join(finished["commands"])
        items.append(f"<h3>{html.escape(name)} ({finished['seconds']:.0f} s)</h3><pre>{html.escape(commands)}</pre>")
    return "".join(items)


# -- page pieces ---------------------------------------------------------------------------------

def _png(rgb: np.ndarray, max_width: int | None = None) -> str:
    """An <img> holding `rgb` as base64 PNG data."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    style = f" style='max-width:{max_width}px'" if max_width else ""
    return f"<img src='data:image/png;base64,{encoded}'{style} alt=''>"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.meaning { color: #555; font-size: 90%; }
.note { background: #fff6d5; padding: 8px; border-left: 4px solid #e0b000; }
.charts svg { margin: 0 12px 12px 0; } figure { display: inline-block; vertical-align: top; margin: 0 12px 12px 0; }
figure img { max-width: 100%; } pre { white-space: pre-wrap; font-size: 85%; max-width: 900px; }
.row figure { max-width: 330px; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TAG demo report</title><style>{style}</style></head>
<body>
<h1>TAG demo: AU-grounded expression recognition, SFT then GRPO</h1>
<p>Model: <code>{model}</code>. Data: <code>{data}</code>.</p>
{note}
{sections}
</body></html>
"""
