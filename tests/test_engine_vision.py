"""Images in the llama.cpp engine, on the tiny demos: Qwen3.5 (hybrid, M-RoPE) with its own projector, and
the qwen2 text stack with the Qwen2.5-VL projector (attention-only KV cache, consecutive image positions).

Reference: llama.cpp's own multimodal path (VisionEncoder.tokenize + eval_chunks, i.e. mtmd's helper) on a
separate model; the engine must give the same next-token distribution and the same greedy tokens. Logprob
tolerance 1e-4: the engine feeds the same rows at the same positions (measured difference 0.0, bit-equal),
while another image moves the random demo's nearly flat distribution by ~1e-2 (the negative control).
Reuse is checked through TokenEvent.cached_tokens and the engine's count of vision-tower runs (also in its
stats and /metrics).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from qwenkit.catalog.shape import VisionTower
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.llamacpp.image_tokens import image_boundary, image_keys, position_after
from qwenkit.engines.llamacpp.model import LlamaModel, recent_log
from qwenkit.engines.llamacpp.vision import VisionEncoder
from qwenkit.engines.request import EngineError, GenerationRequest, ImageInput, RequestTooLong, TokenEvent
from qwenkit.engines.sampling import SamplingParams
from qwenkit.gguf.mmproj import convert_mmproj
from qwenkit.media import VisionSpec, prepare_image
from qwenkit.serve.metrics import ServeMetrics

PAD = "<|vision_start|><|image_pad|><|vision_end|>"
TURN = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# (text GGUF, projector checkpoint): the qwen2 demo's width is the Qwen2.5-VL demo projector's output.
MODELS = {
    "hybrid": (("qwen3_5", "tiny", "f32"), "qwen3_5"),
    "attention": (("qwen2", "tiny", "f32"), "qwen2_5_vl"),
}
LOGPROB_TOL = 1e-4


def _image(height: int = 256, width: int = 320, seed: int = 1) -> ImageInput:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return ImageInput(pixels, hashlib.sha256(pixels.tobytes()).hexdigest())


@pytest.fixture(scope="module")
def files(
    demo_checkpoint: Callable[..., Path],
    demo_gguf: Callable[..., Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[Path, Path]]:
    """files(kind) → (text GGUF, mmproj GGUF), converted once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            text, vl = MODELS[kind]
            out = tmp_path_factory.mktemp("mmproj") / f"{vl}.gguf"
            made[kind] = (demo_gguf(*text), convert_mmproj(demo_checkpoint(vl), out, "f32"))
        return made[kind]

    return get


@pytest.fixture
def engine(files: Callable[[str], tuple[Path, Path]]) -> Iterator[Callable[..., LlamaCppEngine]]:
    """engine(kind, **config) → an engine with that model's projector (closed after the test)."""
    opened: list[LlamaCppEngine] = []

    def open_(kind: str = "hybrid", **overrides: object) -> LlamaCppEngine:
        text, mmproj = files(kind)
        config = {"n_ctx": 2048, "max_seqs": 4, "threads": 2, "mmproj": mmproj, **overrides}
        opened.append(LlamaCppEngine(text, EngineConfig(**config)))  # type: ignore[arg-type]
        return opened[-1]

    yield open_
    for eng in opened:
        eng.close()


def _request(
    eng: LlamaCppEngine, text: str, images: tuple[ImageInput, ...] = (), rid: str = "r", **sampling: object
) -> GenerationRequest:
    ids = tuple(eng.model.tokenize(text, parse_special=True))
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 6, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(rid, ids, params, images=images, logprobs=3)


def _run(eng: LlamaCppEngine, request: GenerationRequest) -> list[TokenEvent]:
    return list(eng.generate_sync(request))


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def _first_top(events: list[TokenEvent]) -> dict[int, float]:
    first = next(e for e in events if e.logprobs)
    return dict(first.logprobs[0].top)  # type: ignore[index]


def _reference(
    files: tuple[Path, Path], text: str, images: tuple[ImageInput, ...], n: int
) -> tuple[list[int], np.ndarray, int]:
    """mtmd's own path: (greedy tokens, first-token log-probabilities, prompt tokens incl. the image)."""
    import llama_cpp

    model = LlamaModel(files[0], EngineConfig(n_ctx=1024, max_seqs=1, threads=2))
    enc = VisionEncoder(files[1], model, threads=2)
    try:
        # mtmd writes <|vision_start|>/<|vision_end|> around its marker itself, as the template does.
        chunks = enc.tokenize(text.replace(PAD, enc.marker), [image.pixels for image in images])
        n_prompt = chunks.n_tokens
        n_past = enc.eval_chunks(chunks, 0, 0, 512)
        chunks.close()
        tokens: list[int] = []
        first = None
        for _ in range(n):
            ptr = llama_cpp.llama_get_logits_ith(model.ctx, -1)
            logits = np.ctypeslib.as_array(ptr, shape=(model.n_vocab,)).astype(np.float64)
            if first is None:
                first = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            tokens.append(int(logits.argmax()))
            model.decode([tokens[-1]], [n_past], [0], [True])
            n_past += 1
    finally:
        enc.close()
        model.close()
    return tokens, first, n_prompt  # type: ignore[return-value]


