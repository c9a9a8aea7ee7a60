"""`tag prepare traces` with conversations in flight, through the real command, against an
OpenAI-compatible endpoint on 127.0.0.1 that answers with template traces (`template_endpoint.py`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from tag_lightning.commands.cli import main
from tag_lightning.data.samples import SAMPLE_LABELS
from tag_lightning.traces.builder import read_jsonl, sidecar_paths
from tag_lightning.traces.template_endpoint import TemplateEndpoint, replicate

IMAGES = 24


@pytest.fixture(scope="module")
def replicas(samples_dir, au_cache, tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """24 distinct-content copies of the labelled photos: (manifest, AU cache, records, labels by content hash)."""
    cache = tmp_path_factory.mktemp("cache") / "au_cache"
    shutil.copytree(au_cache, cache)
    photos = [(samples_dir / name, label) for name, label in SAMPLE_LABELS.items() if label]
    manifest, records, labels = replicate(photos, cache, tmp_path_factory.mktemp("replicas"), IMAGES)
    return manifest, cache, records, labels


def _command(replicas, out: Path, endpoint: TemplateEndpoint, *options) -> list[str]:
    manifest, cache, _, _ = replicas
    return ["prepare", "traces", "--data", str(manifest), "--cache", str(cache), "--out", str(out), "--quiet",
            "--teacher", "openai", "--base-url", endpoint.base_url, "--model", "template", *map(str, options)]


def _sorted_lines(path: Path) -> list[str]:
    return sorted(json.dumps(line, sort_keys=True) for line in read_jsonl(path))


def test_n_in_flight_keep_exactly_the_traces_of_one_on_kept_alive_connections(replicas, tmp_path):
    _, _, records, labels = replicas
    outs = {}
    for concurrency in (1, 8):
        with TemplateEndpoint(records, labels, latency=0.05) as endpoint:
            outs[concurrency] = tmp_path / f"traces_{concurrency}.jsonl"
            assert main(_command(replicas, outs[concurrency], endpoint, "--concurrency", concurrency)) == 0
        assert len(endpoint.arrivals) == IMAGES and endpoint.most_in_flight <= concurrency
        assert endpoint.connections <= 1 + concurrency  # the probe, then one kept-alive connection per thread
        stats = json.loads(sidecar_paths(outs[concurrency])[1].read_text())
        settings = stats["last_run"]["settings"]
        assert (stats["kept"], stats["requests"], settings["concurrency"]) == (IMAGES, IMAGES, concurrency)
        assert stats["tokens_received"] > 0 and stats["last_run"]["cpu_seconds"] > 0
        assert settings["teacher"] | {"seed": 0, "temperature": 0.7} == settings["teacher"]
    assert endpoint.most_in_flight > 1, "nothing was in flight at once"
    assert len(read_jsonl(outs[1])) == IMAGES
    assert _sorted_lines(outs[1]) == _sorted_lines(outs[8])


def test_a_kill_loses_only_what_was_in_flight_and_a_rerun_writes_every_image_once(replicas, tmp_path):
    _, _, records, labels = replicas
    out = tmp_path / "traces.jsonl"
    with TemplateEndpoint(records, labels, latency=0.2) as endpoint:
        command = [sys.executable, "-m", "tag_lightning.commands.cli", *_command(replicas, out, endpoint, "--concurrency", 4)]
        job = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while job.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < 6):
                time.sleep(0.05)
        finally:
            job.send_signal(signal.SIGKILL)
            job.wait()
        assert job.returncode == -signal.SIGKILL, job.stderr.read().decode()
        written = len(read_jsonl(out))
        assert 6 <= written < IMAGES
        asked_before = len(endpoint.arrivals)
        assert main(_command(replicas, out, endpoint, "--concurrency", 4)) == 0
    lines = read_jsonl(out)
    assert len(lines) == IMAGES and len({line["content_hash"] for line in lines}) == IMAGES
    assert len(endpoint.arrivals) - asked_before == IMAGES - written  # the rerun asked only for what was missing
    assert asked_before - written <= 4, "more was asked for than the conversations in flight"


def test_a_connection_the_server_closed_while_idle_is_reopened_without_a_retry(replicas, tmp_path):
    _, _, records, labels = replicas
    out = tmp_path / "traces.jsonl"
    with TemplateEndpoint(records, labels) as endpoint:
        endpoint.drop_connections = True
        assert main(_command(replicas, out, endpoint, "--concurrency", 1, "--limit", 5)) == 0
    assert endpoint.connections == 1 + 5  # the probe, then a new connection for each request
    assert [line["attempts"]["http_retries"] for line in read_jsonl(out)] == [0] * 5


class _Throttled(TemplateEndpoint):
    """Answers the first request with HTTP 429 and ``Retry-After: 2``, then as the template endpoint."""

    def respond(self, request, headers):
        if len(self.arrivals) == 1:
            return 429, {"Retry-After": "2"}, {"error": "rate limited"}
        return super().respond(request, headers)


def test_a_429_with_retry_after_is_waited_for(replicas, tmp_path):
    _, _, records, labels = replicas
    out = tmp_path / "traces.jsonl"
    with _Throttled(records, labels) as endpoint:
        assert main(_command(replicas, out, endpoint, "--concurrency", 1, "--limit", 2)) == 0
    first, retry = endpoint.arrivals[:2]
    assert retry - first >= 2.0  # the server's wait, not the client's backoff (under 1 s for a first retry)
    assert [line["attempts"]["http_retries"] for line in read_jsonl(out)] == [1, 0]
    assert "HTTP 429" in read_jsonl(out)[0]["attempts"]["transport_errors"][0]


class _Stopping(TemplateEndpoint):
    """Answers `answered` requests, then HTTP 503 to every request while `stopped`."""

    answered, stopped = 10, True

    def respond(self, request, headers):
        with self.lock:
            down = self.stopped and len(self.arrivals) > self.answered
        return (503, {}, {"error": "stopped"}) if down else super().respond(request, headers)


def test_a_server_that_stops_mid_run_ends_the_job_in_one_line_and_a_rerun_completes_it(replicas, tmp_path, capsys):
    _, _, records, labels = replicas
    out = tmp_path / "traces.jsonl"
    with _Stopping(records, labels, latency=0.05) as endpoint:
        command = _command(replicas, out, endpoint, "--concurrency", 4, "--max-http-retries", 0,
                           "--max-failures-in-a-row", 3)
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no answer for 3 traces in a row" in err[0] and "Rerun once it answers" in err[0]
        kept = read_jsonl(out)
        assert 0 < len(kept) <= _Stopping.answered
        endpoint.stopped = False
        assert main(command) == 0
    lines = read_jsonl(out)
    assert lines[:len(kept)] == kept
    assert len(lines) == IMAGES and len({line["content_hash"] for line in lines}) == IMAGES
