"""The planner with images: the vision projector's memory (vision-tower parameters x its type) and its
encoder's compute buffer on llama.cpp, and each request's image-token budget, in the plan and in
`qwenkit plan --images`. Vision-tower parameter counts are checked against transformers' own models (built
on the meta device from the same config) and the demo checkpoints' stored tensors; the compute buffer
against llama.cpp's in tests/test_engine_vision.py."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenkit.catalog import load_catalog
from qwenkit.catalog.formats import WeightFormat
from qwenkit.catalog.planner import GIB, Device, PlanError, PlanRequest, plan, vision_compute_bytes
from qwenkit.catalog.shape import ModelShape, VisionTower
from qwenkit.cli.app import app
from qwenkit.media import VisionSpec, smart_resize

CPU = Device("cpu", 64 * GIB, 48 * GIB, 20.0, frozenset({"avx2"}), "test box")


def _request(name: str, images: bool, **kw: object) -> PlanRequest:
    shape = load_catalog().get(name).shape()
    return PlanRequest(shape, WeightFormat.Q4_K_M, 4096, 2, CPU, images=images, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Qwen2.5-VL-3B-Instruct"])
def test_the_projector_adds_its_weights_and_the_plan_states_the_image_budget(name: str) -> None:
    text, vision = plan(_request(name, False)), plan(_request(name, True))
    shape = vision.request.shape
    assert text.memory.vision == 0 and text.images is None
    assert vision.memory.vision == 2 * shape.encoder_params  # f16 projector
    assert vision.memory.peak - text.memory.peak == vision.memory.vision
    assert plan(_request(name, True, mmproj_type="f32")).memory.vision == 4 * shape.encoder_params
    spec = VisionSpec.for_projector(shape.model_type)
    height, width = smart_resize(1024, 1024, spec)
    budget = vision.images
    assert budget is not None and budget.factor == spec.factor
    assert budget.photo_tokens == height * width // spec.factor**2
    assert budget.photos_per_request == vision.n_ctx_seq // budget.photo_tokens
    assert budget.max_image_tokens == spec.max_pixels // spec.factor**2
    assert any(note.startswith("images:") for note in vision.notes)


def test_a_model_without_a_catalogued_tower_size_says_so() -> None:
    # The catalog has Qwen3.5-9B's text tower only: the budget is still planned, the missing size is named.
    p = plan(_request("Qwen3.5-9B", True))
    assert p.memory.vision == 0 and p.images is not None and p.images.factor == 32
    assert any("no vision-tower size" in note for note in p.notes)


def test_images_need_a_vision_tower_and_a_known_projector_type() -> None:
    with pytest.raises(PlanError, match="has no vision tower"):
        plan(_request("Qwen3-0.6B", True))
    with pytest.raises(PlanError, match="unknown projector type"):
        plan(_request("Qwen3.5-4B", True, mmproj_type="q2"))


def test_plan_command_with_images_runs_on_llama_cpp() -> None:
    result = CliRunner().invoke(
        app, ["plan", "Qwen2.5-VL-3B-Instruct", "--images", "--device", "cpu", "--memory", "16GB", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["engine"] == "llamacpp" and data["images"]["photo_tokens"] > 0
    assert data["memory_bytes"]["vision"] > 0


def test_plan_command_with_images_serves_the_checkpoint_it_converts_the_tower_from() -> None:
    # `serve --mmproj auto` needs the checkpoint beside the text GGUF: no `quantize ... &&` first.
    base = ["plan", "Qwen3.5-4B", "--images", "--device", "cpu", "--memory", "16GB", "--json"]
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["weight_format"] == "q8_0"
    assert data["command"].startswith("qwenkit serve --model Qwen/Qwen3.5-4B --quant q8_0 ")
    assert data["command"].endswith("--mmproj auto")
    result = CliRunner().invoke(app, [*base, "--format", "q4_k_m"])
    assert result.exit_code == 2 and "plan --format q8_0" in result.stderr
    assert "Traceback" not in result.output


# model_type → transformers' (module, vision config class, vision model class).
_TRANSFORMERS_VISION = {
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLVisionConfig", "Qwen2_5_VisionTransformerPretrainedModel"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLVisionConfig", "Qwen3VLVisionModel"),
    "qwen3_5": ("qwen3_5", "Qwen3_5VisionConfig", "Qwen3_5VisionModel"),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeVisionConfig", "Qwen3_5MoeVisionModel"),
}


def _transformers_vision_params(model_type: str, vision_config: dict) -> int:
    """Parameters of transformers' own vision model for this vision_config (meta device: no memory)."""
    import torch
    import transformers

    module, config_class, model_class = _TRANSFORMERS_VISION[model_type]
    models = getattr(transformers.models, module)
    config = getattr(models, config_class)(**vision_config)
    with torch.device("meta"):
        return sum(p.numel() for p in getattr(models, model_class)._from_config(config).parameters())


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_vl", "qwen2_5_vl"])
def test_vision_tower_parameters_are_transformers_and_the_checkpoints(
    demo_checkpoint: Callable[..., Path], arch: str
) -> None:
    # Each layout (Qwen3-VL's deepstack mergers, Qwen3.5 without them, Qwen2.5-VL's gated MLP and RMSNorm).
    from safetensors import safe_open

    directory = demo_checkpoint(arch, "tiny")
    config = json.loads((directory / "config.json").read_text())
    shape = ModelShape.from_config(config)
    assert shape.vision is not None and shape.encoder_params == shape.vision.params
    assert shape.encoder_params == _transformers_vision_params(arch, config["vision_config"])
    stored = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                if key.startswith(("visual.", "model.visual.")):
                    stored += math.prod(f.get_slice(key).get_shape())
    assert stored == shape.encoder_params


