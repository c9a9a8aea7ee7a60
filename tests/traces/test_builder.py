"""Rejection sampling and the resumable `tag prepare traces` job, on the real sample photos."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tag_lightning.answers.grammar import PAPER, PER_STEP, Step, Trace, parse_trace, render_trace
from tag_lightning.commands.cli import main
from tag_lightning.data.datasets import FERSample
from tag_lightning.data.samples import ANGER, HAPPINESS, MANIFEST_NAME, SAMPLE_LABELS, SINGLE_FACE, SURPRISE
from tag_lightning.grounding.claims import MISS, SUPPORTED, trace_claims
from tag_lightning.images import ImageRef, content_hash
from tag_lightning.traces.builder import (
    RejectionConfig,
    build_traces,
    grounding_errors,
    read_jsonl,
    sample_trace,
    sidecar_paths,
)
from tag_lightning.traces.teachers import Proposal, TeacherDeclined, TeacherError, TeacherRequest
from tag_lightning.traces.template import TemplateTeacher

CANDIDATES = ("surprise", "fear", "happiness", "anger", "disgust", "neutral")
LABELLED = [name for name, label in SAMPLE_LABELS.items() if label]
KEYS = {"image", "label", "trace", "trace_struct", "teacher", "attempts", "content_hash", "dataset", "split"}


class ScriptedTeacher:
    """Answers from a list (a TeacherError in the list is raised) and remembers every request."""

    name = "scripted"

    def __init__(self, answers: list):
        self.answers = list(answers)
        self.requests: list[TeacherRequest] = []

    def propose(self, request: TeacherRequest) -> Proposal:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Proposal(answer)


def _sample(record, label: str | None) -> FERSample:
    return FERSample(ImageRef.from_path(record.image), label, "manifest", "all", record.image)


# -- judging answers -----------------------------------------------------------------------------
def test_grounding_accepts_the_template_and_catches_unbacked_claims(sample_records):
    record = sample_records[HAPPINESS]
    trace = TemplateTeacher().write(record, "happiness")
    assert grounding_errors(trace, record, 1.0, 0.5) == []
    step = trace.steps[0]
    inactive = replace(trace, steps=(replace(step, aus=(15,)), *trace.steps[1:]))
    assert any("AU15 is not activated" in error for error in grounding_errors(inactive, record, 1.0, 0.5))
    x1, y1, x2, y2 = step.box
    moved = replace(trace, steps=(replace(step, box=(x2, y2, x2 + 40, y2 + 40)), *trace.steps[1:]))
    assert any("misses the AU" in error for error in grounding_errors(moved, record, 1.0, 0.5))
    unknown = replace(trace, steps=(replace(step, aus=(99,)),))
    assert any("AU99 was not measured" in error for error in grounding_errors(unknown, record, 1.0, 0.5))
    boasting = replace(trace, conclusion="AU15 and AU12 indicate happiness.")
    assert any("conclusion: AU15" in error for error in grounding_errors(boasting, record, 1.0, 0.5))


def test_a_concluded_au_no_step_inspects_is_blamed_on_the_conclusion(sample_records):
    """In the paper's format the conclusion names the AUs; one whose region no step inspects has no box."""
    record = sample_records[HAPPINESS]
    grounded = TemplateTeacher().write(record, "happiness")
    paper = parse_trace(render_trace(grounded, PAPER)).trace
    assert paper.steps and grounding_errors(paper, record, 1.0, 0.5) == []
    unboxed = replace(paper, steps=paper.steps[:-1])
    errors = grounding_errors(unboxed, record, 1.0, 0.5)
    assert errors == [f"the conclusion: no step inspects the region of AU{au}, so nothing boxes it"
                      for au in grounded.steps[-1].aus]
    assert not any("None" in error for error in errors)


def test_a_neutral_answer_may_report_inactive_aus_as_relaxed(sample_records):
    record = sample_records[HAPPINESS]
    au15 = record.aus["AU15"]
    trace = TemplateTeacher().write(record, "happiness")
    relaxed = replace(trace, steps=(Step("lip corner", (15,), "relaxed", tuple(au15["box"])),), answer="neutral")
    assert grounding_errors(relaxed, record, 1.0, 0.5) == []


def test_a_neutral_step_calling_an_activated_au_relaxed_is_rejected_as_the_claim_rule_scores_it_a_miss(
        sample_records):
    """What a VLM teacher writes and the template teacher avoids: the filter keeps exactly what the
    claim rule of the rewards and metrics supports, and rejects the trace until the teacher gives up."""
    record = sample_records[HAPPINESS]
    activated = {key for key, _ in record.activated(1.0)}
    au12 = record.aus["AU12"]
    assert "AU12" in activated
    trace = TemplateTeacher().write(record, "happiness")
    miss = replace(trace, steps=(Step("lip corner", (12,), "relaxed", tuple(au12["box"])),), answer="neutral")
    assert [claim.verdict for claim in trace_claims(miss, record.aus, activated) if claim.step is not None] == [MISS]
    assert any("calls AU12 relaxed, but it is activated" in error for error in grounding_errors(miss, record, 1.0, 0.5))
    for honest in (trace, TemplateTeacher().write(record, "neutral")):
        assert {claim.verdict for claim in trace_claims(honest, record.aus, activated)} == {SUPPORTED}
        assert grounding_errors(honest, record, 1.0, 0.5) == []

    outcome = sample_trace(ScriptedTeacher([render_trace(miss)] * 4), record, ImageRef.from_path(record.image),
                           "neutral", CANDIDATES, RejectionConfig(max_format_retries=3))
    assert (outcome.status, outcome.reason, outcome.attempts.proposals) == ("rejected", "format", 4)


# -- rejection sampling --------------------------------------------------------------------------
def test_format_failures_are_retried_up_to_the_limit(sample_records):
    record = sample_records[SURPRISE]
    teacher = ScriptedTeacher(["no trace here"] * 3)
    outcome = sample_trace(teacher, record, ImageRef.from_path(record.image), "surprise", CANDIDATES,
                           RejectionConfig(max_format_retries=2))
    assert (outcome.status, outcome.reason) == ("rejected", "format")
    assert (outcome.attempts.proposals, outcome.attempts.format_retries) == (3, 2)
    assert "missing 'Global analysis:' line" in outcome.detail


def test_wrong_labels_are_eliminated_one_by_one_until_the_limit(sample_records):
    record = sample_records[SURPRISE]
    right = TemplateTeacher().write(record, "surprise")
    wrong = [render_trace(replace(right, answer=label)) for label in ("fear", "anger", "happiness")]
    teacher = ScriptedTeacher(wrong)
    outcome = sample_trace(teacher, record, ImageRef.from_path(record.image), "surprise", CANDIDATES,
                           RejectionConfig(max_label_retries=2))
    assert (outcome.status, outcome.reason, outcome.attempts.label_retries) == ("rejected", "wrong label", 2)
    assert outcome.attempts.eliminated == ["fear", "anger"]
    assert [request.candidates for request in teacher.requests] == [
        CANDIDATES,
        tuple(label for label in CANDIDATES if label != "fear"),
        tuple(label for label in CANDIDATES if label not in ("fear", "anger")),
    ]
    assert all(request.label == "surprise" for request in teacher.requests)


def test_an_eliminated_label_answered_again_is_a_format_failure(sample_records):
    record = sample_records[SURPRISE]
    right = TemplateTeacher().write(record, "surprise")
    fear = render_trace(replace(right, answer="fear"))
    outcome = sample_trace(ScriptedTeacher([fear, fear, render_trace(right)]), record,
                           ImageRef.from_path(record.image), "surprise", CANDIDATES)
    assert outcome.status == "kept"
    assert (outcome.attempts.label_retries, outcome.attempts.format_retries) == (1, 1)


def test_the_paper_filter_keeps_flawed_traces_with_the_right_label_and_ours_drops_them(sample_records):
    """Hand-made answers: grounded, an extra step on an inactive AU, a box on another region, a wrong
    label, a broken format. TAG's filter sees only the last two; ours sees all four flaws."""
    record = sample_records[HAPPINESS]
    grounded = TemplateTeacher().write(record, "happiness")
    au15 = record.aus["AU15"]  # inactive on this face
    hallucinated = replace(grounded, steps=(*grounded.steps, Step("lip corner", (15,), "pulled down", tuple(au15["box"]))))
    far = tuple(record.aus["AU1"]["box"])
    moved = replace(grounded, steps=(replace(grounded.steps[0], box=far), *grounded.steps[1:]))
    answers = {"grounded": render_trace(grounded), "hallucinated": render_trace(hallucinated),
               "moved": render_trace(moved), "wrong label": render_trace(replace(grounded, answer="anger")),
               "broken": "Global analysis: nothing else"}
    kept = {}
    for name in ("paper", "grounded"):
        config = RejectionConfig(max_format_retries=0, max_label_retries=0, filter=name)
        kept[name] = sorted(answer for answer, text in answers.items()
                            if sample_trace(ScriptedTeacher([text]), record, ImageRef.from_path(record.image),
                                            "happiness", CANDIDATES, config).status == "kept")
    assert kept == {"paper": ["grounded", "hallucinated", "moved"], "grounded": ["grounded"]}
    with pytest.raises(ValueError, match="filter must be one of paper, grounded"):
        RejectionConfig(filter="strict")


