"""Tools for multi-turn environments: schemas, rendering, parsing calls, calling them, built-ins, loading."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from alignrl.envs import tools as tools_mod
from alignrl.envs.tools import (
    BUILTIN_TOOLS,
    ToolCall,
    calculator,
    call_tool,
    load_tools,
    parse_tool_calls,
    python,
    render_conversation,
    tool_schema,
    tools_system_prompt,
)
from alignrl.errors import AlignRLError
from alignrl.models import build_char_tokenizer

posix_only = pytest.mark.skipif(os.name != "posix", reason="the code sandbox needs a POSIX system")


def get_weather(city: str, days: int = 1) -> str:
    """Get the weather forecast for a city.

    Args:
        city: The city's name.
        days: How many days ahead.
    """
    return f"sunny in {city} for {days} days"


def undocumented(x: int) -> int:
    return x


class Counter:
    """A TRL-style environment whose methods are tools."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> int:
        """Add to the counter.

        Args:
            n: How much to add.
        """
        self.count += n
        return self.count


# ---- schemas and rendering -------------------------------------------------------------------------------
def test_schema_of_typed_function_with_google_docstring() -> None:
    schema = tool_schema(get_weather)
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "get_weather"
    assert fn["description"] == "Get the weather forecast for a city."
    assert fn["parameters"]["properties"]["city"] == {"type": "string", "description": "The city's name."}
    assert fn["parameters"]["properties"]["days"]["type"] == "integer"
    assert fn["parameters"]["required"] == ["city"]


def test_schema_of_bound_method_skips_self() -> None:
    fn = tool_schema(Counter().add)["function"]
    assert fn["name"] == "add" and list(fn["parameters"]["properties"]) == ["n"]


def test_schema_without_docstring_is_one_line_error() -> None:
    with pytest.raises(AlignRLError) as info:
        tool_schema(undocumented)
    message = str(info.value)
    assert message.startswith("tools: undocumented: ") and "docstring" in message and "\n" not in message


def test_schema_missing_type_hint_or_arg_description() -> None:
    def no_hint(x):  # noqa: ANN001
        """Echo.

        Args:
            x: A value.
        """

    def no_arg_doc(x: int) -> int:
        """Echo."""
        return x

    with pytest.raises(AlignRLError, match=r"^tools: no_hint: .*type hint"):
        tool_schema(no_hint)
    with pytest.raises(AlignRLError, match=r"^tools: no_arg_doc: .*'x'"):
        tool_schema(no_arg_doc)


MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def test_render_with_template_that_ignores_tools_uses_system_message() -> None:
    tok = build_char_tokenizer()
    text = render_conversation(tok, MESSAGES, [get_weather, calculator])
    assert text.startswith("system: Tools:\nget_weather(city: string")
    assert "\ncalculator(expression: string): Evaluate an arithmetic expression." in text
    assert "<tool_call>" in text and text.endswith("user: Weather in Paris?\nassistant: ")
    assert text.isascii()
    assert all(ch == "\n" or 32 <= ord(ch) < 127 for ch in text)  # the char tokenizer's alphabet
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_render_merges_into_existing_system_message() -> None:
    tok = build_char_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    text = render_conversation(tok, messages, [get_weather])
    assert text.startswith("system: Be brief.\n\nTools:\n")
    assert text.count("system: ") == 1
    assert messages[0]["content"] == "Be brief."  # the caller's messages are not changed


def test_render_without_tools_is_the_plain_template() -> None:
    tok = build_char_tokenizer()
    plain = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert render_conversation(tok, MESSAGES, add_generation_prompt=False) == plain == "user: Weather in Paris?\n"


TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_render_with_template_that_supports_tools_uses_it() -> None:
    tok = build_char_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    text = render_conversation(tok, MESSAGES, [get_weather, calculator])
    assert text == "TOOLS: get_weather calculator\nuser: Weather in Paris?\nassistant: "


