"""The planner with images: the vision projector's memory (vision-tower parameters x its type) on
llama.cpp and each request's image-token budget, in the plan and in `qwenkit plan --images`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qwenkit.catalog import load_catalog
from qwenkit.catalog.formats import WeightFormat
from qwenkit.catalog.planner import GIB, Device, PlanError, PlanRequest, plan
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
    # The catalog has Qwen3.5's text tower only: the budget is still planned, the projector's size is named.
    p = plan(_request("Qwen3.5-4B", True))
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
