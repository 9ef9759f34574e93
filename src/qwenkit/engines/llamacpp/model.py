"""A loaded GGUF model and its llama.cpp context: vocab, KV memory, per-sequence state and one decode call.

Contract: LlamaModel owns the native model, context and batch and frees them on close(); everything else
in the engine talks to llama.cpp only through it (load_model() and context_params() are shared with the
embedding context, embedder.py). Not thread-safe: the engine's loop thread alone uses it.
`recurrent` is true when the memory holds a recurrent state (Mamba-like or hybrid, e.g. Qwen3.5's Gated
DeltaNet layers): such a sequence cannot be cut back to a prefix (seq_rm then returns False), only saved
whole (state_get) and put back (state_set). LoRA adapters load onto the model (load_lora) and apply
to the whole context (set_loras), so one decode runs under one set of adapters. Decode runs on a ggml
thread pool at config.poll's polling level ("auto" measured at open, see threads.py), created with the
context and freed with it. On a llama.cpp build with ggml's AMX kernels (they crash) weights load without
extra buffer types (model_params), and a warning names the rebuild that restores full speed. With
config.huge_pages the memory llama.cpp allocated for model and context goes onto huge pages (hugepages.py).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from qwenkit.engines.llamacpp import hugepages, threads
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.request import EngineError
from qwenkit.gguf.reader import read_gguf_info

log = logging.getLogger("qwenkit.engine")
_RECENT_LOG: list[str] = []


@llama_cpp.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp logs every load detail to stderr; keep the last lines for error messages instead.
    _RECENT_LOG.append(text.decode("utf-8", "replace"))
    del _RECENT_LOG[:-20]


def recent_log() -> str:
    """The last lines llama.cpp logged (for error messages)."""
    return "".join(_RECENT_LOG).strip()


def last_logged() -> str:
    """llama.cpp's last log line, or "no details"."""
    return (recent_log().splitlines()[-1:] or ["no details"])[0].strip()


# llama_get_logits_ith returning the plain address (the binding's float pointer costs a cast per call).
_LOGITS_ITH = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)
_MAX_LOGITS_VIEWS = 4096

_KV_TYPES = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}


# ggml's AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat at the first decode) in the builds pip makes
# with -march=native on Sapphire Rapids and later CPUs (llama.cpp #20824; seen on this project's machines).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # after -march=native, still no AMX
AMX_REBUILD = (
    f"CMAKE_ARGS=\"-DCMAKE_C_FLAGS='{NO_AMX_FLAGS}' -DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'\" "
    "pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python==0.3.36"
)


def has_amx(system_info: str | None = None) -> bool:
    """Whether llama.cpp was compiled with its AMX kernels (its system info; default: the loaded build's)."""
    if system_info is None:
        system_info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return "AMX_INT8 = 1" in system_info


def model_params(system_info: str | None = None) -> llama_cpp.llama_model_params:
    """llama.cpp's default model parameters, except on an AMX build: there no weight goes to an extra buffer
    type (AMX, and with it the AVX weight repacking: measured -30 % prefill, -7 % decode), so it runs."""
    mparams = llama_cpp.llama_model_default_params()
    if has_amx(system_info):
        mparams.use_extra_bufts = False
        _warn_amx()
    return mparams


@functools.cache
def _warn_amx() -> None:
    log.warning(
        "this llama-cpp-python build has ggml's AMX kernels, which crash: running without weight repacking "
        "(slower); for full speed rebuild it without AMX: %s",
        AMX_REBUILD,
    )


def load_model(gguf_path: Path) -> llama_cpp.llama_model_p:
    """llama.cpp's model for a GGUF (logging kept quiet); EngineError naming the fix when it will not load."""
    llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), model_params())
    if not model:
        raise EngineError(
            f"llama.cpp could not load {gguf_path} ({last_logged()}); re-create it with `qwenkit convert`"
        )
    return model


