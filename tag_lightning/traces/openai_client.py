"""The OpenAI-compatible teacher: a chat model behind any ``POST /chat/completions`` endpoint (OpenAI, vLLM, ...).

It speaks HTTP with the standard library's `http.client`: the job needs one POST route, a kept-alive
connection per thread and retries it controls (backoff with jitter, ``Retry-After``, counted
per trace). The `openai` SDK would add httpx and friends as dependencies and retry on its own
beneath ours, so failures would be counted and backed off twice.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import io
import json
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from tag_lightning.errors import BadValue
from tag_lightning.images import decode_image
from tag_lightning.traces.prompt import build_prompt
from tag_lightning.traces.teachers import (
    Proposal,
    TeacherError,
    TeacherRequest,
    TeacherSetupError,
    checked_top_p,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures: timeouts, dropped connections, HTTP 429 and 5xx.

    The jitter spreads the retries of many conversations in flight, which would otherwise all hit a
    recovering server in the same instant. A server's ``Retry-After`` is a floor on the wait.
    """

    max_retries: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.5  # the wait is drawn uniformly from [(1 - jitter) * backoff, backoff]

    def delay(self, retry: int, retry_after: float | None = None, draw: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (0-based), at least `retry_after`."""
        backoff = min(self.max_delay, self.base_delay * 2**retry)
        return max(backoff * (1.0 - self.jitter * draw()), retry_after or 0.0)


class _Transient(Exception):
    """A failure worth retrying after a pause (`retry_after`: the server's ``Retry-After``, seconds)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


_DROPPED = (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)


class OpenAITeacher:
    """A chat model behind an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint.

    The API key is read from the environment variable named `api_key_env` (a key never goes on
    a command line); without it no Authorization header is sent, which local servers such as
    vLLM accept. Sends `max_tokens`, every sampling parameter (`sampling`) and a `seed` per request
    (see `request_seed`).
    Safe to call from many threads at once: each thread keeps its own connection alive
    (`http.client`), so N conversations in flight hold N connections, not one per request.
    Environment proxy variables are not read: point `base_url` at the server itself.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        *,
        timeout: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 1024,
        seed: int | None = 0,
    ):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadValue(f"the teacher's base URL must be http(s)://HOST[:PORT]/PATH, got {base_url!r}")
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._address = parts.netloc.rpartition("@")[2]
        self._path = parts.path
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.retry = retry
        self.temperature = temperature
        self.top_p = checked_top_p(top_p)
        self.max_tokens = max_tokens
        self.seed = seed
        self.name = f"openai:{model}"
        self._headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()  # this thread's connection

    def settings(self) -> dict[str, Any]:
        """What the run's statistics record of this teacher (never the key)."""
        return {"name": self.name, "base_url": self.base_url, "model": self.model, **self.sampling(),
                "max_tokens": self.max_tokens, "seed": self.seed, "timeout": self.timeout,
                "max_retries": self.retry.max_retries}

    def sampling(self) -> dict[str, Any]:
        """The sampling fields of every request, none left to the server's defaults (see `teachers.py`).

        ``top_k`` (-1: off) and ``repetition_penalty`` are extra fields that vLLM reads; OpenAI's own API
        refuses fields it does not know (HTTP 400), which ends the job with its message.
        """
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": -1, "repetition_penalty": 1.0}

    def propose(self, request: TeacherRequest) -> Proposal:
        body = json.dumps(self._payload(request)).encode("utf-8")
        errors: list[str] = []
        for retry in range(self.retry.max_retries + 1):
            try:
                text, tokens = self._post(body)
                return Proposal(text, retries=retry, errors=tuple(errors), tokens=tokens)
            except _Transient as err:
                errors.append(str(err))
                if retry < self.retry.max_retries:
                    time.sleep(self.retry.delay(retry, err.retry_after))
        raise TeacherError(
            f"{self.url}: no answer after {len(errors)} tries; last error: {errors[-1]}",
            retries=len(errors) - 1, errors=tuple(errors),
        )

    def request_seed(self, request: TeacherRequest) -> int | None:
        """The sampling seed of one request, drawn from `seed`, the image, the trace and the attempt.

        A server that honours seeds (vLLM) then samples reproducibly, while a retry or another trace
        of the same image is a fresh draw rather than the same answer again.
        """
        if self.seed is None:
            return None
        key = f"{self.seed}:{request.record.content_hash}:{request.index}:{request.attempt}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big") >> 1  # 31 bits: any server's int

    def probe(self, timeout: float = 10.0) -> None:
        """Raise `TeacherSetupError` unless the endpoint answers a cheap ``GET {base_url}/models``.

        Called before the first image, so that a dead endpoint ends the job in seconds rather than
        after every image's retries. Any HTTP answer but a refused key counts as alive (not every
        OpenAI-compatible server serves ``/models``).
        """
        connection = self._connection_class(self._address, timeout=min(timeout, self.timeout))
        try:
            connection.request("GET", self._path + "/models", headers=self._headers)
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException) as err:
            raise TeacherSetupError(f"{self.base_url} does not answer ({err}); is the server running, and is the "
                                    "base URL right?") from err
        finally:
            connection.close()
        if status in (401, 403):
            raise self._key_refused(f"HTTP {status}")

    def _key_refused(self, detail: str) -> TeacherSetupError:
        return TeacherSetupError(f"{self.url} refused the API key ({detail}); "
                                 f"put a valid key in the environment variable {self.api_key_env}")

    def _payload(self, request: TeacherRequest) -> dict[str, Any]:
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(request.image.read_bytes())}},
            {"type": "text", "text": build_prompt(request)},
        ]
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            **self.sampling(),
        }
        seed = self.request_seed(request)
        return payload if seed is None else payload | {"seed": seed}

    def _post(self, body: bytes) -> tuple[str, int | None]:
        """One request: the answer and its token count; `_Transient` for what a retry may fix, errors for the rest."""
        try:
            status, headers, raw = self._exchange(self._path + "/chat/completions", body)
        except (OSError, http.client.HTTPException) as err:
            raise _Transient(f"{type(err).__name__}: {err}") from err
        if 200 <= status < 300:
            return _answer(raw, self.url)
        detail = f"HTTP {status}: {raw[:300].decode('utf-8', errors='replace').strip()}"
        if status == 429 or status >= 500:
            raise _Transient(detail, _retry_after(headers.get("Retry-After")) if status in (429, 503) else None)
        if status in (401, 403):
            raise self._key_refused(detail)
        if status == 404:
            raise TeacherSetupError(f"{self.url} answered {detail}; check the base URL (OpenAI-compatible "
                                    f"servers usually end in /v1) and the model name {self.model!r}")
        raise TeacherError(f"{self.url} rejected the request ({detail})")

    def _exchange(self, path: str, body: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One POST on this thread's kept-alive connection: status, headers, body.

        A server may close an idle kept-alive connection at any time; when a reused one turns out
        closed, the request goes once more, at once, on a new connection (no failure, no backoff).
        """
        connection = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None:
            try:
                return self._send(connection, path, body)
            except _DROPPED:
                pass
        self._local.connection = self._connection_class(self._address, timeout=self.timeout)
        return self._send(self._local.connection, path, body)

    def _send(self, connection: http.client.HTTPConnection, path: str, body: bytes
              ) -> tuple[int, http.client.HTTPMessage, bytes]:
        try:
            connection.request("POST", path, body=body, headers=self._headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        except BaseException:  # a half-done exchange leaves the connection unusable
            connection.close()
            raise


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _answer(raw: bytes, url: str) -> tuple[str, int | None]:
    """The assistant message of a chat completion and its `usage` token count; an empty refusal reads as empty."""
    try:
        completion = json.loads(raw)
        content = completion["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise TeacherError(f"{url} did not answer with a chat completion: {raw[:200]!r}") from err
    usage = completion.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return (content if isinstance(content, str) else ""), (tokens if isinstance(tokens, int) else None)


def image_data_url(data: bytes) -> str:
    """The image as a base64 data URL, re-encoded as PNG unless the bytes are web-ready and upright.

    Boxes are in upright pixels, so an image with an EXIF rotation is sent already rotated.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, orientation = image.format, image.getexif().get(0x0112, 1)
    except (OSError, ValueError) as err:
        raise TeacherError(f"the image cannot be sent: {err}") from err
    if kind not in ("JPEG", "PNG", "WEBP") or orientation != 1:
        buffer = io.BytesIO()
        Image.fromarray(decode_image(data)[0]).save(buffer, format="PNG")
        data, kind = buffer.getvalue(), "PNG"
    return f"data:image/{kind.lower()};base64,{base64.b64encode(data).decode('ascii')}"
