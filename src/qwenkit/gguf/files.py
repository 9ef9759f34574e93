"""File handling shared by the GGUF writers (convert, lora, mmproj): a GGUF appears whole or not at all,
and a checkpoint's JSON file is read with the caller's one-line error.

Contract: `with gguf_file(path, arch) as writer:` yields a gguf.GGUFWriter on a temp file beside `path`; the
block adds keys and tensors and ends with write_gguf(writer) (tensors added with add_tensor) or
write_gguf(writer, data) (the arrays of the add_tensor_info entries, in order, one in memory at a time).
The writer is closed either way; the file is renamed to `path` when the block ends without an error and
the temp file is removed when it raises, so no reader or cache check ever sees a half-written GGUF.
read_json(path, error, fix) parses a JSON file; an unreadable or unparsable one raises
error("<path> is not valid JSON (<why>): <fix>"), a missing one error(missing) when `missing` is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qwenkit.paths import replaced_on_success

__all__ = ["gguf_file", "read_json", "write_gguf"]


@contextmanager
def gguf_file(
    path: Path, arch: str, *, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE
) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter for `path` (folder created); the file appears there only if the block succeeds."""
    with replaced_on_success(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, endianess=endianess)
        try:
            yield writer
        finally:
            writer.close()  # before replaced_on_success renames or removes the temp file


def write_gguf(writer: gguf.GGUFWriter, data: Iterable[np.ndarray] | None = None) -> None:
    """Header, keys, tensor infos and tensor data: the tensors added with add_tensor(), or `data`, the
    arrays for the add_tensor_info() entries in their order (streamed, for files larger than memory)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if data is None:
        writer.write_tensors_to_file()
        return
    writer.write_ti_data_to_file()
    for array in data:
        writer.write_tensor_data(array)


def read_json(path: Path, error: Callable[[str], Exception], fix: str, missing: str | None = None) -> Any:
    """The parsed JSON in `path`; error(...) naming `fix` when it cannot be read or parsed, and
    error(missing) when `missing` is given and there is no such file."""
    if missing is not None and not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}): {fix}") from None
