"""Shared fixtures: one private qwenkit cache for the test session, demo checkpoints and their GGUFs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Tests never read or write the user's real cache.
    if "QWENKIT_TEST_CACHE" not in os.environ:
        root = Path(config.rootpath) / ".pytest_cache" / "qwenkit-cache"
        root.mkdir(parents=True, exist_ok=True)
        os.environ["QWENKIT_TEST_CACHE"] = str(root)
    os.environ["QWENKIT_CACHE_DIR"] = os.environ["QWENKIT_TEST_CACHE"]
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """demo_checkpoint(arch, size) → a demo checkpoint dir, created once per session."""
    from qwenkit.checkpoints.demo import DemoArch, DemoSize, create_demo

    made: dict[tuple[str, str], Path] = {}

    def get(arch: str = "qwen3", size: str = "tiny") -> Path:
        if (arch, size) not in made:
            out = tmp_path_factory.mktemp("demo") / f"{arch}-{size}"
            made[(arch, size)] = create_demo(out, arch=DemoArch(arch), size=DemoSize(size))
        return made[(arch, size)]

    return get


@pytest.fixture(scope="session")
def demo_gguf(
    demo_checkpoint: Callable[[str, str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str, str], Path]:
    """demo_gguf(arch, size, outtype) → the demo checkpoint converted to GGUF, once per session."""
    from qwenkit.gguf.convert import convert_to_gguf

    made: dict[tuple[str, str, str], Path] = {}

    def get(arch: str = "qwen3", size: str = "tiny", outtype: str = "f32") -> Path:
        key = (arch, size, outtype)
        if key not in made:
            out = tmp_path_factory.mktemp("gguf") / f"{arch}-{size}-{outtype}.gguf"
            made[key] = convert_to_gguf(demo_checkpoint(arch, size), out, outtype)  # type: ignore[arg-type]
        return made[key]

    return get
