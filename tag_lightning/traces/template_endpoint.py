"""A stand-in for a vLLM teacher: an OpenAI-compatible endpoint answering with template-teacher traces.

`bench/traces.py` and the tests run the real `tag prepare traces --teacher openai` against it, so
the client's concurrency, resume and retries are measured and checked without a GPU or a network,
with answers known in advance (a deterministic teacher). Each chat request's image is looked up by
content hash among the AU records and labels the endpoint was given and answered, after a fixed
`latency`, with `TemplateTeacher`'s trace for it, in the trace format the prompt asks for
(`prompts.asked_format`; ours when it asks for none); `usage` counts the answer's words as tokens. It
speaks HTTP/1.1 with kept-alive connections, as vLLM does, and records every chat request's
arrival time, every connection opened and the most requests it answered at once.

`replicate` makes a dataset of any size for it from a few photos, without running the AU detector
again.
"""

from __future__ import annotations

import base64
import csv
import functools
import json
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tag_lightning.answers.grammar import PER_STEP, render_trace
from tag_lightning.answers.prompts import asked_format
from tag_lightning.au.cache import AUCache
from tag_lightning.au.record import AURecord
from tag_lightning.images import content_hash
from tag_lightning.traces.template import TemplateTeacher


class TemplateEndpoint(ThreadingHTTPServer):
    """``POST /v1/chat/completions`` on 127.0.0.1 (a free port); use as a context manager to serve.

    `records` and `labels` are keyed by content hash. Override `respond` to script failures.
    """

    daemon_threads = True
    request_queue_size = 512  # socketserver's 5 resets connections that many clients open at once; uvicorn's is 2048

    def __init__(self, records: Mapping[str, AURecord], labels: Mapping[str, str], latency: float = 0.0,
                 teacher: TemplateTeacher = TemplateTeacher()):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.records, self.labels, self.latency, self.teacher = records, labels, latency, teacher
        self.arrivals: list[float] = []  # time.monotonic() of each chat request, in arrival order
        self.connections = 0
        self.in_flight = self.most_in_flight = 0  # chat requests being answered now, and at most at once
        self.drop_connections = False  # close each connection after one answer, unannounced (an idle timeout)
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def respond(self, request: dict, headers: Message) -> tuple[int, dict[str, str], dict[str, Any]]:
        """The HTTP status, extra headers and JSON body that answer one chat request (and its headers)."""
        time.sleep(self.latency)
        image, prompt = request["messages"][0]["content"]
        digest = content_hash(base64.b64decode(image["image_url"]["url"].split(",", 1)[1]))
        if digest not in self.records:
            return 400, {}, {"error": f"unknown image {digest}"}
        text = self._answer(digest, asked_format(prompt["text"]) or PER_STEP)
        return 200, {}, {"choices": [{"message": {"role": "assistant", "content": text}}],
                         "usage": {"completion_tokens": len(text.split())}}

    @functools.lru_cache(maxsize=None)  # noqa: B019 (the endpoint lives as long as its answers)
    def _answer(self, digest: str, trace_format: str) -> str:
        """The template trace of an image: written once, so that the endpoint spends its CPU on HTTP only."""
        return render_trace(self.teacher.write(self.records[digest], self.labels[digest]), trace_format)

    def handle_error(self, request, client_address) -> None:
        """A client that goes away (a killed job, one that ended with connections kept alive) is no error here."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def __enter__(self) -> TemplateEndpoint:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: TemplateEndpoint
    protocol_version = "HTTP/1.1"  # kept-alive connections

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming): the client's probe lists the models
        self._send(200, {}, {"data": [{"id": "template"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {}, {"error": f"no route {self.path}"})
        server = self.server
        with server.lock:
            server.arrivals.append(time.monotonic())
            server.in_flight += 1
            server.most_in_flight = max(server.most_in_flight, server.in_flight)
        try:
            answer = server.respond(body, self.headers)
        finally:
            with server.lock:
                server.in_flight -= 1
        self._send(*answer)
        self.close_connection = self.close_connection or server.drop_connections

    def _send(self, status: int, headers: dict[str, str], payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet
        pass


def replicate(
    photos: Sequence[tuple[Path, str]], cache_dir: Path, out: Path, count: int
) -> tuple[Path, dict[str, AURecord], dict[str, str]]:
    """`count` copies of the labelled `photos`, each with its own content, their AU records added to the cache.

    A copy is its photo's bytes plus a 4-byte tag after the image data: the same pixels (so the
    same AU record), another content hash (so another image to the trace job, which resumes by
    content). Writes ``out/manifest.csv`` (path,label); returns its path and the copies' records
    and labels by content hash, as `TemplateEndpoint` takes them.
    """
    cache = AUCache(cache_dir, create=True)
    out.mkdir(parents=True, exist_ok=True)
    sources = [(path.read_bytes(), label) for path, label in photos]
    records, rows = [], []
    for number in range(count):
        data, label = sources[number % len(sources)]
        original = cache.get(content_hash(data))
        if original is None:
            raise KeyError(f"{photos[number % len(photos)][0]} is not in the AU cache {cache.root}")
        path = out / f"{number:05d}.jpg"
        path.write_bytes(data + number.to_bytes(4, "little"))
        records.append(replace(original, image=str(path), content_hash=content_hash(path.read_bytes())))
        rows.append((path.name, label))
    cache.put_many(records, cache.settings_key)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as file:
        csv.writer(file).writerows([("path", "label"), *rows])
    return (manifest, {record.content_hash: record for record in records},
            {record.content_hash: label for record, (_, label) in zip(records, rows)})
