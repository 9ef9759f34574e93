"""CLI error reporting: known failures become one line on stderr and exit code 2, never a traceback.

Set QWENKIT_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import pydantic
import typer
from rich.console import Console
from rich.markup import escape

P = ParamSpec("P")
R = TypeVar("R")

err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    # Escaped: messages name extras and paths in brackets (`qwenkit[vllm]`) that rich would take as markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, pydantic.ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "input"
        return f"{where}: {first['msg']}"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def friendly_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can cause (bad values, missing files) into a one-line message."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, pydantic.ValidationError) as exc:
            if os.environ.get("QWENKIT_DEBUG"):
                raise
            raise fail(_one_line(exc)) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper
