"""The OpenAI Batch file format: input lines, output lines, and an output file a crash cannot tear.

Contract: parse_batch() reads an input file's bytes into BatchLines, one per non-blank line, numbered from
1; each is either runnable (custom_id, url, body) or carries the error its output line reports (not JSON,
not an object, no custom_id, method not POST, a url not in `urls` or not the batch's endpoint, body not an
object). BatchFileError (one line naming the fix) for a file that is not JSONL at all (not UTF-8, or no
line is a JSON object), a repeated custom_id (both line numbers), or more requests than max_lines.
Output lines have OpenAI's shape {id, custom_id, response: {status_code, request_id, body} | null,
error: {code, message[, line]} | null}: a request the API answered (any status) keeps its response, and a
non-200 also sets error; a line that could not be sent has response null and error.line. ResultFile
appends one whole line per write (a failed write is cut back), and on open drops a torn last line (a
crash mid-write) and reads which custom_ids (and line numbers, for lines without one) are done.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_CUSTOM_ID_CHARS = 512
BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
LINE_SHAPE = 'each line is one request: {"custom_id": ..., "method": "POST", "url": ..., "body": {...}}'


class BatchFileError(ValueError):
    """A batch file that cannot run at all (or an output file that is not one); one line naming the fix."""


@dataclass(frozen=True, slots=True)
class LineError:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class BatchLine:
    line: int  # 1-based line number in the input file
    custom_id: str | None
    url: str
    body: Mapping[str, Any]
    error: LineError | None = None


def _check(obj: dict[str, Any], number: int, urls: Collection[str], endpoint: str | None) -> LineError | None:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        return LineError(
            "invalid_custom_id", f"line {number}: custom_id must be a string of 1-{MAX_CUSTOM_ID_CHARS} chars"
        )
    if obj.get("method") != "POST":
        return LineError("invalid_method", f'line {number}: method must be "POST"')
    url = obj.get("url")
    if endpoint is not None and url != endpoint:
        return LineError(
            "mismatched_url", f"line {number}: url {url!r} is not this batch's endpoint {endpoint}"
        )
    if url not in urls:
        return LineError(
            "unsupported_url", f"line {number}: url {url!r} is not supported; use one of {', '.join(urls)}"
        )
    if not isinstance(obj.get("body"), dict):
        return LineError("invalid_body", f"line {number}: body must be a JSON object (the request's body)")
    return None


def parse_batch(
    data: bytes,
    urls: Collection[str] = BATCH_URLS,
    *,
    endpoint: str | None = None,
    max_lines: int | None = None,
    name: str = "the batch file",
) -> list[BatchLine]:
    """The lines of a batch input file; bad lines carry their error, a file that cannot run raises."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchFileError(f"{name} is not UTF-8 text (byte {exc.start}); {LINE_SHAPE}") from None
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    objects = 0
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if max_lines is not None and len(lines) >= max_lines:
            raise BatchFileError(f"{name} has more than {max_lines} requests; split it into smaller files")
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            why = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "too deep"
            lines.append(
                BatchLine(number, None, "", {}, LineError("invalid_json", f"line {number}: not JSON ({why})"))
            )
            continue
        if not isinstance(obj, dict):
            lines.append(
                BatchLine(number, None, "", {}, LineError("invalid_line", f"line {number}: {LINE_SHAPE}"))
            )
            continue
        objects += 1
        error = _check(obj, number, urls, endpoint)
        custom_id = obj.get("custom_id") if isinstance(obj.get("custom_id"), str) else None
        if custom_id is not None:
            if custom_id in seen:
                raise BatchFileError(
                    f"custom_id {custom_id[:80]!r} is on lines {seen[custom_id]} and {number}; "
                    "give every request its own custom_id"
                )
            seen[custom_id] = number
        body = obj.get("body") if error is None else {}
        lines.append(BatchLine(number, custom_id, str(obj.get("url", "")), body, error))  # type: ignore[arg-type]
    if objects == 0:
        raise BatchFileError(f"{name} is not JSONL: no line is a JSON object; {LINE_SHAPE}")
    return lines


# ---- output lines -----------------------------------------------------------------------------------------


def _record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex[:24]}"


def answered(line: BatchLine, status: int, body: Any, request_id: str) -> dict[str, Any]:
    """The output line of a request the API answered (with any status)."""
    error = None
    if status != 200:
        detail = body.get("error") if isinstance(body, dict) else None
        detail = detail if isinstance(detail, dict) else {}
        message = detail.get("message") or (body if isinstance(body, str) else f"HTTP {status}")
        error = {
            "code": detail.get("code") or detail.get("type") or f"http_{status}",
            "message": str(message),
        }
    return {
        "id": _record_id(),
        "custom_id": line.custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": error,
    }


def refused(line: BatchLine) -> dict[str, Any]:
    """The output line of a line that could not be sent (its LineError)."""
    assert line.error is not None
    error = {"code": line.error.code, "message": line.error.message, "line": line.line}
    return {"id": _record_id(), "custom_id": line.custom_id, "response": None, "error": error}


def succeeded(record: Mapping[str, Any]) -> bool:
    response = record.get("response")
    return isinstance(response, dict) and response.get("status_code") == 200


def usage_of(record: Mapping[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of an answered line (chat/completions' or Responses' usage), else 0s."""
    response = record.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return (prompt if isinstance(prompt, int) else 0, completion if isinstance(completion, int) else 0)


# ---- the output file ---------------------------------------------------------------------------------


@dataclass
class Done:
    """What an output file already holds: the custom_ids answered and the lines refused without one."""

    custom_ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)
    records: int = 0
    torn: bool = False  # a torn last line was dropped

    def has(self, line: BatchLine) -> bool:
        return line.custom_id in self.custom_ids if line.custom_id is not None else line.line in self.lines


def _is_record(obj: object) -> bool:
    return isinstance(obj, dict) and "custom_id" in obj and ("response" in obj or "error" in obj)


class ResultFile:
    """An output JSONL file appended one whole line per write; open() resumes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> Done:
        """Read what is done; cut a torn last line (no newline, or not a record) off the file."""
        done = Done()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        good = 0  # bytes of whole, valid lines
        chunks = data.split(b"\n")
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            if not chunk.strip():
                good += len(chunk) + (0 if last else 1)
                continue
            try:
                obj = json.loads(chunk)
            except ValueError:
                obj = None
            if last or not _is_record(obj):
                if last or index == len(chunks) - 2:  # the final line, written by a crash: drop it
                    done.torn = True
                    break
                raise BatchFileError(
                    f"{self.path} line {index + 1} is not a batch output line; give a new output file"
                )
            done.records += 1
            good += len(chunk) + 1
            if obj["custom_id"] is not None:
                done.custom_ids.add(str(obj["custom_id"]))
            elif isinstance(obj.get("error"), dict) and isinstance(obj["error"].get("line"), int):
                done.lines.add(obj["error"]["line"])
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if good < len(data):
            os.ftruncate(self._fd, good)
        return done

    def append(self, record: Mapping[str, Any]) -> None:
        """One line, whole or not at all (a short or failed write is cut back before the error rises)."""
        assert self._fd is not None, "open() first"
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
        except BaseException:
            os.ftruncate(self._fd, start)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The whole output lines of a result file (a torn last line skipped)."""
    with path.open("rb") as f:
        for raw in f:
            if raw.endswith(b"\n") and raw.strip():
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if _is_record(obj):
                    yield obj
