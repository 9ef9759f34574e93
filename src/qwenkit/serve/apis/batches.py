"""OpenAI's Files and Batch APIs on `qwenkit serve`, run on the server's own engine.

Contract: POST /v1/files (multipart: file, purpose "batch"; at most max_batch_file_bytes, and one key's
files together at most batch_storage_bytes: 413 naming the flag), GET /v1/files[/{id}[/content]], DELETE
/v1/files/{id}; POST /v1/batches (input_file_id, endpoint, completion_window "24h", metadata), GET
/v1/batches[/{id}], POST /v1/batches/{id}/cancel. Everything lives under config.batch_dir (default
<cache>/batches), one folder per API key (one for the server when it has no keys): another key's ids are
404. A batch's file is checked when the batch is created (not JSONL, a repeated custom_id, more than
batch_max_requests: 400; bad lines become error lines); the batch then runs in the background through the
native path (batch/run.py), at most batch_concurrency requests of all batches at once, so interactive
requests keep the engine's other slots. Results are appended to a resumable file; at the end they split
into the output file (status 200) and the error file (the rest). A shutdown stops batches without failing
their requests; the server resumes them when it starts again. Nothing expires on its own (expires_at is
informational): DELETE files you no longer need.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from qwenkit.batch import run as batch_run  # a module: batch/run.py imports the serve package (a cycle)
from qwenkit.batch.format import BatchFileError, BatchLine, ResultFile, parse_batch, read_records, succeeded
from qwenkit.paths import atomic_write, cache_root
from qwenkit.serve.errors import APIError
from qwenkit.serve.handlers import ServeContext
from qwenkit.serve.logs import request_info

log = logging.getLogger("qwenkit.serve")
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")
WINDOW_S = 24 * 3600
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the file
SAVE_EVERY_S = 1.0  # a running batch's counts reach disk at most this often
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
NO_KEY_OWNER = "open"
# The OpenAPI document's request bodies of the routes that take none as JSON (serve/openapi.py has the rest).
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                    },
                    "required": ["file", "purpose"],
                }
            }
        },
    }
}
NO_BODY = {  # cancel takes no body; one sent is ignored
    "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
}


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = None


def _file_caps(max_bytes: int) -> tuple[int, str]:
    """The /v1/files body cap for SecurityMiddleware: the file cap plus the form around it."""
    return max_bytes + MULTIPART_SLACK, " (the server's cap for a batch file; qwenkit serve --batch-file-mb)"


def body_caps(max_batch_file_bytes: int) -> dict[str, tuple[int, str]]:
    return {"/v1/files": _file_caps(max_batch_file_bytes)}


def _owner(request: Request) -> str:
    info = request_info(request.scope)
    return (info.key_id if info is not None else None) or NO_KEY_OWNER


def _now() -> int:
    return int(time.time())


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def read_upload(content_type: str, body: bytes) -> tuple[dict[str, str], str, bytes]:
    """(form fields, file name, file bytes) of a multipart upload with one `file` part (blocking)."""
    from python_multipart import parse_form
    from python_multipart.exceptions import FormParserError

    fields: dict[str, str] = {}
    files: list[Any] = []
    headers = {"Content-Type": content_type.encode("latin-1"), "Content-Length": str(len(body)).encode()}
    try:
        parse_form(
            headers,
            io.BytesIO(body),
            lambda f: fields.__setitem__(f.field_name.decode("utf-8", "replace"), (f.value or b"").decode()),
            files.append,
        )
    except (FormParserError, ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the multipart body does not parse: {exc}") from None
    part = next((f for f in files if f.field_name == b"file"), None)
    if part is None:
        raise APIError(400, "send the file in a multipart field named 'file'", param="file")
    part.file_object.seek(0)
    data = part.file_object.read()
    name = (part.file_name or b"upload.jsonl").decode("utf-8", "replace")
    for f in files:
        f.close()
    return fields, Path(name).name[:256] or "upload.jsonl", data


def _newest_first(folder: Path, pattern: str) -> list[dict[str, Any]]:
    """The JSON records (files or batches) in folder, newest first."""
    found = [json.loads(p.read_text("utf-8")) for p in folder.glob(pattern)] if folder.exists() else []
    return sorted(found, key=lambda r: (r["created_at"], r["id"]), reverse=True)


def _one(folder: Path, item_id: str, shape: re.Pattern[str], kind: str) -> dict[str, Any]:
    """The JSON record of one file or batch in an owner's folder; 404 for an id not there (or malformed)."""
    path = folder / f"{item_id}.json"
    if not shape.fullmatch(item_id) or not path.exists():
        raise APIError(
            404, f"no {kind} {item_id[:80]!r} (for this API key)", param=f"{kind}_id", code="not_found"
        )
    return json.loads(path.read_text("utf-8"))


