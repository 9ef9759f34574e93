"""The official Qwen chat templates, fetched at test time, and a reference Jinja renderer for them.

The templates are test data we may not ship: they come from the llama-cpp-python sdist on PyPI (its vendored
llama.cpp keeps them in models/templates/). fetch_official_templates() downloads that sdist once with
`pip download`, keeps only the templates below in a per-version cache dir ($QWENKIT_OFFICIAL_TEMPLATES, else
~/.cache/qwenkit-test/official-templates/<version>/) and returns {name: text}. Offline it raises
OfficialTemplatesUnavailable; require_official_templates() and the `official_templates` fixture turn that
into a test failure, never a skip.
render_official(template, messages, ...) renders a template as transformers' apply_chat_template does
(sandboxed Jinja, trim_blocks/lstrip_blocks, tojson without ASCII escaping, raise_exception).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

SDIST = "llama-cpp-python"
VERSION = "0.3.36"
TEMPLATE_DIR = "vendor/llama.cpp/models/templates"
# name (as in the sdist, without .jinja) -> the family it is the official template of
NAMES: tuple[str, ...] = (
    "Qwen-Qwen2.5-7B-Instruct",
    "Qwen-Qwen3-0.6B",
    "Qwen3-Coder",
    "Qwen3.5-4B",
    "Qwen-QwQ-32B",
)


class OfficialTemplatesUnavailable(RuntimeError):
    """The sdist could not be fetched (offline, or the registry refused)."""


def cache_dir() -> Path:
    """Where the extracted templates of this sdist version live (reused across runs)."""
    root = os.environ.get("QWENKIT_OFFICIAL_TEMPLATES")
    if root:
        return Path(root) / VERSION
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwenkit-test" / "official-templates" / VERSION


def _download_and_extract(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="qwenkit-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", tmp, f"{SDIST}=={VERSION}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            raise OfficialTemplatesUnavailable(f"`{' '.join(cmd)}` timed out after 900 s") from None
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise OfficialTemplatesUnavailable(
                f"could not fetch the official Qwen chat templates: `{' '.join(cmd)}` failed "
                f"(exit {done.returncode}): {' | '.join(tail)}. These tests need the package registry "
                f"(PyPI) once; the templates are then cached in {dest}."
            )
        wanted = {f"{TEMPLATE_DIR}/{name}.jinja": name for name in NAMES}
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
        staging.chmod(0o755)
        with tarfile.open(archives[0], "r:gz") as tar:
            for member in tar:
                rel = member.name.split("/", 1)[-1]  # drop the "llama_cpp_python-X.Y.Z/" prefix
                if rel in wanted and member.isfile():
                    data = tar.extractfile(member)
                    assert data is not None
                    (staging / f"{wanted[rel]}.jinja").write_bytes(data.read())
        missing = [n for n in NAMES if not (staging / f"{n}.jinja").is_file()]
        if missing:
            raise OfficialTemplatesUnavailable(f"{archives[0].name} lacks {TEMPLATE_DIR}/{missing[0]}.jinja")
        staging.rename(dest)


@cache
def fetch_official_templates() -> dict[str, str]:
    """{name: template text} for NAMES, fetched once per sdist version and cached on disk."""
    dest = cache_dir()
    if not all((dest / f"{n}.jinja").is_file() for n in NAMES):
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Several pytest processes may start at once: one fetches, the others wait and read.
        with open(dest.parent / f".{VERSION}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not all((dest / f"{n}.jinja").is_file() for n in NAMES):
                if dest.exists():
                    for stale in dest.iterdir():
                        stale.unlink()
                    dest.rmdir()
                _download_and_extract(dest)
    return {n: (dest / f"{n}.jinja").read_text("utf-8") for n in NAMES}


def require_official_templates() -> dict[str, str]:
    """{name: official template text}; fails the test (never skips) when they cannot be fetched."""
    try:
        return fetch_official_templates()
    except OfficialTemplatesUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def official_templates() -> dict[str, str]:
    """The fixture form of require_official_templates() (import it into a test module to use it)."""
    return require_official_templates()


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # As transformers defines it: no ASCII escaping, no HTML escaping (Jinja's own tojson does both).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def render_official(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """The template applied as transformers' apply_chat_template(tokenize=False) applies it.

    kwargs are the template variables (add_generation_prompt, enable_thinking, ...); a template's
    raise_exception() surfaces as jinja2.TemplateError.
    """
    compiled = _environment().from_string(template)
    return compiled.render(messages=list(messages), tools=list(tools) if tools else None, **kwargs)
