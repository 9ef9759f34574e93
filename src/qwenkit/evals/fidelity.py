"""Quantization fidelity: how far each quantized GGUF's next-token distribution is from the float reference.

Contract: run_fidelity(FidelityConfig) tokenizes one text with the reference GGUF's vocabulary, cuts it into
windows of `ctx` tokens and, as llama.cpp's perplexity tool does, decodes each window from an empty KV cache
and scores only its second half (positions ctx/2 .. ctx-2 predict the next token, so every scored token has
at least ctx/2 tokens of context). For every candidate it reports, against the reference on the same tokens,
the KL divergence KL(P_ref || P_cand) per token (mean ± standard error, median, p99, max), top-1 agreement
(same argmax), the mean change of the true token's probability, and each model's perplexity on the text.
Log-softmax runs in float64 numpy. The reference's raw float32 logits are kept in a temporary memory-mapped
file, so a reference compared with itself gives exactly KL 0 and agreement 1. Models are loaded one at a
time through qwenkit's LlamaModel, with explicit threads. Without a text file a deterministic plain-English
text is generated from a seed. Bad input (different vocabularies, a text shorter than one window, a context
larger than the model's) raises FidelityError, a ValueError with a one-line message naming the fix.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwenkit.hardware import physical_cores

__all__ = [
    "FidelityConfig",
    "FidelityError",
    "FidelityReport",
    "VariantFidelity",
    "builtin_text",
    "log_softmax",
    "run_fidelity",
    "score_rows",
]

DEFAULT_CHUNKS = 4
_ROW_BLOCK = 32  # rows of float64 log-probs (32 × 152k × 8 B ≈ 39 MB) handled at once
Progress = Callable[[str, int, int], None]


class FidelityError(ValueError):
    """Input that cannot be scored; the message is one line naming the fix."""


@dataclass(frozen=True)
class FidelityConfig:
    """What to compare: a float reference GGUF, candidate GGUFs, the text and the windowing."""

    reference: Path
    candidates: tuple[Path, ...]
    text: Path | None = None
    ctx: int = 512
    chunks: int | None = None  # windows scored; None: every whole window of --text, DEFAULT_CHUNKS built-in
    threads: int = field(default_factory=physical_cores)
    seed: int = 0
    batch: int = 512

    def __post_init__(self) -> None:
        if self.ctx < 64:
            raise FidelityError(f"--ctx {self.ctx} is too small: use at least 64 tokens per window")
        if self.chunks is not None and self.chunks < 1:
            raise FidelityError(f"--chunks {self.chunks} must be at least 1")
        if self.threads < 1:
            raise FidelityError(f"--threads {self.threads} must be at least 1")


@dataclass(frozen=True)
class VariantFidelity:
    """One GGUF's numbers; for the reference row the KL fields are 0 and agreement 1 by definition."""

    name: str
    path: str
    file_type: str
    size_bytes: int
    is_reference: bool
    tokens: int  # scored tokens
    perplexity: float
    ppl_ratio: float  # perplexity / the reference's
    kl_mean: float
    kl_stderr: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    delta_p_mean: float  # mean of p_cand(true token) - p_ref(true token)
    seconds: float


@dataclass(frozen=True)
class FidelityReport:
    reference: VariantFidelity
    candidates: tuple[VariantFidelity, ...]
    ctx: int
    windows: int
    scored_tokens: int
    text_source: str
    threads: int

    @property
    def variants(self) -> tuple[VariantFidelity, ...]:
        return (self.reference, *self.candidates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ctx": self.ctx,
            "windows": self.windows,
            "scored_tokens": self.scored_tokens,
            "text_source": self.text_source,
            "threads": self.threads,
            "reference": asdict(self.reference),
            "candidates": [asdict(c) for c in self.candidates],
        }

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", "utf-8")
        return path


