"""Agent tools: Python callables with a JSON schema, run in the code verifier's sandbox.

A `Tool` wraps a plain function `fn(state, **arguments) -> str`. `state` is the episode's
JSON data (e.g. a per-prompt key-value store) and `arguments` the model's call. The function
must be self-contained (standard library only, imports inside its body): its source is sent
to a fresh interpreter in `envs.sandbox` (own PID/network/mount namespaces, CPU, memory,
process, file and output limits, a wall-clock deadline), never run in the trainer.

`call_tool` never raises for what the tool or the model did: an unknown tool, bad arguments,
a crash, a time-out or an output flood becomes an error observation (`ToolResult.error`)
for that trajectory only, and the episode goes on.

Calls are written in the student's chat-template format, Qwen3's:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (whitespace inside the tags is
allowed); `parse_tool_calls` reads every call of an assistant message.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mopd_megatron.envs.sandbox import PYTHON, Limits, run

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
_RUNNER = """
import json, sys
{source}
state, arguments = json.load(sys.stdin)
result = {name}(state, **arguments)
if not isinstance(result, str):
    raise TypeError(f"tool returned {{type(result).__name__}}, expected str")
sys.stdout.write(result)
"""

TOOL_LIMITS = Limits(timeout_s=2.0, memory_bytes=256 << 20, processes=8, file_bytes=1 << 20,
                     folder_bytes=4 << 20, output_bytes=1024)
"""A tool call's default limits: small, since an observation is read by a model."""


@dataclass(frozen=True)
class Tool:
    """A callable the model may call, described by a JSON schema of its arguments."""

    fn: Callable[..., str]
    """`fn(state, **arguments) -> str`, self-contained (see the module docstring)."""
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments (an object schema: `properties`, `required`)."""
    limits: Limits = TOOL_LIMITS
    """Sandbox limits of one call; `output_bytes` caps the observation."""
    source: str = field(init=False, repr=False)

    def __post_init__(self):
        if self.fn.__name__ == "<lambda>":
            raise ValueError("a tool must be a named function (its source runs in the sandbox)")
        try:
            object.__setattr__(self, "source", textwrap.dedent(inspect.getsource(self.fn)))
        except (OSError, TypeError) as err:
            raise ValueError(f"tool {self.fn.__name__!r}: its source is not readable "
                             f"({err}); define it in a module file") from None

    @property
    def name(self) -> str:
        return self.fn.__name__

    def schema(self) -> dict[str, Any]:
        """The OpenAI/Qwen3 function schema `apply_chat_template(tools=...)` takes."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """One parsed call (`error` set when the call text could not be read)."""

    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class ToolResult:
    """What a call produced: the observation text, and whether it is an error."""

    content: str
    error: bool = False


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` of an assistant message, in order."""
    calls = []
    for body in _CALL.findall(text):
        try:
            data = json.loads(body.strip())
        except json.JSONDecodeError as err:
            calls.append(ToolCall(error=f"tool call is not valid JSON ({err.msg})"))
            continue
        name, arguments = (data.get("name"), data.get("arguments", {})) if isinstance(
            data, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(arguments, dict):
            calls.append(ToolCall(error='tool call needs {"name": str, "arguments": object}'))
            continue
        calls.append(ToolCall(name, arguments))
    return calls


def call_tool(tools: dict[str, Tool], call: ToolCall, state: Any) -> ToolResult:
    """Run one call in the sandbox; every failure is an error observation, never a raise
    (except `SandboxUnavailable`: a machine that cannot isolate tools stops the run)."""
    if call.error:
        return ToolResult(f"error: {call.error}", error=True)
    tool = tools.get(call.name)
    if tool is None:
        return ToolResult(f"error: unknown tool {call.name!r}; tools: {sorted(tools)}", True)
    if problem := _argument_problem(tool, call.arguments):
        return ToolResult(f"error: {tool.name}: {problem}", error=True)
    program = _RUNNER.format(source=tool.source, name=tool.name)
    result = run([PYTHON, "-I", "-S", "main.py"], files={"main.py": program},
                 stdin=json.dumps([state, call.arguments]), limits=tool.limits)
    if result.timed_out:
        return ToolResult(f"error: {tool.name} timed out after {tool.limits.timeout_s:g}s", True)
    if result.truncated:
        return ToolResult(f"error: {tool.name} printed more than {tool.limits.output_bytes} "
                          "bytes", True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        return ToolResult(f"error: {tool.name} failed: {lines[-1][:200]}", True)
    return ToolResult(result.stdout)


def _argument_problem(tool: Tool, arguments: dict[str, Any]) -> str:
    """Missing required or unknown arguments (the schema's top level), else ''."""
    properties = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", []) if k not in arguments]
    unknown = [k for k in arguments if k not in properties]
    if missing or unknown:
        return f"missing arguments {missing}, unknown arguments {unknown}"
    return ""