# --- image keys and positions (pure) --------------------------------------------------------------------


def test_image_keys_match_by_hash_and_positions_skip_the_grid() -> None:
    a = image_keys("ab" * 32, 6, 3)
    assert a == image_keys("ab" * 32, 6, 3) and all(k < 0 for k in a) and len(set(a)) == 6
    assert set(a).isdisjoint(image_keys("cd" * 32, 6, 3))  # same size, other picture: no match
    tokens = [5, 7, *a, 9, 11]
    assert position_after(tokens, 2) == 2 and position_after(tokens, 8) == 2 + 3
    assert position_after(tokens, 10) == 7 and position_after([1, 2, 3], 3) == 3
    assert (
        image_boundary(tokens, 5) == 2 and image_boundary(tokens, 8) == 8 and image_boundary(tokens, 9) == 9
    )
    with pytest.raises(ValueError):
        image_keys("not hex", 6, 3)


# --- output -------------------------------------------------------------------------------------------


def test_image_request_matches_llama_cpp_multimodal_path(
    engine: Callable[..., LlamaCppEngine], files: Callable[[str], tuple[Path, Path]]
) -> None:
    # Two pictures of different grids (10x8 and 8x8 merged patches): the text between and after them sits
    # at M-RoPE positions that skip each grid, not one position per image token.
    text = TURN.format(f"{PAD}What is in this picture, and in {PAD} this one?")
    images = (_image(), _image(256, 256, seed=4))
    ref_tokens, ref_logprobs, n_prompt = _reference(files("hybrid"), text, images, 6)
    eng = engine("hybrid")
    events = _run(eng, _request(eng, text, images))
    assert _tokens(events) == ref_tokens
    top = _first_top(events)
    assert len(top) == 3 and all(abs(lp - ref_logprobs[t]) < LOGPROB_TOL for t, lp in top.items())
    n_text = len(eng.model.tokenize(text, parse_special=True)) - 2
    assert events[-1].prompt_tokens == n_prompt == n_text + 80 + 64
    # Negative control: another picture moves the distribution, so the image really is read.
    other = _first_top(_run(eng, _request(eng, text, (images[0], _image(256, 256, seed=9)), rid="o")))
    assert max(abs(other.get(t, -99.0) - lp) for t, lp in top.items()) > 10 * LOGPROB_TOL


@pytest.mark.parametrize("kind", ["hybrid", "attention"])
def test_image_beside_text_streams_equals_solo_and_streams_keep_flowing(
    engine: Callable[..., LlamaCppEngine], kind: str
) -> None:
    eng = engine(kind, prefix_cache=False, state_cache_mb=0, prefill_chunk=16)
    texts = [TURN.format(f"Tell me about topic {i}.") for i in range(2)]
    img_text = TURN.format(f"Look: {PAD} and describe it.")
    solo_text = [_tokens(_run(eng, _request(eng, t, max_tokens=12))) for t in texts]
    solo_image = _run(eng, _request(eng, img_text, (_image(),)))

    events: dict[str, list[TokenEvent]] = {}
    for i, t in enumerate(texts):
        eng.submit(_request(eng, t, rid=f"t{i}", max_tokens=12), events.setdefault(f"t{i}", []).append)
    for _ in range(3):  # the text streams are decoding before the image arrives
        eng.step()
    eng.submit(_request(eng, img_text, (_image(),), rid="img"), events.setdefault("img", []).append)
    text_tokens_before_image_answer = 0
    while any(not (e and e[-1].finished) for e in events.values()):
        eng.step()
        if not events["img"]:
            text_tokens_before_image_answer = sum(len(_tokens(events[f"t{i}"])) for i in range(2))
    assert [_tokens(events[f"t{i}"]) for i in range(2)] == solo_text
    assert _tokens(events["img"]) == _tokens(solo_image)
    solo_top, top = _first_top(solo_image), _first_top(events["img"])
    assert solo_top.keys() == top.keys() and all(abs(top[t] - solo_top[t]) < LOGPROB_TOL for t in top)
    # The image (80+ tokens) went in 16-token runs and was encoded off the loop: the streams kept decoding
    # in every one of those steps (2 streams x 3 steps before it arrived, then a token per step at least).
    assert text_tokens_before_image_answer >= 2 * 3 + 80 // 16