# ---- the numerics ----------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class _Rows:
    """Per-token values gathered over all windows."""

    nll: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    same: list[np.ndarray] = field(default_factory=list)
    delta_p: list[np.ndarray] = field(default_factory=list)

    def add(self, other: dict[str, np.ndarray]) -> None:
        for key, value in other.items():
            getattr(self, key).append(value)

    def cat(self, key: str) -> np.ndarray:
        parts = getattr(self, key)
        return np.concatenate(parts) if parts else np.zeros(0)


def score_rows(ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row KL(P_ref || P_cand), same-argmax, candidate NLL of the target and Δp of the target."""
    ref_lp, cand_lp = log_softmax(ref_logits), log_softmax(cand_logits)
    ref_p = np.exp(ref_lp)
    rows = np.arange(len(targets))
    # Terms with p_ref == 0 contribute 0 (0 · log 0 → 0); float64 exp underflows only far below 1e-300.
    kl = np.maximum((ref_p * (ref_lp - cand_lp)).sum(axis=-1), 0.0)
    return {
        "nll": -cand_lp[rows, targets],
        "kl": kl,
        "same": ref_logits.argmax(axis=-1) == cand_logits.argmax(axis=-1),
        "delta_p": np.exp(cand_lp[rows, targets]) - ref_p[rows, targets],
    }


# ---- the text --------------------------------------------------------------------------------------
_SUBJECTS = (
    "the farmer", "a young teacher", "the old captain", "my neighbour", "the small company", "a tired doctor",
    "the city council", "our guide", "the baker", "a curious student", "the river", "the engineer",
    "her brother", "the committee", "a quiet musician", "the children", "the new manager", "the gardener",
)  # fmt: skip
_VERBS = (
    "carried", "painted", "repaired", "described", "found", "sold", "opened", "watched", "built", "wrote",
    "remembered", "cleaned", "measured", "followed", "explained", "planted", "borrowed", "discovered",
)  # fmt: skip
_OBJECTS = (
    "a wooden boat", "the long letter", "an empty house", "the morning train", "a bright lamp",
    "the garden wall", "a map of the valley", "the broken clock", "several baskets of apples",
    "the old bridge", "a book about the sea", "the village school", "a heavy coat", "the narrow road",
)  # fmt: skip
_PLACES = (
    "near the harbour", "before the winter", "after the storm", "in the market", "on a cold evening",
    "behind the station", "during the festival", "at the edge of the forest", "in the spring",
    "by the lake", "along the coast", "early in the morning", "under a grey sky", "last summer",
)  # fmt: skip
_LINKS = ("because", "although", "while", "so", "and then", "but", "when", "since")
_OPENERS = ("In the end,", "For a while,", "Later,", "At first,", "Meanwhile,", "Even so,", "That year,")


def builtin_text(seed: int = 0, words: int = 4000) -> str:
    """Deterministic plain English (simple sentences in paragraphs), about `words` words, from `seed`."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    count = 0
    while count < words:
        sentences = []
        for _ in range(rng.randint(3, 7)):
            clause = (
                f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}"
            )
            if rng.random() < 0.5:
                second = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
                clause = f"{clause}, {rng.choice(_LINKS)} {second}"
            if rng.random() < 0.3:
                clause = f"{rng.choice(_OPENERS)} {clause}"
            sentence = clause[0].upper() + clause[1:] + "."
            sentences.append(sentence)
            count += len(sentence.split())
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


# ---- running the models ----------------------------------------------------------------------------
def _open(path: Path, config: FidelityConfig) -> Any:
    from qwenkit.engines.llamacpp.config import EngineConfig
    from qwenkit.engines.llamacpp.model import LlamaModel
    from qwenkit.engines.request import EngineError

    batch = min(config.batch, config.ctx)
    engine_config = EngineConfig(
        n_ctx=config.ctx, max_seqs=1, n_batch=batch, n_ubatch=batch, threads=config.threads, state_cache_mb=0
    )
    try:
        return LlamaModel(path, engine_config)
    except EngineError as exc:
        raise FidelityError(str(exc)) from None


