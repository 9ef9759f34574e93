"""A JSON-schema converter that never returns, for the compile time-limit test (imported by the worker)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def stuck_convert(schema_text: str) -> str:
    """Leave this process's id at the path in the schema's description, then hang."""
    Path(json.loads(schema_text)["description"]).write_text(str(os.getpid()))
    time.sleep(3600)
    return ""
