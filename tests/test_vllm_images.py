"""Images on the vLLM engine, checked with vLLM's own Qwen-VL multimodal processors: the TokensPrompt the
adapter builds (one <|image_pad|> per image, the decoded pixels, their sha256 as ids) comes out of vLLM's
processing with each marker expanded to exactly the tokens qwenkit counts for that image (image_tokens, what
the adapter's context check and the server's usage use), in prompt order, keyed by those sha256s.

Runs where vLLM and torchvision import (a scratch venv: vLLM pins a CUDA torch) and skips elsewhere. Where
transformers cannot build the video processor (no usable torchvision beside a CPU torch), the Hugging Face
processor is built for images only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qwenkit.engines.request import GenerationRequest
from qwenkit.engines.vllm.translate import generate_kwargs
from qwenkit.media.images import VisionSpec, image_tokens, prepare_image
from qwenkit.tokenizer.specials import IMAGE_PAD
from qwenkit.tokenizer.tokenizer import QwenTokenizer

PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and "
    "<|vision_start|><|image_pad|><|vision_end|>What differs?<|im_end|>\n<|im_start|>assistant\n"
)


def _image_only_processor(info: Any, model: Path, arch: str) -> None:
    """Give vLLM's processing info a Hugging Face processor without its video part (needs torchvision)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil.from_pretrained(str(model))
    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLProcessor, "qwen3_vl": transformers.Qwen3VLProcessor}[arch]
    processor = cls.__new__(cls)
    processor.image_processor = images
    processor.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
    video: Any = type("NoVideo", (), {"merge_size": images.merge_size, "patch_size": images.patch_size})()
    video.temporal_patch_size = getattr(images, "temporal_patch_size", 2)
    video.valid_kwargs = type("Kwargs", (), {"__annotations__": {}})
    processor.video_processor = video
    processor.image_token, processor.video_token = IMAGE_PAD, "<|video_pad|>"
    processor.image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    processor.video_token_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    processor.chat_template = None
    info.get_hf_processor = lambda **kw: processor
    info.get_image_processor = lambda **kw: images


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_vllm_expands_each_marker_to_the_tokens_qwenkit_counts(
    demo_checkpoint: Callable[..., Path], arch: str
) -> None:
    pytest.importorskip("vllm.multimodal", reason="vLLM is not installed here")
    pytest.importorskip("torchvision", reason="vLLM's Qwen-VL model code imports torchvision")
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.parse import parse_mm_uuids

    model = demo_checkpoint(arch, "tiny")
    spec = VisionSpec.from_checkpoint(model)
    assert spec is not None
    tokenizer = QwenTokenizer.from_dir(model)
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((300, 200, 3), (64, 500, 3))]
    images = tuple(prepare_image(p, spec) for p in pictures)  # what the server hands the engine
    ids = tokenizer.encode(PROMPT)
    prompt = generate_kwargs(GenerationRequest("r", tuple(ids), images=images))["prompt"]

    processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(model), tokenizer=str(model)))
    try:
        processor.info.get_hf_processor()
    except ImportError:  # no torchvision: the video processor cannot be built
        _image_only_processor(processor.info, model, arch)
    items = processor.info.parse_mm_data(prompt["multi_modal_data"])
    out = processor(prompt["prompt_token_ids"], items, parse_mm_uuids(prompt["multi_modal_uuids"]))

    counts = [image_tokens(image.pixels, spec) for image in images]
    assert all(n > 1 for n in counts) and counts[0] != counts[1]
    ranges = out["mm_placeholders"]["image"]
    assert [r.length for r in ranges] == counts and ranges[0].offset < ranges[1].offset
    pad = tokenizer.special_id(IMAGE_PAD)
    expanded = out["prompt_token_ids"]
    assert len(expanded) == len(ids) + sum(n - 1 for n in counts) and expanded.count(pad) == sum(counts)
    assert out["mm_hashes"]["image"] == [image.sha256 for image in images]
