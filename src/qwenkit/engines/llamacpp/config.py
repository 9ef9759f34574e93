"""Engine configuration: context and batch sizes, threads, KV dtype, sized from the expected request mix.

Contract: EngineConfig is validated and immutable; for_workload() picks n_ctx from how many sequences run
at once and how long each may get, so a user states the workload rather than llama.cpp's knobs.
state_cache_mb bounds the host memory kept for saved sequence states (see state_cache.py). loras names
the LoRA adapter GGUFs a request may select (see adapters.py); mmproj the vision projector (vision.py).
poll is how long idle worker threads spin before sleeping (llama.cpp's --poll, 0-100) or "auto"
(see threads.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qwenkit.hardware import physical_cores

KVType = Literal["f32", "f16", "q8_0"]
# A LoRA adapter's name, as requests give it ("model": "MODEL:name").
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n_ctx: int = Field(default=4096, ge=64, description="KV cells in all; n_ctx / max_seqs per sequence")
    max_seqs: int = Field(default=8, ge=1, le=256, description="sequences decoded together")
    # llama.cpp's defaults. A burst of prompts at an idle engine goes in one call, as llama-server does: 16
    # prompts of 64 tokens in one step rather than three keep the streams in step (peers.py, 16 streams,
    # 0.5B q4_0, 2 threads: TTFT max 3.90 / 3.91 s vs llama-server's 4.11 / 3.97 s; at 512 it was above).
    # Beside running streams a step takes at most one ubatch of prompt: llama.cpp computes a call in
    # ubatches anyway, and each step gives each stream a token.
    n_batch: int = Field(default=2048, ge=16, description="tokens per llama_decode call at most")
    n_ubatch: int = Field(
        default=512,
        ge=16,
        description="tokens computed at once; the most prompt tokens a step takes beside decodes",
    )
    threads: int = Field(default_factory=physical_cores, ge=1)
    adapt_threads: bool = Field(
        default=False,
        description="decode on fewer threads (down to 1) while other processes keep the cores busy, and on "
        "`threads` again once they stop (threads.ThreadGovernor)",
    )
    kv_type: KVType = "f16"
    # None: llama.cpp's auto (on where the backend has the kernel, as in llama-server); measured on 2 CPU
    # cores, 0.5B q4_0: decode 4% (1 stream) to 10% (16) and prompts 15-20% faster than with it off.
    flash_attn: bool | None = None
    huge_pages: bool = Field(
        default=True,
        description="back llama.cpp's weights and buffers with transparent huge pages (Linux; hugepages.py)",
    )
    prefill_chunk: int | None = Field(
        default=None, ge=8, description="prompt tokens per step while others decode; None = adaptive"
    )
    prefix_cache: bool = True
    state_cache_mb: int = Field(
        default=1024,
        ge=0,
        description="host memory for saved sequence states (turn-boundary snapshots, spilled prefix caches), "
        "least recently used dropped first; 0 = off",
    )
    # One shared pool lets sequences differ in length, but every token then attends over every cell.
    kv_unified: bool = False
    loras: dict[str, Path] = Field(
        default_factory=dict, description="LoRA adapter GGUFs by name, loaded at start, chosen per request"
    )
    mmproj: Path | None = Field(
        default=None, description="vision projector GGUF (llama.cpp's mmproj): images in prompts; None: text"
    )
    max_waiting: int = Field(default=256, ge=0)
    poll: int | Literal["auto"] = Field(
        default=50,
        description="worker polling level 0-100 (llama.cpp's --poll; 0: sleep at once, for machines with "
        "other CPU load) or 'auto': 0 when other processes load the cores at start, else 50",
    )

    @field_validator("loras")
    @classmethod
    def _adapter_names(cls, loras: dict[str, Path]) -> dict[str, Path]:
        for name in loras:
            if not ADAPTER_NAME.fullmatch(name):
                raise ValueError(
                    f"adapter name {name!r}: use letters, digits, '_', '.' or '-' (at most 64 characters)"
                )
        return loras

    @field_validator("poll", mode="before")
    @classmethod
    def _poll_level(cls, value: object) -> object:
        if isinstance(value, bool) or (isinstance(value, int) and not 0 <= value <= 100):
            raise ValueError("poll must be 0..100 or 'auto'")
        return value

    @model_validator(mode="after")
    def _quantized_v_needs_flash_attention(self) -> EngineConfig:
        if self.kv_type == "q8_0" and self.flash_attn is False:
            raise ValueError("a q8_0 KV cache needs flash attention (llama.cpp quantizes V only with it)")
        return self

    @classmethod
    def for_workload(
        cls, max_seqs: int, tokens_per_seq: int, n_ctx_train: int | None = None, **overrides: object
    ) -> EngineConfig:
        """n_ctx = max_seqs × tokens_per_seq (rounded up to 256), each sequence capped at n_ctx_train."""
        per_seq = min(tokens_per_seq, n_ctx_train) if n_ctx_train else tokens_per_seq
        n_ctx = -(-(max_seqs * per_seq) // 256) * 256
        return cls(n_ctx=n_ctx, max_seqs=max_seqs, **overrides)  # type: ignore[arg-type]
