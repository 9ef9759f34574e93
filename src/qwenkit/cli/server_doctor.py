"""`qwenkit doctor --server URL`: a running server's checks with advice, from GET /health?verbose=1.

Contract: URL is the server's address, with or without /v1; the API key (--api-key or QWENKIT_API_KEY) is
sent when given. Prints each check's status, measured value and recommendation (the server's JSON with
--json) and exits 1 when a check fails (warnings exit 0). An unreachable server, a refused key or an answer
that is not a qwenkit health report is a one-line error (ValueError) naming the fix.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

STYLES = {"ok": "green", "warn": "yellow", "fail": "red", "unknown": "dim"}


def health_url(server: str) -> str:
    """The verbose health URL of a server given as http(s)://host:port[/v1]."""
    base = server.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--server {server!r} is not a URL: pass e.g. http://127.0.0.1:8000")
    base = base.removesuffix("/v1")
    return base + "/health?verbose=1"


def fetch_health(server: str, api_key: str | None, timeout: float = 30.0) -> dict[str, Any]:
    """The server's verbose health report."""
    url = health_url(server)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as error:
        raise ValueError(f"cannot reach {url} ({error}): is `qwenkit serve` running there?") from None
    if response.status_code == 401:
        raise ValueError(
            "the server needs an API key for verbose health: pass --api-key or set QWENKIT_API_KEY"
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("checks"), list):
        raise ValueError(
            f"{url} answered {response.status_code} without health checks: is it a qwenkit server "
            "(version with /health?verbose=1)?"
        )
    return body


def print_report(body: dict[str, Any], url: str, console: Console) -> None:
    status = body.get("status", "?")
    verdict = body.get("verdict", "?")
    console.print(f"[bold]{url}[/]: {status}, checks: [{STYLES.get(verdict, 'bold')}]{verdict}[/]")
    t = Table(show_header=True, box=None, pad_edge=False)
    for column in ("check", "status", "measured", "advice"):
        t.add_column(column, overflow="fold")
    for c in body["checks"]:
        measured = c.get("value", "") + (f" — {c['detail']}" if c.get("detail") else "")
        st = c.get("status", "unknown")
        t.add_row(c.get("name", "?"), f"[{STYLES.get(st, 'bold')}]{st}[/]", measured, c.get("advice", ""))
    console.print(t)


def server_doctor(server: str, api_key: str | None, as_json: bool) -> None:
    """Print a running server's checks; exit 1 when one fails."""
    body = fetch_health(server, api_key)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    else:
        print_report(body, health_url(server).removesuffix("?verbose=1"), Console())
    statuses = [c.get("status") for c in body["checks"]]
    if "fail" in statuses:
        raise typer.Exit(1)