def test_an_answer_in_the_other_trace_format_is_a_format_error(sample_records):
    record = sample_records[SURPRISE]
    right = TemplateTeacher().write(record, "surprise")
    teacher = ScriptedTeacher([render_trace(right), render_trace(right, PAPER)])
    outcome = sample_trace(teacher, record, ImageRef.from_path(record.image), "surprise", CANDIDATES,
                           RejectionConfig(trace_format=PAPER))
    assert (outcome.status, outcome.attempts.format_retries) == ("kept", 1)
    assert parse_trace(render_trace(outcome.trace, PAPER)).trace_format == PAPER
    assert [request.trace_format for request in teacher.requests] == [PAPER, PAPER]
    refused = sample_trace(ScriptedTeacher([render_trace(right)]), record, ImageRef.from_path(record.image),
                           "surprise", CANDIDATES, RejectionConfig(trace_format=PAPER, max_format_retries=0))
    assert refused.detail == "written in the per_step format, asked for the paper format"
    with pytest.raises(ValueError, match="trace_format must be one of per_step, paper"):
        RejectionConfig(trace_format="xml")


def test_declines_and_transport_failures_end_the_sample_without_retries(sample_records):
    record = sample_records[SURPRISE]
    image = ImageRef.from_path(record.image)
    declined = sample_trace(ScriptedTeacher([TeacherDeclined("nothing to cite")]), record, image, "surprise",
                            CANDIDATES)
    assert (declined.status, declined.reason, declined.detail) == ("rejected", "declined", "nothing to cite")
    failed = sample_trace(ScriptedTeacher([TeacherError("down", retries=4, errors=("HTTP 503",) * 5)]), record,
                          image, "surprise", CANDIDATES)
    assert (failed.status, failed.reason, failed.attempts.http_retries) == ("failed", "teacher error", 4)


def test_failed_samples_are_asked_again_on_the_next_run(sample_records, tmp_path):
    records = {r.content_hash: r for r in sample_records.values()}
    samples = [_sample(sample_records[name], SAMPLE_LABELS[name]) for name in (SURPRISE, HAPPINESS)]
    out = tmp_path / "traces.jsonl"
    down = ScriptedTeacher([TeacherError("connection refused", retries=3)] * 2)
    stats = build_traces(samples, records, down, out, CANDIDATES, progress=False)
    assert (stats.kept, stats.failed, stats.http_retries) == (0, 2, 6)
    rejected, stats_file = sidecar_paths(out)
    assert [(line["status"], line["reason"]) for line in read_jsonl(rejected)] == [("failed", "teacher error")] * 2
    assert json.loads(stats_file.read_text())["failed"] == 2
    again = build_traces(samples, records, TemplateTeacher(), out, CANDIDATES, progress=False)
    assert again.kept == 2, "failed samples are asked again on the next run"


def test_samples_are_screened_by_label_and_record_status(sample_records, tmp_path):
    records = {r.content_hash: r for r in sample_records.values()}
    no_face = next(r for r in sample_records.values() if r.status == "no_face")
    unknown = FERSample(ImageRef(name="elsewhere.png", data=b"\x89PNG other bytes"), "anger", "manifest", "all", "-")
    samples = [
        _sample(sample_records[SINGLE_FACE], None),
        _sample(no_face, "surprise"),
        unknown,
        _sample(sample_records[ANGER], "contempt"),
        _sample(sample_records[ANGER], "anger"),
    ]
    stats = build_traces(samples, records, TemplateTeacher(), tmp_path / "t.jsonl", CANDIDATES, progress=False)
    assert stats.kept == 1 and stats.samples == 5
    assert stats.skipped == {"no label": 1, "AU record no_face": 1, "not in the AU cache": 1,
                             "label not a candidate": 1}