def context_params(config: EngineConfig, n_ctx: int, n_batch: int) -> llama_cpp.llama_context_params:
    """Context parameters from an EngineConfig: sizes, threads, KV type, and flash attention as configured
    (None: llama.cpp's auto, which turns it on where the backend has the kernel)."""
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = min(config.n_ubatch, n_batch)
    cparams.n_seq_max = config.max_seqs
    cparams.n_threads = config.threads
    cparams.n_threads_batch = config.threads
    cparams.type_k = _KV_TYPES[config.kv_type]
    cparams.type_v = _KV_TYPES[config.kv_type]
    cparams.flash_attn_type = {
        None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[config.flash_attn]
    cparams.no_perf = True
    return cparams


class TokenBatch:
    """A llama_batch of up to `size` token entries, each in one sequence, filled through numpy views of its
    arrays (bulk copies, not five ctypes lookups per token); free() releases it."""

    def __init__(self, size: int) -> None:
        self.batch = llama_cpp.llama_batch_init(size, 0, 1)
        b = self.batch
        self._token = np.ctypeslib.as_array(b.token, shape=(size,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(size,))
        self._logits = np.ctypeslib.as_array(b.logits, shape=(size,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(size,))[:] = 1
        self._seq = [b.seq_id[i] for i in range(size)]  # each entry's one sequence-id cell

    def fill(
        self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int], wants: Sequence[bool]
    ) -> llama_cpp.llama_batch:
        n = len(tokens)
        self._token[:n] = tokens
        self._pos[:n] = positions
        self._logits[:n] = wants
        cells = self._seq
        for i in range(n):
            cells[i][0] = seq_ids[i]
        self.batch.n_tokens = n
        return self.batch

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.batch)


class LlamaModel:
    def __init__(self, gguf_path: Path, config: EngineConfig) -> None:
        self.info = read_gguf_info(gguf_path)  # clear errors for non-GGUF, truncated or non-Qwen files
        before = hugepages.anonymous_regions() if config.huge_pages else set()
        self._model = load_model(gguf_path)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        cparams = context_params(config, config.n_ctx, config.n_batch)
        cparams.kv_unified = config.kv_unified
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineError(
                f"llama.cpp could not create a context of {config.n_ctx} tokens: {last_logged()} (if memory "
                "ran out: lower --ctx)"
            )
        advised = hugepages.advise_new_regions(before) if config.huge_pages else []
        self.huge_pages = hugepages.Collapser(advised).start()
        self.poll = threads.resolve_poll(config.poll, config.threads)[0]
        self._pool = self._attach_pool(config.threads, self.poll)
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self._ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._logits_row = ctypes.c_float * self.n_vocab  # one array type for every logits view
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.recurrent = bool(
            llama_cpp.llama_model_is_recurrent(self._model) or llama_cpp.llama_model_is_hybrid(self._model)
        )
        # llama.cpp clamps n_batch to n_ctx (and n_ubatch to n_batch): plan steps by what it kept.
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)
        self.n_ubatch = llama_cpp.llama_n_ubatch(self._ctx)
        self._batch = TokenBatch(self.n_batch)
        self._logits_at = _LOGITS_ITH(ctypes.cast(llama_cpp.llama_get_logits_ith, ctypes.c_void_p).value)
        self._logits_views: dict[int, np.ndarray] = {}
        self._pieces: dict[int, bytes] = {}
        self._plain_pieces: dict[int, bytes] = {}
        self._eog_ids: tuple[int, ...] | None = None
        self._closed = False

    def set_threads(self, n_threads: int) -> None:
        """Decode on n_threads from the next call on (at most the pool's size)."""
        llama_cpp.llama_set_n_threads(self._ctx, n_threads, n_threads)

    def _attach_pool(self, n_threads: int, poll: int) -> threads.ThreadPool | None:
        """A thread pool at this polling level for the context; None (llama.cpp's own) if ggml refuses."""
        if threads.uses_openmp() and not threads.prepare_openmp(poll):
            threads.log.warning(
                "poll %d cannot apply: llama.cpp's OpenMP workers were set up when it loaded; start the "
                "process with %s",
                poll,
                " ".join(f"{k}={v}" for k, v in threads.openmp_env(poll).items()),
            )
        try:
            pool = threads.ThreadPool(n_threads, poll)
        except RuntimeError as exc:
            threads.log.warning("%s; decoding with llama.cpp's default threads", exc)
            return None
        pool.attach(self._ctx)
        return pool

    # vocab
    def tokenize(self, text: str, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, False, parse_special)
        if n < 0:
            raise EngineError("text too long to tokenize")
        return list(buf[:n])

    def piece(self, token: int, special: bool = True) -> bytes:
        """The bytes a token stands for. special=False renders control tokens (e.g. <|im_end|>) as b"";
        added tokens that are not control tokens (<think>, <tool_call>) keep their text either way."""
        cache = self._pieces if special else self._plain_pieces
        cached = cache.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            cached = cache[token] = buf.raw[:n]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @property
    def eog_ids(self) -> tuple[int, ...]:
        """Every end-of-generation token id (found once, on first use: one call per vocabulary entry)."""
        if self._eog_ids is None:
            self._eog_ids = tuple(t for t in range(self.n_vocab) if self.is_eog(t))
        return self._eog_ids

    def token_id(self, text: str) -> int | None:
        ids = self.tokenize(text, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    # KV memory
    def seq_rm(self, seq_id: int, p0: int = 0, p1: int = -1) -> bool:
        """Drop cells [p0, p1) of a sequence; False (memory untouched) when a recurrent state forbids it."""
        return bool(llama_cpp.llama_memory_seq_rm(self._mem, seq_id, p0, p1))

    def seq_len(self, seq_id: int) -> int:
        """How many positions the sequence holds in memory (its highest position + 1; 0 when empty)."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._mem, seq_id)) + 1

    # per-sequence state (all its KV cells and its recurrent state, if any)
    def state_size(self, seq_id: int) -> int:
        return int(llama_cpp.llama_state_seq_get_size(self._ctx, seq_id))

    def state_get(self, seq_id: int) -> bytes:
        """A copy of one sequence's whole state, restorable into any sequence id with state_set."""
        size = self.state_size(seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, seq_id)
        if n == 0:
            raise EngineError(f"llama.cpp could not save the state of sequence {seq_id}")
        return bytes(memoryview(buf)[:n])

    def state_set(self, seq_id: int, data: bytes) -> bool:
        """Replace a sequence's state with a saved one; False (sequence left empty) when it does not fit."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(data), seq_id) == 0:
            self.seq_rm(seq_id)
            return False
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def clear_memory(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)

    # running
    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int], wants: Sequence[bool]
    ) -> int:
        """One llama_decode over a batch; returns llama.cpp's status (0 ok, 1 no KV room, <0 error)."""
        return llama_cpp.llama_decode(self._ctx, self._batch.fill(tokens, positions, seq_ids, wants))

    def decode_embd(self, rows: np.ndarray, positions: np.ndarray, seq_id: int) -> int:
        """One llama_decode of input embeddings (an image's rows, (n, n_embd_inp) float32) into one sequence
        at positions (sections, n): M-RoPE takes four sections, section-major. No logits. Status as decode."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        pos = np.ascontiguousarray(positions, dtype=np.int32).reshape(-1)
        n = len(rows)
        seq = (llama_cpp.llama_seq_id * 1)(seq_id)
        seq_ptrs = (ctypes.POINTER(llama_cpp.llama_seq_id) * n)(*[seq] * n)
        n_seq = (ctypes.c_int32 * n)(*[1] * n)
        wants = (ctypes.c_int8 * n)()
        batch = llama_cpp.llama_batch(
            n_tokens=n,
            token=None,
            embd=rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            pos=pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=n_seq,
            seq_id=seq_ptrs,
            logits=wants,
        )
        return llama_cpp.llama_decode(self._ctx, batch)

    # LoRA adapters (freed with the model)
    def load_lora(self, path: Path) -> object:
        """Load a LoRA adapter GGUF for this model; EngineError with llama.cpp's reason when it refuses."""
        adapter = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        if not adapter:
            raise EngineError(f"llama.cpp could not load the LoRA adapter {path} ({last_logged()})")
        return adapter

    def set_loras(self, adapters: Sequence[object], scale: float = 1.0) -> None:
        """The adapters every following decode applies (none: the base model); a no-op when unchanged."""
        n = len(adapters)
        array = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*adapters) if n else None
        scales = (ctypes.c_float * n)(*[scale] * n) if n else None
        llama_cpp.llama_set_adapters_lora(self._ctx, array, n, scales)

    @property
    def ctx(self) -> llama_cpp.llama_context_p:
        return self._ctx

    def logits(self, batch_index: int) -> np.ndarray:
        """A view of the logits llama.cpp produced for one batch position (valid until the next decode)."""
        address = self._logits_at(self._ctx, batch_index)
        if not address:
            raise RuntimeError(f"llama.cpp has no logits for batch position {batch_index}")
        # A view only names an address and n_vocab floats, which llama.cpp guarantees there: reusing the
        # view of an address is safe even after the buffer was reallocated.
        view = self._logits_views.get(address)
        if view is None:
            if len(self._logits_views) >= _MAX_LOGITS_VIEWS:
                self._logits_views.clear()
            view = self._logits_views[address] = np.frombuffer(
                self._logits_row.from_address(address), dtype=np.float32
            )
        return view

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.huge_pages.stop()  # before llama.cpp frees what it collapses
        self._batch.free()
        llama_cpp.llama_free(self._ctx)
        if self._pool is not None:  # after the context: nothing may run on a freed pool
            self._pool.free()
        llama_cpp.llama_model_free(self._model)
