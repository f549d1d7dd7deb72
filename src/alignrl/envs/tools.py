"""Tools an agent calls between its turns: schemas, prompt rendering, parsing calls, running them, built-ins.

A tool is a typed function with a Google-style docstring (its `Args:` describe every argument), as for TRL's
GRPOTrainer `tools=` and transformers' chat templates; bound methods work too. The model calls tools in the
Hermes/Qwen format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and each result comes back as the
content of a `tool` message: a string, or `{"error": "..."}` when the call failed (as in TRL).

Tools run in a daemon thread with a time limit. Python cannot stop a thread: a tool that hangs past its limit is
abandoned and keeps running in the background (holding whatever it holds), so a tool that may hang or loop should
do its work in a subprocess it can kill, as the built-in `python` tool does (it runs code in the code sandbox).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import math
import operator
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from alignrl.errors import AlignRLError

__all__ = [
    "BUILTIN_TOOLS",
    "ToolCall",
    "calculator",
    "call_tool",
    "load_tools",
    "parse_tool_calls",
    "python",
    "render_conversation",
    "tool_schema",
    "tools_system_prompt",
]

_PYTHON_TIMEOUT = 5.0  # seconds of wall-clock time per `python` call
_PYTHON_MEMORY_MB = 512  # address-space limit of the `python` tool's sandboxed interpreter
_OUTPUT_CAP = 2000  # characters of a `python` call's output returned to the model
_ERROR_CAP = 500  # characters of an exception message put into a tool's error result
_SNIPPET = 60  # characters of a malformed tool call quoted in its error


# ----------------------------------------------------------------------------------------------------------
# Schemas and rendering
# ----------------------------------------------------------------------------------------------------------
def _tool_name(fn: Callable[..., Any]) -> str:
    """The name a tool is called by (its function name)."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _schema(fn: Callable[..., Any], label: str) -> dict[str, Any]:
    """get_json_schema(fn), or one-line AlignRLError naming `label`."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # noqa: BLE001 - transformers raises its own exceptions, NameError for bad hints, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = re.sub(r"^Cannot generate JSON schema for \S+ because (it )?", "", reason).rstrip("!")
        raise AlignRLError(
            f"tools: {label}: {reason} (a tool needs type hints and a Google-style docstring with an Args: section)"
        ) from None


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema transformers renders for a tool (`{"type": "function", "function": {...}}`)."""
    return _schema(fn, _tool_name(fn))


def tools_system_prompt(tools: Sequence[Callable[..., Any]]) -> str:
    """A short plain-text tool description (one `name(arg: type, ...): description` line per tool and how to call
    one), for chat templates that do not render tools themselves."""
    lines = []
    for fn in tools:
        schema = tool_schema(fn)["function"]
        props = schema.get("parameters", {}).get("properties", {})
        args = ", ".join(f"{name}: {spec.get('type', 'any')}" for name, spec in props.items())
        lines.append(f"{schema['name']}({args}): {schema.get('description', '')}".rstrip(": "))
    return "Tools:\n" + "\n".join(lines) + '\nCall one with <tool_call>{"name": NAME, "arguments": {...}}</tool_call>'


def _with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`messages` with `text` added to the first system message (one is prepended if there is none)."""
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):  # content parts
            first["content"] = [*content, {"type": "text", "text": text}]
        else:
            first["content"] = f"{content}\n\n{text}" if content else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def render_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: Sequence[Callable[..., Any]] = (),
    add_generation_prompt: bool = True,
) -> str:
    """The chat-template text of `messages` with `tools`; templates that ignore tools get them described in the
    system message instead."""

    def render(msgs: list[dict[str, Any]], schemas: list[dict[str, Any]] | None) -> str:
        return tokenizer.apply_chat_template(
            msgs, tools=schemas, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    if not tools:
        return render(messages, None)
    with_tools = render(messages, [tool_schema(fn) for fn in tools])
    if with_tools != render(messages, None):
        return with_tools
    # The template ignores `tools` (e.g. alignrl.models.CHAT_TEMPLATE): the model must still learn what it can call.
    return render(_with_system_text(messages, tools_system_prompt(tools)), None)


# ----------------------------------------------------------------------------------------------------------
# Parsing and calling
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ToolCall:
    """One tool call parsed from an assistant message."""

    name: str
    arguments: dict[str, Any]


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def _malformed(reason: str, body: str) -> str:
    """The error string of one malformed tool call, quoting its start."""
    return f"malformed tool call: {reason} in {body.strip()[:_SNIPPET]!r}"


def _parse_block(body: str) -> ToolCall | str:
    """The call in the JSON between one pair of tags, or why it is malformed."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return _malformed(f"{e.msg} at char {e.pos}", body)
    except RecursionError:
        return _malformed("nested too deeply", body)
    if not isinstance(data, dict):
        return _malformed("not a JSON object", body)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return _malformed('no "name"', body)
    arguments = data.get("arguments", data.get("parameters", {}))  # Llama templates say "parameters"
    if isinstance(arguments, str):  # some models (and OpenAI's format) encode the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return _malformed("arguments are not valid JSON", body)
    if not isinstance(arguments, dict):
        return _malformed("arguments are not a JSON object", body)
    return ToolCall(name, arguments)


