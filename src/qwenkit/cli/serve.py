"""`qwenkit serve`: an OpenAI-compatible server for a Qwen model (the built-in demo model by default).

Binds 127.0.0.1:8000 unless told otherwise, says which model it serves, where, and whether API keys are
required; SIGTERM or Ctrl-C drains in-flight requests and exits 0. --ctx is the KV cells of all
--max-seqs sequences together (as EngineConfig.n_ctx); each request may use ctx / max-seqs tokens, prompt
plus answer. Default: 4096 tokens per request (or the model's training context if smaller) — with 8
sequences 32768 cells, about 3.5 GiB of f16 KV for Qwen3-0.6B (112 KiB per token); on a smaller machine
lower --max-seqs or --ctx.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from qwenkit.chat.presets import load_presets
from qwenkit.checkpoints.demo import DEMO_NOTICE
from qwenkit.cli.common import (
    AllowPickleOption,
    ModelOption,
    PollOption,
    check_quant,
    engine_poll,
    open_model_files,
)
from qwenkit.cli.errors import err_console, friendly_errors
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.hardware import physical_cores
from qwenkit.serve.app import create_app
from qwenkit.serve.config import ServeConfig
from qwenkit.serve.server import bind_socket, run_server

API_KEY_ENV = "QWENKIT_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


DEFAULT_CTX = 4096


def default_ctx(max_seqs: int, n_ctx_train: int | None) -> int:
    """Default KV cells: 4096 tokens per request (room for a thinking answer), within the model's context."""
    per_request = min(DEFAULT_CTX, n_ctx_train) if n_ctx_train else DEFAULT_CTX
    return max_seqs * per_request


