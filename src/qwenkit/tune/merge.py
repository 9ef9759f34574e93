"""`qwenkit tune merge`: fold a LoRA adapter into its base model and write a plain HF checkpoint.

Contract: merge_adapter(adapter_dir, out) reads adapter_dir/run.json for the base model (or takes base),
loads base + adapter, merges the LoRA deltas into the weights (peft merge_and_unload) and writes out/ as an
HF-layout checkpoint: config.json, model.safetensors (the base's dtype), generation_config.json and the
base's tokenizer and chat-template files copied unchanged, so `qwenkit convert` / `quantize` take it. out
must not exist yet (or be empty) unless overwrite. An adapter on lm_head of a tied-embedding model is
merged into an untied copy of the head (the merged config says tie_word_embeddings false).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qwenkit.tune.train import TuneError

_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
)


def base_of(adapter_dir: Path) -> Path:
    """The base checkpoint an adapter was trained from (run.json's base_model)."""
    run = adapter_dir / "run.json"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TuneError(
            f"{adapter_dir} holds no adapter (adapter_config.json): pass a `qwenkit tune` --out dir"
        )
    try:
        base = Path(json.loads(run.read_text("utf-8"))["base_model"])
    except (OSError, ValueError, KeyError):
        raise TuneError(f"{run} is missing or unreadable: pass the base model with --base") from None
    if not base.is_dir():
        raise TuneError(f"the base model {base} is gone: pass its new location with --base")
    return base


def merge_adapter(adapter_dir: Path, out: Path, *, base: Path | None = None, overwrite: bool = False) -> Path:
    """Write the merged checkpoint into out (see the module docstring); returns out."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base or base_of(adapter_dir)
    if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
        if not overwrite:
            raise TuneError(f"{out} already exists: pass --overwrite to replace it or choose another --out")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    config = json.loads((base / "config.json").read_text("utf-8"))
    dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "float32"), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    targets = json.loads((adapter_dir / "adapter_config.json").read_text("utf-8")).get("target_modules") or []
    if "lm_head" in targets and model.config.get_text_config().tie_word_embeddings:
        # A LoRA on a tied head must not leak into the input embedding: merge into an untied copy.
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.get_text_config().tie_word_embeddings = False
        model.config.tie_word_embeddings = False
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(dtype)
    merged.save_pretrained(str(out), safe_serialization=True)
    for name in _COPIED:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    return out
