"""Rejection sampling of teacher traces into a TAG-310K-style JSONL file, resumable after a kill.

For each labelled face with an `ok` AU record, the teacher proposes `traces_per_image` traces
(a VLM teacher sampled at temperature writes a different one each time). A trace is kept only if
it parses without a format error and predicts the ground-truth label (TAG's data construction,
the ``paper`` filter) and, with the ``grounded`` filter (the default), if it is also grounded in
the detector's AUs and boxes. A rejected answer is asked for again, up to `max_format_retries`
times; a wrong label is asked for again with that label removed from the candidates (label
elimination), up to `max_label_retries` times. Traces are asked for and written in one format
(`RejectionConfig.trace_format`, `grammar.TRACE_FORMATS`); an answer in the other is a format error,
as the claims of the two are matched differently (`claims.py`) and SFT must learn one.

Several conversations with the teacher may be in flight at once (`build_traces`, `inflight.py`).
One writer appends each finished one, flushed, and fsyncs the lines that finished together before
asking for more, so a killed job loses at most the conversations in flight and the line it was
writing; a rerun repairs a torn last line and skips the traces already written. Samples given up
on go to a sidecar file so that a rerun does not ask the teacher about them again. What is done is
keyed by image content, not by path text, so a teacher is never asked twice about one image,
however it is named. A teacher that answers nothing for several traces in a row stops the
job (`TeacherSetupError`) rather than failing every remaining image after its backoff.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from tag_lightning.answers.grammar import (
    PAPER,
    PER_STEP,
    TRACE_FORMATS,
    ParsedTrace,
    Trace,
    conclusion_aus,
    line_format,
    parse_trace,
    render_trace,
    trace_format,
)
from tag_lightning.au.record import AURecord
from tag_lightning.data.datasets import FERSample
from tag_lightning.errors import BadValue
from tag_lightning.grounding.claims import HALLUCINATION, MISS, SUPPORTED, trace_claims
from tag_lightning.images import ImageRef, UnreadableImage, content_hash
from tag_lightning.traces import inflight
from tag_lightning.traces.teachers import (
    Proposal,
    Teacher,
    TeacherDeclined,
    TeacherError,
    TeacherRequest,
    TeacherSetupError,
    activated_aus,
)

@dataclass(frozen=True)
class RejectionConfig:
    """How hard to try per sample, and what counts as grounded."""

    max_format_retries: int = 3
    max_label_retries: int = 3
    top_k: int = 3  # activated AUs shown to a VLM teacher
    min_intensity: float = 1.0  # an AU at or above this intensity is activated
    min_box_iou: float = 0.5  # a step's box must overlap its AU's region box this much
    filter: str = "grounded"  # one of FILTERS
    traces_per_image: int = 1  # traces asked for per image, each judged on its own
    trace_format: str = PER_STEP  # the format asked for, kept and written (one of TRACE_FORMATS)

    def __post_init__(self) -> None:
        if self.filter not in FILTERS:
            raise BadValue(f"filter must be one of {', '.join(FILTERS)}, got {self.filter!r}")
        if self.trace_format not in TRACE_FORMATS:
            raise BadValue(f"trace_format must be one of {', '.join(TRACE_FORMATS)}, got {self.trace_format!r}")
        if self.traces_per_image < 1:
            raise BadValue(f"traces_per_image must be at least 1, got {self.traces_per_image}")


FILTERS = {
    "paper": "TAG's: a trace is kept when its format is valid and its answer names the label",
    "grounded": "ours: the paper's, and every AU it cites is activated with a box on its region",
}
"""The rejection filters by name, with what each keeps."""


@dataclass
class Attempts:
    """What one sample cost: teacher answers, requests sent (retries included), tokens received
    (None: the teacher reported none), retries of each kind, labels eliminated."""

    proposals: int = 0
    requests: int = 0
    tokens: int | None = None
    format_retries: int = 0
    label_retries: int = 0
    http_retries: int = 0
    eliminated: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """`status` is kept, rejected (the teacher never got it right) or failed (no answer at all)."""

    status: str
    attempts: Attempts
    trace: Trace | None = None
    reason: str | None = None  # a short category, counted in the statistics
    detail: str | None = None  # what exactly went wrong last
    flaw: dict | None = None  # the mistake a teacher made on purpose (`TemplateTeacher.error_rate`)


# ---------------------------------------------------------------------------------------------
# Judging one answer


def check_answer(text: str, record: AURecord, candidates: Sequence[str], config: RejectionConfig) -> ParsedTrace:
    """Parse `text` and add an answer in another format than asked for and, with the grounded filter,
    grounding errors: the errors a retry should fix."""
    parsed = parse_trace(text, image_size=record.size, labels=candidates)
    errors = parsed.errors
    if parsed.trace_format != config.trace_format:
        errors += (f"written in the {parsed.trace_format} format, asked for the {config.trace_format} format",)
    if config.filter == "grounded":
        errors += tuple(grounding_errors(parsed.trace, record, config.min_intensity, config.min_box_iou))
    return ParsedTrace(parsed.trace, errors)


def grounding_errors(trace: Trace, record: AURecord, min_intensity: float, min_box_iou: float) -> list[str]:
    """Claims the AU detector does not back.

    Every claim is judged by the claim rule the rewards and the metrics use (`claims.py`, AUs
    activated at `min_intensity`), wherever the trace asserts it: a step, the global analysis or the
    conclusion. Each must be supported, so a neutral trace may inspect AUs only to report them
    relaxed, and one that calls an activated AU relaxed is a miss; an AU named only in prose must be
    measured on this face and, unless the answer is neutral (which may say what little is active),
    activated. Every step's box must overlap the region box of each of its AUs by at least
    `min_box_iou`; in the paper's format, where the conclusion names the AUs, each must be matched
    to a step that inspects its region.
    """
    errors: list[str] = []
    activated = {key for key, _ in record.activated(min_intensity)}
    concluded = set(conclusion_aus(trace)) if trace_format(trace) == PAPER else set()
    for claim in trace_claims(trace, record.aus, activated):
        au = f"AU{claim.au}"
        where = f"step {claim.step}" if claim.step is not None else "the conclusion" if claim.au in concluded else \
            "the global analysis or conclusion"
        if claim.step is None and claim.au in concluded:
            errors.append(f"{where}: no step inspects the region of {au}, so nothing boxes it")
        intensity = record.intensity(au)
        if claim.verdict == HALLUCINATION and intensity is not None:
            errors.append(f"{where}: {au} is not activated (intensity {intensity:.2f} < {min_intensity})")
        elif claim.verdict == MISS:
            errors.append(f"{where}: a neutral answer calls {au} relaxed, but it is activated "
                          f"(intensity {intensity:.2f} >= {min_intensity})")
        elif claim.verdict != SUPPORTED:
            errors.append(f"{where}: {au} was not measured on this face")
        if claim.box is not None and claim.detector_box is not None and claim.iou < min_box_iou:
            errors.append(f"{where}: box {list(claim.box)} misses the {au} region {claim.detector_box} "
                          f"(IoU below {min_box_iou})")
    return errors


# ---------------------------------------------------------------------------------------------
# Rejection sampling for one sample


def conversation(
    record: AURecord,
    image: ImageRef,
    label: str,
    candidates: Sequence[str],
    config: RejectionConfig = RejectionConfig(),
    index: int = 0,
) -> Generator[TeacherRequest, Proposal, Outcome]:
    """Rejection sampling of trace `index` of the image, as a dialogue with the teacher.

    Yields each request, is sent the teacher's `Proposal` (or thrown its `TeacherError`) and returns
    the `Outcome`. Whoever drives it decides how the teacher is asked (`inflight.py`): one request
    at a time, many conversations on threads, or many in one batch.
    """
    attempts = Attempts()
    remaining = list(candidates)
    hints = tuple(activated_aus(record, config.min_intensity)[: config.top_k])
    while True:
        request = TeacherRequest(record, image, label, tuple(remaining), hints, index, config.traces_per_image,
                                 attempt=attempts.proposals, trace_format=config.trace_format)
        try:
            proposal = yield request
        except TeacherError as err:
            declined = isinstance(err, TeacherDeclined)  # asking again would not help
            attempts.requests += 0 if declined else err.retries + 1
            attempts.http_retries += err.retries
            attempts.transport_errors += err.errors
            return Outcome("rejected" if declined else "failed", attempts,
                           reason="declined" if declined else "teacher error", detail=str(err))
        attempts.proposals += 1
        attempts.requests += proposal.retries + 1
        attempts.http_retries += proposal.retries
        attempts.transport_errors += proposal.errors
        if proposal.tokens is not None:
            attempts.tokens = (attempts.tokens or 0) + proposal.tokens
        parsed = check_answer(proposal.text, record, remaining, config)
        if parsed.errors:
            if attempts.format_retries == config.max_format_retries:
                return Outcome("rejected", attempts, reason="format", detail="; ".join(parsed.errors[:3]))
            attempts.format_retries += 1
            continue
        answer = parsed.trace.answer.strip().casefold()
        if answer != label:
            if attempts.label_retries == config.max_label_retries:
                return Outcome("rejected", attempts, reason="wrong label", detail=f"last answer {answer!r}")
            attempts.label_retries += 1
            attempts.eliminated.append(answer)
            remaining = [candidate for candidate in remaining if candidate.casefold() != answer]
            continue
        return Outcome("kept", attempts, trace=replace(parsed.trace, answer=label), flaw=proposal.flaw)


def sample_trace(
    teacher: Teacher,
    record: AURecord,
    image: ImageRef,
    label: str,
    candidates: Sequence[str],
    config: RejectionConfig = RejectionConfig(),
    index: int = 0,
) -> Outcome:
    """Ask `teacher` for trace `index` of the image until it writes one the filter keeps, or give up."""
    return inflight.converse(conversation(record, image, label, candidates, config, index), teacher.propose)


# ---------------------------------------------------------------------------------------------
# The job: many samples, one JSONL file, resumable


class RecordSource(Protocol):
    """Where AU records come from: an `AUCache`, or any mapping from content hash to record."""

    def get(self, content_hash: str) -> AURecord | None: ...


@dataclass
class Tally:
    """Finished conversations counted: traces kept (and the deliberate flaws they carry), given up by
    reason, failed, and what they cost in requests, tokens and retries."""

    kept: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> traces
    failed: int = 0
    format_retries: int = 0
    label_retries: int = 0
    http_retries: int = 0
    requests: int = 0  # sent to the teacher, retries included
    tokens_received: int | None = None  # answer tokens, as the teacher's `usage` reports them (None: never)
    flawed: Counter = field(default_factory=Counter)  # flaw kind -> kept traces carrying it

    def add(self, outcome: Outcome) -> None:
        if outcome.status == "kept":
            self.kept += 1
            if outcome.flaw is not None:
                self.flawed[outcome.flaw["kind"]] += 1
        elif outcome.status == "failed":
            self.failed += 1
        else:
            self.rejected[outcome.reason] += 1
        self.format_retries += outcome.attempts.format_retries
        self.label_retries += outcome.attempts.label_retries
        self.http_retries += outcome.attempts.http_retries
        self.requests += outcome.attempts.requests
        if outcome.attempts.tokens is not None:
            self.tokens_received = (self.tokens_received or 0) + outcome.attempts.tokens

    @property
    def asked(self) -> int:
        """Traces the teacher was asked for (skipped samples excluded)."""
        return self.kept + self.failed + sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rejected": dict(self.rejected), "flawed": dict(self.flawed)}


@dataclass
class TraceStats(Tally):
    """What one run of `build_traces` did (its tally, the samples it skipped, its time and settings), and
    `output`: the tally of the whole output after it.

    A resumed job's run asks only for what is missing, so its own counts are not the output's. The
    output's are counted from the lines of the output and its sidecar, which record every finished
    conversation of every run, killed ones included (a failed trace asked again on a later run counts
    once as failed, once as what it became). `describe` is the line printed at the end.
    """

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> samples
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all threads) over the run
    settings: dict = field(default_factory=dict)  # filter, traces per image, concurrency, the teacher's settings
    output: Tally = field(default_factory=Tally)

    def to_dict(self) -> dict[str, Any]:
        """The statistics file: the output's tally on top (its `kept` counts the lines of the output), this
        run's statistics under ``last_run``."""
        last_run = {**super().to_dict(), "skipped": dict(self.skipped)}
        del last_run["output"]
        return {**self.output.to_dict(), "last_run": last_run}

    def describe(self) -> str:
        def counts(counter: Counter) -> str:
            return ", ".join(f"{reason} {count}" for reason, count in counter.most_common()) or "none"

        def rate(count: int) -> float:
            return count / self.seconds if self.seconds > 0 else 0.0

        whole = self.output
        return (
            f"{self.samples} samples: kept {self.kept}, rejected {sum(self.rejected.values())} "
            f"({counts(self.rejected)}), failed {self.failed} | skipped {sum(self.skipped.values())} "
            f"({counts(self.skipped)}) | retries: format {self.format_retries}, label {self.label_retries}, "
            f"http {self.http_retries} | {rate(self.asked):.2f} traces/s, {rate(self.requests):.2f} requests/s"
            + (f" | kept with a deliberate flaw: {counts(self.flawed)}" if self.flawed else "")
            + (f" | the output, with earlier runs: kept {whole.kept}, rejected {sum(whole.rejected.values())}, "
               f"failed {whole.failed}" if whole.asked > self.asked else "")
        )