class BatchStore:
    """Files and batch records on disk, one folder per owner (API key id)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _files(self, owner: str) -> Path:
        return self.root / owner / "files"

    def _batches(self, owner: str) -> Path:
        return self.root / owner / "batches"

    def file_meta(self, owner: str, file_id: str) -> dict[str, Any]:
        return _one(self._files(owner), file_id, FILE_ID, "file")

    def file_data(self, owner: str, file_id: str) -> Path:
        self.file_meta(owner, file_id)
        return self._files(owner) / f"{file_id}.data"

    def list_files(self, owner: str) -> list[dict[str, Any]]:
        return _newest_first(self._files(owner), "file-*.json")

    def used_bytes(self, owner: str) -> int:
        return sum(m["bytes"] for m in self.list_files(owner))

    def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": _now(),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        atomic_write(self._files(owner) / f"{file_id}.data", data)
        atomic_write(self._files(owner) / f"{file_id}.json", json.dumps(meta))  # last: the file exists now
        return meta

    def delete_file(self, owner: str, file_id: str) -> None:
        self.file_meta(owner, file_id)
        (self._files(owner) / f"{file_id}.json").unlink(missing_ok=True)
        (self._files(owner) / f"{file_id}.data").unlink(missing_ok=True)

    def batch(self, owner: str, batch_id: str) -> dict[str, Any]:
        return _one(self._batches(owner), batch_id, BATCH_ID, "batch")

    def save_batch(self, owner: str, record: dict[str, Any]) -> None:
        atomic_write(self._batches(owner) / f"{record['id']}.json", json.dumps(record))

    def results(self, owner: str, batch_id: str) -> Path:
        return self._batches(owner) / f"{batch_id}.results.jsonl"

    def list_batches(self, owner: str) -> list[dict[str, Any]]:
        return _newest_first(self._batches(owner), "batch_*.json")

    def all_batches(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.root.exists():
            return []
        return [(d.name, b) for d in self.root.iterdir() if d.is_dir() for b in self.list_batches(d.name)]


class BatchRunner:
    """The batches running in this server: one task each, sharing batch_concurrency engine slots."""

    def __init__(self, ctx: ServeContext, store: BatchStore) -> None:
        self.ctx = ctx
        self.store = store
        self.slots = asyncio.Semaphore(ctx.config.batch_concurrency)
        self.live: dict[tuple[str, str], dict[str, Any]] = {}  # (owner, batch id) → its record while it runs
        self.tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}

    def record(self, owner: str, batch_id: str) -> dict[str, Any]:
        live = self.live.get((owner, batch_id))  # keyed by owner too: another key's id stays unknown
        return live if live is not None else self.store.batch(owner, batch_id)

    def start(self, owner: str, record: dict[str, Any], lines: list[BatchLine]) -> None:
        stop = asyncio.Event()
        self.live[(owner, record["id"])] = record
        task = asyncio.create_task(self._run(owner, record, lines, stop))
        self.tasks[record["id"]] = (task, stop)

    def cancel(self, owner: str, record: dict[str, Any]) -> None:
        record["status"], record["cancelling_at"] = "cancelling", _now()
        self.store.save_batch(owner, record)
        running = self.tasks.get(record["id"])
        if running is not None:
            running[1].set()

    async def _run(
        self, owner: str, record: dict[str, Any], lines: list[BatchLine], stop: asyncio.Event
    ) -> None:
        batch_id = record["id"]
        key = owner if owner != NO_KEY_OWNER else None
        execute = batch_run.NativeExecutor(self.ctx, key_id=key)

        async def guarded(line: BatchLine) -> dict[str, Any]:
            async with self.slots:  # a cap over all batches: interactive requests keep the other slots
                return await execute(line)

        results = ResultFile(self.store.results(owner, batch_id))
        saved = time.monotonic()
        try:
            done = results.open()
            self._count(record, read_records(results.path))
            todo = [line for line in lines if not done.has(line)]

            def sink(result: dict[str, Any]) -> None:
                nonlocal saved
                results.append(result)
                self._count(record, [result])
                if time.monotonic() - saved > SAVE_EVERY_S:
                    saved = time.monotonic()
                    self.store.save_batch(owner, record)

            await batch_run.run_lines(todo, guarded, sink, self.ctx.config.batch_concurrency, stop=stop)
            results.close()
            await asyncio.to_thread(self.finish, owner, record, "cancelled" if stop.is_set() else "completed")
        except (batch_run.BatchInterrupted, asyncio.CancelledError):
            self.store.save_batch(owner, record)  # still in_progress: resumed when the server starts again
            if not self.ctx.draining:
                raise
        except Exception as exc:
            log.exception("batch %s failed", batch_id)
            record["status"], record["failed_at"] = "failed", _now()
            record["errors"] = {
                "object": "list",
                "data": [{"code": "batch_failed", "message": str(exc)[:300]}],
            }
            self.store.save_batch(owner, record)
        finally:
            results.close()
            self.live.pop((owner, batch_id), None)
            self.tasks.pop(batch_id, None)

    @staticmethod
    def _count(record: dict[str, Any], results: Any) -> None:
        progress = batch_run.Progress()
        for result in results:
            progress.add(result)
        counts, usage = record["request_counts"], record["usage"]
        counts["completed"] += progress.succeeded
        counts["failed"] += progress.failed
        usage["input_tokens"] += progress.prompt_tokens
        usage["output_tokens"] += progress.completion_tokens
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]

    def finish(self, owner: str, record: dict[str, Any], status: str) -> None:
        """Split the results into the output and error files (blocking) and close the batch."""
        record["status"], record["finalizing_at"] = "finalizing", record.get("finalizing_at") or _now()
        self.store.save_batch(owner, record)
        path = self.store.results(owner, record["id"])
        ok, bad = [], []
        if path.exists():
            for result in read_records(path):
                (ok if succeeded(result) else bad).append(json.dumps(result, ensure_ascii=False) + "\n")
        for lines, field, suffix in ((ok, "output_file_id", "output"), (bad, "error_file_id", "error")):
            if lines and not record.get(field):
                data = "".join(lines).encode("utf-8")
                meta = self.store.add_file(owner, f"{record['id']}_{suffix}.jsonl", "batch_output", data)
                record[field] = meta["id"]
        record["status"] = status
        record["completed_at" if status == "completed" else "cancelled_at"] = _now()
        self.store.save_batch(owner, record)
        path.unlink(missing_ok=True)

    def resume(self) -> None:
        """Go on with the batches a previous run of the server left unfinished."""
        for owner, record in self.store.all_batches():
            if record["status"] not in RUNNING or record["id"] in self.tasks:
                continue
            if record["status"] in ("cancelling", "finalizing"):
                final = "cancelled" if record["status"] == "cancelling" else "completed"
                self.finish(owner, record, final)
                continue
            try:
                data = self.store.file_data(owner, record["input_file_id"]).read_bytes()
                lines = parse_batch(data, tuple(batch_run.NATIVE_ENDPOINTS), endpoint=record["endpoint"])
            except (APIError, BatchFileError, OSError) as exc:
                record["status"], record["failed_at"] = "failed", _now()
                message = getattr(exc, "message", str(exc))
                record["errors"] = {"object": "list", "data": [{"code": "resume_failed", "message": message}]}
                self.store.save_batch(owner, record)
                continue
            record["request_counts"].update(completed=0, failed=0)  # recounted from the results file
            record["usage"].update(input_tokens=0, output_tokens=0, total_tokens=0)
            self.start(owner, record, lines)

    async def stop(self) -> None:
        """At shutdown: stop every batch without failing its requests (they resume at the next start)."""
        tasks = [task for task, _ in self.tasks.values()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


def _page(items: list[dict[str, Any]], request: Request) -> dict[str, Any]:
    """OpenAI's cursor list: ?after=<id>&limit=N (1-100, default 20)."""
    after = request.query_params.get("after")
    try:
        limit = int(request.query_params.get("limit", "20"))
    except ValueError:
        raise APIError(400, "limit must be a whole number from 1 to 100", param="limit") from None
    if not 1 <= limit <= 100:
        raise APIError(400, "limit must be a whole number from 1 to 100", param="limit")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(items) > limit,
    }


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise APIError(
            400, "metadata: at most 16 pairs, keys up to 64 and values up to 512 characters", param="metadata"
        )


