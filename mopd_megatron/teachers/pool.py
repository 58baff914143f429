"""Teacher stage: route each sequence to its domain's teacher and score the student's tokens.

Consumes token sequences (prompt + the student's response), the position where each
response starts, and each sequence's domain; produces, in input order, one `Scores` per
sequence: log pi_T(y_t) of every response token under its domain's teacher, with
`top_k > 0` the teacher's top-k ids and log-probs per position (the top-k loss), and with
`hidden_states` the teacher's final hidden state per position in its recipe dtype (the
full-vocabulary losses without local teachers; launched servers get the flag it needs), and
with `token_ids` the log-probs of each sequence's given ids per position (`student_topk`).

Routing is hard (MiMo-V2-Flash MOPD): a domain belongs to exactly one teacher (the recipe
validates it); a domain no teacher lists goes to `default`, or is an error naming the
domain and the known ones. Teachers that share a server are started once (same model
folder for launched engines, same URL for attached ones; the first teacher's launch
settings are used). A mixed-domain batch is split by teacher and the parts are scored
concurrently; each teacher's client batches and retries on its own.

Teachers score by prefill only, at temperature 1 whatever the student's sampling
temperature, so log pi_T is the teacher's own distribution. At start-up each teacher's
vocabulary is compared with the student's (token -> id maps of the tokenizers in the model
folders; for an attached server, the folder it reports when this machine can read it), and
a mismatch fails naming the teacher before any engine is launched.
"""

from __future__ import annotations

import asyncio
import functools
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import torch
from transformers import AutoTokenizer

from mopd_megatron.config import TeacherConfig, TeachersConfig
from mopd_megatron.rollout.client import EngineClient
from mopd_megatron.rollout.sglang import EngineHandle, start_engine
from mopd_megatron.rollout.transport import run_sync
from mopd_megatron.rollout.types import Scores


@functools.cache
def _vocab(path: str) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(path).get_vocab()


def check_vocabulary(student_path: str | Path, teacher_path: str | Path, teacher: str) -> None:
    """Fail unless the teacher's tokenizer maps the same tokens to the same ids.

    Raises:
        ValueError: Naming the teacher, both folders and the first differences.
    """
    student, other = _vocab(str(student_path)), _vocab(str(teacher_path))
    if student == other:
        return
    diff = sorted(t for t in set(student) | set(other) if student.get(t) != other.get(t))
    shown = ", ".join(f"{t!r}: {student.get(t)} vs {other.get(t)}" for t in diff[:5])
    raise ValueError(
        f"teacher {teacher!r} ({teacher_path}) does not share the student's vocabulary "
        f"({student_path}): {len(other)} vs {len(student)} tokens, {len(diff)} differ "
        f"(token: student id vs teacher id: {shown}); on-policy distillation scores the "
        "student's token ids, so both must use one tokenizer")


def _endpoint(cfg: TeacherConfig) -> str:
    if cfg.engine == "url":
        return cfg.url.rstrip("/")
    if not cfg.model_path:
        raise ValueError(f"teacher {cfg.name!r}: engine {cfg.engine!r} needs a model_path")
    return f"{cfg.engine}:{Path(cfg.model_path).resolve()}"


def resolve_route(routes: dict[str, str], default: str | None, domain: str) -> str:
    """Hard routing: the teacher named for `domain`, else the default.

    Raises:
        ValueError: The domain has no teacher and there is no default.
    """
    name = routes.get(domain, default)
    if name is None:
        raise ValueError(f"no teacher for domain {domain!r}: known domains are "
                         f"{sorted(routes)} and teachers.default is not set")
    return name


def teacher_for(cfg: TeachersConfig, domain: str) -> TeacherConfig:
    """The recipe entry of the teacher that scores `domain`."""
    name = resolve_route({d: t.name for t in cfg.teachers for d in t.domains}, cfg.default, domain)
    return next(t for t in cfg.teachers if t.name == name)


