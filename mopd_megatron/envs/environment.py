"""Environments for multi-turn rollouts: the interface, a tool-calling environment, a registry.

A prompt record names its environment (`PromptRecord.environment`); records without one
stay single-turn. One `Environment` instance runs one episode:

    env = make_environment(record.environment)
    messages, tools = env.reset(record)       # opening chat messages, tool schemas offered
    result = env.step({"role": "assistant", "content": text})
    result.observation                        # messages to append (e.g. tool results)
    result.done, result.reward                # reward None = the record's verifier decides

`ToolEnvironment` is the common case: the tools' observations answer every tool call of
the assistant's message, and a message without a call ends the episode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mopd_megatron.envs.tools import Tool, call_tool, parse_tool_calls

Message = dict[str, Any]


@dataclass
class StepResult:
    """What the environment answers to one assistant message."""

    observation: list[Message] = field(default_factory=list)
    """Messages to append before the model's next turn (empty when done)."""
    done: bool = False
    reward: float | None = None
    """The episode's outcome reward when done; None = score the final answer with the
    record's verifier."""
    tool_calls: int = 0
    tool_errors: int = 0


class Environment:
    """One episode of a multi-turn task (subclass and register with `register_environment`)."""

    def reset(self, record) -> tuple[list[Message], list[dict[str, Any]]]:
        """(opening messages, tool schemas for `apply_chat_template(tools=...)`)."""
        raise NotImplementedError

    def step(self, message: Message) -> StepResult:
        raise NotImplementedError


class ToolEnvironment(Environment):
    """Answers each tool call with the tool's output (run in the sandbox) as a `tool` message.

    Args:
        tools: the tools offered.
        state_key: the record's `metadata` key whose value every tool receives as `state`.
        error_text: replaces the text of every error observation (for a small vocabulary
            that cannot spell the messages); None keeps the message.
    """

    def __init__(self, tools: list[Tool], state_key: str | None = None,
                 error_text: str | None = None):
        self.tools = {t.name: t for t in tools}
        self.state_key, self.error_text = state_key, error_text
        self.state: Any = None

    def reset(self, record) -> tuple[list[Message], list[dict[str, Any]]]:
        if self.state_key is not None and self.state_key not in record.metadata:
            raise KeyError(f"{record.id}: environment needs metadata[{self.state_key!r}]")
        self.state = record.metadata.get(self.state_key) if self.state_key else None
        messages = record.messages or [{"role": "user", "content": record.prompt}]
        return [dict(m) for m in messages], [t.schema() for t in self.tools.values()]

    def step(self, message: Message) -> StepResult:
        calls = parse_tool_calls(message["content"])
        if not calls:
            return StepResult(done=True)
        results = [call_tool(self.tools, call, self.state) for call in calls]
        texts = [self.error_text if r.error and self.error_text is not None else r.content
                 for r in results]
        return StepResult(
            observation=[{"role": "tool", "content": text} for text in texts],
            tool_calls=len(calls), tool_errors=sum(r.error for r in results))


_ENVIRONMENTS: dict[str, Callable[[], Environment]] = {}


def register_environment(name: str, factory: Callable[[], Environment]) -> None:
    """Make `factory()` (a fresh episode) available to records naming `name`."""
    _ENVIRONMENTS[name] = factory


def make_environment(name: str) -> Environment:
    """A fresh episode of the environment registered as `name`."""
    if name not in _ENVIRONMENTS:
        raise KeyError(f"unknown environment {name!r}; registered: {sorted(_ENVIRONMENTS)} "
                       "(a record's 'environment' field names one)")
    return _ENVIRONMENTS[name]()


def environment_names() -> list[str]:
    return sorted(_ENVIRONMENTS)
