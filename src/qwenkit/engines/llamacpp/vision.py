"""Images through llama.cpp's multimodal library (mtmd): a projector GGUF ("mmproj") beside a text model.

Contract: VisionEncoder(mmproj, model) opens an mtmd context on a LlamaModel's native model (CPU, explicit
threads) and frees it on close(). encode_image() runs the vision tower on one image (raw RGB array or
encoded PNG/JPEG bytes) and returns its embeddings, one row per image token, exactly as llama.cpp feeds
them to the text model. tokenize() splits a prompt holding `marker` placeholders into text and image chunks;
eval_chunks() evaluates them (text decoded, images encoded then decoded) into one sequence of the model's
context and returns the next position. Chunks.cache_key() spells a prompt for prefix reuse: text ids and,
per image, a sha256 of its decoded pixels (so a repeated image matches whatever its encoding). Bad images
and mtmd failures raise VisionError with a one-line message.
For the engine: prepare() preprocesses one image into a PreparedImage (token count, positions it takes);
encode_prepared() runs the vision tower on it; EncodeWorker runs those encodes on a thread of its own so the
engine's loop keeps decoding meanwhile. Threads: prepare() may run on any thread (it only reads the
context, as llama-server's HTTP threads do); encodes run on one thread at a time (the worker's).
"""

from __future__ import annotations

import ctypes
import hashlib
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp

from qwenkit.engines.llamacpp.model import LlamaModel, _quiet_log
from qwenkit.engines.request import EngineError

__all__ = ["EncodeWorker", "ImageChunk", "PreparedImage", "VisionEncoder", "VisionError"]

_TEXT, _IMAGE = 0, 1  # mtmd_input_chunk_type: MTMD_INPUT_CHUNK_TYPE_TEXT, _IMAGE


class VisionError(EngineError):
    """An image could not be read or encoded; the message is one line naming the fix."""


@dataclass(frozen=True)
class ImageChunk:
    """One image's place in a tokenized prompt: its token count and merged-patch grid."""

    n_tokens: int
    nx: int
    ny: int