def parse_tool_calls(text: str) -> tuple[list[ToolCall], list[str]]:
    """The `<tool_call>{...}</tool_call>` calls in `text`, and an error string per malformed one; never raises."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos = 0
    while (start := text.find(_OPEN, pos)) != -1:
        body_start = start + len(_OPEN)
        end = text.find(_CLOSE, body_start)
        reopen = text.find(_OPEN, body_start)
        if end == -1 or (reopen != -1 and reopen < end):  # unclosed: it runs up to the next opening tag
            stop = len(text) if reopen == -1 else reopen
            errors.append(_malformed(f"no {_CLOSE}", text[body_start:stop]))
            pos = stop
            continue
        parsed = _parse_block(text[body_start:end])
        if isinstance(parsed, ToolCall):
            calls.append(parsed)
        else:
            errors.append(parsed)
        pos = end + len(_CLOSE)
    return calls, errors


def _error(message: str) -> str:
    """A tool's error result, as TRL returns it."""
    return json.dumps({"error": message[:_ERROR_CAP]})


def _as_text(result: Any) -> str:
    """A tool's return value as the content of a tool message."""
    if isinstance(result, str):
        return result
    if isinstance(result, (dict, list)):
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            pass  # not JSON data: str() below
    return str(result)


async def _await(awaitable: Any) -> Any:
    """Await anything awaitable (asyncio.run takes coroutines only)."""
    return await awaitable


def call_tool(fn: Callable[..., Any], arguments: dict[str, Any], timeout: float) -> tuple[str, bool]:
    """(content, ok) of calling `fn(**arguments)` in a daemon thread for at most `timeout` seconds (<= 0: no
    limit); any failure is an `{"error": ...}` content. A tool past its limit is abandoned, still running."""
    outcome: list[tuple[str, bool]] = []

    def run() -> None:
        try:
            result = fn(**arguments)
            if inspect.isawaitable(result):  # async tools get an event loop of their own, in this thread
                result = asyncio.run(_await(result))
            outcome.append((_as_text(result), True))
        except BaseException as e:  # noqa: BLE001 - the tool's failure, SystemExit included, goes to the model
            outcome.append((_error(f"{type(e).__name__}: {e}"), False))

    worker = threading.Thread(target=run, name=f"alignrl-tool-{_tool_name(fn)}", daemon=True)
    worker.start()
    worker.join(timeout if timeout > 0 else None)  # interruptible: Ctrl-C in the main thread still propagates
    if not outcome:
        return _error(f"timed out after {timeout:g}s"), False
    return outcome[0]


# ----------------------------------------------------------------------------------------------------------
# Built-in tools
# ----------------------------------------------------------------------------------------------------------
def python(code: str) -> str:
    """Run Python code and return what it prints.

    Args:
        code: Python source code (standard library only); use print() to show results.

    Returns:
        What the code printed, then any error.
    """
    # The code sandbox of the code reward, with a test that needs none of the code's names: it only runs the code.
    from alignrl.rewards.code import run_tests_detailed

    result = run_tests_detailed(code, ["assert True"], timeout=_PYTHON_TIMEOUT, memory_mb=_PYTHON_MEMORY_MB)
    lines = [result.stdout.rstrip("\n"), result.stderr.rstrip("\n")]
    if result.timed_out:
        lines.append(f"timed out after {_PYTHON_TIMEOUT:g}s")
    elif result.exit_code:  # killed by a limit (CPU time, memory)
        lines.append(f"exit code {result.exit_code}")
    text = "\n".join(line for line in lines if line)
    if len(text) > _OUTPUT_CAP:
        text = text[:_OUTPUT_CAP] + "\n... (output truncated)"
    return text or "(no output)"


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_MAX_EXPONENT = 100
_MAX_MAGNITUDE = 1e18
_MAX_EXPRESSION = 200


def _checked(value: Any) -> int | float:
    """`value` if it is a real number within the calculator's limits."""
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > _MAX_MAGNITUDE:
        raise ValueError(f"a value exceeds {_MAX_MAGNITUDE:g} in magnitude")
    return value


def _evaluate(node: ast.AST) -> int | float:
    """The value of an arithmetic expression tree; anything but numbers and arithmetic raises ValueError."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, str, complex
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right:g} is too large (at most {_MAX_EXPONENT})")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError(f"a value exceeds {_MAX_MAGNITUDE:g} in magnitude") from None
    raise ValueError(f"unsupported expression {ast.unparse(node)[:40]!r} (only numbers and + - * / // % **)")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. (2 + 3) * 4.

    Returns:
        The value of the expression.
    """
    if not isinstance(expression, str) or len(expression) > _MAX_EXPRESSION:
        raise ValueError(f"the expression must be a string of at most {_MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError(f"invalid expression {expression[:40]!r}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # "8/2" -> "4"
    return str(value)


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"python": python, "calculator": calculator}


def load_tools(specs: Sequence[str]) -> list[Callable[..., Any]]:
    """The tools of the `tools` option: built-in names, `package.module:function` or `path/to/file.py:function`."""
    from alignrl.rewards import load_named

    files: dict[Path, ModuleType] = {}  # functions from one file share its module
    loaded: list[Callable[..., Any]] = []
    seen: dict[str, str] = {}
    for spec in specs:
        fn = load_named("tools", spec, BUILTIN_TOOLS, "function", files)[1]
        name = _schema(fn, spec)["function"]["name"]
        if name in seen:
            raise AlignRLError(f"tools: {seen[name]!r} and {spec!r} are both named {name!r}; tool names must differ")
        seen[name] = spec
        loaded.append(fn)
    return loaded
