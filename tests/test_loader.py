"""Opening models for the engine: HF checkpoints converted once (cached), GGUF files with their tokenizer."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from qwenkit.chat.flavor import Flavor
from qwenkit.checkpoints.resolve import resolve_model
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.loader import prepare_files
from qwenkit.tokenizer.specials import ADDED_TOKENS
from qwenkit.tokenizer.tokenizer import QwenTokenizer

SAMPLES = [
    "Hello <think> world <|im_end|>",
    "你好，世界 🎉👩‍💻",
    "def f(x):\n\treturn x**2  # ok",
    "Привет, мир!",
    "مرحبا",
]


def _random_text(rng: random.Random) -> str:
    pool = "abc XYZ 012 你好 мир مرحبا 🎉 \n\t<|>/{}[]'s 'LL"
    return "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))


@pytest.mark.parametrize(("arch", "flavor"), [("qwen3", Flavor.QWEN3), ("qwen2", Flavor.QWEN2_5)])
def test_gguf_brings_the_same_tokenizer(
    arch: str, flavor: Flavor, demo_checkpoint: Callable[..., Path], demo_gguf: Callable[..., Path]
) -> None:
    files = prepare_files(resolve_model(str(demo_gguf(arch, "tiny", "q8_0"))))
    ref = QwenTokenizer.from_dir(demo_checkpoint(arch, "tiny"))
    assert files.flavor is flavor and not files.is_demo
    rng = random.Random(0)
    for text in SAMPLES + [_random_text(rng) for _ in range(200)]:
        assert files.tokenizer.encode(text) == ref.encode(text)
        assert files.tokenizer.encode_text(text) == ref.encode_text(text)
    for token in ADDED_TOKENS:
        assert files.tokenizer.special_id(token.content) == token.id
    assert files.tokenizer.special_token_ids == ref.special_token_ids
    assert files.tokenizer.eos_token_id == ref.eos_token_id


def test_hf_checkpoint_is_converted_once(demo_checkpoint: Callable[..., Path]) -> None:
    resolved = resolve_model(str(demo_checkpoint("qwen3", "tiny")))
    first = prepare_files(resolved, "q8_0")
    stamp = first.gguf_path.stat().st_mtime_ns
    second = prepare_files(resolved, "q8_0")
    assert second.gguf_path == first.gguf_path and second.gguf_path.stat().st_mtime_ns == stamp
    assert first.is_demo and first.flavor is Flavor.QWEN3


def test_engine_refuses_broken_gguf_files(tmp_path: Path, demo_gguf: Callable[..., Path]) -> None:
    data = demo_gguf("qwen3", "tiny", "q8_0").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + data[4:1000])
    for path in (truncated, not_gguf):
        with pytest.raises(ValueError) as err:
            LlamaCppEngine(path, EngineConfig(n_ctx=256, max_seqs=1, threads=2))
        assert "\n" not in str(err.value) and str(path.name) in str(err.value)


def test_context_sized_from_the_request_mix() -> None:
    config = EngineConfig.for_workload(max_seqs=8, tokens_per_seq=1000, n_ctx_train=40960)
    assert config.n_ctx == 8192 and config.max_seqs == 8
    capped = EngineConfig.for_workload(max_seqs=2, tokens_per_seq=100_000, n_ctx_train=32768)
    assert capped.n_ctx == 65536
