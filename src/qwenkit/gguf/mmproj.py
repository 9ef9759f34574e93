"""A Qwen VL checkpoint's vision tower → a llama.cpp "mmproj" GGUF (clip metadata, v.* / mm.* tensors).

Contract: convert_mmproj() reads the vision tower (model.visual.* or visual.*) of a qwen2_5_vl, qwen3_vl,
qwen3_vl_moe, qwen3_5 or qwen3_5_moe checkpoint and writes, with gguf.GGUFWriter, the keys and tensor names
llama.cpp's mtmd/clip loader reads: projector qwen2.5vl_merger (Qwen2.5-VL: RMSNorm, SiLU-gated MLP, split
q/k/v, window attention every n_wa_pattern blocks) or qwen3vl_merger (Qwen3-VL, Qwen3.5: LayerNorm, GELU MLP,
fused qkv, learned position grid, deepstack mergers). The Conv3d patch embedding is split into its two
temporal Conv2d halves. Matrices take the outtype; vectors, norms, biases and the position grid stay f32.
ensure_mmproj() writes mmproj-<outtype>.gguf beside the text GGUF (same cache directory as ensure_gguf) and
reuses it while the inputs and MMPROJ_VERSION match. resolve_mmproj() picks the projector for a resolved
model: a given file (checked to be a clip GGUF) or "auto" (convert the HF checkpoint's tower).
Bad input raises MmprojError (a ConversionError).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import gguf
import numpy as np
from safetensors import SafetensorError, safe_open

from qwenkit.checkpoints.resolve import ResolvedModel
from qwenkit.gguf.convert import ConversionError, checkpoint_name, gguf_cache_key
from qwenkit.gguf.files import gguf_file, read_json, write_gguf
from qwenkit.gguf.reader import GGUFReadError, MetadataReader, check_gguf_magic
from qwenkit.paths import cache_root

__all__ = [
    "MMPROJ_VERSION",
    "MmprojError",
    "MmprojOutType",
    "convert_mmproj",
    "ensure_mmproj",
    "mmproj_path_for",
    "resolve_mmproj",
    "vision_family",
]

# Bump whenever the bytes convert_mmproj() writes change, so ensure_mmproj() rebuilds cached files.
MMPROJ_VERSION = 1
MmprojOutType = Literal["f32", "f16"]

_QWEN25VL, _QWEN3VL = gguf.VisionProjectorType.QWEN25VL, gguf.VisionProjectorType.QWEN3VL
# model_type → projector; Qwen3.5 reuses Qwen3-VL's vision tower (without deepstack).
_PROJECTORS = {
    "qwen2_5_vl": _QWEN25VL,
    "qwen3_vl": _QWEN3VL,
    "qwen3_vl_moe": _QWEN3VL,
    "qwen3_5": _QWEN3VL,
    "qwen3_5_moe": _QWEN3VL,
}
# The preprocessors' normalisation when preprocessor_config.json is absent: CLIP's for Qwen2.5-VL, 0.5 for
# Qwen3-VL / Qwen3.5 (their hub preprocessor_config.json values).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)
_T = gguf.MODEL_TENSOR
_MERGER_INDEXES = 3  # Qwen2.5-VL's merger: mlp.0, (GELU), mlp.2
_OUTTYPES = {"f32": np.float32, "f16": np.float16}
_FTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}


class MmprojError(ConversionError):
    """The checkpoint's vision tower cannot be converted; the message is one line naming the fix."""


def vision_family(config: Mapping[str, Any]) -> str | None:
    """The model_type whose vision tower convert_mmproj() understands, or None (a text-only model)."""
    model_type = config.get("model_type")
    if model_type in _PROJECTORS and isinstance(config.get("vision_config"), Mapping):
        return str(model_type)
    return None


