"""Forced tool calls on the vLLM engine: qwenkit's GBNF, rewritten as xgrammar EBNF (engines/vllm/ebnf.py),
passes vLLM's own grammar validation and, compiled the way vLLM's xgrammar backend compiles a `grammar`
request (the tokenizer's special tokens filtered out), admits a real forced call that starts with Qwen's
single <tool_call> token and refuses text or out-of-range arguments.

The rewrite itself is checked everywhere; the xgrammar/vLLM checks run where both import (a scratch venv:
vLLM pins a CUDA torch and cannot be installed beside this project's) and skip elsewhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwenkit.chat.messages import Tool
from qwenkit.engines.request import EngineError, Grammar
from qwenkit.engines.vllm.ebnf import xgrammar_ebnf
from qwenkit.serve.tools import tool_call_grammar

WEATHER = Tool(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                },
                "required": ["city"],
            },
        },
    }
)
CLOCK = Tool({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}})
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def forced() -> Grammar:
    return tool_call_grammar([WEATHER, CLOCK], parallel=True)


def _rules(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_-]+) ::= (.*)$", text, re.MULTILINE))


def test_the_rewrite_keeps_the_rules_and_starts_at_root(forced: Grammar) -> None:
    ebnf = xgrammar_ebnf(forced)
    before, after = _rules(forced.gbnf), _rules(ebnf)
    assert forced.root != "root" and "root" in before  # the JSON part's own root is renamed away
    assert after["root"] == before[forced.root]
    assert after["qk-root"] == before["root"] and len(after) == len(before)
    assert after["qk-call"] == '"<tool_call>" "\\n" qk-root "\\n" "</tool_call>"'
    assert all(
        after[name] == rule for name, rule in before.items() if name not in ("root", forced.root, "qk-call")
    )


def test_renames_touch_names_only() -> None:
    gbnf = 'start ::= root "root" [r-t] # root here\nroot ::= "x" root?'
    assert (
        xgrammar_ebnf(Grammar(gbnf, root="start"))
        == 'root ::= qk-root "root" [r-t] \nqk-root ::= "x" qk-root?'
    )
    plain = Grammar('root ::= <think> "a\\"<b>"')  # already rooted at root: only the token becomes text
    assert xgrammar_ebnf(plain) == 'root ::= "<think>" "a\\"<b>"'


@pytest.mark.parametrize("ref", ["<[151657]>", "!<tool_call>"])
def test_token_references_without_text_are_refused(ref: str) -> None:
    with pytest.raises(EngineError, match="--engine llamacpp") as info:
        xgrammar_ebnf(Grammar(f'root ::= {ref} "x"'))
    assert ref in str(info.value) and "\n" not in str(info.value)


# ---- against xgrammar and vLLM's backend (where they import) ---------------------------------------------
@pytest.fixture(scope="module")
def vllm_compiler(demo_checkpoint: Callable[..., Path]) -> tuple[Any, Any, Any]:
    """(xgrammar, GrammarCompiler as vLLM builds it for `grammar` requests, the HF tokenizer)."""
    xgr = pytest.importorskip("xgrammar", reason="xgrammar is not installed here")
    backend = pytest.importorskip(
        "vllm.v1.structured_output.backend_xgrammar", reason="vLLM is not installed here"
    )
    from transformers import AutoTokenizer

    model = demo_checkpoint("qwen3", "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    full = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    info = backend.XgrammarBackend._filter_special_tokens(tokenizer, full)  # what compiles `grammar` requests
    return xgr, xgr.GrammarCompiler(info), tokenizer


def test_vllm_validates_the_rewritten_grammar(forced: Grammar) -> None:
    pytest.importorskip("xgrammar", reason="xgrammar is not installed here")
    backend = pytest.importorskip(
        "vllm.v1.structured_output.backend_xgrammar", reason="vLLM is not installed here"
    )
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    params = SamplingParams(structured_outputs=StructuredOutputsParams(grammar=xgrammar_ebnf(forced)))
    backend.validate_xgrammar_grammar(params)  # vLLM's own request check: raises on a bad grammar
    with pytest.raises(VLLMValidationError, match="Invalid grammar"):
        bad = SamplingParams(structured_outputs=StructuredOutputsParams(grammar=forced.gbnf))
        backend.validate_xgrammar_grammar(bad)  # the GBNF as it is: xgrammar cannot read <tool_call>


def _accepts(xgr: Any, compiled: Any, ids: list[int]) -> int:
    """How many of `ids` a fresh matcher accepts before the first refusal."""
    matcher = xgr.GrammarMatcher(compiled)
    for i, token in enumerate(ids):
        if not matcher.accept_token(token):
            return i
    return len(ids)


def test_the_compiled_grammar_forces_a_real_tool_call(
    vllm_compiler: tuple[Any, Any, Any], forced: Grammar
) -> None:
    xgr, compiler, tokenizer = vllm_compiler
    compiled = compiler.compile_grammar(xgrammar_ebnf(forced))
    call = tokenizer.encode(CALL, add_special_tokens=False)
    assert call[0] == tokenizer.convert_tokens_to_ids("<tool_call>")  # Qwen's one added token
    matcher = xgr.GrammarMatcher(compiled)
    assert all(matcher.accept_token(t) for t in call)
    two = tokenizer.encode(CALL + "\n" + CALL.replace("Paris", "Rome"), add_special_tokens=False)
    assert _accepts(xgr, compiled, two) == len(two)  # parallel calls
    assert _accepts(xgr, compiled, tokenizer.encode("Paris is", add_special_tokens=False)) == 0
    out_of_range = tokenizer.encode(CALL.replace('"days": 3', '"days": 15'), add_special_tokens=False)
    assert _accepts(xgr, compiled, out_of_range) < len(out_of_range)
    lower = tokenizer.encode(CALL.replace("Paris", "paris"), add_special_tokens=False)
    assert _accepts(xgr, compiled, lower) < len(lower)  # the pattern ^[A-Z][a-z]+$
    unknown = tokenizer.encode(CALL.replace("get_weather", "get_news"), add_special_tokens=False)
    assert _accepts(xgr, compiled, unknown) < len(unknown)