def test_tools_system_prompt_is_short_ascii() -> None:
    text = tools_system_prompt([calculator])
    assert text.isascii() and len(text) < 160
    assert text.splitlines()[1] == "calculator(expression: string): Evaluate an arithmetic expression."


# ---- parsing ---------------------------------------------------------------------------------------------
def test_parse_one_and_two_calls() -> None:
    one = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert parse_tool_calls(one) == ([ToolCall("get_weather", {"city": "Paris"})], [])
    two = (
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    )
    assert parse_tool_calls(two) == ([ToolCall("a", {"x": 1}), ToolCall("b", {})], [])


def test_parse_arguments_as_json_string_and_parameters_key() -> None:
    text = '<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call>'
    assert parse_tool_calls(text) == ([ToolCall("a", {"x": 2})], [])
    text = '<tool_call>{"name": "a", "parameters": {"y": "z"}}</tool_call>'
    assert parse_tool_calls(text) == ([ToolCall("a", {"y": "z"})], [])


def test_parse_malformed_json() -> None:
    calls, errors = parse_tool_calls('<tool_call>{"name": "a" "arguments": {}}</tool_call>')
    assert calls == [] and len(errors) == 1
    assert errors[0].startswith("malformed tool call: Expecting ',' delimiter") and '{"name": "a"' in errors[0]


def test_parse_missing_closing_tag_keeps_later_calls() -> None:
    calls, errors = parse_tool_calls('<tool_call>{"name": "a"} <tool_call>{"name": "b"}</tool_call>')
    assert calls == [ToolCall("b", {})]
    assert len(errors) == 1 and "no </tool_call>" in errors[0]
    calls, errors = parse_tool_calls('text <tool_call>{"name": "a", "arguments": {')
    assert calls == [] and len(errors) == 1


def test_parse_no_name_and_bad_arguments() -> None:
    cases = [
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": 3}</tool_call>',
        '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "a", "arguments": "[1]"}</tool_call>',
        "<tool_call>[1, 2]</tool_call>",
        "<tool_call>" + "[" * 100000 + "</tool_call>",
    ]
    for text in cases:
        calls, errors = parse_tool_calls(text)
        assert calls == [] and len(errors) == 1 and errors[0].startswith("malformed tool call: "), text
        assert len(errors[0]) < 200


def test_parse_plain_text() -> None:
    assert parse_tool_calls("The answer is 4.") == ([], [])
    assert parse_tool_calls("") == ([], [])


# ---- calling ---------------------------------------------------------------------------------------------
def test_call_normal_and_dict_results() -> None:
    assert call_tool(get_weather, {"city": "Oslo", "days": 2}, 5) == ("sunny in Oslo for 2 days", True)
    assert call_tool(lambda: {"a": [1, 2]}, {}, 5) == ('{"a": [1, 2]}', True)
    assert call_tool(lambda: 7, {}, 0) == ("7", True)
    counter = Counter()
    assert call_tool(counter.add, {"n": 3}, 5) == ("3", True) and counter.count == 3


def test_call_raising_tool_and_wrong_arguments() -> None:
    def bad(x: int) -> int:
        raise ValueError("bad input")

    assert call_tool(bad, {"x": 1}, 5) == ('{"error": "ValueError: bad input"}', False)
    content, ok = call_tool(get_weather, {"town": "Oslo"}, 5)
    assert not ok and json.loads(content)["error"].startswith("TypeError: ") and "town" in content


def test_call_hanging_tool_times_out() -> None:
    start = time.monotonic()
    content, ok = call_tool(lambda: time.sleep(30), {}, 0.5)
    assert (content, ok) == ('{"error": "timed out after 0.5s"}', False)
    assert time.monotonic() - start < 1.5


