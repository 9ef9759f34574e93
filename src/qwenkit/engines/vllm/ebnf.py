"""qwenkit's GBNF grammars (llama.cpp's format) as the EBNF vLLM's xgrammar backend compiles.

Contract: xgrammar_ebnf(grammar) rewrites one Grammar's GBNF text so that
`vllm.sampling_params.StructuredOutputsParams(grammar=...)` accepts it and means the same language:
- a token reference `<text>` (how the forced-tool-call grammar names Qwen's <tool_call> / </tool_call>
  added tokens) becomes the string literal "<text>", brackets included, as llama.cpp reads it. xgrammar
  matches text, and Qwen's tool-call tokens are plain (not special) added tokens whose text is exactly
  that, so the one added token is admitted (the text spelled out in ordinary tokens is admitted too,
  which a parser of the answer reads the same way);
- the start rule is renamed `root` (vLLM compiles from `root`), and a rule already named `root` gets a
  fresh name, each at its definition and at every reference.
Comments are dropped; everything else (rules, strings, character classes, `{m,n}` repetition) is
xgrammar's EBNF as it is. A token reference by id (`<[123]>`) or a negated one (`!<...>`) has no text to
match: EngineError.
Pure text work; no vLLM or xgrammar import.
"""

from __future__ import annotations

import re

from qwenkit.engines.request import EngineError, Grammar

ROOT = "root"  # the rule vLLM's xgrammar backend starts from (compile_grammar's default)
# One lexical piece of GBNF: a comment, a string, a character class, a token reference (maybe negated),
# a rule name, or any other single character (operators, brackets, whitespace).
_PIECE = re.compile(
    r"""(?P<comment>\#[^\n]*)
      | (?P<string>"(?:\\.|[^"\\])*")
      | (?P<cls>\[(?:\\.|[^\]\\])*\])
      | (?P<token>!?<[^<>\n]*>)
      | (?P<name>[A-Za-z0-9_-]+)
      | (?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fresh(names: set[str], stem: str) -> str:
    name, i = stem, 0
    while name in names:
        i += 1
        name = f"{stem}-{i}"
    return name


def xgrammar_ebnf(grammar: Grammar) -> str:
    """The EBNF text for StructuredOutputsParams(grammar=...) that constrains like `grammar.gbnf`."""
    pieces = [(m.lastgroup, m.group()) for m in _PIECE.finditer(grammar.gbnf)]
    names = {text for kind, text in pieces if kind == "name"}
    rename = {}
    if grammar.root != ROOT:
        if ROOT in names:
            rename[ROOT] = _fresh(names, "qk-root")
        rename[grammar.root] = ROOT
    out = []
    for kind, text in pieces:
        if kind == "token":
            if text.startswith(("!", "<[")):
                raise EngineError(
                    f"the vLLM engine cannot enforce the grammar's token reference {text} (a token by id "
                    "or a negated one): serve it with --engine llamacpp"
                )
            out.append(_literal(text))  # GBNF's <text> is the token whose text is "<text>", brackets included
        elif kind == "name":
            out.append(rename.get(text, text))
        elif kind != "comment":
            out.append(text)
    return "".join(out)


__all__ = ["ROOT", "xgrammar_ebnf"]
