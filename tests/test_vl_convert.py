"""Qwen2.5-VL and Qwen3-VL text towers as llama.cpp's qwen2vl / qwen3vl GGUFs, with the projector from the
same checkpoint: `--mmproj auto` for both families, on the tiny demos.

Text parity: the sharpened demo (test_parity.sharpen), llama.cpp f32 vs transformers fp32, max |Δlogit| 1e-4
as test_parity, against what llama.cpp 0.3.36's graphs compute. They differ from transformers in two places,
with llama.cpp's own converter's files too (measured on the sharpened demos, logit std ~4):
- qwen2vl reads no attention.layer_norm_rms_epsilon, so its RMSNorms run with eps 0: the reference runs with
  rms_norm_eps 0 (2e-5); with the checkpoint's 1e-6 it is 1.5e-4 (1.2e-3 on the flat demo, whose hidden
  RMS is ~0.02; negligible at real models' activations).
- qwen3vl's interleaved M-RoPE rotates a rotary pair that falls in no (t, h, w) slot by the 4th position,
  0 for text, where transformers uses the time position: the demo's split [4, 2, 2] leaves pair 7 of 8 there
  (Qwen3-VL's own [24, 20, 20] leaves pairs 61 and 62 of 64, ~4e-7 rad per position). The 1e-4 check uses
  [3, 3, 2], which both map pair for pair (2e-5); the demo's own split is off by 6.2e-4.
Both deviations are also checked (slow) to stay within 2e-3, and above 1e-4: the comparison sees them.
With an image (slow): mtmd's eval_chunks vs transformers, 1e-3 of the largest logit as test_vision
(measured 1e-4 / 3.6e-4); another image moves them by >1e-1. The engine's greedy tokens and first-token
log-probabilities equal mtmd's own path (test_engine_vision's reference and tolerance).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from qwenkit.cli.app import app
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.llamacpp.model import LlamaModel
from qwenkit.engines.llamacpp.vision import VisionEncoder
from qwenkit.gguf.convert import ConversionError, convert_to_gguf
from qwenkit.gguf.mmproj import MmprojError, convert_mmproj
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from test_engine_vision import LOGPROB_TOL, PAD, TURN, _first_top, _image, _reference, _request, _run, _tokens
from test_parity import MAX_ABS_DIFF, PROMPT, load_llama, sharpen

ARCHS = ("qwen2_5_vl", "qwen3_vl")
GGUF_ARCH = {"qwen2_5_vl": "qwen2vl", "qwen3_vl": "qwen3vl"}
# What llama.cpp's graphs compute, spelled as configs (see the module docstring): transformers' side for
# qwen2vl's missing eps, the checkpoint's (so both read it) for a split qwen3vl maps pair for pair.
HF_AS_LLAMA_CPP = {"qwen2_5_vl": {"rms_norm_eps": 0.0}, "qwen3_vl": {}}
MAPPED_SPLIT = {"mrope_section": [3, 3, 2]}
DEVIATION_MAX = 2e-3
IMAGE_TOL = 1e-3  # relative to the largest reference logit, as test_vision's full-model check
# Sizes both preprocessors keep as they are (multiples of patch x merge; Qwen3-VL's processor's minimum).
IMAGE_SIZE = {"qwen2_5_vl": (168, 224), "qwen3_vl": (256, 320)}
runner = CliRunner()


def _edit(directory: Path, text: dict) -> None:
    """Set text fields (mrope_section goes into rope_scaling) where the config keeps them."""
    config = json.loads((directory / "config.json").read_text())
    target = config.get("text_config", config)
    for key, value in text.items():
        if key == "mrope_section":
            target["rope_scaling"]["mrope_section"] = value
        else:
            target[key] = value
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def sharp(
    demo_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, bool], tuple[Path, Path, Path]]:
    """sharp(arch, mapped_split) → (sharpened checkpoint, its f32 text GGUF, its f32 mmproj), made once;
    mapped_split gives a qwen3_vl checkpoint MAPPED_SPLIT."""
    made: dict[tuple[str, bool], tuple[Path, Path, Path]] = {}

    def get(arch: str, mapped_split: bool = False) -> tuple[Path, Path, Path]:
        key = (arch, mapped_split and arch == "qwen3_vl")
        if key not in made:
            root = tmp_path_factory.mktemp(f"vl-{arch}")
            checkpoint = root / "checkpoint"
            shutil.copytree(demo_checkpoint(arch, "tiny"), checkpoint)
            sharpen(checkpoint)
            if key[1]:
                _edit(checkpoint, MAPPED_SPLIT)
            text = convert_to_gguf(checkpoint, root / "model-f32.gguf", "f32")
            made[key] = (checkpoint, text, convert_mmproj(checkpoint, root / "mm.gguf", "f32"))
        return made[key]

    return get


def _hf(checkpoint: Path, **text: object) -> transformers.PreTrainedModel:
    options = {"text_config": text} if text else {}
    return transformers.AutoModelForImageTextToText.from_pretrained(
        checkpoint, dtype=torch.float32, **options
    ).eval()


def _text_logits(checkpoint: Path, text_gguf: Path, **hf_text: object) -> tuple[np.ndarray, np.ndarray]:
    ids = QwenTokenizer.from_dir(checkpoint).encode(PROMPT)
    with torch.no_grad():
        reference = _hf(checkpoint, **hf_text)(torch.tensor([ids])).logits[0].numpy()
    llm = load_llama(text_gguf)
    try:
        llm.eval(ids)
        return reference, np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


# --- the files -------------------------------------------------------------------------------------------


# Qwen3-VL's file (deepstack, interleaved sections) by default; Qwen2.5-VL's (~10 s to make) as slow, its
# keys being checked by default through its parity and engine tests below.
@pytest.mark.parametrize("arch", [pytest.param("qwen2_5_vl", marks=pytest.mark.slow), "qwen3_vl"])
def test_text_gguf_has_llama_cpp_s_keys_and_tensors(demo_gguf: Callable[..., Path], arch: str) -> None:
    path = demo_gguf(arch, "tiny", "f32")
    reader = gguf.GGUFReader(path)
    name = GGUF_ARCH[arch]

    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert field("general.architecture") == name
    tensors = {t.name for t in reader.tensors}
    if arch == "qwen2_5_vl":  # the qwen2 stack: q/k/v biases, no q/k norms; the config's flat split
        assert field(f"{name}.rope.dimension_sections") == [2, 3, 3, 0]
        assert {"blk.1.attn_q.bias", "blk.1.attn_v.bias"} <= tensors
        assert not any("attn_q_norm" in t for t in tensors)
        assert f"{name}.n_deepstack_layers" not in reader.fields
    else:  # the qwen3 stack: q/k norms; the interleaved split; three deepstack rows beside each image row
        assert field(f"{name}.rope.dimension_sections") == [4, 2, 2, 0]
        assert {"blk.3.attn_q_norm.weight", "blk.3.attn_k_norm.weight"} <= tensors
        assert field(f"{name}.n_deepstack_layers") == 3
    assert not any(t.startswith(("v.", "mm.")) for t in tensors)  # the vision tower is the projector's
    model = LlamaModel(path, EngineConfig(n_ctx=256, max_seqs=1, threads=2))
    try:
        # The input row width mtmd checks the projector against: 4 x hidden with Qwen3-VL's deepstack.
        hidden = int(field(f"{name}.embedding_length"))  # type: ignore[arg-type]
        assert llama_cpp.llama_model_n_embd_inp(model._model) == hidden * (4 if arch == "qwen3_vl" else 1)
        rope = llama_cpp.LLAMA_ROPE_TYPE_IMROPE if arch == "qwen3_vl" else llama_cpp.LLAMA_ROPE_TYPE_MROPE
        assert llama_cpp.llama_model_rope_type(model._model) == rope
    finally:
        model.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_a_checkpoint_saved_by_transformers_converts_to_the_same_file(
    demo_checkpoint: Callable[..., Path], demo_gguf: Callable[..., Path], tmp_path: Path, arch: str
) -> None:
    # transformers 5 writes the text settings nested, with rope_parameters instead of rope_scaling.
    demo = demo_checkpoint(arch, "tiny")
    _hf(demo).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(demo / name, tmp_path / name)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())["text_config"]
    readers = [
        gguf.GGUFReader(p)
        for p in (demo_gguf(arch, "tiny", "f32"), convert_to_gguf(tmp_path, tmp_path / "m.gguf", "f32"))
    ]
    # Every key but the name, and the vocabulary's arrays (the same tokenizer files; slow to decode).
    skip = ("general.name", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    fields = [{k: f.contents() for k, f in r.fields.items() if k not in skip} for r in readers]
    tensors = [{t.name: np.array(t.data) for t in r.tensors} for r in readers]
    assert fields[0] == fields[1] and tensors[0].keys() == tensors[1].keys()
    assert all(np.array_equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


# --- parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_text_logits_match_transformers(sharp: Callable[..., tuple[Path, Path, Path]], arch: str) -> None:
    checkpoint, text_gguf, _ = sharp(arch, True)
    reference, logits = _text_logits(checkpoint, text_gguf, **HF_AS_LLAMA_CPP[arch])
    assert logits.shape == reference.shape and reference.std() > 2.0  # sharpened: logits spread over units
    assert np.abs(logits - reference).max() <= MAX_ABS_DIFF


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_s_known_deviations_stay_small(
    sharp: Callable[..., tuple[Path, Path, Path]], arch: str
) -> None:
    # The checkpoint as it is (its eps, its own mrope split) against transformers as it is.
    checkpoint, text_gguf, _ = sharp(arch)
    reference, logits = _text_logits(checkpoint, text_gguf)
    assert MAX_ABS_DIFF < np.abs(logits - reference).max() <= DEVIATION_MAX


def _mtmd_last_logits(
    text_gguf: Path, mmproj: Path, prompt: str, image: np.ndarray, image_token: int
) -> tuple[list[int], np.ndarray]:
    """mtmd's own path: (prompt ids with one image_token per image row, last-position logits)."""
    # Exact attention, as every parity test: flash attention's f16 rounding alone moves logits ~2e-3.
    model = LlamaModel(text_gguf, EngineConfig(n_ctx=512, max_seqs=1, threads=2, flash_attn=False))
    enc = VisionEncoder(mmproj, model, threads=2)
    try:
        chunks = enc.tokenize(prompt.replace(PAD, enc.marker), [image])
        ids = chunks.token_ids(image_token)
        enc.eval_chunks(chunks, 0, 0, 512)
        chunks.close()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab,))
        return ids, logits.copy()
    finally:
        enc.close()
        model.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_with_an_image_match_transformers(
    sharp: Callable[..., tuple[Path, Path, Path]], arch: str
) -> None:
    # The image's M-RoPE positions, the deepstack rows and the text after the image, end to end.
    checkpoint, text_gguf, mmproj = sharp(arch)
    config = json.loads((checkpoint / "config.json").read_text())
    image_token = config["image_token_id"]
    image = _image(*IMAGE_SIZE[arch], seed=1).pixels
    prompt = TURN.format(f"What is in {PAD} this picture? Tell me more.")
    ids, got = _mtmd_last_logits(text_gguf, mmproj, prompt, image, image_token)
    hf = _hf(checkpoint)
    processor = transformers.AutoImageProcessor.from_pretrained(checkpoint)

    def reference(pixels: np.ndarray) -> np.ndarray:
        inputs = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
        kinds = torch.tensor([[int(t == image_token) for t in ids]])
        with torch.no_grad():
            out = hf(
                input_ids=torch.tensor([ids]),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                mm_token_type_ids=kinds,
            )
        return out.logits[0, -1].numpy()

    ref = reference(image)
    got = got[: ref.shape[0]]
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < IMAGE_TOL * scale and int(got.argmax()) == int(ref.argmax())
    other = reference(_image(*IMAGE_SIZE[arch], seed=2).pixels)
    assert np.abs(other - ref).max() > 10 * IMAGE_TOL * scale  # the image really reaches the logits


