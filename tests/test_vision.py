"""Images, part 1: VL demo checkpoints, mmproj conversion, and llama.cpp (mtmd) vs transformers parity.

Tolerances (max |llama.cpp - transformers| / max |transformers|, same image, fp32 reference):
- vision tower: 2e-3. Measured 4e-4..8e-4 for Qwen2.5-VL, Qwen3-VL and Qwen3.5, f32 and f16 projectors. The
  floor is llama.cpp's, not the converter's: clip casts K and V to f16 for flash attention and ggml's GELU
  reads an f16 table (relative step 2^-11 = 4.9e-4 each), so ~2.5x the worst measured case bounds honest
  rounding, while one wrong weight (the negative control) is off by >2e-2 and typically 1e-1.
- full model (Qwen3.5, image in the prompt): 1e-3 (measured 7e-5, same argmax); another image moves the
  logits by ~0.4, so the image really reaches them.
Images are sized so both preprocessors keep the same pixels (llama.cpp resizes only below 8 or above 4096
tokens; transformers' Qwen3.5 processor upsizes anything under 65,536 pixels).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

Image = pytest.importorskip("PIL.Image")

from qwenkit.checkpoints.demo import create_demo  # noqa: E402
from qwenkit.checkpoints.resolve import resolve_model  # noqa: E402
from qwenkit.engines.llamacpp.config import EngineConfig  # noqa: E402
from qwenkit.engines.llamacpp.model import LlamaModel  # noqa: E402
from qwenkit.engines.llamacpp.vision import VisionEncoder, VisionError  # noqa: E402
from qwenkit.gguf.convert import gguf_cache_key  # noqa: E402
from qwenkit.gguf.mmproj import MmprojError, convert_mmproj, ensure_mmproj, resolve_mmproj  # noqa: E402

VISION_TOL = 2e-3
LOGITS_TOL = 1e-3
# Each VL family, and the text GGUF its projector is bound to: mtmd only needs a text model whose width is
# the projector's output (Qwen2.5-VL's text stack is the qwen2 demo's, which llama.cpp loads as qwen2).
# Qwen3-VL's rows are 4 x its text width (3 deepstack outputs appended): the qwen3 small demo has that width.
FAMILIES = {
    "qwen3_5": ("qwen3_5", "tiny", "f32"),
    "qwen2_5_vl": ("qwen2", "tiny", "f32"),
    "qwen3_vl": ("qwen3", "small", "f16"),
}


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref - got).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def hf_vision() -> Callable[[Path, np.ndarray], np.ndarray]:
    """hf_vision(checkpoint, image) → transformers' fp32 vision-tower output (merged image tokens)."""
    models: dict[Path, tuple[object, object]] = {}

    def run(checkpoint: Path, image: np.ndarray) -> np.ndarray:
        if checkpoint not in models:
            model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
            models[checkpoint] = (model, transformers.AutoImageProcessor.from_pretrained(checkpoint))
        model, processor = models[checkpoint]
        inputs = processor(images=[Image.fromarray(image)], return_tensors="pt")  # type: ignore[operator]
        with torch.no_grad():
            out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])  # type: ignore[attr-defined]
        # Qwen3-VL also returns its deepstack features; llama.cpp appends them to each row, in block order.
        return torch.cat([out.pooler_output, *(getattr(out, "deepstack_features", None) or [])], -1).numpy()

    return run


@pytest.fixture(scope="module")
def encoder(demo_gguf: Callable[..., Path]) -> Iterator[Callable[[str, Path], VisionEncoder]]:
    """encoder(family, mmproj) → a VisionEncoder on that family's tiny text GGUF (one model per family)."""
    models: dict[str, LlamaModel] = {}
    encoders: list[VisionEncoder] = []

    def open_(family: str, mmproj: Path) -> VisionEncoder:
        if family not in models:
            text = demo_gguf(*FAMILIES[family])
            # Exact attention for parity: flash attention's f16 rounding alone moves logits ~2e-3.
            config = EngineConfig(n_ctx=512, max_seqs=1, threads=2, flash_attn=False)
            models[family] = LlamaModel(text, config)
        encoders.append(VisionEncoder(mmproj, models[family], threads=2))
        return encoders[-1]

    yield open_
    for enc in encoders:
        enc.close()
    for model in models.values():
        model.close()