# --- reuse --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hybrid", "attention"])
def test_follow_up_reuses_the_image_and_another_image_does_not(
    engine: Callable[..., LlamaCppEngine], kind: str
) -> None:
    eng = engine(kind)
    first_turn = TURN.format(f"Intro text. {PAD} What is this?")
    events = _run(eng, _request(eng, first_turn, (_image(),), rid="1"))
    assert eng.image_encodes == 1 and events[-1].cached_tokens == 0
    n_image = events[-1].prompt_tokens - len(eng.model.tokenize(first_turn, True)) + 1  # the marker's tokens
    follow = first_turn + "It is noise.<|im_end|>\n" + TURN.format("And the colours?")
    image_start = len(eng.model.tokenize("<|im_start|>user\nIntro text. <|vision_start|>", True))
    events = _run(eng, _request(eng, follow, (_image(),), rid="2"))
    assert events[-1].cached_tokens > image_start + n_image and eng.image_encodes == 1  # no second encode
    assert events[-1].prompt_tokens == len(eng.model.tokenize(follow, True)) - 1 + n_image
    # The same follow-up about a different picture of the same size must not match past the picture.
    events = _run(eng, _request(eng, follow, (_image(seed=3),), rid="3"))
    assert events[-1].cached_tokens <= image_start and eng.image_encodes == 2
    # The count reaches the engine's stats and /metrics (a counter of vision-tower runs).
    assert eng.stats().image_encodes == 2
    assert "qwenkit_image_encodes_total 2.0" in ServeMetrics(eng).render().decode()
    alone = engine(kind)
    assert _tokens(events) == _tokens(_run(alone, _request(alone, follow, (_image(seed=3),), rid="4")))


# --- abort and errors ---------------------------------------------------------------------------------


def test_abort_mid_image_frees_the_sequence_and_the_engine_goes_on(
    engine: Callable[..., LlamaCppEngine],
) -> None:
    eng = engine("attention", prefill_chunk=16)
    text = TURN.format(f"{PAD} Describe.")
    expected = _tokens(_run(engine("attention"), _request(engine("attention"), text, (_image(),))))
    # While the image encodes: abort before any of it is in the KV cache.
    events: list[TokenEvent] = []
    eng.submit(_request(eng, text, (_image(),), rid="a"), events.append)
    eng.step()
    eng.abort("a")
    while not events or not events[-1].finished:
        eng.step()
    assert events[-1].finish_reason == "abort"
    # Half way through the image's rows (a decoding stream beside it keeps the runs 16 tokens long): the
    # partial image must not serve as a prefix later.
    stream: list[TokenEvent] = []
    eng.submit(_request(eng, TURN.format("Talk."), rid="t", max_tokens=60), stream.append)
    eng.step()
    events = []
    eng.submit(_request(eng, text, (_image(),), rid="b"), events.append)
    seq = None
    for _ in range(200):
        eng.step()
        seq = next((s for s in eng.scheduler.running if s.request_id == "b"), None)
        if seq is not None and seq.images[0].start + 16 <= seq.n_cached < seq.images[0].end:
            break
    assert seq is not None and seq.images[0].start < seq.n_cached < seq.images[0].end
    eng.abort("b")
    eng.abort("t")
    while not events[-1:] or not events[-1].finished or not stream[-1].finished:
        eng.step()
    assert events[-1].finish_reason == "abort" and eng.stats().running == 0
    again = _run(eng, _request(eng, text, (_image(),), rid="c"))
    assert _tokens(again) == expected and again[-1].cached_tokens <= seq.images[0].start


