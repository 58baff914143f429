"""Data stage, loading: prompt files (JSONL or Parquet) -> validated `PromptRecord`s.

One record per line (JSONL) or row (Parquet). Fields:

- `prompt` (str) or `messages` (list of {"role", "content"}): exactly one of the two;
- `domain` (str): routes the prompt to its teacher and its verifier;
- `answer` (str or number, optional): the reference answer for the verifier;
- `tests` (str or list, optional): test code or stdin/stdout cases for a code verifier;
- `verifier` (str, optional): verifier name; by default the domain names the verifier;
- `environment` (str, optional): the registered multi-turn environment (`envs.environment`)
  that runs this prompt's episode; without it the prompt is single-turn;
- `id` (str, optional): a stable name; by default `<file name>:<line>`;
- `metadata` (mapping, optional): free data; any other top-level key is also kept there.

A bad line raises `PromptDataError` naming the file, the line (or row) and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KNOWN_FIELDS = ("prompt", "messages", "domain", "answer", "tests", "verifier", "environment",
                "id", "metadata")


class PromptDataError(ValueError):
    """A prompt file or record that cannot be used, with its place (file:line, field)."""


@dataclass
class PromptRecord:
    """One prompt with what its teacher router and verifier need."""

    domain: str
    prompt: str | None = None
    """Plain-text prompt (set when `messages` is not)."""
    messages: list[dict[str, str]] | None = None
    """Chat messages (set when `prompt` is not)."""
    answer: str | None = None
    tests: Any = None
    verifier: str | None = None
    """Verifier name; None = the verifier registered for `domain`."""
    environment: str | None = None
    """Multi-turn environment name; None = single-turn."""
    id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_ids: list[int] | None = None
    """Token ids of the rendered prompt, set by `data.tokenize.tokenize_records`."""

    def to_json(self) -> dict[str, Any]:
        """The record as a JSONL line's object (without token ids or unset fields)."""
        out: dict[str, Any] = {"id": self.id, "domain": self.domain}
        for name in ("prompt", "messages", "answer", "tests", "verifier", "environment"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.metadata:
            out["metadata"] = self.metadata
        return out


def load_prompts(
    paths: str | Path | Iterable[str | Path], domains: Iterable[str] | None = None
) -> list[PromptRecord]:
    """Read and validate prompt files.

    Args:
        paths: one path or several; `.jsonl`/`.json` files hold one JSON object per line,
            `.parquet` files one record per row (needs pyarrow).
        domains: the domains allowed (e.g. those a teacher serves); None = any domain.

    Returns:
        The records in file order.

    Raises:
        PromptDataError: a missing file, an unknown format, a bad line or field, or a
            domain outside `domains`.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    allowed = set(domains) if domains is not None else None
    records = []
    for path in map(Path, paths):
        for where, raw in _read_rows(path):
            record = parse_record(raw, where, default_id=where)
            if allowed is not None and record.domain not in allowed:
                raise PromptDataError(
                    f"{where}: field 'domain': {record.domain!r} is not one of {sorted(allowed)}"
                )
            records.append(record)
    if not records:
        raise PromptDataError(f"no prompts in {[str(p) for p in paths]}")
    return records


def check_prompt_files(paths: Iterable[str | Path]) -> None:
    """Fail in a second, before any rank or model starts, on a missing file or an unknown
    format (`load_prompts` validates the records themselves)."""
    for path in map(Path, paths):
        _check_file(path)


def save_prompts(records: Iterable[PromptRecord], path: str | Path) -> None:
    """Write records as JSONL (the format `load_prompts` reads)."""
    with open(path, "w") as f:
        f.writelines(json.dumps(record.to_json()) + "\n" for record in records)


def parse_record(raw: Any, where: str, default_id: str = "") -> PromptRecord:
    """Validate one raw mapping into a `PromptRecord`; `where` names it in errors."""
    if not isinstance(raw, dict):
        raise PromptDataError(f"{where}: expected a JSON object, got {type(raw).__name__}")

    def fail(name: str, why: str) -> PromptDataError:
        return PromptDataError(f"{where}: field '{name}': {why}")

    prompt, messages = raw.get("prompt"), raw.get("messages")
    if (prompt is None) == (messages is None):
        raise fail("prompt", "exactly one of 'prompt' and 'messages' must be set")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise fail("prompt", f"must be a non-empty string, got {prompt!r}")
    if messages is not None:
        _check_messages(messages, fail)
    domain = raw.get("domain")
    if not isinstance(domain, str) or not domain:
        raise fail("domain", f"must be a non-empty string, got {domain!r}")
    answer = raw.get("answer")
    if answer is not None and (
        isinstance(answer, bool) or not isinstance(answer, (str, int, float))
    ):
        raise fail("answer", f"must be a string or a number, got {answer!r}")
    tests = raw.get("tests")
    if tests is not None and not isinstance(tests, (str, list)):
        raise fail("tests", f"must be a string or a list, got {type(tests).__name__}")
    verifier = raw.get("verifier")
    if verifier is not None and (not isinstance(verifier, str) or not verifier):
        raise fail("verifier", f"must be a non-empty string, got {verifier!r}")
    environment = raw.get("environment")
    if environment is not None and (not isinstance(environment, str) or not environment):
        raise fail("environment", f"must be a non-empty string, got {environment!r}")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise fail("metadata", f"must be a mapping, got {type(metadata).__name__}")
    extra = {k: v for k, v in raw.items() if k not in KNOWN_FIELDS}
    return PromptRecord(
        domain=domain,
        prompt=prompt,
        messages=messages,
        answer=None if answer is None else str(answer),
        tests=tests,
        verifier=verifier,
        environment=environment,
        id=str(raw.get("id") or default_id),
        metadata={**extra, **metadata},
    )


def _check_messages(messages: Any, fail) -> None:
    if not isinstance(messages, list) or not messages:
        raise fail("messages", "must be a non-empty list of {'role', 'content'} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise fail(f"messages[{i}]", f"needs a string 'role', got {message!r}")
        if not isinstance(message.get("content"), str):
            raise fail(f"messages[{i}]", f"needs a string 'content', got {message!r}")


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line` or `file:row N`, raw object) for every record of a file."""
    _check_file(path)
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptDataError(f"{path}:{number}: not valid JSON: {err.msg}") from None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise PromptDataError(f"{path}: prompt file not found")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise PromptDataError(f"{path}: unknown prompt file format (use .jsonl or .parquet)")


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptDataError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert to JSONL"
        ) from None
    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}:row {number}", {k: v for k, v in row.items() if v is not None}