class TeacherPool:
    """Domain -> teacher routing over one client per distinct teacher server.

    Args:
        clients: Teacher name -> its server's client (teachers may share a client).
        routes: Domain -> teacher name.
        default: Teacher for domains not in `routes` (None = such a domain is an error).
        handles: Engines to stop with the pool.
        hidden_dtypes: Teacher name -> dtype its hidden states are kept in (default bf16).
    """

    def __init__(self, clients: dict[str, EngineClient], routes: dict[str, str],
                 default: str | None = None,
                 handles: Sequence[EngineHandle] = (),
                 hidden_dtypes: dict[str, torch.dtype] | None = None):
        unknown = {t for t in [*routes.values(), default] if t is not None} - set(clients)
        if unknown:
            raise ValueError(f"routes name teachers without a client: {sorted(unknown)}")
        self.clients, self.routes, self.default = clients, routes, default
        self.handles = list(handles)
        self.hidden_dtypes = hidden_dtypes or {}

    @classmethod
    def start(cls, cfg: TeachersConfig, student_path: str | Path, log_dir: str | Path = ".",
              startup_timeout_s: float = 900.0) -> TeacherPool:
        """Check vocabularies, launch (or attach to) each distinct server, wait for all.

        Args:
            cfg: The recipe's teachers section.
            student_path: The student's HF folder (its tokenizer is the reference).
            log_dir: Folder of the teacher server logs (`teacher-<name>.log`).
            startup_timeout_s: Deadline for all servers to become healthy (they start in
                parallel).

        Returns:
            The pool; use it as a context manager or call `stop()`.
        """
        first: dict[str, TeacherConfig] = {}
        for t in cfg.teachers:
            first.setdefault(_endpoint(t), t)
        if cfg.check_tokenizer:
            for t in first.values():
                if t.engine != "url":
                    check_vocabulary(student_path, t.model_path, t.name)
        handles: dict[str, EngineHandle] = {}
        try:
            for key, t in first.items():
                handles[key] = start_engine(t, log_dir=log_dir, name=f"teacher-{t.name}",
                                            startup_timeout_s=startup_timeout_s, wait=False)
            deadline = time.monotonic() + startup_timeout_s
            for key, handle in handles.items():
                handle.wait_healthy(max(0.0, deadline - time.monotonic()))
                if cfg.check_tokenizer and first[key].engine == "url":
                    _check_attached(handle.client, student_path, first[key].name)
        except BaseException:
            for handle in handles.values():
                handle.stop()
            raise
        clients = {t.name: handles[_endpoint(t)].client for t in cfg.teachers}
        routes = {d: t.name for t in cfg.teachers for d in t.domains}
        dtypes = {t.name: getattr(torch, t.hidden_dtype) for t in cfg.teachers}
        return cls(clients, routes, cfg.default, list(handles.values()), dtypes)

    @property
    def names(self) -> list[str]:
        """The teachers' names."""
        return list(self.clients)

    def client(self, name: str) -> EngineClient:
        """The client of teacher `name` (e.g. to evaluate the teacher by generation)."""
        return self.clients[name]

    def route(self, domain: str) -> str:
        """The name of the teacher that scores `domain` (see `resolve_route`)."""
        return resolve_route(self.routes, self.default, domain)

    async def ascore(self, sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
                     domains: Sequence[str], top_k: int = 0,
                     hidden_states: bool = False,
                     token_ids: Sequence[Sequence[int]] | None = None) -> list[Scores]:
        """Score each sequence from its response start with its domain's teacher.

        Args:
            sequences: Token ids of prompt + response.
            response_starts: Index of the first response token in each sequence (>= 1).
            domains: Each sequence's domain.
            top_k: Top-k log-probs per position to return as well (0 = none; the objective
                says how many it needs).
            hidden_states: Return each teacher's final hidden states as well.
            token_ids: Per sequence, ids whose log-probs to return at every position (None =
                none; `EngineClient.ascore`).

        Returns:
            One `Scores` per sequence, in input order.
        """
        if not len(sequences) == len(response_starts) == len(domains):
            raise ValueError(f"{len(sequences)} sequences, {len(response_starts)} starts and "
                             f"{len(domains)} domains")
        groups: dict[tuple, tuple[EngineClient, torch.dtype | None, list[int]]] = {}
        for i, domain in enumerate(domains):
            name = self.route(domain)
            client = self.clients[name]
            dtype = self.hidden_dtypes.get(name, torch.bfloat16) if hidden_states else None
            groups.setdefault((id(client), dtype), (client, dtype, []))[2].append(i)
        parts = await asyncio.gather(*(
            client.ascore([sequences[i] for i in idx], [response_starts[i] for i in idx], top_k,
                          dtype, None if token_ids is None else [token_ids[i] for i in idx])
            for client, dtype, idx in groups.values()))
        out: list[Scores | None] = [None] * len(sequences)
        for (_, _, idx), scores in zip(groups.values(), parts):
            for i, s in zip(idx, scores):
                out[i] = s
        return out

    def score(self, sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
              domains: Sequence[str], top_k: int = 0,
              hidden_states: bool = False,
              token_ids: Sequence[Sequence[int]] | None = None) -> list[Scores]:
        """Blocking `ascore`."""
        return run_sync(self.ascore(sequences, response_starts, domains, top_k, hidden_states,
                                    token_ids))

    def stop(self) -> None:
        """Stop the teacher servers this pool launched."""
        for handle in self.handles:
            handle.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _check_attached(client: EngineClient, student_path: str | Path, name: str) -> None:
    """Vocabulary check of an attached server through the folder it reports, if readable."""
    info = client.model_info()
    path = info.get("tokenizer_path") or info.get("model_path") or ""
    if Path(path).is_dir():
        check_vocabulary(student_path, path, name)
    else:
        warnings.warn(f"teacher {name!r} at {client.url}: its tokenizer {path!r} is not readable "
                      "here, so its vocabulary is not checked against the student's",
                      stacklevel=3)
