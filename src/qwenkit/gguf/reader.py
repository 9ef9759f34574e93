"""Read what a Qwen GGUF file is (architecture, sizes, quantization, chat template) with gguf.GGUFReader.

Contract: read_gguf_info() returns a GGUFInfo for a GGUF whose general.architecture is qwen2, qwen3, qwen2moe,
qwen3moe, qwen35, qwen35moe, qwen3next, qwen2vl or qwen3vl (Qwen2.5-VL / Qwen3-VL text towers). A missing
file, a file that is not GGUF (bad magic), a truncated or corrupt one, and another architecture each raise
GGUFReadError (a ValueError) with a one-line message naming the fix. Tensor data is memory-mapped, never
read; string arrays (vocabulary, merges) are measured, not decoded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

__all__ = ["QWEN_GGUF_ARCHES", "GGUFInfo", "GGUFReadError", "read_gguf_info"]

# The last two: the Qwen2.5-VL / Qwen3-VL text towers.
QWEN_GGUF_ARCHES = (
    "qwen2",
    "qwen3",
    "qwen2moe",
    "qwen3moe",
    "qwen35",
    "qwen35moe",
    "qwen3next",
    "qwen2vl",
    "qwen3vl",
)
_MAGIC = b"GGUF"


class GGUFReadError(ValueError):
    """A file that is not a usable Qwen GGUF; the message is one line naming the fix."""


@dataclass(frozen=True)
class GGUFInfo:
    """A Qwen GGUF's metadata; file_type_name is llama.cpp's ftype without its prefix (e.g. "Q8_0").

    tensors maps each tensor name to its ggml type name, tensor_types counts them per type; metadata holds
    every scalar (non-array) key/value.
    """

    path: Path
    architecture: str
    name: str | None
    context_length: int
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    vocab_size: int
    file_type: int | None
    file_type_name: str
    tensor_count: int
    size_bytes: int
    expert_count: int | None = None
    expert_used_count: int | None = None
    chat_template: str | None = field(default=None, repr=False)
    eos_token_id: int | None = None
    tensor_types: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, str] = field(default_factory=dict, repr=False)
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)


class MetadataReader(gguf.GGUFReader):
    """GGUFReader that reads each metadata array as one block instead of one numpy view per element.

    The stock reader takes ~10 s on a Qwen vocabulary (150k tokens + 150k merges) on a small CPU; here a
    string array becomes [item type, count, raw bytes] (contents() of it is not decoded) and a numeric
    array one typed view (contents() works).
    """

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[npt.NDArray[Any]], list[int], list[gguf.GGUFValueType]]:
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        start, n = orig_offs + 12, int(count[0])
        kind = gguf.GGUFValueType(int(item_type[0]))
        types = [gguf.GGUFValueType.ARRAY, kind]
        if kind == gguf.GGUFValueType.STRING:
            order = "little" if self.byte_order == "I" and np.little_endian else "big"
            raw, end = memoryview(self.data), start
            for _ in range(n):
                end += 8 + int.from_bytes(raw[end : end + 8], order)
            return end - orig_offs, [item_type, count, self._get(start, np.uint8, end - start)], [], types
        nptype = self.gguf_scalar_to_np.get(kind)
        if nptype is None:  # nested arrays: rare, leave them to the stock reader
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(start, nptype, n)
        return 12 + int(values.nbytes), [item_type, count, values], [2], types


def check_gguf_magic(path: Path) -> None:
    """Raise GGUFReadError unless the file starts with the GGUF magic bytes."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise GGUFReadError(
            f"{path} is not a GGUF file (starts with {magic!r}, not {_MAGIC!r}): pass a .gguf file "
            "or convert the checkpoint with `qwenkit convert`"
        )


def read_gguf_info(path: Path) -> GGUFInfo:
    """Metadata of the Qwen GGUF at `path` (see the module docstring for the errors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFReadError(f"no such GGUF file: {path}: pass an existing .gguf file")
    check_gguf_magic(path)
    size = path.stat().st_size
    try:
        reader = MetadataReader(path)
    except Exception as exc:  # the reader raises ValueError, struct/numpy errors or IndexError on bad bytes
        raise GGUFReadError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {_first_line(exc)}): "
            "re-download or re-convert it"
        ) from None
    arch = _value(reader, "general.architecture")
    if arch not in QWEN_GGUF_ARCHES:
        raise GGUFReadError(
            f"{path} is a {arch!r} model, not a Qwen one ({', '.join(QWEN_GGUF_ARCHES)}): pass a Qwen GGUF"
        )

    def need(key: str) -> Any:
        value = _value(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFReadError(f"{path} lacks {arch}.{key}: re-convert it with `qwenkit convert`")
        return value

    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab_size = _value(reader, f"{arch}.vocab_size") or (
        int(tokens.parts[-2][0]) if tokens is not None else 0
    )
    file_type = _value(reader, "general.file_type")
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=_value(reader, "general.name"),
        context_length=int(need("context_length")),
        block_count=int(need("block_count")),
        embedding_length=int(need("embedding_length")),
        head_count=int(need("attention.head_count")),
        head_count_kv=int(_value(reader, f"{arch}.attention.head_count_kv") or need("attention.head_count")),
        vocab_size=int(vocab_size),
        file_type=file_type,
        file_type_name=_file_type_name(file_type),
        tensor_count=len(reader.tensors),
        size_bytes=size,
        expert_count=_value(reader, f"{arch}.expert_count"),
        expert_used_count=_value(reader, f"{arch}.expert_used_count"),
        chat_template=_value(reader, "tokenizer.chat_template"),
        eos_token_id=_value(reader, "tokenizer.ggml.eos_token_id"),
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors)),
        tensors={t.name: t.tensor_type.name for t in reader.tensors},
        metadata={
            key: f.contents()
            for key, f in reader.fields.items()
            if f.types and f.types[0] != gguf.GGUFValueType.ARRAY and not key.startswith("GGUF.")
        },
    )


def _value(reader: gguf.GGUFReader, key: str) -> Any:
    found = reader.get_field(key)
    return None if found is None else found.contents()


def _file_type_name(file_type: int | None) -> str:
    if file_type is None:
        return "unknown"
    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return f"ftype {file_type}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no detail"