def read_api_keys(api_key: str | None, api_key_file: Path | None) -> list[str]:
    """Keys from --api-key (or QWENKIT_API_KEY) and --api-key-file (one per line; # comments)."""
    keys = [api_key.strip()] if api_key and api_key.strip() else []
    if api_key_file is not None:
        for line in api_key_file.read_text("utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
        if not keys:
            raise ValueError(f"--api-key-file {api_key_file} has no keys; put one key per line")
    for key in keys:
        if len(key) < 8 or any(c.isspace() for c in key):
            raise ValueError("an API key must be at least 8 characters without spaces; use a long random one")
    return keys


def split_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated option as its non-empty items."""
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def _setup_logging() -> None:
    # One JSON line per request on stderr; uvicorn's own loggers stay at warning level.
    logger = logging.getLogger("qwenkit.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@friendly_errors
def serve_command(
    model: ModelOption = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; only this machine by default.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar=API_KEY_ENV, help="Require 'Authorization: Bearer KEY' (not on /health)."
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option("--api-key-file", help="File with API keys, one per line.")
    ] = None,
    max_seqs: Annotated[
        int, typer.Option("--max-seqs", min=1, max=256, help="Sequences decoded together.")
    ] = 8,
    max_waiting: Annotated[
        int, typer.Option("--max-waiting", min=0, help="Requests that may wait for a slot; beyond: 503.")
    ] = 64,
    ctx: Annotated[
        int | None,
        typer.Option(
            "--ctx",
            min=256,
            help="KV cells for all sequences; each request gets ctx / max-seqs (default: 4096 each).",
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: physical cores).")] = None,
    poll: PollOption = "auto",
    state_cache_mb: Annotated[
        int,
        typer.Option(
            "--state-cache-mb",
            min=0,
            help="Host memory (MiB) for saved conversation states, so a chat's next turn prefills only its "
            "new tokens; least recently used first out; 0: off.",
        ),
    ] = 1024,
    quant: Annotated[
        str, typer.Option("--quant", help="GGUF type an HF checkpoint is converted to: f32, f16, bf16, q8_0.")
    ] = "q8_0",
    rate_limit_rpm: Annotated[
        int | None, typer.Option("--rate-limit-rpm", min=1, help="Requests per minute per key (or client).")
    ] = None,
    rate_limit_tpm: Annotated[
        int | None, typer.Option("--rate-limit-tpm", min=1, help="Tokens per minute per key (or client).")
    ] = None,
    auth_failures_per_minute: Annotated[
        int,
        typer.Option(
            "--bad-key-rpm",
            min=1,
            help="Wrong API keys one address may send per minute; then 429 until its allowance refills.",
        ),
    ] = 30,
    log_content: Annotated[
        bool, typer.Option("--log-content", help="Log prompt and completion text (off: sizes only).")
    ] = False,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="Model name clients use (default: the model's).")
    ] = None,
    shutdown_timeout: Annotated[
        float, typer.Option("--shutdown-timeout", min=0, help="Seconds in-flight requests get on SIGTERM.")
    ] = 30.0,
    header_timeout: Annotated[
        float,
        typer.Option("--header-timeout", min=0.1, help="Seconds a client may take to send request headers."),
    ] = 10.0,
    body_timeout: Annotated[
        float,
        typer.Option("--body-timeout", min=0.1, help="Seconds a client may take to send a request body."),
    ] = 30.0,
    max_connections_per_address: Annotated[
        int,
        typer.Option(
            "--max-connections-per-address", min=1, help="Open connections one client address may hold."
        ),
    ] = 64,
    cors_origins: Annotated[
        str | None,
        typer.Option(
            "--cors-origins",
            help="Browser origins allowed to call the API, comma-separated (e.g. https://app.example.com; "
            "'*': any). Default: no CORS. Keys are still required.",
        ),
    ] = None,
    trusted_proxies: Annotated[
        str | None,
        typer.Option(
            "--trusted-proxies",
            help="Proxy networks (CIDR, comma-separated) whose X-Forwarded-For names the client.",
        ),
    ] = None,
    responses_store: Annotated[
        int,
        typer.Option(
            "--responses-store",
            min=0,
            help="Keep the last N /v1/responses conversations in memory (per key) for previous_response_id. "
            "Default 0: off (stateless).",
        ),
    ] = 0,
    presets: Annotated[
        Path | None,
        typer.Option(
            "--presets",
            help="A YAML file of prompt presets (name: system, sampling, enable_thinking, defaults) added to "
            'the built-in reasoning/coding/multilingual ones; chosen per request with "preset".',
        ),
    ] = None,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Serve a Qwen model over the OpenAI API (chat, completions, tools, JSON schema, streaming)."""
    check_quant(quant)
    keys = read_api_keys(api_key, api_key_file)
    config = ServeConfig(
        host=host,
        port=port,
        api_keys=tuple(keys),  # type: ignore[arg-type]
        served_model_name=served_model_name,
        rate_limit_rpm=rate_limit_rpm,
        rate_limit_tpm=rate_limit_tpm,
        auth_failures_per_minute=auth_failures_per_minute,
        log_content=log_content,
        shutdown_timeout=shutdown_timeout,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections_per_address=max_connections_per_address,
        cors_origins=split_list(cors_origins),
        trusted_proxies=split_list(trusted_proxies),
        responses_store=responses_store,
        presets_file=str(presets) if presets else None,
    )
    if presets:
        load_presets(presets)  # a file that does not parse fails now, in one line naming its line
    sock = bind_socket(host, port)  # before loading: a busy port fails in a second, not after a conversion
    threads = threads or physical_cores()
    poll_level = engine_poll(poll, threads)  # before llama.cpp loads (open_model_files loads it)
    files = open_model_files(model, allow_pickle, quant)
    n_ctx = ctx or default_ctx(max_seqs, files.n_ctx_train)
    engine_config = EngineConfig(
        n_ctx=n_ctx,
        max_seqs=max_seqs,
        threads=threads,
        max_waiting=max_waiting,
        state_cache_mb=state_cache_mb,
        poll=poll_level,
    )
    from qwenkit.engines.loader import open_engine  # llama.cpp loads only when a model is served

    engine = open_engine(files, engine_config)
    app = create_app(engine, files.tokenizer, files.family, files.name, config)
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    name = config.served_model_name or files.name
    auth = f"on ({len(keys)} key{'s' if len(keys) != 1 else ''})" if keys else "off"
    err_console.print(
        f"qwenkit serve: [bold]{name}[/] at [bold]http://{shown_host}:{bound_port}/v1[/] "
        f"(context {engine.n_ctx} tokens per request, {max_seqs} at once, API key: {auth})",
        soft_wrap=True,
        highlight=False,
    )
    if not keys and host not in LOOPBACK:
        err_console.print(
            f"[yellow]warning:[/] listening on {host} without an API key: anyone who can reach it can use it "
            f"(set {API_KEY_ENV} or --api-key-file)",
            soft_wrap=True,
        )
    if files.is_demo:
        err_console.print(f"[yellow]{DEMO_NOTICE}[/]", soft_wrap=True)  # again, next to the URL
    _setup_logging()
    run_server(app, sock, shutdown_timeout)
    err_console.print("qwenkit serve: stopped")
