"""Rollout/teacher stage, transport: HTTP/1.1 over asyncio with deadlines, retries and a limit.

Consumes a method, a path and a JSON payload; produces the parsed (and, given a `parse`
function, validated) JSON reply or raises `EngineError`. `HttpEndpoint` is the base of the
one SGLang client (`client.EngineClient`): every engine call in the package goes through
`HttpEndpoint._request`.

A request has a total deadline of `timeout_s`; at most `max_concurrency` requests are in
flight per event loop. Transient failures (refused/reset connection, timeout, HTTP 5xx/429,
malformed JSON, a reply that `parse` cannot read: any shape, nulls or types it does not
expect) are retried `max_retries` times with exponential backoff; the last one, or an HTTP
4xx at once, raises `EngineError` naming the URL, the path and the problem (and the HTTP
status, when there was one). Standard library only (no aiohttp/requests).
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from mopd_megatron.rollout.types import ResponseError


class EngineError(RuntimeError):
    """A serving engine failed: names the endpoint URL and what went wrong.

    `status` is the HTTP status of a refusal (e.g. 404: an older server without the route).
    """

    def __init__(self, url: str, problem: str, attempts: int = 1, status: int | None = None):
        self.url, self.problem, self.attempts, self.status = url, problem, attempts, status
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{url}: {problem}{tries}")


class _Transient(Exception):
    """A failure worth retrying (server error, overload, bad response)."""


def run_sync(coro: Coroutine) -> Any:
    """Run a coroutine to completion from blocking code, even under a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while size := int((await reader.readline()).split(b";")[0], 16):
            chunks.append(await reader.readexactly(size))
            await reader.readline()
        return b"".join(chunks)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


class HttpEndpoint:
    """One HTTP server: its URL and the limits that every request to it obeys.

    Args:
        url: Base URL, e.g. http://127.0.0.1:30000.
        timeout_s: Total deadline of one HTTP request.
        max_retries: Retries of a transient failure (so up to 1 + max_retries attempts).
        max_concurrency: Requests in flight at once (per event loop).
        batch_size: Sequences per request for the calls that batch.
        backoff_s: First retry delay; doubles on every retry.
    """

    def __init__(self, url: str, *, timeout_s: float = 120.0, max_retries: int = 3,
                 max_concurrency: int = 8, batch_size: int = 64, backoff_s: float = 0.25):
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"engine URL must look like http://host:port, got {url!r}")
        self._host, self._ssl = parts.hostname, parts.scheme == "https"
        self._port = parts.port or (443 if self._ssl else 80)
        self._prefix, self._netloc = parts.path, parts.netloc
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_concurrency, self.batch_size = max_concurrency, batch_size
        self._limits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def from_config(cls, url: str, cfg: Any):
        """Client with the limits of an `EngineConfig` (timeout_s, max_retries, ...)."""
        return cls(url, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                   max_concurrency=cfg.max_concurrency, batch_size=cfg.batch_size)

    async def _http(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=self._ssl)
        try:
            head = (f"{method} {self._prefix}{path} HTTP/1.1\r\nHost: {self._netloc}\r\n"
                    "Connection: close\r\nAccept: application/json\r\n")
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"\r\n" + (body or b""))
            await writer.drain()
            status_line = (await reader.readline()).split()
            if len(status_line) < 2 or not status_line[1].isdigit():
                raise _Transient(f"{path}: not an HTTP response ({b' '.join(status_line)!r:.100})")
            status = int(status_line[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            return status, await _read_body(reader, headers)
        finally:
            writer.close()

    def _limit(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._limits:
            self._limits[loop] = asyncio.Semaphore(self.max_concurrency)
        return self._limits[loop]

    async def _request(self, method: str, path: str, payload: Any = None, *,
                       parse: Callable[[Any], Any] | None = None, json_reply: bool = True,
                       retries: int | None = None) -> Any:
        """One call with deadline, retries and checks; `parse` validates the JSON reply."""
        body = None if payload is None else json.dumps(payload).encode()
        attempts = 1 + (self.max_retries if retries is None else retries)
        for attempt in range(1, attempts + 1):
            try:
                async with self._limit():
                    status, data = await asyncio.wait_for(
                        self._http(method, path, body), self.timeout_s)
                text = data.decode("utf-8", "replace")
                if status >= 400:
                    problem = f"HTTP {status} from {path}: {text[:1000]}"
                    if status >= 500 or status == 429:
                        raise _Transient(problem)
                    raise EngineError(self.url, problem, attempt, status)
                if not json_reply:
                    return text
                try:
                    value = json.loads(text)
                except ValueError:
                    raise _Transient(f"malformed JSON from {path}: {text[:200]!r}") from None
                return _parse(parse, value, path) if parse else value
            except (TimeoutError, OSError, asyncio.IncompleteReadError, _Transient) as err:
                if isinstance(err, asyncio.TimeoutError):
                    problem = f"no reply from {path} within {self.timeout_s:g} s (timeout)"
                elif isinstance(err, _Transient):
                    problem = str(err)
                else:
                    problem = f"{path}: server down or unreachable ({type(err).__name__}: {err})"
                if attempt == attempts:
                    raise EngineError(self.url, problem, attempt) from err
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))


def _parse(parse: Callable[[Any], Any], value: Any, path: str) -> Any:
    """`parse(value)`; a reply it cannot read, whatever the way, is a bad (retried) reply."""
    try:
        return parse(value)
    except ResponseError as err:
        raise _Transient(f"{path}: {err}") from None
    except (TypeError, ValueError, LookupError, AttributeError) as err:
        raise _Transient(f"{path}: malformed reply ({type(err).__name__}: {err})") from None