# --- the engine and the CLI ------------------------------------------------------------------------------


@pytest.fixture
def engine(sharp: Callable[..., tuple[Path, Path, Path]]) -> Iterator[Callable[[str], LlamaCppEngine]]:
    opened: list[LlamaCppEngine] = []

    def open_(arch: str) -> LlamaCppEngine:
        _, text_gguf, mmproj = sharp(arch, True)
        config = EngineConfig(n_ctx=2048, max_seqs=4, threads=2, mmproj=mmproj)
        opened.append(LlamaCppEngine(text_gguf, config))
        return opened[-1]

    yield open_
    for eng in opened:
        eng.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_image_request_matches_llama_cpp_s_multimodal_path(
    sharp: Callable[..., tuple[Path, Path, Path]], engine: Callable[[str], LlamaCppEngine], arch: str
) -> None:
    _, text_gguf, mmproj = sharp(arch, True)
    text = TURN.format(f"{PAD}What is in this picture?")
    images = (_image(),)
    ref_tokens, ref_logprobs, n_prompt = _reference((text_gguf, mmproj), text, images, 6)
    eng = engine(arch)
    events = _run(eng, _request(eng, text, images))
    assert _tokens(events) == ref_tokens and len(set(ref_tokens)) > 1
    top = _first_top(events)
    assert len(top) == 3 and all(abs(lp - ref_logprobs[t]) < LOGPROB_TOL for t, lp in top.items())
    assert events[-1].prompt_tokens == n_prompt


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_plan_and_generate_with_mmproj_auto(
    demo_checkpoint: Callable[..., Path], tmp_path: Path, arch: str
) -> None:
    model = str(demo_checkpoint(arch, "tiny"))
    result = runner.invoke(app, ["plan", model, "--images", "--device", "cpu", "--memory", "8GB", "--json"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["engine"] == "llamacpp" and plan["images"]["max_image_tokens"] > 0
    assert "--mmproj auto" in plan["command"]
    picture = tmp_path / "cat.png"
    buf = io.BytesIO()
    Image.fromarray(_image(200, 300).pixels).save(buf, format="PNG")
    picture.write_bytes(buf.getvalue())
    args = ["generate", "--model", model, "--image", str(picture), "--mmproj", "auto", "--threads", "2"]
    result = runner.invoke(app, [*args, "-n", "4", "What?"])
    assert result.exit_code == 0, result.stderr
    assert "4 tokens" in result.stderr and "finish: length" in result.stderr


# --- bad input ---------------------------------------------------------------------------------------------


def test_shallow_qwen2_5_vl_tower_converts_and_encodes(
    demo_checkpoint: Callable[..., Path], demo_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    # Depth 2: gguf's map numbers the merger's mlp.2 like a block, which a depth-sized map left out.
    checkpoint = tmp_path / "shallow"
    shutil.copytree(demo_checkpoint("qwen2_5_vl", "tiny"), checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_config"] |= {"depth": 2, "fullatt_block_indexes": [1]}
    (checkpoint / "config.json").write_text(json.dumps(config))
    [weights_file] = checkpoint.glob("*.safetensors")
    weights = load_file(str(weights_file))
    extra = {
        k: weights.pop(k) for k in list(weights) if k.startswith(("visual.blocks.2.", "visual.blocks.3."))
    }
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    mmproj = convert_mmproj(checkpoint, tmp_path / "mm.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(mmproj).tensors}
    assert {"mm.0.weight", "mm.2.weight", "mm.2.bias"} <= names and not any("blk.2." in n for n in names)
    model = LlamaModel(demo_gguf("qwen2_5_vl", "tiny", "f32"), EngineConfig(n_ctx=256, max_seqs=1, threads=2))
    enc = VisionEncoder(mmproj, model, threads=2)
    try:
        rows = enc.encode_image(_image(56, 84).pixels)
        assert rows.shape[1] == config["hidden_size"] and np.isfinite(rows).all()
    finally:
        enc.close()
        model.close()
    # A block the config does not count is a broken checkpoint, not a silently dropped tensor.
    save_file(weights | extra, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(MmprojError, match=r"blocks\.2\..* beyond vision_config depth 2"):
        convert_mmproj(checkpoint, tmp_path / "mm2.gguf", "f32")


@pytest.mark.parametrize(
    ("arch", "text", "message"),
    [
        ("qwen3_vl", {"num_hidden_layers": 3}, "3 deepstack layers but only 3 text layers"),
        ("qwen2_5_vl", {"rope_scaling": {"type": "mrope"}}, "lacks rope_scaling.mrope_section"),
        (
            "qwen2_5_vl",
            {"rope_scaling": {"mrope_section": [8, 8, 8]}},
            r"mrope_section \[8, 8, 8\].*head_dim 16",
        ),
    ],
)
def test_vl_configs_llama_cpp_cannot_run_are_refused(
    demo_checkpoint: Callable[..., Path], tmp_path: Path, arch: str, text: dict, message: str
) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(demo_checkpoint(arch, "tiny"), checkpoint)
    _edit(checkpoint, text)
    with pytest.raises(ConversionError, match=message):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "f32")