# --- demo checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_vl_demo_loads_in_transformers_with_every_tensor(
    arch: str, demo_checkpoint: Callable[..., Path]
) -> None:
    path = demo_checkpoint(arch)
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = json.loads((path / "config.json").read_text())
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    assert processor.patch_size == config["vision_config"]["patch_size"]
    assert processor.merge_size == config["vision_config"]["spatial_merge_size"]
    assert type(model).__name__ == config["architectures"][0]


def test_qwen2_5_vl_demo_mirrors_the_hub_layout(demo_checkpoint: Callable[..., Path]) -> None:
    path = demo_checkpoint("qwen2_5_vl")
    config = json.loads((path / "config.json").read_text())
    v = config["vision_config"]
    # mrope splits the text head's rotary pairs; full-attention blocks evenly spaced as in the 3B.
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert sum(config["rope_scaling"]["mrope_section"]) == head_dim // 2
    assert v["fullatt_block_indexes"] == [1, 3] and v["out_hidden_size"] == config["hidden_size"]
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert pre["patch_size"] == 14 and pre["image_mean"][0] == pytest.approx(0.48145466)
    with pytest.raises(ValueError, match="tiny, small"):
        create_demo(path.parent / "big", arch="qwen2_5_vl", size="0.5b")


# --- conversion --------------------------------------------------------------------------------------------


