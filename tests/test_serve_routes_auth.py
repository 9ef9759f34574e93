"""Every route the server has, whichever API module installed it, needs the key: the check runs over the
app's own route list, so a route added later is covered without editing this test."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr
from starlette.routing import Route

from qwenkit.serve.config import ServeConfig
from qwenkit.serve.security import PUBLIC_PATHS
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import API_KEY, FakeEngine, fake_app, in_process


def test_every_route_but_the_public_ones_needs_the_key(demo_checkpoint: Callable[..., Path]) -> None:
    engine = FakeEngine(QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny")))
    # No lockout: this one address sends a missing key on purpose, once per route.
    config = ServeConfig(api_keys=(SecretStr(API_KEY),), auth_failures_per_minute=100_000)
    app = fake_app(engine, config)
    routes = [
        (r.path, m)
        for r in app.routes
        if isinstance(r, Route)
        for m in sorted(r.methods or ())
        if m != "HEAD"
    ]
    paths = {p for p, _ in routes}
    # The APIs this server speaks are all there (a module that stopped installing its routes shows here).
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/api/chat", "/v1/embeddings",
                 "/v1/batches", "/v1/files"):  # fmt: skip
        assert path in paths, path
    with in_process(app) as client:
        for path, method in routes:
            url = re.sub(r"\{[^}]+\}", "x", path)
            reply = client.request(method, url)
            if path in PUBLIC_PATHS:
                assert reply.status_code != 401, (method, path)
            else:
                assert reply.status_code == 401, (method, path, reply.status_code)
                error = reply.json()["error"]  # each API's own error shape (Ollama's is a string)
                assert error if isinstance(error, str) else error["type"] == "authentication_error", (
                    method,
                    path,
                )
