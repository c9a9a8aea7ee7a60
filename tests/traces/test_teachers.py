"""Teachers: the template teacher on real photos' AU records, the OpenAI-compatible teacher against a
real HTTP server on 127.0.0.1, and the local Hugging Face teacher with a tiny random Qwen2-VL."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from tag_lightning.answers.grammar import GLOBAL_HEADER, PAPER, PER_STEP, conclusion_aus, parse_trace, render_trace
from tag_lightning.answers.prompts import format_spec
from tag_lightning.au.taxonomy import EMOTION_PROTOTYPES
from tag_lightning.data.datasets import FERSample
from tag_lightning.data.samples import DISGUST, HAPPINESS, MANIFEST_NAME, SAMPLE_LABELS, SINGLE_FACE, SURPRISE
from tag_lightning.grounding.claims import References, read_completion
from tag_lightning.grounding.rewards import format_reward
from tag_lightning.images import ImageRef
from tag_lightning.traces.builder import (
    RejectionConfig,
    build_traces,
    grounding_errors,
    read_jsonl,
    sample_trace,
    sidecar_paths,
)
from tag_lightning.traces.hf_teacher import HFTeacher
from tag_lightning.traces.openai_client import OpenAITeacher, RetryPolicy, image_data_url
from tag_lightning.traces.prompt import build_prompt
from tag_lightning.traces.teachers import (
    TeacherDeclined,
    TeacherError,
    TeacherRequest,
    TeacherSetupError,
    activated_aus,
)
from tag_lightning.traces.template import TemplateTeacher
from tag_lightning.traces.template_endpoint import TemplateEndpoint

LABELLED = sorted(name for name, label in SAMPLE_LABELS.items() if label)
CANDIDATES = ("surprise", "fear", "happiness", "anger", "disgust")
AU_MENTION = re.compile(r"\bAU(\d+)\b")
# What the openai teacher sends by default, and what Qwen2.5-VL-Instruct's generation_config.json says.
SENT = {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}
QWEN_SAMPLING = {"temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05}


def _intensity(record, au: int) -> float | None:
    return record.intensity(f"AU{au}")


def _request(record, label: str, candidates=CANDIDATES, top_k: int = 3) -> TeacherRequest:
    hints = tuple(activated_aus(record, 1.0)[:top_k])
    return TeacherRequest(record, ImageRef.from_path(record.image), label, tuple(candidates), hints)


# -- the template teacher ------------------------------------------------------------------------
@pytest.mark.parametrize("photo", LABELLED)
def test_template_trace_parses_and_claims_only_activated_aus_with_their_boxes(sample_records, photo):
    record, label = sample_records[photo], SAMPLE_LABELS[photo]
    text = TemplateTeacher().propose(_request(record, label)).text
    parsed = parse_trace(text, image_size=record.size, labels=CANDIDATES)
    assert parsed.errors == ()
    assert parsed.trace.answer == label
    assert render_trace(parsed.trace) == text
    for step in parsed.trace.steps:
        assert all(isinstance(value, int) for value in step.box)
        for au in step.aus:
            assert _intensity(record, au) >= 1.0, f"AU{au} is claimed but not activated"
            assert list(step.box) == record.aus[f"AU{au}"]["box"]
    for au in AU_MENTION.findall(text):  # the global analysis and conclusion too
        assert _intensity(record, int(au)) >= 1.0


@pytest.mark.parametrize("photo", LABELLED)
def test_template_cites_the_label_s_prototype_aus_or_else_the_strongest(sample_records, photo):
    record, label = sample_records[photo], SAMPLE_LABELS[photo]
    trace = TemplateTeacher(top_k=3).write(record, label)
    cited = sorted(au for step in trace.steps for au in step.aus)
    activated = [hint.au.id for hint in activated_aus(record, 1.0)]
    supporting = [au for au in activated if au in EMOTION_PROTOTYPES[label]]
    assert cited == sorted((supporting or activated)[:3])
    assert all(f"AU{au}" in trace.conclusion for au in cited) and label in trace.conclusion


def test_template_falls_back_to_the_strongest_aus_and_says_so(sample_records):
    """The posed disgust photo: the blendshape detector activates none of AU9, AU10, AU15."""
    record = sample_records[DISGUST]
    assert not [au for au in EMOTION_PROTOTYPES["disgust"] if _intensity(record, au) >= 1.0]
    trace = TemplateTeacher().write(record, "disgust")
    strongest = activated_aus(record, 1.0)[0].au.id
    assert strongest in trace.steps[0].aus
    assert "weak" in trace.conclusion or "None of the typical" in trace.conclusion


def test_template_top_k_and_threshold_bound_the_claims(sample_records):
    record = sample_records[SURPRISE]
    one = TemplateTeacher(top_k=1).write(record, "surprise")
    assert sum(len(step.aus) for step in one.steps) == 1
    strict = TemplateTeacher(min_intensity=2.0).write(record, "surprise")
    assert all(_intensity(record, au) >= 2.0 for step in strict.steps for au in step.aus)


def test_template_is_reproducible_per_seed_and_varies_across_seeds(sample_records):
    for photo in LABELLED:
        record, label = sample_records[photo], SAMPLE_LABELS[photo]
        texts = [render_trace(TemplateTeacher(seed=seed).write(record, label)) for seed in range(8)]
        assert texts == [render_trace(TemplateTeacher(seed=seed).write(record, label)) for seed in range(8)]
        assert len(set(texts)) > 1, f"{photo}: every seed wrote the same text"
        assert all(parse_trace(text, record.size, CANDIDATES).valid for text in texts)


def test_template_neutral_inspects_only_relaxed_regions_and_names_what_is_active(sample_records):
    record = sample_records[SINGLE_FACE]  # a smiling face: AU6, AU7, AU10, AU12 are activated
    activated = {hint.au.id for hint in activated_aus(record, 1.0)}
    trace = TemplateTeacher(relaxed_regions=2).write(record, "neutral")
    assert parse_trace(render_trace(trace), record.size, ["neutral"]).valid
    assert len(trace.steps) == 2
    for step in trace.steps:
        region_aus = [key for key in record.aus if record.aus[key]["box"] == list(step.box)]
        assert all(record.aus[key]["intensity"] < 1.0 for key in region_aus), "a relaxed region has an active AU"
        assert any(word in step.observation for word in ("relaxed", "at rest", "calm"))
    assert {int(au) for au in AU_MENTION.findall(trace.global_analysis)} == activated


def test_template_declines_rather_than_inventing_evidence(sample_records):
    record = sample_records[SURPRISE]
    calm = replace(record, aus={key: {**entry, "intensity": 0.1} for key, entry in record.aus.items()})
    with pytest.raises(TeacherDeclined, match="no AU reaches"):
        TemplateTeacher().write(calm, "surprise")
    neutral = TemplateTeacher().write(calm, "neutral")
    assert "no action unit" in neutral.global_analysis.lower() or "no strong" in neutral.global_analysis.lower()
    tense = replace(record, aus={key: {**entry, "intensity": 3.0} for key, entry in record.aus.items()})
    with pytest.raises(TeacherDeclined, match="relaxed"):
        TemplateTeacher().write(tense, "neutral")


@pytest.mark.parametrize("photo", [*LABELLED, SINGLE_FACE])
def test_template_trace_in_the_paper_s_format_scores_format_1_and_is_grounded(sample_records, photo):
    """Asked for TAG's format, the template teacher names no AU on its steps and lists them in the
    conclusion; the answer is read as the paper's, scores format 1 and the builder's filter keeps it."""
    record, label = sample_records[photo], SAMPLE_LABELS[photo] or "neutral"
    text = TemplateTeacher().propose(replace(_request(record, label), trace_format=PAPER)).text
    completion = read_completion(text)
    assert completion.trace_format == PAPER and completion.errors == ()
    assert all(not step.aus for step in completion.trace.steps)
    assert not [line for line in text.splitlines() if line.startswith("Inspect") and "AU" in line]
    grounded = TemplateTeacher().write(record, label)
    assert set(conclusion_aus(completion.trace)) == {au for step in grounded.steps for au in step.aus}
    references = References(label, CANDIDATES + ("neutral",), record.aus,
                            frozenset(key for key, _ in record.activated(1.0)), record.size)
    assert format_reward(completion, references).value == 1.0
    assert grounding_errors(completion.trace, record, 1.0, 0.5) == []


# -- the prompt ----------------------------------------------------------------------------------
def test_prompt_lists_the_candidates_the_activated_aus_with_boxes_and_the_format(sample_records):
    record = sample_records[SURPRISE]
    request = _request(record, "surprise")
    prompt = build_prompt(request)
    assert "surprise" in request.candidates and all(label in prompt for label in CANDIDATES)
    for hint in request.hints:
        x1, y1, x2, y2 = hint.box
        assert f"{hint.au.key} {hint.au.name}" in prompt and f"[{x1},{y1},{x2},{y2}]" in prompt
    assert "Global analysis:" in prompt and "<answer>" in prompt and "512x512" in prompt
    calm_prompt = build_prompt(replace(request, hints=()))
    assert "no activated action unit" in calm_prompt and "lip corner (AU12, AU14, AU15, AU20)" in calm_prompt


def test_the_prompt_asks_for_the_request_s_trace_format(sample_records):
    request = _request(sample_records[SURPRISE], "surprise")
    for trace_format, where in ((PER_STEP, "in each step"), (PAPER, "in the final conclusion")):
        asked = replace(request, trace_format=trace_format)
        for prompt in (build_prompt(asked), build_prompt(replace(asked, hints=()))):
            assert format_spec(trace_format) in prompt and where in prompt
    assert format_spec(PER_STEP) not in build_prompt(replace(request, trace_format=PAPER))


def test_image_data_url_sends_web_images_as_is_and_rotates_exif_images(tmp_path, samples_dir):
    jpeg = (samples_dir / SURPRISE).read_bytes()
    assert image_data_url(jpeg) == "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buffer, format="JPEG", exif=exif)
    url = image_data_url(buffer.getvalue())
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (20, 40)
    with pytest.raises(TeacherError, match="cannot be sent"):
        image_data_url(b"not an image")


# -- the OpenAI-compatible teacher against a real HTTP server -------------------------------------
class ChatServer(TemplateEndpoint):
    """A scripted OpenAI-compatible endpoint that checks each request before answering it."""

    def __init__(self, expected_image: bytes | None = None):
        super().__init__(records={}, labels={})
        self.script: list[tuple[int, str]] = []  # (HTTP status, assistant text or error body)
        self.prompts: list[str] = []
        self.sampling: list[dict] = []  # each request's max_tokens, sampling fields and seed
        self.expected_image = expected_image

    def respond(self, request, headers):
        problem = self.problem(headers, request)
        if problem:
            return 400, {}, {"error": problem}
        self.prompts.append(request["messages"][0]["content"][1]["text"])
        self.sampling.append({key: request.get(key) for key in ("max_tokens", *SENT, "seed")})
        status, text = self.script.pop(0) if self.script else (500, "script exhausted")
        if status != 200:
            return status, {}, {"error": text}
        return 200, {}, {"choices": [{"message": {"role": "assistant", "content": text}}]}

    def problem(self, headers, body: dict) -> str | None:
        """What is wrong with a request, or None."""
        if headers.get("Authorization") != "Bearer test-key":
            return f"bad Authorization header {headers.get('Authorization')!r}"
        if body.get("model") != "teacher-model":
            return f"bad model {body.get('model')!r}"
        parts = {part["type"]: part for part in body["messages"][0]["content"]}
        url = parts.get("image_url", {}).get("image_url", {}).get("url", "")
        if not url.startswith("data:image/jpeg;base64,"):
            return "no image data URL"
        if self.expected_image is not None and base64.b64decode(url.split(",", 1)[1]) != self.expected_image:
            return "the image is not the sample's"
        if "Choose one of:" not in parts.get("text", {}).get("text", ""):
            return "no candidate labels in the prompt"
        return None


@pytest.fixture
def chat_server(samples_dir, monkeypatch):
    monkeypatch.setenv("TAG_TEST_KEY", "test-key")
    with ChatServer(expected_image=(samples_dir / SURPRISE).read_bytes()) as server:
        yield server


def _openai(base_url: str, max_retries: int = 3) -> OpenAITeacher:
    return OpenAITeacher(base_url, "teacher-model", api_key_env="TAG_TEST_KEY", timeout=10,
                         retry=RetryPolicy(max_retries=max_retries, base_delay=0.001, max_delay=0.01))


def _candidates_in(prompt: str) -> list[str]:
    return re.search(r"Choose one of: (.*?)\.\n", prompt).group(1).split(", ")


def test_openai_teacher_retries_format_eliminates_wrong_labels_and_backs_off(sample_records, chat_server):
    record = sample_records[SURPRISE]
    right = TemplateTeacher().write(record, "surprise")
    chat_server.script = [
        (200, "I think this person is surprised."),  # garbage: a format retry
        (200, render_trace(replace(right, answer="fear"))),  # well formed, wrong label: eliminate fear
        (503, "overloaded"),  # transient: backoff retry inside the teacher
        (200, render_trace(right)),
    ]
    outcome = sample_trace(_openai(chat_server.base_url), record, ImageRef.from_path(record.image), "surprise",
                           CANDIDATES)
    assert outcome.status == "kept", outcome.detail
    assert outcome.trace == right
    attempts = outcome.attempts
    assert (attempts.proposals, attempts.format_retries, attempts.label_retries, attempts.http_retries) == (3, 1, 1, 1)
    assert attempts.eliminated == ["fear"] and "HTTP 503" in attempts.transport_errors[0]
    asked = [_candidates_in(prompt) for prompt in chat_server.prompts]
    assert len(asked) == 4
    assert asked[0] == asked[1] == list(CANDIDATES)
    assert asked[2] == asked[3] == [label for label in CANDIDATES if label != "fear"]
    seeds = [sampling.pop("seed") for sampling in chat_server.sampling]
    assert seeds[2] == seeds[3] and len(set(seeds)) == 3  # a fresh draw per answer; a transport retry resends
    assert chat_server.sampling == [{"max_tokens": 1024} | SENT] * 4


def test_the_template_endpoint_answers_in_the_trace_format_it_is_asked_for(sample_records):
    record = sample_records[SURPRISE]
    image = ImageRef.from_path(record.image)
    with TemplateEndpoint({record.content_hash: record}, {record.content_hash: "surprise"}) as endpoint:
        teacher = OpenAITeacher(endpoint.base_url, "template", api_key_env="TAG_NO_KEY", timeout=10)
        for trace_format in (PER_STEP, PAPER):
            config = RejectionConfig(trace_format=trace_format, max_format_retries=0)
            outcome = sample_trace(teacher, record, image, "surprise", CANDIDATES, config)
            assert outcome.status == "kept", outcome.detail
            assert parse_trace(render_trace(outcome.trace, trace_format)).trace_format == trace_format


def test_request_seeds_are_reproducible_and_differ_by_image_trace_and_attempt(sample_records, monkeypatch):
    monkeypatch.setenv("TAG_TEST_KEY", "test-key")
    request = _request(sample_records[SURPRISE], "surprise")
    teacher = _openai("http://127.0.0.1:9/v1")
    seeds = {teacher.request_seed(replace(request, index=index, attempt=attempt))
             for index in range(3) for attempt in range(3)}
    seeds.add(teacher.request_seed(_request(sample_records[HAPPINESS], "happiness")))
    assert len(seeds) == 10 and all(0 <= seed < 2**31 for seed in seeds)
    assert teacher.request_seed(request) == _openai("http://127.0.0.1:9/v1").request_seed(request)
    assert OpenAITeacher("http://127.0.0.1:9/v1", "m", seed=None).request_seed(request) is None
    assert teacher.settings()["seed"] == 0 and "test-key" not in json.dumps(teacher.settings())


def test_retry_after_is_read_as_seconds_or_an_http_date():
    from email.utils import formatdate

    from tag_lightning.traces.openai_client import _retry_after

    assert _retry_after("2") == 2.0 and _retry_after(None) is None and _retry_after("soon") is None
    assert 25 < _retry_after(formatdate(time.time() + 30, usegmt=True)) <= 30


def test_openai_teacher_gives_up_after_persistent_server_errors(sample_records, chat_server):
    record = sample_records[SURPRISE]
    chat_server.script = [(500, "down")] * 10
    with pytest.raises(TeacherError, match="no answer after 3 tries") as caught:
        _openai(chat_server.base_url, max_retries=2).propose(_request(record, "surprise"))
    assert caught.value.retries == 2 and len(chat_server.prompts) == 3


def test_a_down_endpoint_fails_each_sample_and_the_job_goes_on(sample_records, chat_server, tmp_path):
    chat_server.expected_image = None  # two different photos
    chat_server.script = [(500, "down")] * 6
    records = {record.content_hash: record for record in sample_records.values()}
    samples = [FERSample(ImageRef.from_path(sample_records[name].image), SAMPLE_LABELS[name], "manifest", "all", name)
               for name in (SURPRISE, HAPPINESS)]
    out = tmp_path / "traces.jsonl"
    stats = build_traces(samples, records, _openai(chat_server.base_url, max_retries=2), out, CANDIDATES,
                         progress=False)
    assert (stats.samples, stats.kept, stats.failed, stats.http_retries) == (2, 0, 2, 4)
    assert out.read_text() == "" and len(chat_server.prompts) == 6
    failed = read_jsonl(sidecar_paths(out)[0])
    assert [(line["status"], line["reason"], line["attempts"]["http_retries"]) for line in failed] == [
        ("failed", "teacher error", 2)] * 2
    assert "HTTP 500" in failed[0]["detail"] and len(failed[0]["attempts"]["transport_errors"]) == 3


def test_openai_teacher_retries_a_refused_connection(sample_records):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TeacherError) as caught:
        _openai(f"http://127.0.0.1:{port}/v1", max_retries=2).propose(_request(sample_records[SURPRISE], "surprise"))
    assert caught.value.retries == 2 and "refused" in caught.value.errors[0].lower()


def test_openai_teacher_does_not_retry_client_errors(sample_records, chat_server, monkeypatch):
    request = _request(sample_records[SURPRISE], "surprise")
    chat_server.script = [(422, "unprocessable")]
    with pytest.raises(TeacherError, match="HTTP 422") as caught:
        _openai(chat_server.base_url).propose(request)
    assert caught.value.retries == 0 and len(chat_server.prompts) == 1
    monkeypatch.setenv("TAG_TEST_KEY", "wrong-key")  # the server answers 400 to a wrong key
    with pytest.raises(TeacherError, match="Authorization"):
        _openai(chat_server.base_url).propose(request)
    chat_server.script = [(401, "invalid key")]
    monkeypatch.setenv("TAG_TEST_KEY", "test-key")
    with pytest.raises(TeacherSetupError, match="TAG_TEST_KEY"):
        _openai(chat_server.base_url).propose(request)
    with pytest.raises(TeacherSetupError, match="base URL"):
        _openai(chat_server.base_url.removesuffix("/v1")).propose(request)


def test_retry_policy_backs_off_exponentially_up_to_a_cap_with_jitter_and_never_before_retry_after():
    policy = RetryPolicy(max_retries=6, base_delay=0.5, max_delay=3.0, jitter=0.5)
    assert [policy.delay(retry, draw=lambda: 0.0) for retry in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert [policy.delay(retry, draw=lambda: 1.0) for retry in range(5)] == [0.25, 0.5, 1.0, 1.5, 1.5]
    assert policy.delay(0, retry_after=7.0) == 7.0 and policy.delay(3, retry_after=0.1, draw=lambda: 0.0) == 3.0
    assert len({policy.delay(4) for _ in range(20)}) > 1  # many conversations do not retry in the same instant


# -- sampling: every parameter stated, identical traces warned about ----------------------------
class VLLMLike(TemplateEndpoint):
    """The template endpoint sampling as vLLM samples a Qwen2.5-VL-Instruct folder: a sampling field that a request
    leaves out (or that `dropped` loses on the way, as a proxy passing on only OpenAI's fields does) comes from the
    folder's generation_config.json, whose top_k 1 decodes greedily: the template trace, every time. A request that
    samples gets the trace with its seed's draw written into the global analysis."""

    def __init__(self, records, labels, dropped=()):
        super().__init__(records, labels)
        self.dropped = set(dropped)
        self.bodies: list[dict] = []

    def respond(self, request, headers):
        self.bodies.append(request)
        status, extra, answer = super().respond(request, headers)
        sampling = QWEN_SAMPLING | {key: value for key, value in request.items() if key not in self.dropped}
        if sampling["temperature"] > 0 and sampling["top_k"] != 1 and sampling["top_p"] > 0.01:
            message = answer["choices"][0]["message"]
            message["content"] = message["content"].replace(GLOBAL_HEADER, f"{GLOBAL_HEADER} Draw {request['seed']}.")
        return status, extra, answer


@pytest.fixture
def vllm_like(sample_records):
    records = {record.content_hash: record for record in sample_records.values()}
    labels = {record.content_hash: SAMPLE_LABELS[name] for name, record in sample_records.items()}
    return lambda dropped=(): VLLMLike(records, labels, dropped)


def _prepare_traces(samples_dir, au_cache, out, *options) -> int:
    """`tag prepare traces` on the first two (labelled) sample photos, four traces each."""
    from tag_lightning.commands.cli import main

    return main(["prepare", "traces", "--data", str(samples_dir / MANIFEST_NAME), "--cache", str(au_cache), "--out",
                 str(out), "--quiet", "--limit", "2", "--traces-per-image", "4", *options])


def _traces_by_image(out: Path) -> list[set[str]]:
    by_image: dict[str, set[str]] = {}
    for line in read_jsonl(out):
        by_image.setdefault(line["content_hash"], set()).add(line["trace"])
    return list(by_image.values())


def test_the_openai_teacher_states_every_sampling_parameter_so_a_near_greedy_server_samples(
        samples_dir, au_cache, vllm_like, tmp_path, capsys):
    out = tmp_path / "traces.jsonl"
    with vllm_like() as server:
        assert _prepare_traces(samples_dir, au_cache, out, "--teacher", "openai", "--base-url", server.base_url,
                               "--model", "template", "--top-p", "0.95") == 0
    sent = SENT | {"top_p": 0.95}
    assert len(server.bodies) == 8 and all(body | sent == body for body in server.bodies)
    assert [len(traces) for traces in _traces_by_image(out)] == [4, 4]  # four draws, not four copies
    teacher = json.loads(sidecar_paths(out)[1].read_text())["last_run"]["settings"]["teacher"]
    assert teacher | sent == teacher
    assert "warning" not in capsys.readouterr().err


def test_identical_traces_of_an_image_draw_one_warning_that_names_the_likely_cause(
        samples_dir, au_cache, vllm_like, tmp_path, capsys):
    with vllm_like(dropped=("top_k", "repetition_penalty")) as server:  # the folder's top_k 1 applies
        command = ("--teacher", "openai", "--base-url", server.base_url, "--model", "template")
        assert _prepare_traces(samples_dir, au_cache, tmp_path / "copies.jsonl", *command) == 0
        assert [len(traces) for traces in _traces_by_image(tmp_path / "copies.jsonl")] == [1, 1]
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1, "once per job, not per image"
        assert "identical" in warnings[0] and "generation_config.json with top_k 1" in warnings[0]
        assert "top_k -1" in warnings[0] and "--generation-config vllm" in warnings[0]
        assert _prepare_traces(samples_dir, au_cache, tmp_path / "one.jsonl", *command, "--traces-per-image", "1") == 0
    # the template teacher writes one grounded trace per face, by design
    assert _prepare_traces(samples_dir, au_cache, tmp_path / "template.jsonl") == 0
    assert [len(traces) for traces in _traces_by_image(tmp_path / "template.jsonl")] == [1, 1]
    assert "warning" not in capsys.readouterr().err


# -- the local Hugging Face teacher --------------------------------------------------------------
def test_hf_teacher_says_what_folder_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFTeacher.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="image-text-to-text"):
        HFTeacher.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    """A randomly initialised Qwen2-VL with a 263-token byte-level vocabulary, saved with its processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {token: len(vocab) + offset for offset, token in enumerate(specials)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=chat_template,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
                     "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>")},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_hf_teacher_answers_and_its_garbage_is_rejected_as_format(sample_records, tiny_qwen2_vl):
    record = sample_records[SURPRISE]
    teacher = HFTeacher.from_pretrained(tiny_qwen2_vl, max_new_tokens=8, temperature=0)
    assert teacher.name == f"hf:{tiny_qwen2_vl.name}"
    proposal = teacher.propose(_request(record, "surprise"))
    assert isinstance(proposal.text, str) and proposal.retries == 0
    outcome = sample_trace(teacher, record, ImageRef.from_path(record.image), "surprise", CANDIDATES,
                           RejectionConfig(max_format_retries=1))
    assert (outcome.status, outcome.reason, outcome.attempts.proposals) == ("rejected", "format", 2)


@pytest.mark.slow
def test_hf_teacher_answers_a_left_padded_batch_as_it_answers_one_at_a_time(sample_records, tiny_qwen2_vl):
    teacher = HFTeacher.from_pretrained(tiny_qwen2_vl, max_new_tokens=8, temperature=0)
    requests = [_request(sample_records[photo], SAMPLE_LABELS[photo]) for photo in LABELLED[:3]]
    # the tiny tokenizer has one token per byte: prompts of different lengths get padded
    assert len({len(build_prompt(request)) for request in requests}) > 1
    assert [proposal.text for proposal in teacher.propose_many(requests)] == [
        teacher.propose(request).text for request in requests]


@pytest.mark.slow
def test_prepare_traces_with_a_batched_hf_teacher_writes_what_one_at_a_time_writes(
        samples_dir, au_cache, tiny_qwen2_vl, tmp_path):
    from tag_lightning.commands.cli import main
    from tag_lightning.data.samples import MANIFEST_NAME

    written = {}
    for batch_size in (1, 3):
        out = tmp_path / f"traces_{batch_size}.jsonl"
        assert main(["prepare", "traces", "--data", str(samples_dir / MANIFEST_NAME), "--cache", str(au_cache),
                     "--out", str(out), "--quiet", "--teacher", "hf", "--hf-model", str(tiny_qwen2_vl),
                     "--temperature", "0", "--max-new-tokens", "8", "--max-format-retries", "1",
                     "--batch-size", str(batch_size)]) == 0
        assert json.loads(sidecar_paths(out)[1].read_text())["last_run"]["settings"]["batch_size"] == batch_size
        written[batch_size] = [sorted(json.dumps(line, sort_keys=True) for line in read_jsonl(path))
                               for path in (out, sidecar_paths(out)[0])]
    assert written[3] == written[1] and len(written[1][1]) == len(LABELLED)  # the tiny model's garbage: rejected


@pytest.mark.slow
def test_the_hf_teacher_samples_despite_a_near_greedy_generation_config(samples_dir, au_cache, tmp_path, monkeypatch):
    """Measured on an exported checkpoint whose generation_config.json said top_k 1, top_p 0.001: 1 distinct
    answer in 4 at temperature 0.7. `generate` took them from the folder; now every parameter is passed."""
    from tag_lightning.models.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny")
    generation_config = folder / "generation_config.json"
    generation_config.write_text(json.dumps(json.loads(generation_config.read_text()) | {"top_k": 1, "top_p": 0.001}))
    answers: list[str] = []
    propose_many = HFTeacher.propose_many

    def answered(teacher, requests):
        proposals = propose_many(teacher, requests)
        answers.extend(proposal.text for proposal in proposals)
        return proposals

    monkeypatch.setattr(HFTeacher, "propose_many", answered)
    out = tmp_path / "traces.jsonl"
    assert _prepare_traces(samples_dir, au_cache, out, "--teacher", "hf", "--hf-model", str(folder),
                           "--batch-size", "4", "--max-new-tokens", "8", "--max-format-retries", "0") == 0
    assert len(answers) == len(set(answers)) == 8  # the tiny model's garbage, drawn four times per image
    teacher = json.loads(sidecar_paths(out)[1].read_text())["last_run"]["settings"]["teacher"]
    sampled = {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    assert teacher | sampled == teacher


# -- the template teacher's controlled experiment (error_rate) -----------------------------------
@pytest.mark.parametrize("photo", LABELLED)
def test_a_flawed_template_errs_on_a_seeded_share_of_each_image_s_traces(sample_records, photo):
    record, label = sample_records[photo], SAMPLE_LABELS[photo]
    teacher = TemplateTeacher(error_rate=0.75, seed=3)
    flawed = [teacher.is_flawed(record, index, 4) for index in range(4)]
    assert sum(flawed) == 3  # round(0.75 * 4), exactly, on every image
    assert flawed == [TemplateTeacher(error_rate=0.75, seed=3).is_flawed(record, index, 4) for index in range(4)]
    grounded = TemplateTeacher(seed=3).write(record, label)
    for index in range(4):
        request = replace(_request(record, label), index=index, count=4)
        proposal = teacher.propose(request)
        assert proposal == teacher.propose(request)  # deterministic
        parsed = parse_trace(proposal.text, image_size=record.size, labels=CANDIDATES)
        assert parsed.errors == () and parsed.trace.answer == label  # a flaw the paper's filter cannot see
        assert (proposal.flaw is not None) == flawed[index]
        if proposal.flaw is None:
            assert proposal.text == render_trace(grounded)
    assert TemplateTeacher(error_rate=0.0).propose(replace(_request(record, label), count=4)).flaw is None


@pytest.mark.parametrize("photo", LABELLED)
def test_each_flaw_kind_is_the_mistake_it_names(sample_records, photo):
    from tag_lightning.boxes import box_iou

    record, label = sample_records[photo], SAMPLE_LABELS[photo]
    grounded = TemplateTeacher().write(record, label)
    hallucinating, flaw = TemplateTeacher(error_kinds=("hallucination",)).compose(record, label, flawed=True)
    assert flaw["kind"] == "hallucination"
    au = int(flaw["au"][2:])
    assert _intensity(record, au) < 1.0 and flaw["measured_intensity"] == round(_intensity(record, au), 2)
    *same, step = hallucinating.steps  # the grounded steps, then the flawed one: one choice apart
    assert tuple(same) == grounded.steps and step.aus == (au,)
    assert list(step.box) == record.aus[f"AU{au}"]["box"]  # the region is right; the activity is not there
    assert flaw["au"] in hallucinating.conclusion
    moved, flaw = TemplateTeacher(error_kinds=("wrong_box",)).compose(record, label, flawed=True)
    assert flaw["kind"] == "wrong_box"
    number = flaw["step"] - 1
    assert [step.aus for step in moved.steps] == [step.aus for step in grounded.steps]
    assert list(grounded.steps[number].box) == flaw["true_box"] and list(moved.steps[number].box) == flaw["box"]
    assert box_iou(moved.steps[number].box, grounded.steps[number].box) == 0.0
    assert moved.steps[:number] + moved.steps[number + 1:] == grounded.steps[:number] + grounded.steps[number + 1:]


def test_bad_error_settings_are_refused():
    with pytest.raises(ValueError, match=r"error_rate must lie in \[0, 1\]"):
        TemplateTeacher(error_rate=1.5)
    with pytest.raises(ValueError, match="error kinds must be some of hallucination, wrong_box"):
        TemplateTeacher(error_kinds=("typo",))
