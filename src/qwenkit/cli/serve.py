"""`qwenkit serve`: an OpenAI-compatible server for a Qwen model (the built-in demo model by default).

Binds 127.0.0.1:8000 unless told otherwise, says which model it serves, where, and whether API keys are
required; SIGTERM or Ctrl-C drains in-flight requests and exits 0. --ctx is the KV cells of all
--max-seqs sequences together (as EngineConfig.n_ctx); each request may use ctx / max-seqs tokens, prompt
plus answer. Default: 4096 tokens per request (or the model's training context if smaller) — with 8
sequences 32768 cells, about 3.5 GiB of f16 KV for Qwen3-0.6B (112 KiB per token); on a smaller machine
lower --max-seqs or --ctx. An embedding model (Qwen3-Embedding) is served on POST /v1/embeddings only, each
input up to ctx / max-seqs tokens. --lora name=DIR serves a tuned adapter unmerged beside the model
(converted to a llama.cpp LoRA GGUF once, cached); requests pick it with "model": "MODEL:name".
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from qwenkit.chat.presets import load_presets
from qwenkit.checkpoints.demo import DEMO_NOTICE
from qwenkit.cli.common import (
    THREADS_HELP,
    AllowPickleOption,
    FlashAttnOption,
    KvOption,
    MmprojOption,
    ModelOption,
    PollOption,
    check_kv,
    check_quant,
    engine_threads,
    open_model_files,
    vision_spec,
)
from qwenkit.cli.errors import err_console, friendly_errors
from qwenkit.cli.serve_engines import (
    DataParallel,
    EngineChoice,
    GpuUtilization,
    PipelineParallel,
    RayAddress,
    Replicas,
    ScaleOptions,
    TensorParallel,
    check_scale_options,
    open_replicas,
    serve_vllm,
)
from qwenkit.engines.llamacpp.config import ADAPTER_NAME, EngineConfig
from qwenkit.media import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES
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


def image_body_bytes(max_image_bytes: int) -> int:
    """The request body cap when images are on: the default 2 MiB for text plus one largest image in
    base64 (4 characters per 3 bytes)."""
    return ServeConfig().max_body_bytes + -(-max_image_bytes * 4 // 3)


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


def parse_lora_options(values: list[str]) -> dict[str, Path]:
    """--lora name=DIR|FILE.gguf options as {name: path}; ValueError naming the bad one."""
    specs: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path or not ADAPTER_NAME.fullmatch(name):
            raise ValueError(
                f"--lora {value!r}: write name=DIR (a name of letters, digits, '_', '.', '-'), "
                "e.g. --lora support=./tuned"
            )
        if name in specs:
            raise ValueError(f"--lora {name!r} is given twice: give each adapter its own name")
        specs[name] = Path(path).expanduser()
        if not specs[name].exists():  # before the model loads: a typo fails in a second
            raise ValueError(
                f"--lora {name}: no such adapter {path}: pass a `qwenkit tune` --out dir or a .gguf"
            )
    return specs


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
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
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
    kv: KvOption = "f16",
    flash_attn: FlashAttnOption = "auto",
    no_huge_pages: Annotated[
        bool,
        typer.Option(
            "--no-huge-pages",
            help="Keep the model's weights and buffers off transparent huge pages (on by default on Linux: "
            "fewer TLB misses per token).",
        ),
    ] = False,
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
    batch_file_mb: Annotated[
        int, typer.Option("--batch-file-mb", min=1, help="Largest /v1/files upload (a batch input), MiB.")
    ] = 100,
    batch_storage_mb: Annotated[
        int,
        typer.Option("--batch-storage-mb", min=1, help="MiB of files one API key may keep."),
    ] = 1024,
    batch_concurrency: Annotated[
        int,
        typer.Option(
            "--batch-concurrency",
            min=1,
            help="/v1/batches requests on the engine at once (the other --max-seqs slots stay interactive).",
        ),
    ] = 4,
    mmproj: MmprojOption = None,
    max_image_bytes: Annotated[
        int, typer.Option("--max-image-bytes", min=1024, help="Largest image, encoded (bytes).")
    ] = DEFAULT_MAX_IMAGE_BYTES,
    max_image_pixels: Annotated[
        int,
        typer.Option("--max-image-pixels", min=64, help="Largest image, width x height, before resizing."),
    ] = DEFAULT_MAX_IMAGE_PIXELS,
    max_images: Annotated[int, typer.Option("--max-images", min=0, help="Images per request.")] = (
        DEFAULT_MAX_IMAGES
    ),
    allow_remote_media: Annotated[
        bool,
        typer.Option(
            "--allow-remote-media",
            help="Fetch http(s) image URLs (public addresses only, no redirects, capped and timed). "
            "Default: data: URLs only.",
        ),
    ] = False,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="A LoRA adapter served beside the model without merging: name=DIR (a `qwenkit tune` --out "
            'dir) or name=FILE.gguf; a request picks it with "model": "MODEL:name". Repeatable.',
        ),
    ] = None,
    engine_kind: EngineChoice = "llamacpp",
    tensor_parallel: TensorParallel = 1,
    pipeline_parallel: PipelineParallel = 1,
    data_parallel: DataParallel = 1,
    gpu_memory_utilization: GpuUtilization = 0.9,
    ray_address: RayAddress = None,
    replicas: Replicas = 1,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Serve a Qwen model over the OpenAI API (chat, completions, tools, JSON schema, streaming)."""
    check_quant(quant)
    kv_type, flash = check_kv(kv, flash_attn)
    lora_specs = parse_lora_options(lora or [])
    scale = ScaleOptions(
        engine_kind,
        tensor_parallel,
        pipeline_parallel,
        data_parallel,
        gpu_memory_utilization,
        ray_address,
        replicas,
    )
    llamacpp_only = {
        "--lora": bool(lora_specs),
        "--mmproj": mmproj is not None,
        "--kv": kv != "f16",
        "--no-huge-pages": no_huge_pages,
    }
    check_scale_options(scale, {**llamacpp_only, "--flash-attn": flash_attn != "auto"})
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
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
        max_images=max_images,
        allow_remote_media=allow_remote_media,
        # With a projector, a body must hold a base64 image of --max-image-bytes beside the text.
        **({"max_body_bytes": image_body_bytes(max_image_bytes)} if mmproj else {}),
        max_batch_file_bytes=batch_file_mb * 2**20,
        batch_storage_bytes=batch_storage_mb * 2**20,
        batch_concurrency=batch_concurrency,
    )
    if presets:
        load_presets(presets)  # a file that does not parse fails now, in one line naming its line
    sock = bind_socket(host, port)  # before loading: a busy port fails in a second, not after a conversion
    if scale.engine == "vllm" and lora_specs:
        raise ValueError("--lora runs on the llama.cpp engine: drop --engine vllm, or merge the adapter")
    if scale.engine == "vllm":  # GPUs: no GGUF conversion, no llama.cpp (cli/serve_engines.py)
        serve_vllm(model, allow_pickle, max_seqs, ctx, scale, config, sock, keys)
        return
    cpu = engine_threads(threads, poll)  # before llama.cpp loads (open_model_files loads it)
    files = open_model_files(model, allow_pickle, quant, mmproj)
    n_ctx = ctx or default_ctx(max_seqs, files.n_ctx_train)
    if lora_specs and files.embedding:
        raise ValueError("--lora needs a text-generation model; this is an embedding model")
    from qwenkit.gguf.lora import resolve_loras  # converts a tune output dir once (cached)

    # A LoRA on lm_head/embed_tokens of a tied model is served from an untied copy of the base.
    base_gguf, loras = resolve_loras(lora_specs, files.gguf_path)
    files = dataclasses.replace(files, gguf_path=base_gguf)
    engine_config = EngineConfig(
        n_ctx=n_ctx,
        max_seqs=max_seqs,
        max_waiting=max_waiting,
        state_cache_mb=state_cache_mb,
        **cpu.config(),
        kv_type=kv_type,
        flash_attn=flash,
        huge_pages=not no_huge_pages,
        loras=loras,
        mmproj=files.mmproj_path,
    )
    from qwenkit.engines.loader import open_engine  # llama.cpp loads only when a model is served

    engine = (
        open_engine(files, engine_config)
        if replicas == 1
        else open_replicas(files.gguf_path, engine_config, scale)
    )
    app = create_app(
        engine,
        files.tokenizer,
        files.family,
        files.name,
        config,
        embedding=files.embedding,
        vision=vision_spec(files),
        adapters=tuple(loras),
    )
    auth = f"on ({len(keys)} key{'s' if len(keys) != 1 else ''})" if keys else "off"
    extra = (" — an embedding model: POST /v1/embeddings only" if files.embedding else "") + (
        f" — images on ({files.mmproj_path.name})" if files.mmproj_path else ""
    )
    name = config.served_model_name or files.name
    announce_and_run(app, sock, config, name, engine.n_ctx, max_seqs, auth, files.is_demo, extra=extra)


