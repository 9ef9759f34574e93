"""The official Qwen BPE vocabulary: dashscope's resources/qwen.tiktoken, read without network access.

Contract: vocab_path() locates the file inside the installed `dashscope` package (never a hard-coded path);
load_ranks() returns {token bytes: rank} with exactly BPE_VOCAB_SIZE entries whose ranks are 0..N-1.
Anything else raises TokenizerError (a ValueError) whose message names the fix.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
from pathlib import Path

from qwenkit.tokenizer.specials import BPE_VOCAB_SIZE

VOCAB_PACKAGE = "dashscope"
VOCAB_RESOURCE = ("resources", "qwen.tiktoken")


class TokenizerError(ValueError):
    """Bad tokenizer input or files; the message says how to fix it."""


def vocab_path() -> Path:
    """Where the installed dashscope package keeps qwen.tiktoken."""
    # find_spec locates the package without importing it (importing dashscope costs ~1 s).
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "the Qwen vocabulary ships in the 'dashscope' package, which is missing: pip install dashscope"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*VOCAB_RESOURCE)
        if candidate.is_file():
            return candidate
    raise TokenizerError(
        f"dashscope is installed but has no {'/'.join(VOCAB_RESOURCE)}; reinstall it: "
        "pip install --force-reinstall dashscope"
    )


def parse_ranks(data: bytes, source: str = "qwen.tiktoken") -> dict[bytes, int]:
    """Parse tiktoken's "base64(bytes) rank" lines and check they form the full Qwen vocabulary."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise TokenizerError(f"{source}:{lineno}: expected 'base64 rank'; reinstall dashscope")
        try:
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (binascii.Error, ValueError) as exc:
            raise TokenizerError(f"{source}:{lineno}: unreadable entry ({exc}); reinstall dashscope") from exc
        if token in ranks:
            raise TokenizerError(f"{source}:{lineno}: duplicate token {token!r}; reinstall dashscope")
        ranks[token] = rank
    if len(ranks) != BPE_VOCAB_SIZE:
        raise TokenizerError(
            f"{source} has {len(ranks)} entries, expected {BPE_VOCAB_SIZE}; install a dashscope that ships "
            "the Qwen vocabulary: pip install -U dashscope"
        )
    if set(ranks.values()) != set(range(BPE_VOCAB_SIZE)):
        raise TokenizerError(f"{source}: ranks are not exactly 0..{BPE_VOCAB_SIZE - 1}; reinstall dashscope")
    return ranks


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    """{token bytes: rank} from qwen.tiktoken (dashscope's copy unless `path` is given)."""
    path = vocab_path() if path is None else path
    return parse_ranks(path.read_bytes(), source=str(path))