def test_catalogued_towers_are_transformers_counts_and_planned_with_their_buffer() -> None:
    # Qwen3.5-35B-A3B's vision_config (from a verbatim copy of its config.json the catalog cites), full size.
    entry = load_catalog().get("Qwen3.5-35B-A3B")
    v = entry.model.vision
    assert v is not None
    config = {
        "depth": v.depth,
        "hidden_size": v.hidden,
        "intermediate_size": v.ffn,
        "num_heads": v.heads,
        "out_hidden_size": v.out_hidden,
        "patch_size": v.patch,
        "num_position_embeddings": v.positions,
    }
    shape = entry.shape()
    assert shape.encoder_params == _transformers_vision_params("qwen3_5_moe", config) == 446_571_248
    text, vision = plan(_request(entry.name, False)), plan(_request(entry.name, True))
    buffer = vision.memory.vision_compute
    # The largest image the engine takes: 4096 tokens of 2x2 patches, the buffer llama.cpp then keeps.
    assert buffer == shape.vision.compute_bytes(4096 * 4) == vision_compute_bytes(shape) > 400 * 2**20
    assert vision.memory.peak - text.memory.peak == vision.memory.vision + buffer
    assert any("compute buffer at the largest image" in note for note in vision.notes)
    # On a GPU the projector runs on the CPU (mtmd without GPU): host memory, not the GPU's budget.
    gpu = Device("cuda", 80 * GIB)
    shape_req = PlanRequest(shape, WeightFormat.Q4_K_M, 4096, 2, gpu, images=True)
    on_gpu = plan(shape_req)
    assert on_gpu.memory.vision == on_gpu.memory.vision_compute == 0
    assert any("host memory" in note for note in on_gpu.notes)


def test_the_encoder_buffer_grows_with_the_patches_and_qwen2_5_vl_s_window_mask() -> None:
    # Qwen3-VL's layout is linear in patches; Qwen2.5-VL's full-size mask is quadratic in them.
    qwen3 = VisionTower("qwen3_vl", depth=27, hidden=1152, ffn=4304, heads=16, out_hidden=2048, patch=16)
    assert qwen3.compute_bytes(16384) == 4 * qwen3.compute_bytes(4096)
    assert qwen3.compute_bytes(16384) >= 480.25 * 2**20  # measured: llama.cpp's log at 16384 patches
    qwen25 = VisionTower("qwen2_5_vl", depth=32, hidden=1280, ffn=3420, heads=16, out_hidden=2048, patch=14)
    assert qwen25.compute_bytes(16384) > 6 * qwen25.compute_bytes(4096)
    assert qwen25.compute_bytes(16384) >= 1985.0e6 and qwen25.compute_bytes(4096) >= 306.3e6  # measured