def test_image_errors_name_the_fix(
    engine: Callable[..., LlamaCppEngine], files: Callable[..., tuple[Path, Path]]
) -> None:
    text_only = LlamaCppEngine(files("hybrid")[0], EngineConfig(n_ctx=512, max_seqs=1, threads=2))
    try:
        with pytest.raises(EngineError, match="start with --mmproj FILE"):
            text_only.submit(_request(text_only, TURN.format(f"{PAD} hi"), (_image(),)), lambda e: None)
    finally:
        text_only.close()
    eng = engine("hybrid", n_ctx=512, max_seqs=2)
    with pytest.raises(EngineError, match=r"2 image marker\(s\).* but 1 image"):
        eng.submit(_request(eng, TURN.format(f"{PAD}{PAD} hi"), (_image(),)), lambda e: None)
    with pytest.raises(EngineError, match=r"1 image marker\(s\).* but 2 image"):
        eng.submit(_request(eng, TURN.format(f"{PAD} hi"), (_image(), _image(seed=2))), lambda e: None)
    with pytest.raises(EngineError, match="ends with an image"):
        eng.submit(_request(eng, "hi <|image_pad|>", (_image(),)), lambda e: None)
    with pytest.raises(EngineError, match="sha256"):
        eng.submit(
            _request(eng, TURN.format(f"{PAD} hi"), (ImageInput(_image().pixels, "x"),)), lambda e: None
        )
    # The context counts image tokens: a short text with a 512x512 image (256 tokens) no longer fits.
    big = _request(eng, TURN.format(f"{PAD} hi"), (_image(512, 512),), max_tokens=100)
    with pytest.raises(RequestTooLong, match=r"prompt \(2\d\d tokens\)"):
        eng.submit(big, lambda e: None)
    assert _tokens(_run(eng, _request(eng, TURN.format(f"{PAD} ok"), (_image(),))))  # still serving


# --- what images cost: tokens and the encoder's buffer --------------------------------------------------


def test_small_images_take_the_processor_s_token_count_not_llama_cpp_s(
    files: Callable[[str], tuple[Path, Path]], demo_checkpoint: Callable[..., Path]
) -> None:
    # Why a 224x224 picture is 64 prompt tokens here and 49 on llama-server (same template text otherwise):
    # llama.cpp's own Qwen3.5 preprocessing keeps it at 7x7 tokens (its floor is 8 tokens), transformers'
    # processor raises it to its 65536-pixel minimum (256x256, 8x8); the edge resizes as transformers does.
    from PIL import Image
    from transformers import AutoImageProcessor

    directory = demo_checkpoint("qwen3_5", "tiny")
    pixels = _image(224, 224).pixels
    grid = AutoImageProcessor.from_pretrained(directory)(images=Image.fromarray(pixels))["image_grid_thw"]
    reference = int(np.prod(grid[0])) // 4  # 2x2 patches per token
    text, mmproj = files("hybrid")
    model = LlamaModel(text, EngineConfig(n_ctx=512, max_seqs=1, threads=2))
    enc = VisionEncoder(mmproj, model, threads=2)
    try:
        raw = enc.prepare(pixels)
        edge = enc.prepare(prepare_image(pixels, VisionSpec.from_checkpoint(directory)).pixels)
        assert (reference, edge.n_tokens, raw.n_tokens) == (64, 64, 49)
        raw.close()
        edge.close()
    finally:
        enc.close()
        model.close()


@pytest.mark.parametrize("kind", ["hybrid", "attention"])
def test_the_planned_encoder_buffer_bounds_llama_cpp_s(
    files: Callable[[str], tuple[Path, Path]], demo_checkpoint: Callable[..., Path], kind: str
) -> None:
    # llama.cpp logs the clip graph's compute buffer when it first sizes it (for the image at hand, with
    # min = max tokens); VisionTower.compute_bytes must not be under it, nor far over (see shape.py's CLIP_*).
    vl = MODELS[kind][1]
    config = json.loads((demo_checkpoint(vl, "tiny") / "config.json").read_text())
    tower = VisionTower.from_config(config["vision_config"], vl)
    text, mmproj = files(kind)
    model = LlamaModel(text, EngineConfig(n_ctx=512, max_seqs=1, threads=2))
    measured = {}
    try:
        for tokens in (64, 1024):
            enc = VisionEncoder(mmproj, model, threads=2, min_tokens=tokens, max_tokens=tokens)
            try:
                side = int(tokens**0.5) * tower.patch * tower.merge
                prepared = enc.prepare(_image(side, side).pixels)
                assert prepared.n_tokens == tokens
                enc.encode_prepared(prepared)
                prepared.close()
                found = re.findall(r"compute buffer size =\s*([\d.]+) MiB", recent_log())
                measured[tokens] = float(found[-1]) * 2**20
            finally:
                enc.close()
    finally:
        model.close()
    for tokens, got in measured.items():
        assert got <= tower.compute_bytes(tokens * tower.merge**2) <= 1.4 * got, (tokens, got)
    # 16x the patches: 16x the buffer (Qwen3-VL layout), far more with Qwen2.5-VL's full window mask.
    growth = measured[1024] / measured[64]
    assert (15 < growth < 17) if kind == "hybrid" else growth > 30
