"""Where qwenkit keeps files it makes: one cache root, overridable with QWENKIT_CACHE_DIR.

Every function takes the environment explicitly (defaulting to os.environ) so tests never touch the
user's real cache: no hidden globals.
"""

from __future__ import annotations

import os
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