def test_a_torn_last_line_is_dropped_and_a_damaged_middle_is_an_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"image": "a"}\n{"image": "b"}\n{"image": "c", "la')
    assert read_jsonl(path) == [{"image": "a"}, {"image": "b"}]
    assert path.read_text() == '{"image": "a"}\n{"image": "b"}\n'
    path.write_text('{"image": "a"}\nnot json\n{"image": "c"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2 is not a JSON line"):
        read_jsonl(path)


# -- tag prepare traces, end to end --------------------------------------------------------------
def _prepare_traces(samples_dir: Path, au_cache: Path, out: Path, *options: str) -> int:
    return main(["prepare", "traces", "--data", str(samples_dir / MANIFEST_NAME), "--cache", str(au_cache),
                 "--teacher", "template", "--out", str(out), "--quiet", *options])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_traces_writes_tag310k_style_jsonl(samples_dir, au_cache, tmp_path, capsys):
    out = tmp_path / "traces.jsonl"
    assert _prepare_traces(samples_dir, au_cache, out) == 0
    lines = _lines(out)
    assert sorted(Path(line["image"]).name for line in lines) == sorted(LABELLED)
    for line in lines:
        assert KEYS <= set(line)
        image = Path(line["image"])
        assert line["label"] == SAMPLE_LABELS[image.name] == line["trace_struct"]["answer"]
        assert line["content_hash"] == content_hash(image.read_bytes())
        assert (line["teacher"], line["dataset"], line["split"]) == ("template", "manifest", "all")
        assert line["trace"].endswith(f"<answer> {line['label']} </answer>")
        assert line["attempts"]["proposals"] == 1
    printed = capsys.readouterr().out
    assert "kept 4" in printed and "no label 3" in printed and "retries: format 0, label 0, http 0" in printed
    stats = json.loads(sidecar_paths(out)[1].read_text())
    assert stats["kept"] == 4 and stats["last_run"]["skipped"] == {"no label": 3}


def test_prepare_traces_in_the_paper_s_format_writes_and_records_it(samples_dir, au_cache, tmp_path, capsys):
    out = tmp_path / "paper.jsonl"
    assert _prepare_traces(samples_dir, au_cache, out, "--trace-format", "paper") == 0
    lines = _lines(out)
    assert sorted(Path(line["image"]).name for line in lines) == sorted(LABELLED)  # the filter keeps them all
    for line in lines:
        parsed = parse_trace(line["trace"], image_size=tuple(line["image_size"]), labels=CANDIDATES)
        assert (line["trace_format"], parsed.trace_format, parsed.errors) == (PAPER, PAPER, ())
        assert render_trace(Trace.from_dict(line["trace_struct"]), PAPER) == line["trace"]
    assert json.loads(sidecar_paths(out)[1].read_text())["last_run"]["settings"]["trace_format"] == PAPER
    ours = tmp_path / "per_step.jsonl"
    assert _prepare_traces(samples_dir, au_cache, ours) == 0
    assert {line["trace_format"] for line in _lines(ours)} == {PER_STEP}
    assert json.loads(sidecar_paths(ours)[1].read_text())["last_run"]["settings"]["trace_format"] == PER_STEP
    capsys.readouterr()
    assert _prepare_traces(samples_dir, au_cache, out, "--limit", "1") == 2  # per_step lines into a paper file
    assert capsys.readouterr().err == (f"error: {out} holds paper traces, and --trace-format is per_step: write "
                                       "per_step traces to another --out, or rerun with --trace-format paper\n")


def test_prepare_traces_resumes_after_a_kill_without_duplicates(samples_dir, au_cache, tmp_path):
    out = tmp_path / "traces.jsonl"
    assert _prepare_traces(samples_dir, au_cache, out) == 0
    complete = _lines(out)
    written = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(written[:2]) + written[2][: len(written[2]) // 2])  # killed while writing line 3
    assert _prepare_traces(samples_dir, au_cache, out) == 0
    resumed = _lines(out)
    assert len(resumed) == len(complete) == 4
    assert len({line["image"] for line in resumed}) == 4
    assert resumed[:2] == complete[:2] and sorted(map(json.dumps, resumed)) == sorted(map(json.dumps, complete))
    last_run = json.loads(sidecar_paths(out)[1].read_text())["last_run"]
    assert last_run["kept"] == 2 and last_run["skipped"]["already written"] == 2


def test_given_up_images_are_not_retried_unless_asked(samples_dir, au_cache, tmp_path):
    out = tmp_path / "traces.jsonl"
    assert _prepare_traces(samples_dir, au_cache, out, "--min-intensity", "9") == 0  # nothing is activated
    assert out.read_text() == ""
    given_up = read_jsonl(sidecar_paths(out)[0])
    assert [(line["status"], line["reason"]) for line in given_up] == [("rejected", "declined")] * 4
    assert _prepare_traces(samples_dir, au_cache, out) == 0
    stats = json.loads(sidecar_paths(out)[1].read_text())
    assert stats["last_run"]["skipped"]["rejected earlier"] == 4 and stats["last_run"]["rejected"] == {}
    assert stats["rejected"] == {"declined": 4}  # the output's, from the sidecar that the first run wrote
    assert _prepare_traces(samples_dir, au_cache, out, "--retry-rejected", "--limit", "2") == 0
    assert len(_lines(out)) == 2  # the first two manifest rows are labelled


def test_prepare_traces_explains_missing_teacher_options(samples_dir, au_cache, tmp_path, capsys):
    assert _prepare_traces(samples_dir, au_cache, tmp_path / "t.jsonl", "--teacher", "openai") == 2
    assert "--base-url" in capsys.readouterr().err
    assert _prepare_traces(samples_dir, au_cache, tmp_path / "t.jsonl", "--candidates", "anger") == 2
    assert "--candidates" in capsys.readouterr().err
    assert _prepare_traces(samples_dir, au_cache, tmp_path / "t.jsonl", "--batch-size", "2") == 2
    assert "the template teacher cannot answer in batches" in capsys.readouterr().err


def test_several_traces_per_image_are_written_resumed_and_recorded(samples_dir, au_cache, tmp_path, capsys):
    out = tmp_path / "traces.jsonl"
    options = ("--traces-per-image", "4", "--error-rate", "0.75", "--filter", "paper")
    assert _prepare_traces(samples_dir, au_cache, out, *options) == 0
    complete = _lines(out)
    assert len(complete) == 16
    by_image: dict[str, list[dict]] = {}
    for line in complete:
        by_image.setdefault(line["image"], []).append(line)
    for lines in by_image.values():
        assert sorted(line["trace_index"] for line in lines) == [0, 1, 2, 3]
        assert sum("flaw" in line for line in lines) == 3
        assert len({json.dumps(line["flaw"]) for line in lines if "flaw" in line}) == 1  # one flaw per face
    stats = json.loads(sidecar_paths(out)[1].read_text())
    assert sum(stats["flawed"].values()) == 12
    settings = stats["last_run"]["settings"]
    assert settings["filter"] == "paper" and settings["traces_per_image"] == 4
    assert settings["teacher"] | {"error_rate": 0.75, "name": "template"} == settings["teacher"]
    assert "kept with a deliberate flaw" in capsys.readouterr().out
    written = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(written[:6]) + written[6][:40])  # killed while writing the 7th trace
    assert _prepare_traces(samples_dir, au_cache, out, *options) == 0
    resumed = _lines(out)
    assert sorted(map(json.dumps, resumed)) == sorted(map(json.dumps, complete))
    assert json.loads(sidecar_paths(out)[1].read_text())["last_run"]["kept"] == 10  # only what was lost is asked for
    assert _prepare_traces(samples_dir, au_cache, out, "--filter", "grounded", "--traces-per-image", "4",
                           "--error-rate", "0.75") == 0
    again = json.loads(sidecar_paths(out)[1].read_text())["last_run"]
    assert again["kept"] == 0 and again["skipped"]["already written"] == 4


def test_after_a_resume_the_statistics_count_the_whole_output_and_the_last_run(
        samples_dir, au_cache, tmp_path, capsys):
    """Issue 27: a resumed job's statistics said "kept 13" beside 16 traces in the file."""
    out = tmp_path / "traces.jsonl"
    options = ("--traces-per-image", "4", "--error-rate", "0.75", "--filter", "paper")
    assert _prepare_traces(samples_dir, au_cache, out, *options) == 0
    written = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(written[:3]) + written[3][:40])  # killed while writing the 4th trace,
    sidecar_paths(out)[1].unlink()  # before it wrote any statistics
    capsys.readouterr()
    assert _prepare_traces(samples_dir, au_cache, out, *options) == 0
    lines = _lines(out)
    stats = json.loads(sidecar_paths(out)[1].read_text())
    assert (stats["kept"], stats["last_run"]["kept"]) == (len(lines), 13) == (16, 13)
    assert stats["requests"] == sum(line["attempts"]["requests"] for line in lines)
    assert sum(stats["flawed"].values()) == sum("flaw" in line for line in lines) == 12
    printed = capsys.readouterr().out
    assert "kept 13," in printed and "the output, with earlier runs: kept 16, rejected 0, failed 0" in printed


def test_the_error_rate_belongs_to_the_template_teacher(samples_dir, au_cache, tmp_path, capsys):
    for option, value, message in (("--error-rate", "1.5", "must lie in [0, 1]"),
                                   ("--error-kinds", "typo", "unknown flaw kind")):
        with pytest.raises(SystemExit) as stopped:
            _prepare_traces(samples_dir, au_cache, tmp_path / "t.jsonl", option, value)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert _prepare_traces(samples_dir, au_cache, tmp_path / "t.jsonl", "--teacher", "openai",
                           "--error-rate", "0.5") == 2
    assert "controlled experiment" in capsys.readouterr().err