def _read_config(directory: Path) -> dict[str, Any]:
    config = read_json(
        directory / "config.json",
        MmprojError,
        "re-download the checkpoint",
        missing=f"no config.json in {directory}: pass a Hugging Face-layout checkpoint",
    )
    if not isinstance(config, dict) or vision_family(config) is None:
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise MmprojError(
            f"{directory} (model_type {model_type!r}) has no vision tower qwenkit converts: "
            f"use a {', '.join(_PROJECTORS)} checkpoint, or pass a .gguf with --mmproj FILE"
        )
    return config


def _preprocessor(directory: Path, family: str) -> tuple[list[float], list[float]]:
    """image_mean / image_std from preprocessor_config.json (or processor_config.json), else the family's."""
    default = (_CLIP_MEAN, _CLIP_STD) if family == "qwen2_5_vl" else (_HALF, _HALF)
    merged: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = directory / name
        if path.is_file():
            data = read_json(path, MmprojError, "re-download the checkpoint")
            if isinstance(data, dict):
                merged |= data | (data.get("image_processor") or {})
    mean, std = merged.get("image_mean", default[0]), merged.get("image_std", default[1])
    return [float(x) for x in mean], [float(x) for x in std]


def _vision_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name without the model./visual. prefix, f32 array) for every vision-tower tensor, in file order."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MmprojError(f"no *.safetensors weights in {directory}: finish the download")
    for path in files:
        try:
            handle = safe_open(str(path), framework="numpy")
        except (SafetensorError, OSError) as exc:
            raise MmprojError(f"{path} is not a readable safetensors file ({exc}): re-download it") from None
        with handle as opened:
            for key in opened.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                for prefix in ("model.visual.", "visual."):
                    if key.startswith(prefix):
                        yield key[len(prefix) :], opened.get_tensor(key).astype(np.float32)


def _rename(
    name: str, value: np.ndarray, family: str, vision: Mapping[str, Any], names: gguf.TensorNameMap
) -> list[tuple[str, np.ndarray]]:
    """One HF vision tensor → its llama.cpp name(s) and values."""
    if name == "patch_embed.proj.weight":
        # Conv3d (out, C, T=2, p, p) → two Conv2d kernels, one per temporal frame, summed by the graph.
        if value.ndim != 5 or value.shape[2] != 2:
            raise MmprojError(
                f"patch_embed.proj.weight has shape {value.shape}: temporal_patch_size must be 2"
            )
        return [("v.patch_embd.weight", value[:, :, 0]), ("v.patch_embd.weight.1", value[:, :, 1])]
    if name == "patch_embed.proj.bias":
        return [("v.patch_embd.bias", value)]
    if name.startswith("deepstack_merger_list."):
        _, index, rest = name.split(".", 2)
        layer = list(vision.get("deepstack_visual_indexes", []))[int(index)]
        part, suffix = rest.split(".", 1)
        kind = {"norm": _T.V_DS_NORM, "linear_fc1": _T.V_DS_FC1, "linear_fc2": _T.V_DS_FC2}.get(part)
        if kind is None:
            raise MmprojError(f"unexpected vision tensor {name}: update qwenkit")
        return [(gguf.TENSOR_NAMES[kind].format(bid=layer) + "." + suffix, value)]
    if family != "qwen2_5_vl" and name.startswith("merger."):
        part, suffix = name[len("merger.") :].split(".", 1)
        target = {"norm": "v.post_ln", "linear_fc1": "mm.0", "linear_fc2": "mm.2"}.get(part)
        if target is None:
            raise MmprojError(f"unexpected vision tensor {name}: update qwenkit")
        return [(f"{target}.{suffix}", value)]
    if family == "qwen2_5_vl" and ".attn.qkv." in name:
        # qwen2.5vl_merger reads q, k and v separately.
        q, k, v = np.split(value, 3, axis=0)
        return [
            (_mapped(names, name.replace(".qkv.", f".{part}.")), t)
            for part, t in (("q", q), ("k", k), ("v", v))
        ]
    return [(_mapped(names, name), value)]


