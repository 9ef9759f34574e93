"""Images in the CLI: `qwenkit render --image` shows the placeholders and each image's token count,
`generate --image` refuses bad pictures and text-only models in one line, chat's /image keeps pictures for
the next message and finds them again on every turn."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwenkit.chat.messages import messages_from_openai
from qwenkit.cli.app import app
from qwenkit.cli.run import Pictures
from qwenkit.media import VisionSpec, smart_resize
from qwenkit.tokenizer.specials import IMAGE_PAD
from qwenkit.tokenizer.tokenizer import QwenTokenizer

Image = pytest.importorskip("PIL.Image")
runner = CliRunner()
MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"


def _picture(path: Path, height: int, width: int) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_render_shows_image_placeholders_and_token_counts(
    demo_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    checkpoint = demo_checkpoint("qwen3_5", "tiny")
    cat = _picture(tmp_path / "cat.png", 300, 500)
    args = ["render", "--model", str(checkpoint), "--user", "What is this?", "--image", str(cat), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert f"<|im_start|>user\n{MARKUP}What is this?<|im_end|>" in data["prompt"]
    pad = QwenTokenizer.from_dir(checkpoint).special_id(IMAGE_PAD)
    assert data["token_ids"].count(pad) == 1
    spec = VisionSpec.from_checkpoint(checkpoint)
    assert spec is not None
    height, width = smart_resize(300, 500, spec)
    assert data["images"] == [
        {"path": str(cat), "width": width, "height": height, "tokens": height * width // spec.factor**2}
    ]


def test_generate_refuses_a_bad_picture_before_loading(tmp_path: Path) -> None:
    svg = tmp_path / "logo.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    for path, words in ((svg, "SVG"), (tmp_path / "missing.png", "no image file")):
        result = runner.invoke(app, ["generate", "--image", str(path), "What is this?"])
        assert result.exit_code == 2, result.stdout
        assert words in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_generate_with_an_image_on_a_text_model_names_the_fix(
    demo_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    cat = _picture(tmp_path / "cat.png", 64, 64)
    model = str(demo_checkpoint("qwen3", "tiny"))
    result = runner.invoke(app, ["generate", "--model", model, "--image", str(cat), "What is this?"])
    assert result.exit_code == 2
    assert "no vision tower" in result.stderr and "--mmproj" in result.stderr


def test_chat_pictures_attach_to_the_next_message(tmp_path: Path) -> None:
    spec = VisionSpec(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216)
    pictures = Pictures(spec)
    cat = _picture(tmp_path / "cat.png", 256, 320)
    line = pictures.attach(str(cat))
    assert "cat.png (320x256, 80 image tokens)" in line
    history = [{"role": "user", "content": pictures.content("What is it?")}]
    pictures.pending.clear()
    history += [
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": pictures.content("Sure?")},
    ]
    assert history[2]["content"] == "Sure?"  # the picture went with the first message only
    images = pictures.images(messages_from_openai(history))
    assert len(images) == 1 and images[0].pixels.shape == (256, 320, 3)
    with pytest.raises(ValueError, match="needs a path"):
        pictures.attach("")
    with pytest.raises(ValueError, match="no vision projector: restart chat with --mmproj"):
        Pictures(None).attach(str(cat))


@pytest.mark.slow
def test_generate_reads_an_image_end_to_end(demo_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    # --image without --mmproj converts the checkpoint's own vision tower (auto) and runs it in llama.cpp.
    cat = _picture(tmp_path / "cat.png", 200, 300)
    model = str(demo_checkpoint("qwen3_5", "tiny"))
    args = [
        "generate",
        "--model",
        model,
        "--image",
        str(cat),
        "--threads",
        "2",
        "-n",
        "4",
        "--no-think",
        "What?",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "4 tokens" in result.stderr and "finish: length" in result.stderr