def _window_logits(model: Any, window: Sequence[int], first: int, out: np.ndarray) -> None:
    """Decode one window from an empty cache; copy the logits of positions first .. len-2 into `out`."""
    model.clear_memory()
    last = len(window) - 1
    for start in range(0, len(window), model.n_batch):
        piece = window[start : start + model.n_batch]
        positions = list(range(start, start + len(piece)))
        wants = [first <= p < last for p in positions]
        status = model.decode(piece, positions, [0] * len(piece), wants)
        if status != 0:
            raise FidelityError(f"llama.cpp could not decode a window (status {status}): lower --ctx")
        for j, p in enumerate(positions):
            if wants[j]:
                out[p - first] = model.logits(j)


def _text(config: FidelityConfig, model: Any) -> tuple[str, list[int], str]:
    """The text, its tokens (reference vocabulary) and where it came from."""
    if config.text is not None:
        try:
            text = config.text.read_text("utf-8")
        except UnicodeDecodeError:
            raise FidelityError(f"--text {config.text} is not UTF-8 text: pass a plain-text file") from None
        return text, model.tokenize(text, parse_special=False), str(config.text)
    want = config.ctx * (config.chunks or DEFAULT_CHUNKS)
    words = want
    while True:  # English runs ~1.3 tokens a word; grow until enough
        text = builtin_text(config.seed, words)
        tokens = model.tokenize(text, parse_special=False)
        if len(tokens) >= want:
            return text, tokens, f"built-in English text (seed {config.seed})"
        words *= 2