def test_call_async_tool() -> None:
    async def fetch(key: str) -> str:
        import asyncio

        await asyncio.sleep(0.01)
        return key.upper()

    assert call_tool(fetch, {"key": "ab"}, 5) == ("AB", True)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_call_keyboard_interrupt_propagates() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    main = threading.main_thread().ident
    timer = threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            call_tool(lambda: time.sleep(30), {}, 10)
    finally:
        timer.cancel()


# ---- built-in tools --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expression", "value"),
    [("12*7", "84"), ("7/2", "3.5"), ("8/2", "4"), ("2+3*4", "14"), ("(2+3)*4", "20"), ("-2**2", "-4"),
     ("(-2)**2", "4"), ("-(3-5)", "2"), ("7//2", "3"), ("-7 % 3", "2"), ("2**-1", "0.5"), ("1.5*2", "3")],
)  # fmt: skip
def test_calculator_values(expression: str, value: str) -> None:
    assert calculator(expression) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [("1/0", "division by zero"), ("5 % 0", "division by zero"), ("2**1000", "exponent"), ("9**9**9", "exponent"),
     ("10**18 * 10", "magnitude"), ("1e300*1e300", "magnitude"), ("(-8)**0.5", "real"),
     ("__import__('os')", "unsupported"), ("x + 1", "unsupported"), ("'a' * 3", "unsupported"),
     ("True + 1", "unsupported"), ("1 < 2", "unsupported"), ("1 +", "invalid"), ("1+" * 150 + "1", "at most")],
)  # fmt: skip
def test_calculator_errors_via_call_tool(expression: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        calculator(expression)
    content, ok = call_tool(calculator, {"expression": expression}, 5)
    assert not ok and json.loads(content)["error"].startswith("ValueError: ")


@posix_only
def test_python_tool_prints_output_and_errors() -> None:
    assert python("print(6 * 7)") == "42"
    assert "ZeroDivisionError" in python("print('before')\n1 / 0")
    assert python("x = 1") == "(no output)"
    long = python("print('a' * 5000)")
    assert len(long) < 2100 and long.endswith("(output truncated)")


@posix_only
def test_python_tool_infinite_loop_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools_mod, "_PYTHON_TIMEOUT", 1.0)
    start = time.monotonic()
    assert python("while True:\n    pass").endswith("timed out after 1s")
    assert time.monotonic() - start < 4
    content, ok = call_tool(python, {"code": "while True: pass"}, 10)
    assert ok and "timed out" in content


# ---- loading ---------------------------------------------------------------------------------------------
def test_load_builtin_and_file_tools(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "my_tools.py"
    path.write_text(
        "def double(x: int) -> int:\n"
        '    """Double a number.\n\n    Args:\n        x: The number.\n    """\n'
        "    return 2 * x\n\n\n"
        "def calculator(expression: str) -> str:\n"
        '    """Mine.\n\n    Args:\n        expression: Text.\n    """\n'
        "    return expression\n\n\n"
        "def nodoc(x: int) -> int:\n"
        "    return x\n"
    )
    monkeypatch.chdir(tmp_path)
    tools = load_tools(["calculator", "python", "my_tools.py:double"])
    assert tools[:2] == [BUILTIN_TOOLS["calculator"], BUILTIN_TOOLS["python"]]
    assert tools[2](x=4) == 8
    with pytest.raises(AlignRLError, match=r"^tools: my_tools.py has no function 'missing'$"):
        load_tools(["my_tools.py:missing"])
    with pytest.raises(AlignRLError, match=r"^tools: my_tools.py:nodoc: .*docstring"):
        load_tools(["my_tools.py:nodoc"])
    with pytest.raises(AlignRLError, match="both named 'calculator'"):
        load_tools(["calculator", "my_tools.py:calculator"])
    with pytest.raises(AlignRLError, match="both named 'double'"):
        load_tools(["my_tools.py:double", "my_tools.py:double"])
    with pytest.raises(AlignRLError, match="is not a built-in"):
        load_tools(["nope"])
    with pytest.raises(AlignRLError, match="not found"):
        load_tools(["other.py:f"])