def sidecar_paths(out: Path) -> tuple[Path, Path]:
    """The given-up samples file and the statistics file that sit beside `out`."""
    return Path(f"{out}.rejected.jsonl"), Path(f"{out}.stats.json")


def read_jsonl(path: Path) -> list[dict]:
    """The lines of a JSONL file this job appends to; a torn last line (a kill mid-write) is
    dropped and the file rewritten without it. A damaged line elsewhere is an error."""
    if not path.exists():
        return []
    chunks = path.read_bytes().split(b"\n")
    lines: list[dict] = []
    for number, chunk in enumerate(chunks, start=1):
        if not chunk.strip():
            continue
        try:
            lines.append(json.loads(chunk))
        except ValueError:
            if number < len(chunks):  # followed by a newline: not a torn write
                raise BadValue(f"{path}:{number} is not a JSON line; remove or repair that line and rerun") from None
    if chunks[-1]:  # the file does not end with a newline: rewrite it cleanly
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
        os.replace(partial, path)
    return lines


class _AppendLog:
    """A JSONL file opened for appending; lines are on disk once `sync` (or `close`) returns.

    Lines that finish together are committed by one fsync: with many conversations in flight, an
    fsync per line would hold back the next requests.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._unsynced = False

    def append(self, line: dict) -> None:
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._file.flush()
        self._unsynced = True

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._file.fileno())
            self._unsynced = False

    def close(self) -> None:
        self.sync()
        self._file.close()


class _SameTraces:
    """Warns once, in one line, when a teacher that samples writes the same trace twice for an image.

    Its further traces per image are then copies: it decodes near-greedily, most likely by the defaults
    of its server or model folder (see `teachers.py`). Only the texts' hashes are kept, so a long job
    holds no trace text.
    """

    def __init__(self, sampling: dict[str, Any], traces_per_image: int):
        self.sampling, self.traces_per_image = sampling, traces_per_image
        self.seen: dict[str, set[int]] | None = {}  # this run's kept traces by image content; None once warned

    def add(self, digest: str, image: str, trace: str) -> None:
        if self.seen is None:
            return
        traces = self.seen.setdefault(digest, set())
        if hash(trace) not in traces:
            traces.add(hash(trace))
            return
        self.seen = None
        asked = ", ".join(f"{key} {value}" for key, value in self.sampling.items())
        tqdm.write(f"warning: two traces of {image} are identical: the teacher decodes near-greedily, so "
                   f"--traces-per-image {self.traces_per_image} writes copies. It was asked for {asked}; likely cause: "
                   "the server's or model folder's near-greedy defaults used instead (a generation_config.json with "
                   "top_k 1 and top_p 0.001, as Qwen2.5-VL-Instruct's). Check the server's start-up log (vLLM: "
                   "'Default sampling parameters have been overridden'; restart it with --generation-config vllm) and "
                   "that no proxy drops top_k. (Warned once.)", file=sys.stderr)


@dataclass(frozen=True)
class _Job:
    """One trace to ask for: trace `index` of `sample`, whose content hash is `digest`."""

    sample: FERSample
    record: AURecord
    digest: str
    index: int

    @property
    def key(self) -> tuple[str, int]:
        return self.digest, self.index


def build_traces(
    samples: Sequence[FERSample],
    records: RecordSource,
    teacher: Teacher,
    out: str | Path,
    candidates: Sequence[str],
    config: RejectionConfig = RejectionConfig(),
    retry_rejected: bool = False,
    limit: int | None = None,
    progress: bool = True,
    max_failures_in_a_row: int = 3,
    concurrency: int = 1,
    batch_size: int = 1,
) -> TraceStats:
    """Write `config.traces_per_image` kept traces per sample to `out`, resuming whatever an earlier run wrote.

    Samples without a label or without an `ok` AU record are skipped and counted by reason, and so
    are samples whose traces are all in `out` already or were given up on earlier (unless
    `retry_rejected`). Failed traces (the teacher could not be reached) are logged but asked for
    again on the next run; `max_failures_in_a_row` of them in a row (in the order they finish) stop
    the job with `TeacherSetupError`, abandoning the conversations still in flight. Only the first
    `limit` samples are considered, so a limited run covers the same images each time. Every line
    records the AU cache's settings key and the minimum intensity it was grounded on. The run's
    statistics, with those of the whole output (`TraceStats.output`), are returned and written to
    ``<out>.stats.json``. With several traces per image, a teacher that samples and writes one
    trace twice draws a one-line warning (`_SameTraces`).

    `concurrency` conversations run at once on threads (an HTTP teacher mostly waits), or, with
    `batch_size` > 1, that many in lockstep through the teacher's `propose_many` (a local model
    generating for a batch). Either way each finished trace is appended from this thread as it
    finishes, so lines never interleave but their order may differ from the samples'. A trace
    (content hash, trace index) is asked for by one conversation at a time, so a deterministic
    teacher yields the same traces at any concurrency.
    """
    if concurrency < 1 or batch_size < 1:
        raise BadValue(f"concurrency and batch size must be at least 1, got {concurrency} and {batch_size}")
    if batch_size > 1 and not hasattr(teacher, "propose_many"):
        raise BadValue(f"the {teacher.name} teacher cannot answer in batches; use a batch size of 1")
    if concurrency > 1 and batch_size > 1:
        raise BadValue("choose either several conversations in flight (concurrency, an HTTP teacher) or batches "
                       "(batch size, a local model), not both")
    out = Path(out)
    rejected_path, stats_path = sidecar_paths(out)
    written = read_jsonl(out)  # reading also repairs a torn last line
    _check_same_format(out, written, config.trace_format)
    done = {_key(line) for line in written}
    sidecar = read_jsonl(rejected_path)
    given_up = {_key(line) for line in sidecar if line["status"] == "rejected"} - done
    if retry_rejected:
        given_up.clear()
    in_flight: set[tuple[str, int]] = set()
    # What the claims were checked against: the datamodule refuses traces of other AU records.
    grounded_on = {"au_settings": getattr(records, "settings_key", None), "min_intensity": config.min_intensity}
    stats = TraceStats(settings={"filter": config.filter, "traces_per_image": config.traces_per_image,
                                 "min_intensity": config.min_intensity, "min_box_iou": config.min_box_iou,
                                 "trace_format": config.trace_format, "concurrency": concurrency,
                                 "batch_size": batch_size,
                                 "teacher": teacher_settings(teacher)},
                       output=_tally(chain(written, sidecar)))
    count = len(samples) if limit is None else min(limit, len(samples))
    per_image = config.traces_per_image
    sampling = getattr(teacher, "sampling", None)  # a deterministic teacher may repeat itself
    same_traces = _SameTraces(sampling(), per_image) if sampling is not None and per_image > 1 else None
    bar = tqdm(total=count * per_image, desc="traces", unit="trace", disable=not progress, smoothing=0.1)

    def jobs() -> Iterator[_Job]:
        """The traces to ask for, screened lazily: a long dataset starts at once."""
        for sample in (samples[index] for index in range(count)):
            stats.samples += 1
            skip, record, digest = _screen(sample, records, candidates)
            keys = [] if skip else [(digest, index) for index in range(per_image)]
            wanted = [key for key in keys if key not in done and key not in given_up and key not in in_flight]
            if not skip and not wanted:
                skip = ("already written" if all(key in done for key in keys) else
                        "same content in flight" if any(key in in_flight for key in keys) else "rejected earlier")
            bar.total -= per_image - len(wanted)  # the bar counts what is asked for, so its ETA holds
            if skip is not None:
                stats.skipped[skip] += 1
            for _, index in wanted:
                in_flight.add((digest, index))
                yield _Job(sample, record, digest, index)

    def start(job: _Job) -> Generator[TeacherRequest, Proposal, Outcome]:
        return conversation(job.record, job.sample.image, job.sample.label, candidates, config, job.index)

    if batch_size > 1:
        finished = inflight.batched(jobs(), start, teacher.propose_many, batch_size)
    else:
        finished = inflight.threaded(jobs(), start, teacher.propose, concurrency)
    clock, cpu = time.perf_counter(), time.process_time()
    kept_log, rejected_log = _AppendLog(out), _AppendLog(rejected_path)

    def write(job: _Job, outcome: Outcome) -> None:
        """One finished conversation: its line, the statistics, what is done, the progress bar."""
        stats.add(outcome)
        stats.output.add(outcome)
        line = _line(job.sample, job.record, job.digest, job.index, teacher.name, outcome, config.trace_format)
        line |= grounded_on
        (kept_log if outcome.status == "kept" else rejected_log).append(line)
        in_flight.discard(job.key)
        if outcome.status == "kept":  # the same content under another name is not asked about again
            done.add(job.key)
            if same_traces is not None:
                same_traces.add(job.digest, job.sample.image.name, line["trace"])
        elif outcome.status == "rejected":
            given_up.add(job.key)
        bar.update()
        bar.set_postfix(kept=stats.kept, rejected=sum(stats.rejected.values()), failed=stats.failed,
                        requests_per_s=f"{stats.requests / (time.perf_counter() - clock):.1f}")

    failures_in_a_row = 0
    try:
        with closing(finished):
            for outcomes in finished:
                for job, outcome in outcomes:
                    write(job, outcome)
                    failures_in_a_row = failures_in_a_row + 1 if outcome.status == "failed" else 0
                    if failures_in_a_row == max_failures_in_a_row:
                        raise TeacherSetupError(
                            f"the teacher gave no answer for {failures_in_a_row} traces in a row (last: "
                            f"{outcome.detail}); stopping. Rerun once it answers: the job resumes where it stopped"
                        )
                kept_log.sync()  # the lines that finished together, committed by one fsync
                rejected_log.sync()
    finally:
        bar.close()
        kept_log.close()
        rejected_log.close()
        stats.seconds = time.perf_counter() - clock
        stats.cpu_seconds = time.process_time() - cpu
        stats_path.write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
    return stats


def _check_same_format(out: Path, lines: list[dict], trace_format: str) -> None:
    """Refuse to append traces of one format to a file holding the other: SFT trains on one."""
    held = {line_format(line) for line in lines} - {trace_format}
    if held:
        raise BadValue(f"{out} holds {', '.join(sorted(held))} traces, and --trace-format is {trace_format}: write "
                       f"{trace_format} traces to another --out, or rerun with --trace-format {held.pop()}")


def _key(line: dict) -> tuple[str, int]:
    """Which trace of which image content a JSONL line holds (files without ``trace_index``: one per image)."""
    return line["content_hash"], line.get("trace_index", 0)


def teacher_settings(teacher: Teacher) -> dict[str, Any]:
    """What a teacher was set up with, for the statistics: its `settings()`, a dataclass's fields, else its name."""
    if hasattr(teacher, "settings"):
        return teacher.settings()
    if is_dataclass(teacher):
        return {"name": teacher.name, **{key: value for key, value in asdict(teacher).items()
                                         if not key.startswith("_") and _plain(value)}}
    return {"name": teacher.name}


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, tuple, list))