def _mapped(names: gguf.TensorNameMap, name: str) -> str:
    # gguf's table knows the hub's vision block names (visual.blocks.N.attn.qkv, .norm1, .mlp.*, pos_embed).
    mapped = names.get_name("visual." + name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise MmprojError(f"unexpected vision tensor {name}: update qwenkit")
    return mapped


def convert_mmproj(
    checkpoint_dir: Path, out_path: Path, outtype: MmprojOutType = "f16", *, name: str | None = None
) -> Path:
    """Write the vision tower of the checkpoint at `checkpoint_dir` as an mmproj GGUF at `out_path`."""
    checkpoint_dir, out_path = Path(checkpoint_dir).expanduser(), Path(out_path).expanduser()
    if outtype not in _OUTTYPES:
        raise MmprojError(
            f"unknown mmproj outtype {outtype!r}: use one of {', '.join(get_args(MmprojOutType))}"
        )
    if out_path.suffix.lower() != ".gguf" or out_path.is_dir():
        raise MmprojError(
            f"output {out_path} must be a file path ending in .gguf, e.g. mmproj-{outtype}.gguf"
        )
    config = _read_config(checkpoint_dir)
    family = str(vision_family(config))
    vision: dict[str, Any] = dict(config["vision_config"])
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    depth, patch = int(vision["depth"]), int(vision.get("patch_size", 14))
    # gguf's map numbers Qwen2.5-VL's merger.mlp.0 / mlp.2 like blocks: cover index 2 for a shallow tower too.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(depth, _MERGER_INDEXES))
    tensors: list[tuple[str, np.ndarray]] = []
    for hf_name, value in _vision_tensors(checkpoint_dir):
        if hf_name.startswith("blocks.") and int(hf_name.split(".")[1]) >= depth:
            raise MmprojError(
                f"vision tensor {hf_name} is beyond vision_config depth {depth}: re-download the checkpoint"
            )
        tensors.extend(_rename(hf_name, value, family, vision, names))
    if not tensors:
        raise MmprojError(f"{checkpoint_dir} has no vision-tower tensors (model.visual.*): re-download it")
    mean, std = _preprocessor(checkpoint_dir, family)

    with gguf_file(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]) as writer:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(name or checkpoint_name(checkpoint_dir))
        writer.add_file_type(_FTYPES[outtype])
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(_PROJECTORS[family])
        writer.add_vision_projection_dim(int(vision.get("out_hidden_size") or text["hidden_size"]))
        if family == "qwen2_5_vl":
            image_size = int(vision.get("image_size", 560))
        else:
            # The learned position grid is sqrt(num_position_embeddings) patches per side.
            image_size = int(round(int(vision["num_position_embeddings"]) ** 0.5) * patch)
        writer.add_vision_image_size(image_size)
        writer.add_vision_patch_size(patch)
        writer.add_vision_embedding_length(int(vision["hidden_size"]))
        writer.add_vision_feed_forward_length(int(vision["intermediate_size"]))
        writer.add_vision_block_count(depth)
        writer.add_vision_head_count(int(vision["num_heads"]))
        writer.add_vision_image_mean(mean)
        writer.add_vision_image_std(std)
        writer.add_vision_spatial_merge_size(int(vision.get("spatial_merge_size", 2)))
        # transformers' vision norms use eps 1e-6, as does every Qwen text config's rms_norm_eps.
        writer.add_vision_attention_layernorm_eps(float(text.get("rms_norm_eps", 1e-6)))
        if family == "qwen2_5_vl":
            writer.add_vision_use_silu(True)
            writer.add_vision_n_wa_pattern(_window_pattern(vision))
            writer.add_vision_window_size(int(vision.get("window_size", 112)))
        else:
            writer.add_vision_use_gelu(True)
            deepstack = set(vision.get("deepstack_visual_indexes") or [])
            writer.add_vision_is_deepstack_layers([i in deepstack for i in range(depth)])
        for tensor_name, value in tensors:
            # Vectors (norms, biases) stay f32, and so does the position grid: ggml_interpolate, which
            # resizes it to the image, takes only f32. Matrices and kernels take the outtype.
            keep_f32 = value.ndim < 2 or tensor_name.startswith("v.position_embd.")
            dtype = np.float32 if keep_f32 else _OUTTYPES[outtype]
            writer.add_tensor(tensor_name, np.ascontiguousarray(value.astype(dtype)))
        write_gguf(writer)
    return out_path


