"""Where qwenkit keeps files it makes: one cache root, overridable with QWENKIT_CACHE_DIR; atomic_write()
for reports and caches (a reader never sees a half-written file).

Every function takes the environment explicitly (defaulting to os.environ) so tests never touch the
user's real cache: no hidden globals.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
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