def install(app: FastAPI, ctx: ServeContext) -> BatchRunner:
    """Add /v1/files and /v1/batches to an app made by create_app; its lifespan resumes and stops the
    returned runner."""
    from qwenkit.serve.app import parse_body  # app.py installs this module: import it late

    cfg = ctx.config
    store = BatchStore(Path(cfg.batch_dir) if cfg.batch_dir else cache_root() / "batches")
    runner = BatchRunner(ctx, store)
    upload_lock = asyncio.Lock()  # the storage check and the write of one upload happen together

    @app.post("/v1/files", openapi_extra=UPLOAD_BODY)
    async def create_file(request: Request) -> JSONResponse:
        owner = _owner(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise APIError(
                415,
                "send the file as multipart/form-data (fields 'file' and 'purpose')",
                code="unsupported_media_type",
            )
        fields, filename, data = await asyncio.to_thread(read_upload, content_type, await request.body())
        if fields.get("purpose") != "batch":
            raise APIError(400, "purpose: this server keeps files for purpose 'batch' only", param="purpose")
        if len(data) > cfg.max_batch_file_bytes:
            raise APIError(
                413,
                f"the file is {_mib(len(data))}; this server takes batch files up to "
                f"{_mib(cfg.max_batch_file_bytes)} (qwenkit serve --batch-file-mb)",
                code="file_too_large",
            )
        async with upload_lock:
            used = await asyncio.to_thread(store.used_bytes, owner)
            if used + len(data) > cfg.batch_storage_bytes:
                raise APIError(
                    413,
                    f"this key's files would take {_mib(used + len(data))}, over the cap of "
                    f"{_mib(cfg.batch_storage_bytes)} (qwenkit serve --batch-storage-mb); delete "
                    "files you no longer need (DELETE /v1/files/{id})",
                    code="storage_full",
                )
            meta = await asyncio.to_thread(store.add_file, owner, filename, "batch", data)
        return JSONResponse(meta)

    @app.get("/v1/files")
    async def list_files(request: Request) -> JSONResponse:
        files = await asyncio.to_thread(store.list_files, _owner(request))
        purpose = request.query_params.get("purpose")
        if purpose:
            files = [f for f in files if f["purpose"] == purpose]
        if request.query_params.get("order") == "asc":
            files.reverse()
        return JSONResponse(_page(files, request))

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, request: Request) -> JSONResponse:
        return JSONResponse(store.file_meta(_owner(request), file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> FileResponse:
        meta = store.file_meta(_owner(request), file_id)
        path = store.file_data(_owner(request), file_id)
        return FileResponse(path, media_type="application/jsonl", filename=meta["filename"])

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> JSONResponse:
        store.delete_file(_owner(request), file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> JSONResponse:
        owner = _owner(request)
        body = await parse_body(request, BatchCreate)
        if (body.endpoint in batch_run.EMBEDDING_ENDPOINTS) != (ctx.embedding is not None):
            kind = "an embedding" if ctx.embedding is not None else "a chat"
            raise APIError(
                400,
                f"{ctx.model_name} is {kind} model; its batches use "
                + (
                    ", ".join(batch_run.EMBEDDING_ENDPOINTS)
                    if ctx.embedding is not None
                    else ", ".join(
                        u for u in batch_run.NATIVE_ENDPOINTS if u not in batch_run.EMBEDDING_ENDPOINTS
                    )
                ),
                param="endpoint",
                code="embedding_model" if ctx.embedding is not None else "invalid_endpoint",
            )
        if body.endpoint not in batch_run.NATIVE_ENDPOINTS:
            raise APIError(
                400,
                f"endpoint: use one of {', '.join(batch_run.NATIVE_ENDPOINTS)}",
                param="endpoint",
                code="invalid_endpoint",
            )
        if body.completion_window != "24h":
            raise APIError(400, 'completion_window: only "24h" is supported', param="completion_window")
        _check_metadata(body.metadata)
        meta = store.file_meta(owner, body.input_file_id)
        if meta["purpose"] != "batch":
            raise APIError(400, "input_file_id: upload the input with purpose 'batch'", param="input_file_id")
        path = store.file_data(owner, body.input_file_id)

        def check() -> list[BatchLine]:
            name = f"file {body.input_file_id}"
            lines = parse_batch(
                path.read_bytes(),
                tuple(batch_run.NATIVE_ENDPOINTS),
                endpoint=body.endpoint,
                max_lines=cfg.batch_max_requests,
                name=name,
            )
            return lines

        try:
            lines = await asyncio.to_thread(check)
        except BatchFileError as exc:
            raise APIError(400, str(exc), param="input_file_id", code="invalid_batch_file") from None
        created = _now()
        record: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": body.endpoint,
            "model": ctx.model_name,
            "errors": None,
            "input_file_id": body.input_file_id,
            "completion_window": "24h",
            "status": "in_progress",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": created,
            "in_progress_at": created,
            "expires_at": created + WINDOW_S,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.metadata,
            "usage": {
                "input_tokens": 0,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 0,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 0,
            },
        }
        store.save_batch(owner, record)
        runner.start(owner, record, lines)
        return JSONResponse(record)

    @app.get("/v1/batches")
    async def list_batches(request: Request) -> JSONResponse:
        owner = _owner(request)
        found = await asyncio.to_thread(store.list_batches, owner)
        return JSONResponse(_page([runner.live.get((owner, b["id"]), b) for b in found], request))

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request) -> JSONResponse:
        return JSONResponse(runner.record(_owner(request), batch_id))

    @app.post("/v1/batches/{batch_id}/cancel", openapi_extra=NO_BODY)
    async def cancel_batch(batch_id: str, request: Request) -> JSONResponse:
        owner = _owner(request)
        record = runner.record(owner, batch_id)
        if record["status"] in ("completed", "failed", "expired"):
            raise APIError(
                409,
                f"batch {batch_id} is {record['status']}; only a running batch can be cancelled",
                code="conflict",
            )
        if record["status"] in ("validating", "in_progress", "cancelling"):
            runner.cancel(owner, record)
            if batch_id not in runner.tasks:  # not running in this process: close it now
                await asyncio.to_thread(runner.finish, owner, record, "cancelled")
        return JSONResponse(record)

    return runner