def announce_and_run(
    app: object,
    sock: object,
    config: ServeConfig,
    name: str,
    n_ctx: int,
    max_seqs: int,
    auth: str,
    is_demo: bool,
    label: str = "",
    extra: str = "",
) -> None:
    """Print the startup line (and the open-host and demo warnings), then serve until stopped; every engine's
    `qwenkit serve` ends here."""
    bound_host, bound_port = sock.getsockname()[:2]  # type: ignore[attr-defined]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    err_console.print(
        f"qwenkit serve{label}: [bold]{name}[/] at [bold]http://{shown_host}:{bound_port}/v1[/] "
        f"(context {n_ctx} tokens per request, {max_seqs} at once, API key: {auth}){extra}",
        soft_wrap=True,
        highlight=False,
    )
    if auth == "off" and config.host not in LOOPBACK:
        err_console.print(
            f"[yellow]warning:[/] listening on {config.host} without an API key: anyone who can reach it can "
            f"use it (set {API_KEY_ENV} or --api-key-file)",
            soft_wrap=True,
        )
    if is_demo:
        err_console.print(f"[yellow]{DEMO_NOTICE}[/]", soft_wrap=True)  # again, next to the URL
    _setup_logging()
    run_server(app, sock, config.shutdown_timeout)  # type: ignore[arg-type]
    err_console.print("qwenkit serve: stopped")
