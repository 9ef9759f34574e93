"""Where qwenkit keeps files it makes: one cache root, overridable with QWENKIT_CACHE_DIR; atomic_write()
for reports and caches, and replaced_on_success() for writers that need a file name (GGUF writers,
llama.cpp's quantizer): a reader never sees a half-written file.

Every function takes the environment explicitly (defaulting to os.environ) so tests never touch the
user's real cache: no hidden globals.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import platformdirs

CACHE_ENV = "QWENKIT_CACHE_DIR"


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """The qwenkit cache directory (not created)."""
    env = os.environ if env is None else env
    override = env.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("qwenkit"))


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to path via a temp file in the same folder and a rename; the folder is
    created, the file gets ordinary permissions (mkstemp's are private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replaced_on_success(path: Path) -> Iterator[Path]:
    """A temp path beside `path` (its folder created) for a writer that needs a file name: renamed to `path`
    when the block ends without an error, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