def _screen(
    sample: FERSample, records: RecordSource, candidates: Sequence[str]
) -> tuple[str | None, AURecord | None, str | None]:
    """Why `sample` is skipped (None: it is not), with its AU record and content hash."""
    if sample.label is None:
        return "no label", None, None
    if sample.label not in candidates:
        return "label not a candidate", None, None
    try:
        digest = content_hash(sample.image.read_bytes())
    except (OSError, UnreadableImage):
        return "unreadable image", None, None
    record = records.get(digest)
    if record is None:
        return "not in the AU cache", None, None
    if record.status != "ok":
        return f"AU record {record.status}", None, None
    return None, record, digest


def _tally(lines: Iterable[dict]) -> Tally:
    """The tally of the conversations that lines of the output or its sidecar record (one each)."""
    tally = Tally()
    for line in lines:
        tally.add(Outcome(line.get("status", "kept"), Attempts(**line["attempts"]), reason=line.get("reason"),
                          flaw=line.get("flaw")))
    return tally


def _line(sample: FERSample, record: AURecord, digest: str, index: int, teacher: str, outcome: Outcome,
          trace_format: str) -> dict[str, Any]:
    """A kept trace's JSONL object (TAG-310K style), or a given-up trace's sidecar object."""
    line: dict[str, Any] = {"image": sample.image.name, "label": sample.label, "trace_index": index}
    if outcome.trace is not None:
        line |= {"trace": render_trace(outcome.trace, trace_format), "trace_format": trace_format,
                 "trace_struct": outcome.trace.to_dict()}
        if outcome.flaw is not None:
            line["flaw"] = outcome.flaw
    else:
        line |= {"status": outcome.status, "reason": outcome.reason, "detail": outcome.detail}
    return line | {
        "teacher": teacher,
        "attempts": outcome.attempts.to_dict(),
        "content_hash": digest,
        "dataset": sample.dataset,
        "split": sample.split,
        "image_size": list(record.size) if record.size else None,
    }