def _window_pattern(vision: Mapping[str, Any]) -> int:
    """Qwen2.5-VL's full-attention blocks must be evenly spaced: llama.cpp stores only the period."""
    full = list(vision.get("fullatt_block_indexes") or [])
    if not full:
        raise MmprojError("qwen2_5_vl vision_config lacks fullatt_block_indexes: re-download config.json")
    period = full[0] + 1
    if any(b - a != period for a, b in itertools.pairwise(full)):
        raise MmprojError(
            f"fullatt_block_indexes {full} are not evenly spaced: llama.cpp cannot run this tower"
        )
    return period


def mmproj_path_for(
    checkpoint_dir: Path,
    text_outtype: str = "q8_0",
    outtype: MmprojOutType = "f16",
    env: Mapping[str, str] | None = None,
) -> Path:
    """Where ensure_mmproj() keeps the projector: beside ensure_gguf()'s text GGUF for the same checkpoint."""
    key = gguf_cache_key(Path(checkpoint_dir).expanduser(), text_outtype)  # type: ignore[arg-type]
    return cache_root(env) / "gguf" / key / f"mmproj-{outtype}.gguf"


def ensure_mmproj(
    checkpoint_dir: Path,
    text_outtype: str = "q8_0",
    outtype: MmprojOutType = "f16",
    env: Mapping[str, str] | None = None,
) -> Path:
    """The checkpoint's vision tower as an mmproj GGUF in the qwenkit cache, converted on first use."""
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    _read_config(checkpoint_dir)
    target = mmproj_path_for(checkpoint_dir, text_outtype, outtype, env)
    stamp = target.with_name(f"mmproj-{outtype}.json")
    source = {"checkpoint": str(checkpoint_dir.resolve()), "outtype": outtype, "mmproj": MMPROJ_VERSION}
    if target.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text("utf-8")) == source:
                return target
        except (OSError, ValueError):
            pass
    convert_mmproj(checkpoint_dir, target, outtype)
    stamp.write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return target


def _check_mmproj_file(path: Path) -> Path:
    """A user-supplied projector: an existing GGUF whose architecture is clip with a vision encoder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MmprojError(f"no such mmproj file: {path}: pass the projector GGUF (often mmproj-*.gguf)")
    try:
        check_gguf_magic(path)
    except GGUFReadError:
        raise MmprojError(f"{path} is not a GGUF file: pass the projector GGUF (mmproj-*.gguf)") from None
    try:
        # MetadataReader skips decoding string arrays: a text GGUF passed by mistake is read in ms, not 10 s.
        reader = MetadataReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise MmprojError(f"{path} is truncated or corrupt ({exc}): re-download the projector GGUF") from None

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if arch != "clip" or not value("clip.has_vision_encoder"):
        raise MmprojError(
            f"{path} is not a vision projector (architecture {arch!r}): "
            "pass the mmproj-*.gguf that ships beside the model"
        )
    return path


def resolve_mmproj(
    resolved: ResolvedModel,
    mmproj: Path | Literal["auto"] | None,
    text_outtype: str = "q8_0",
    env: Mapping[str, str] | None = None,
) -> Path | None:
    """The projector for `resolved`: None when not asked for; a given file (checked); or, with "auto",
    the HF checkpoint's own vision tower converted and cached (a .gguf model needs an explicit file)."""
    if mmproj is None:
        return None
    if mmproj != "auto":
        return _check_mmproj_file(Path(mmproj))
    if resolved.kind == "gguf":
        raise MmprojError(
            f"{resolved.path} is a .gguf text model: pass its projector with --mmproj FILE (mmproj-*.gguf)"
        )
    return ensure_mmproj(resolved.path, text_outtype, env=env)