def _fields(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def test_qwen3_5_mmproj_has_clip_metadata_and_names(
    demo_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    path = demo_checkpoint("qwen3_5")
    v = json.loads((path / "config.json").read_text())["vision_config"]
    fields, tensors = _fields(convert_mmproj(path, tmp_path / "mm.gguf", "f16"))
    assert fields["general.architecture"] == "clip" and fields["general.type"] == "mmproj"
    assert fields["clip.projector_type"] == "qwen3vl_merger"
    assert fields["clip.vision.block_count"] == v["depth"]
    assert fields["clip.vision.projection_dim"] == v["out_hidden_size"]
    assert fields["clip.vision.image_size"] == 4 * 16  # sqrt(16 position embeddings) * patch 16
    assert fields["clip.vision.image_mean"] == [0.5, 0.5, 0.5]
    assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.blk.0.attn_qkv.weight", "mm.0.weight"} <= set(
        tensors
    )
    assert tensors["v.blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    # ggml_interpolate resizes the position grid and only takes f32 (an f16 grid aborts llama.cpp).
    assert tensors["v.position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["v.blk.0.ln1.bias"].tensor_type == gguf.GGMLQuantizationType.F32


def test_qwen2_5_vl_mmproj_splits_qkv_and_sets_window(
    demo_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    fields, tensors = _fields(convert_mmproj(demo_checkpoint("qwen2_5_vl"), tmp_path / "mm.gguf", "f32"))
    assert fields["clip.projector_type"] == "qwen2.5vl_merger"
    assert fields["clip.vision.n_wa_pattern"] == 2 and fields["clip.use_silu"] is True
    assert {
        "v.blk.0.attn_q.bias",
        "v.blk.0.attn_k.weight",
        "v.blk.3.ffn_gate.weight",
        "v.post_ln.weight",
    } <= set(tensors)
    assert not any("attn_qkv" in name for name in tensors)


def test_qwen3_vl_mmproj_keeps_deepstack(demo_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    fields, tensors = _fields(convert_mmproj(demo_checkpoint("qwen3_vl"), tmp_path / "mm.gguf", "f16"))
    assert fields["clip.projector_type"] == "qwen3vl_merger"
    assert fields["clip.vision.is_deepstack_layers"] == [False, True, True, True]
    for block in (1, 2, 3):
        assert {f"v.deepstack.{block}.norm.weight", f"v.deepstack.{block}.fc2.bias"} <= set(tensors)


def test_mmproj_is_cached_beside_the_text_gguf(demo_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    source = demo_checkpoint("qwen3_5")
    env = {"QWENKIT_CACHE_DIR": str(tmp_path / "cache")}
    first = ensure_mmproj(source, "q8_0", env=env)
    assert first.parent.name == gguf_cache_key(source, "q8_0") and first.name == "mmproj-f16.gguf"
    stamp = first.stat().st_mtime_ns
    assert ensure_mmproj(source, "q8_0", env=env) == first and first.stat().st_mtime_ns == stamp
    # resolve_mmproj: "auto" converts an HF checkpoint's tower; a given file must be a clip GGUF.
    resolved = resolve_model(str(source))
    assert resolve_mmproj(resolved, "auto", env=env) == first
    assert resolve_mmproj(resolved, None) is None
    assert resolve_mmproj(resolved, first) == first


def test_mmproj_bad_input_names_the_fix(
    demo_checkpoint: Callable[..., Path], demo_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(MmprojError, match="no vision tower"):
        convert_mmproj(demo_checkpoint("qwen3"), tmp_path / "mm.gguf")
    with pytest.raises(MmprojError, match="not a vision projector"):
        resolve_mmproj(resolve_model(str(demo_gguf("qwen3"))), demo_gguf("qwen3"))
    with pytest.raises(MmprojError, match="--mmproj FILE"):
        resolve_mmproj(resolve_model(str(demo_gguf("qwen3"))), "auto")
    with pytest.raises(MmprojError, match="no such mmproj"):
        resolve_mmproj(resolve_model(str(demo_gguf("qwen3"))), tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(MmprojError, match="not a GGUF"):
        resolve_mmproj(resolve_model(str(demo_gguf("qwen3"))), tmp_path / "junk.gguf")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00")  # the magic, then the file stops
    with pytest.raises(MmprojError, match="truncated or corrupt"):
        resolve_mmproj(resolve_model(str(demo_gguf("qwen3"))), tmp_path / "cut.gguf")


# --- parity ------------------------------------------------------------------------------------------------


# Sizes both preprocessors leave alone (multiples of patch * merge, within both pixel limits), one square and
# one not (Qwen3.5 interpolates its 4x4 position grid; Qwen2.5-VL windows 8x8-patch blocks).
@pytest.mark.parametrize(
    ("family", "shapes"),
    [
        ("qwen3_5", [(256, 256), (320, 448)]),
        ("qwen2_5_vl", [(168, 224), (336, 448)]),
        ("qwen3_vl", [(256, 320)]),
    ],
)
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_vision_tower_matches_transformers(
    family: str,
    shapes: list[tuple[int, int]],
    outtype: str,
    demo_checkpoint: Callable[..., Path],
    hf_vision: Callable[[Path, np.ndarray], np.ndarray],
    encoder: Callable[[str, Path], VisionEncoder],
    tmp_path: Path,
) -> None:
    path = demo_checkpoint(family)
    enc = encoder(family, convert_mmproj(path, tmp_path / f"mm-{outtype}.gguf", outtype))  # type: ignore[arg-type]
    for i, (height, width) in enumerate(shapes):
        image = _image(height, width, seed=i)
        ref, got = hf_vision(path, image), enc.encode_image(image)
        assert got.shape == ref.shape  # one row per merged 2x2 patch block
        assert _rel(ref, got) < VISION_TOL, (family, outtype, (height, width))


@pytest.mark.parametrize(
    ("family", "tensor"),
    [
        ("qwen3_5", "model.visual.blocks.0.attn.qkv.weight"),
        ("qwen2_5_vl", "visual.blocks.2.mlp.up_proj.weight"),
        ("qwen3_vl", "model.visual.deepstack_merger_list.1.linear_fc1.weight"),
    ],
)
def test_a_broken_vision_weight_fails_parity(
    family: str,
    tensor: str,
    demo_checkpoint: Callable[..., Path],
    hf_vision: Callable[[Path, np.ndarray], np.ndarray],
    encoder: Callable[[str, Path], VisionEncoder],
    tmp_path: Path,
) -> None:
    """Negative control: the projector of a copy whose one vision weight has its rows shuffled (a plausible
    conversion bug, e.g. q/k/v in the wrong order) must miss the tolerance the real one meets."""
    from safetensors.numpy import load_file, save_file

    good = demo_checkpoint(family)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights[tensor] = np.random.default_rng(0).permutation(weights[tensor], axis=0)
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    image = _image(*((168, 224) if family == "qwen2_5_vl" else (256, 256)))
    got = encoder(family, convert_mmproj(broken, tmp_path / "mm.gguf", "f32")).encode_image(image)
    assert _rel(hf_vision(good, image), got) > 10 * VISION_TOL


def test_full_model_logits_with_an_image_match_transformers(
    demo_checkpoint: Callable[..., Path], demo_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    import llama_cpp

    path = demo_checkpoint("qwen3_5")
    config = json.loads((path / "config.json").read_text())
    exact = EngineConfig(n_ctx=512, max_seqs=1, threads=2, flash_attn=False)  # parity: no f16 rounding
    model = LlamaModel(demo_gguf("qwen3_5"), exact)
    enc = VisionEncoder(convert_mmproj(path, tmp_path / "mm.gguf", "f32"), model, threads=2)
    try:
        image = _image(256, 320, seed=1)
        prompt = f"<|im_start|>user\nWhat is in {enc.marker} this picture?<|im_end|>\n<|im_start|>assistant\n"
        chunks = enc.tokenize(prompt, [image])
        ids = chunks.token_ids(config["image_token_id"])
        [img] = chunks.images()
        assert (img.nx, img.ny, img.n_tokens) == (10, 8, 80) and ids.count(config["image_token_id"]) == 80
        # M-RoPE: the image advances the position by max(nx, ny), not by its token count.
        assert enc.eval_chunks(chunks, 0, 0, 512) == chunks.n_pos == len(ids) - 80 + 10
        got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab,))
        got = got.copy()
        chunks.close()
    finally:
        enc.close()
        model.close()
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    processor = transformers.AutoImageProcessor.from_pretrained(path)

    def logits(pixels: np.ndarray) -> np.ndarray:
        inputs = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
        kinds = [[int(t == config["image_token_id"]) for t in ids]]
        with torch.no_grad():
            out = hf(
                input_ids=torch.tensor([ids]),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                mm_token_type_ids=torch.tensor(kinds),
            )
        return out.logits[0, -1].numpy()

    ref = logits(image)
    got = got[: ref.shape[0]]
    assert _rel(ref, got) < LOGITS_TOL and int(ref.argmax()) == int(got.argmax())
    assert _rel(ref, logits(_image(256, 320, seed=2))) > 10 * LOGITS_TOL  # the image really is read


def test_vision_encoder_rejects_bad_input(
    demo_checkpoint: Callable[..., Path], encoder: Callable[[str, Path], VisionEncoder], tmp_path: Path
) -> None:
    enc = encoder("qwen3_5", convert_mmproj(demo_checkpoint("qwen3_5"), tmp_path / "mm.gguf", "f32"))
    with pytest.raises(VisionError, match="could not be decoded"):
        enc.encode_image(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(VisionError, match="marker"):
        enc.tokenize("no marker here", [_image(64, 64)])
    with pytest.raises(VisionError, match="RGB"):
        enc.encode_image(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(VisionError, match="no mmproj file"):
        VisionEncoder(tmp_path / "missing.gguf", None)  # type: ignore[arg-type]
    # Encoded bytes go through llama.cpp's own decoder: a PNG gives the same tokens as its pixels.
    import io

    image = _image(64, 96)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    assert np.array_equal(enc.encode_image(png.getvalue()), enc.encode_image(image))
    # Prefix keys: the image's pixel hash, whatever its encoding; another image, another key.
    prompt = f"Look: {enc.marker} and say"
    keys = []
    for picture in (image, png.getvalue(), _image(64, 96, seed=5)):
        chunks = enc.tokenize(prompt, [picture])
        keys.append(chunks.cache_key())
        chunks.close()
    assert keys[0] == keys[1] != keys[2]
    [digest] = [k for k in keys[0] if isinstance(k, str)]
    texts = [[k for k in key if isinstance(k, int)] for key in keys]
    assert len(digest) == 64 and texts[0] == texts[2] and len(texts[0]) == len(keys[0]) - 1


def test_prepare_files_takes_a_gguf_with_its_mmproj(
    demo_checkpoint: Callable[..., Path], demo_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    from qwenkit.engines.loader import prepare_files

    mmproj = convert_mmproj(demo_checkpoint("qwen3_5"), tmp_path / "mmproj-f16.gguf")
    resolved = resolve_model(str(demo_gguf("qwen3_5")))
    assert prepare_files(resolved, mmproj=mmproj).mmproj_path == mmproj
    with pytest.raises(MmprojError, match="not a vision projector"):
        prepare_files(resolved, mmproj=demo_gguf("qwen3_5"))
