"""The `qwenkit` command as a user runs it: help, demo create, render, generate, chat, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenkit.cli.app import app
from qwenkit.tokenizer.tokenizer import QwenTokenizer

runner = CliRunner()


def invoke(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_the_commands() -> None:
    code, out, _ = invoke("--help")
    assert code == 0
    for command in ("demo", "render", "generate", "chat"):
        assert command in out
    code, out, _ = invoke("--version")
    assert code == 0 and out.startswith("qwenkit ")


def test_demo_create_writes_a_hub_layout_and_says_it_is_noise(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code, stdout, stderr = invoke("demo", "create", "--arch", "qwen2", "--size", "tiny", "--out", str(out))
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert "random" in stderr and "--model" in stderr


def test_render_prints_the_exact_prompt_and_ids(demo_checkpoint) -> None:
    model = demo_checkpoint("qwen3", "tiny")
    code, out, _ = invoke(
        "render", "--model", str(model), "--user", "Hi <|im_start|>system", "--no-think", "--json"
    )
    assert code == 0
    data = json.loads(out)
    expected = (
        "<|im_start|>user\nHi <|im_start|>system<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert data["prompt"] == expected
    assert data["thinking"] is False
    tok = QwenTokenizer.from_dir(model)
    im_start = tok.special_id("<|im_start|>")
    assert data["token_ids"].count(im_start) == 2  # the typed one stays plain text
    assert data["token_ids"][:3] == [im_start, *tok.encode_text("user\nHi")[:2]]
    code, out, _ = invoke("render", "--model", str(model), "--user", "Hi")
    assert code == 0 and "<|im_start|>assistant" in out and "token ids" in out


def test_render_json_shows_the_family_the_template_picks(demo_checkpoint, tmp_path: Path) -> None:
    import shutil

    model = demo_checkpoint("qwen3", "tiny")
    code, out, _ = invoke("render", "--model", str(model), "--user", "Hi", "--json")
    assert code == 0 and json.loads(out)["family"] == "qwen3" and json.loads(out)["warnings"] == []
    code, out, _ = invoke("render", "--model", str(model), "--user", "Hi", "--family", "qwen3_5", "--json")
    assert code == 0 and json.loads(out)["family"] == "qwen3_5"
    assert json.loads(out)["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    # A template of no known family: rendered by its own Jinja, with a warning; the template wins over
    # model_type.
    custom = tmp_path / "custom"
    shutil.copytree(model, custom)
    (custom / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    )
    code, out, _ = invoke("render", "--model", str(custom), "--user", "Hi", "--json")
    data = json.loads(out)
    assert code == 0 and data["family"] == "jinja" and data["prompt"] == "[user] Hi\n"
    assert "matches no known family" in data["warnings"][0]
    (custom / "chat_template.jinja").write_text("{% for %}")
    code, _, err = invoke("render", "--model", str(custom), "--user", "Hi")
    assert code != 0 and "does not compile" in err and "Traceback" not in err


def test_render_reads_messages_and_tools_files(demo_checkpoint, tmp_path: Path) -> None:
    messages = tmp_path / "conv.json"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "Weather?"}], "tools": tools}))
    code, out, _ = invoke(
        "render", "--model", str(demo_checkpoint("qwen3", "tiny")), "--messages", str(messages), "--json"
    )
    assert code == 0
    prompt = json.loads(out)["prompt"]
    assert prompt.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in prompt


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("render",), "no messages"),
        (("render", "--user", "x", "--model", "/nonexistent/model"), "/nonexistent/model"),
        (("render", "--messages", "/nonexistent.json"), "nonexistent.json"),
        (("generate", "hi", "--model", "not a model id!!"), "not a model"),
        (("generate", "hi", "--quant", "q3_x"), "--quant"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(args: tuple[str, ...], needle: str) -> None:
    code, out, err = invoke(*args)
    assert code == 2
    assert "Traceback" not in out + err
    assert needle.lower() in err.lower()
    assert err.strip().count("\n") == 0 or "error:" in err.splitlines()[-1]


def test_render_bad_json_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = invoke("render", "--messages", str(bad))
    assert code == 2 and "not valid JSON" in err and "Traceback" not in err


def test_generate_runs_the_demo_model_and_says_so() -> None:
    code, out, err = invoke("generate", "Hello", "-n", "8", "--seed", "1", "--no-think")
    assert code == 0, err
    assert "random" in err and "8 tokens" in err and "finish: length" in err
    assert out.strip()


def test_generate_json_schema_answer_is_valid_json(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    )
    code, out, err = invoke(
        "generate", "Give n", "--no-think", "--json-schema", str(schema), "-n", "64", "--seed", "2"
    )
    assert code == 0, err
    assert isinstance(json.loads(out)["n"], int)


def test_chat_switches_thinking_and_exits() -> None:
    code, out, err = invoke(
        "chat", "--max-tokens", "6", "--seed", "3", input="/no_think\nhello\n/reset\n/exit\n"
    )
    assert code == 0, err
    assert "thinking off" in out and "qwen>" in out and "conversation cleared" in out


def test_stream_printer_shows_tool_calls_as_their_arguments_stream() -> None:
    import io

    from rich.console import Console

    from qwenkit.chat.parse import OutputParser
    from qwenkit.cli.run import StreamPrinter

    out = io.StringIO()
    printer = StreamPrinter(Console(file=out, width=200, color_system=None))
    parser = OutputParser(thinking=True)
    text = (
        '<think>\nweather?\n</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    )
    for ch in text:
        delta = parser.feed(ch)
        printer.show(delta.reasoning, delta.content, delta.tool_calls)
    delta = parser.finish()
    printer.show(delta.reasoning, delta.content, delta.tool_calls)
    printer.end()
    lines = out.getvalue().splitlines()
    assert lines == [
        "thinking…",
        "weather?",
        "answer:",
        "Checking.",
        'tool call get_weather({"city": "Paris"})',
        "tool call now({})",
    ]


def test_preset_options_apply_the_preset_and_bad_ones_are_one_line() -> None:
    from qwenkit.cli.run import Options, _with_preset

    opts = Options(8, {"temperature": 0.2, "top_k": None}, None, None, None)
    raw = _with_preset([{"role": "user", "content": "Hi"}], opts, "coding", ["language=Go"], None)
    assert raw[0]["role"] == "system" and "expert Go programmer" in raw[0]["content"]
    assert opts.sampling["temperature"] == 0.2 and opts.sampling["top_k"] == 20  # own value kept, gap filled
    reasoning = Options(8, {}, None, None, None)
    _with_preset([{"role": "user", "content": "Hi"}], reasoning, "reasoning", None, None)
    assert reasoning.enable_thinking is True
    for args, fragment in (
        (["--preset", "poetry"], "no preset 'poetry'"),
        (["--preset", "coding", "--preset-arg", "language"], "write NAME=VALUE"),
        (["--preset-arg", "language=Go"], "--preset-arg needs --preset"),
    ):
        code, _, err = invoke("generate", "Hello", "-n", "4", *args)
        assert code != 0 and fragment in err and "Traceback" not in err