def _check_scratch(folder: Path, windows: int, window_bytes: int) -> None:
    """Refuse a run whose reference logits would not fit on the scratch disk (a long --text can ask for
    tens of GiB), naming a --chunks that would."""
    free, need = shutil.disk_usage(folder).free, windows * window_bytes
    if need > 0.9 * free:
        fits = max(1, int(0.9 * free // window_bytes))
        raise FidelityError(
            f"the reference logits need {need / 2**30:.1f} GiB of scratch space, {free / 2**30:.1f} GiB "
            f"free in {folder.parent}: pass --chunks {fits} or less, or point TMPDIR at a larger disk"
        )


def _check_pair(reference: Path, candidate: Path) -> None:
    from qwenkit.gguf.reader import read_gguf_info

    ref, cand = read_gguf_info(reference), read_gguf_info(candidate)
    if ref.vocab_size != cand.vocab_size:
        raise FidelityError(
            f"{candidate.name} has a {cand.vocab_size}-token vocabulary, the reference {reference.name} "
            f"{ref.vocab_size}: compare quantizations of the same model"
        )


def _summary(
    path: Path,
    rows: _Rows,
    ref_ppl: float | None,
    is_reference: bool,
    seconds: float,
) -> VariantFidelity:
    from qwenkit.gguf.reader import read_gguf_info

    info = read_gguf_info(path)
    nll, kl, same, dp = rows.cat("nll"), rows.cat("kl"), rows.cat("same"), rows.cat("delta_p")
    ppl = float(math.exp(nll.mean()))
    n = len(nll)
    return VariantFidelity(
        name=path.stem,
        path=str(path),
        file_type=info.file_type_name,
        size_bytes=info.size_bytes,
        is_reference=is_reference,
        tokens=n,
        perplexity=ppl,
        ppl_ratio=ppl / ref_ppl if ref_ppl else 1.0,
        kl_mean=float(kl.mean()),
        kl_stderr=float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        kl_median=float(np.median(kl)),
        kl_p99=float(np.percentile(kl, 99)),
        kl_max=float(kl.max()),
        top1_agreement=float(same.mean()),
        delta_p_mean=float(dp.mean()),
        seconds=seconds,
    )


def run_fidelity(config: FidelityConfig, progress: Progress | None = None) -> FidelityReport:
    """Score every candidate against the reference (see the module docstring)."""
    say = progress or (lambda what, done, total: None)
    for candidate in config.candidates:
        _check_pair(config.reference, candidate)
    started = time.perf_counter()
    ref_model = _open(config.reference, config)
    try:
        if config.ctx > ref_model.n_ctx_train:
            raise FidelityError(
                f"--ctx {config.ctx} exceeds the model's context {ref_model.n_ctx_train}: lower --ctx"
            )
        text, tokens, source = _text(config, ref_model)
        n_windows = len(tokens) // config.ctx
        if n_windows == 0:
            raise FidelityError(
                f"the text has {len(tokens)} tokens, fewer than one window of {config.ctx}: "
                "pass a longer --text or a smaller --ctx"
            )
        if config.chunks is not None:
            n_windows = min(n_windows, config.chunks)
        windows = [tokens[i * config.ctx : (i + 1) * config.ctx] for i in range(n_windows)]
        first = config.ctx // 2
        per_window = config.ctx - 1 - first
        with tempfile.TemporaryDirectory(prefix="qwenkit-fidelity-") as scratch:
            _check_scratch(Path(scratch), n_windows, per_window * ref_model.n_vocab * 4)
            store = np.lib.format.open_memmap(
                Path(scratch) / "reference-logits.npy",
                mode="w+",
                dtype=np.float32,
                shape=(n_windows, per_window, ref_model.n_vocab),
            )
            ref_rows = _Rows()
            for w, window in enumerate(windows):
                say(f"reference {config.reference.name}", w, n_windows)
                _window_logits(ref_model, window, first, store[w])
                targets = np.asarray(window[first + 1 :], dtype=np.int64)
                for b in range(0, per_window, _ROW_BLOCK):
                    block = store[w, b : b + _ROW_BLOCK]
                    ref_rows.add(score_rows(block, block, targets[b : b + _ROW_BLOCK]))
            ref_model.close()
            reference = _summary(config.reference, ref_rows, None, True, time.perf_counter() - started)
            results = [
                _candidate(
                    config, candidate, windows, (text, tokens), store, first, reference.perplexity, say
                )
                for candidate in config.candidates
            ]
    finally:
        ref_model.close()
    return FidelityReport(
        reference=reference,
        candidates=tuple(results),
        ctx=config.ctx,
        windows=n_windows,
        scored_tokens=n_windows * per_window,
        text_source=source,
        threads=config.threads,
    )


def _candidate(
    config: FidelityConfig,
    path: Path,
    windows: list[list[int]],
    text_tokens: tuple[str, list[int]],
    store: np.ndarray,
    first: int,
    ref_ppl: float,
    say: Progress,
) -> VariantFidelity:
    started = time.perf_counter()
    model = _open(path, config)
    try:
        # Same vocabulary size is not enough: the scored tokens must mean the same text to both.
        text, tokens = text_tokens
        if model.tokenize(text, parse_special=False) != tokens:
            raise FidelityError(
                f"{path.name} tokenizes the text differently from the reference: compare quantizations "
                "of the same model"
            )
        per_window = store.shape[1]
        logits = np.empty((per_window, model.n_vocab), dtype=np.float32)
        rows = _Rows()
        for w, window in enumerate(windows):
            say(path.name, w, len(windows))
            _window_logits(model, window, first, logits)
            targets = np.asarray(window[first + 1 :], dtype=np.int64)
            for b in range(0, per_window, _ROW_BLOCK):
                rows.add(
                    score_rows(
                        store[w, b : b + _ROW_BLOCK], logits[b : b + _ROW_BLOCK], targets[b : b + _ROW_BLOCK]
                    )
                )
    finally:
        model.close()
    return _summary(path, rows, ref_ppl, False, time.perf_counter() - started)