class Chunks:
    """mtmd's tokenized prompt (owned; freed on close)."""

    def __init__(self, handle: mtmd_cpp.mtmd_input_chunks_p) -> None:
        self._handle = handle

    def __len__(self) -> int:
        return int(mtmd_cpp.mtmd_input_chunks_size(self._handle))

    @property
    def handle(self) -> mtmd_cpp.mtmd_input_chunks_p:
        return self._handle

    @property
    def n_tokens(self) -> int:
        return int(mtmd_cpp.mtmd_helper_get_n_tokens(self._handle))

    @property
    def n_pos(self) -> int:
        return int(mtmd_cpp.mtmd_helper_get_n_pos(self._handle))

    def images(self) -> list[ImageChunk]:
        found = []
        for i in range(len(self)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(self._handle, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == _IMAGE:
                tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_image(chunk)
                found.append(
                    ImageChunk(
                        int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)),
                        int(mtmd_cpp.mtmd_image_tokens_get_nx(tokens)),
                        int(mtmd_cpp.mtmd_image_tokens_get_ny(tokens)),
                    )
                )
        return found

    def cache_key(self) -> tuple[int | str, ...]:
        """The prompt for prefix matching: text token ids, and for each image the hash of its pixels."""
        key: list[int | str] = []
        for i in range(len(self)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(self._handle, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == _TEXT:
                n = ctypes.c_size_t(0)
                tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                key.extend(tokens[k] for k in range(n.value))
            else:
                key.append((mtmd_cpp.mtmd_input_chunk_get_id(chunk) or b"").decode())
        return tuple(key)

    def token_ids(self, image_token: int) -> list[int]:
        """The prompt as token ids, each image chunk spelled as its count of `image_token` (<|image_pad|>)."""
        ids: list[int] = []
        for i in range(len(self)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(self._handle, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == _TEXT:
                n = ctypes.c_size_t(0)
                tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                ids.extend(tokens[k] for k in range(n.value))
            else:
                ids.extend([image_token] * int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)))
        return ids

    def close(self) -> None:
        if self._handle:
            mtmd_cpp.mtmd_input_chunks_free(self._handle)
            self._handle = None


class PreparedImage:
    """One preprocessed image, ready to encode: an owned mtmd image chunk (freed on close; idempotent)."""

    def __init__(self, chunk: mtmd_cpp.mtmd_input_chunk_p) -> None:
        self._chunk = chunk
        tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_image(chunk)
        self.n_tokens = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
        self.n_pos = int(mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk))
        self.nx = int(mtmd_cpp.mtmd_image_tokens_get_nx(tokens))
        self.ny = int(mtmd_cpp.mtmd_image_tokens_get_ny(tokens))

    @property
    def handle(self) -> mtmd_cpp.mtmd_input_chunk_p:
        return self._chunk

    def copy(self) -> PreparedImage:
        """An independent copy (the encode thread frees its own while the engine may free the original)."""
        return PreparedImage(mtmd_cpp.mtmd_input_chunk_copy(self._chunk))

    def close(self) -> None:
        if self._chunk:
            mtmd_cpp.mtmd_input_chunk_free(self._chunk)
            self._chunk = None

    __del__ = close  # a request refused after preprocessing drops its images without closing them


class VisionEncoder:
    """An mtmd context: the mmproj's vision tower bound to `model`'s text model."""

    def __init__(
        self,
        mmproj: Path,
        model: LlamaModel,
        threads: int = 2,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        mmproj = Path(mmproj)
        if not mmproj.is_file():
            raise VisionError(f"no mmproj file at {mmproj}: pass --mmproj FILE or convert the checkpoint")
        # mtmd logs every image's preprocessing to stderr: keep it with llama.cpp's recent log instead.
        mtmd_cpp.mtmd_helper_log_set(_quiet_log, ctypes.c_void_p(0))
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False  # the warmup encodes a 1472x1472 dummy image: seconds on a small CPU
        # llama.cpp resizes Qwen images to 8..4096 tokens; the hub processors' min/max pixels differ (see
        # processor_token_limits), so callers that want transformers' sizes pass them here.
        params.image_min_tokens = min_tokens or 0
        params.image_max_tokens = max_tokens or 0
        # LlamaModel keeps the native model private; mtmd needs it to match the projector to the text model.
        self._model = model
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), model._model, params)
        if not self._ctx:
            raise VisionError(
                f"llama.cpp could not load the projector {mmproj}: pass the mmproj made for this model"
            )
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            self.close()
            raise VisionError(f"{mmproj} has no vision encoder: pass a vision mmproj")
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        self.n_embd = int(llama_cpp.llama_model_n_embd_inp(model._model))
        # A text model without M-RoPE takes an image's tokens at consecutive positions, one per token.
        self.mrope = llama_cpp.llama_model_rope_type(model._model) in (
            llama_cpp.LLAMA_ROPE_TYPE_MROPE,
            llama_cpp.LLAMA_ROPE_TYPE_IMROPE,
        )
        self.encodes = 0  # vision-tower runs so far (prefix reuse shows as runs not made)
        self._prepare_lock = threading.Lock()

    def _bitmap(self, image: np.ndarray | bytes) -> mtmd_cpp.mtmd_bitmap_p:
        if isinstance(image, bytes):
            buf = (ctypes.c_uint8 * len(image)).from_buffer_copy(image)
            bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(self._ctx, buf, len(image), False)
            if not bitmap:
                raise VisionError("the image could not be decoded: send a PNG, JPEG, BMP or GIF file")
        else:
            rgb = np.ascontiguousarray(image, dtype=np.uint8)
            if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
                raise VisionError(f"an RGB image must be an (height, width, 3) uint8 array, not {rgb.shape}")
            height, width = rgb.shape[:2]
            buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
            bitmap = mtmd_cpp.mtmd_bitmap_init(width, height, buf)
        # The id names the image chunk (Chunks.cache_key): a hash of the decoded pixels and size, so the same
        # picture sent again (as PNG, JPEG or pixels) keys the same prefix and need not be re-encoded.
        data = mtmd_cpp.mtmd_bitmap_get_data(bitmap)
        n_bytes = int(mtmd_cpp.mtmd_bitmap_get_n_bytes(bitmap))
        digest = hashlib.sha256(
            f"{mtmd_cpp.mtmd_bitmap_get_nx(bitmap)}x{mtmd_cpp.mtmd_bitmap_get_ny(bitmap)}:".encode()
        )
        digest.update(ctypes.string_at(data, n_bytes))
        mtmd_cpp.mtmd_bitmap_set_id(bitmap, digest.hexdigest().encode())
        return bitmap

    def tokenize(self, prompt: str, images: Sequence[np.ndarray | bytes]) -> Chunks:
        """Split `prompt` at each `self.marker` into text and image chunks (one image per marker)."""
        if prompt.count(self.marker) != len(images):
            raise VisionError(
                f"the prompt has {prompt.count(self.marker)} image marker(s) but {len(images)} image(s)"
            )
        bitmaps = [self._bitmap(image) for image in images]
        chunks = Chunks(mtmd_cpp.mtmd_input_chunks_init())
        try:
            data = prompt.encode()
            text = mtmd_cpp.mtmd_input_text(
                text=data, text_len=len(data), add_special=False, parse_special=True
            )
            array = (mtmd_cpp.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = mtmd_cpp.mtmd_tokenize(self._ctx, chunks.handle, ctypes.byref(text), array, len(bitmaps))
            if rc != 0:
                # 2: the image preprocessing failed (e.g. too small for the patch grid).
                raise VisionError(
                    f"llama.cpp could not tokenize the images (code {rc}): check the image sizes"
                )
        except BaseException:
            chunks.close()
            raise
        finally:
            for bitmap in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bitmap)
        return chunks

    def encode_image(self, image: np.ndarray | bytes) -> np.ndarray:
        """The vision tower's output for one image: (image tokens, n_embd) float32, a copy."""
        prepared = self.prepare(image)
        try:
            return self.encode_prepared(prepared)
        finally:
            prepared.close()

    def prepare(self, image: np.ndarray | bytes) -> PreparedImage:
        """Preprocess (resize, patch) one image; the caller closes the result."""
        with self._prepare_lock:
            chunks = self.tokenize(self.marker, [image])
        try:
            for i in range(len(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks.handle, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == _IMAGE:
                    return PreparedImage(mtmd_cpp.mtmd_input_chunk_copy(chunk))
        finally:
            chunks.close()
        raise VisionError("llama.cpp produced no image chunk for the image")

    def encode_prepared(self, prepared: PreparedImage) -> np.ndarray:
        """Run the vision tower: (prepared.n_tokens, n_embd) float32 rows, a copy."""
        if mtmd_cpp.mtmd_encode_chunk(self._ctx, prepared.handle) != 0:
            raise VisionError("llama.cpp failed to encode the image: see the log")
        self.encodes += 1
        out = mtmd_cpp.mtmd_get_output_embd(self._ctx)
        n = prepared.n_tokens
        return np.ctypeslib.as_array(out, shape=(n * self.n_embd,)).reshape(n, -1).copy()

    def n_pos(self, prepared: PreparedImage) -> int:
        """Positions the image advances the sequence by (M-RoPE: max(nx, ny); else one per token)."""
        return prepared.n_pos if self.mrope else prepared.n_tokens

    def positions(self, prepared: PreparedImage, pos_0: int) -> np.ndarray:
        """llama_pos of each image token from pos_0, shape (sections, n_tokens): M-RoPE's four (t, y, x, z)
        in the order mtmd's own decode lays them out; else one row of consecutive positions."""
        n = prepared.n_tokens
        if not self.mrope:
            return np.arange(pos_0, pos_0 + n, dtype=np.int32).reshape(1, n)
        out = (mtmd_cpp.mtmd_decoder_pos * n)()
        tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_image(prepared.handle)
        mtmd_cpp.mtmd_helper_image_get_decoder_pos(tokens, pos_0, out)
        grid = np.frombuffer(out, dtype=np.uint32).reshape(n, 4)  # fields t, x, y, z
        return np.ascontiguousarray(grid[:, [0, 2, 1, 3]].T.astype(np.int32))

    def eval_chunks(
        self, chunks: Chunks, n_past: int, seq_id: int, n_batch: int, logits_last: bool = True
    ) -> int:
        """Decode `chunks` into sequence `seq_id` from position `n_past`; returns the next position."""
        new_n_past = llama_cpp.llama_pos(0)
        rc = mtmd_cpp.mtmd_helper_eval_chunks(
            self._ctx,
            self._model.ctx,
            chunks.handle,
            n_past,
            seq_id,
            n_batch,
            logits_last,
            ctypes.byref(new_n_past),
        )
        if rc != 0:
            raise VisionError(
                f"llama.cpp failed to evaluate the prompt's images (code {rc}): lower the image count"
            )
        return int(new_n_past.value)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            mtmd_cpp.mtmd_free(self._ctx)
            self._ctx = None


EncodeDone = Callable[[object, "np.ndarray | BaseException"], None]


class EncodeWorker:
    """Runs vision-tower encodes one at a time on its own thread; done(tag, rows or error) is called there.

    submit() hands over a PreparedImage the worker owns (and frees); the engine keeps decoding other
    sequences while an image encodes, so an encode stalls no stream. close() finishes the job in hand and
    drops the queued ones (their done is not called)."""

    def __init__(self, encoder: VisionEncoder, done: EncodeDone) -> None:
        self._encoder = encoder
        self._done = done
        self._jobs: queue.SimpleQueue[tuple[object, PreparedImage] | None] = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="qwenkit-vision", daemon=True)
        self._thread.start()

    def submit(self, tag: object, prepared: PreparedImage) -> None:
        self._jobs.put((tag, prepared))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            tag, prepared = job
            if self._closing:
                prepared.close()
                continue
            try:
                result: np.ndarray | BaseException = self._encoder.encode_prepared(prepared)
            except Exception as exc:  # reported to the engine, which fails that one request
                result = exc
            finally:
                prepared.close()
            self._done(tag, result)

    def close(self) -> None:
        self._closing = True
        self._jobs.put(None)
        self._thread.join()
