"""Hugging Face safetensors Qwen checkpoint → a GGUF file that llama.cpp loads.

Contract: convert_to_gguf() reads a qwen2 / qwen3 / qwen2_moe / qwen3_moe / qwen3_5 / qwen3_5_moe / qwen3_next
/ qwen2_5_vl / qwen3_vl checkpoint (one file or shards with model.safetensors.index.json) one tensor at a
time (an MoE layer's experts: one stacked tensor) and writes, with gguf.GGUFWriter, llama.cpp's metadata
keys, its tensor names and its tokenizer layout; norms, 1-D tensors and conv kernels stay f32 as llama.cpp's
own converter keeps them. A multimodal config's text_config is used; its vision tower and MTP head are
skipped with a note.
Qwen2.5-VL's and Qwen3-VL's text towers become llama.cpp's qwen2vl / qwen3vl (the qwen2 / qwen3 tensors, with
the M-RoPE sections; qwen3vl also the deepstack layer count, which widens its input rows for image features).
An embedding checkpoint (Qwen3-Embedding: bare Qwen3Model tensor names, a sentence-transformers last-token
pooling module) gets `{arch}.pooling_type` = LAST.
Qwen3.5's Gated DeltaNet tensors get llama.cpp's layout (ssm_a = -exp(A_log), norms +1, value heads tiled,
not grouped).
Qwen3-Next (qwen3next) shares that code: its fused in_proj_qkvz is split into attn_qkv + attn_gate, in_proj_ba
is written whole (ssm_ba), and value heads stay grouped (llama.cpp's qwen3next graph repeats keys per group).
The file appears atomically (temp file + rename).
ensure_gguf() converts once into <cache root>/gguf/<key>/ and reuses the result. Bad input raises
ConversionError (a ValueError) whose one-line message names the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, Literal, get_args

import gguf
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype, which safe_open needs for bf16 weights)
import numpy as np
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from qwenkit.checkpoints.embedding import (
    MODULES_FILE,
    POOLING_FILE,
    EmbeddingSpecError,
    embedding_spec_from_dir,
)
from qwenkit.gguf.files import gguf_file, read_json, write_gguf
from qwenkit.paths import cache_root
from qwenkit.tokenizer.specials import ENDOFTEXT

__all__ = [
    "CONVERTER_VERSION",
    "ConversionError",
    "OutType",
    "ProgressCallback",
    "checkpoint_name",
    "convert_to_gguf",
    "ensure_gguf",
    "flat_text_config",
    "gguf_cache_key",
    "gguf_tensor_namer",
    "text_tensor_name",
]

# Bump whenever the bytes convert_to_gguf() writes change, so ensure_gguf() rebuilds cached files.
CONVERTER_VERSION = 2

OutType = Literal["f32", "f16", "bf16", "q8_0"]
ProgressCallback = Callable[[int, int], None]

ARCHES: dict[str, gguf.MODEL_ARCH] = {
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
    "qwen3_5": gguf.MODEL_ARCH.QWEN35,
    "qwen3_5_moe": gguf.MODEL_ARCH.QWEN35MOE,
    "qwen3_next": gguf.MODEL_ARCH.QWEN3NEXT,
    "qwen2_5_vl": gguf.MODEL_ARCH.QWEN2VL,
    "qwen3_vl": gguf.MODEL_ARCH.QWEN3VL,
}
# A text tower saved on its own (Qwen3_5ForCausalLM) names itself after its text config.
_TEXT_MODEL_TYPES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}
_QWEN35 = (gguf.MODEL_ARCH.QWEN35, gguf.MODEL_ARCH.QWEN35MOE)
_HYBRID = (*_QWEN35, gguf.MODEL_ARCH.QWEN3NEXT)
_MOE = (
    gguf.MODEL_ARCH.QWEN2MOE,
    gguf.MODEL_ARCH.QWEN3MOE,
    gguf.MODEL_ARCH.QWEN35MOE,
    gguf.MODEL_ARCH.QWEN3NEXT,
)
# VL text towers: M-RoPE over the whole head (images take (t, y, x) positions).
_VL = (gguf.MODEL_ARCH.QWEN2VL, gguf.MODEL_ARCH.QWEN3VL)
_SHARED_EXPERT = (gguf.MODEL_ARCH.QWEN2MOE, gguf.MODEL_ARCH.QWEN35MOE, gguf.MODEL_ARCH.QWEN3NEXT)
# Qwen3-Next's fused DeltaNet input projection, split into the two tensors llama.cpp's fast path reads.
_QKVZ = ".linear_attn.in_proj_qkvz.weight"
# Qwen3.5's mrope split of the rotary pairs (time, height, width, extra); text uses one position for all.
_DEFAULT_MROPE_SECTION = (11, 11, 10, 0)
_OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# The routers and conv kernels stay f32, as llama.cpp's converter and quantizer keep them.
_F32_TENSORS = (
    gguf.MODEL_TENSOR.FFN_GATE_INP,
    gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
    gguf.MODEL_TENSOR.SSM_CONV1D,
)
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# transformers 5 / some hub MoE checkpoints store each layer's experts fused: (experts, 2 * ff, hidden) etc.
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_BARE_PREFIXES = ("embed_tokens.", "layers.", "norm.")
# Multimodal checkpoints: the vision tower (a separate mmproj file) and the MTP draft head are not converted.
_SKIPPED_PREFIXES = ("model.visual.", "visual.", "mtp.", "model.mtp.")
# llama.cpp's names for the pre-tokenizer regexes: Qwen2/2.5/3, and Qwen3.5's (letters include marks, \p{M}).
_TOKENIZER_PRE, _TOKENIZER_PRE_QWEN35 = "qwen2", "qwen35"
_ROWS_PER_CHUNK = 16_384  # bounds the f32 copy of a big embedding while it is encoded
_HASHED_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    POOLING_FILE,
    MODULES_FILE,
)
logger = logging.getLogger(__name__)
Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, or a bad argument; the message is one line naming the fix."""


@dataclass(frozen=True)
class _Planned:
    """One GGUF tensor: its HF sources (several = experts stacked in order), numpy shape and type.

    transform, when set, maps each whole source (as f32) to the values written (then `shape` is the result's).
    """

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    transform: Transform | None = None

    @property
    def nbytes(self) -> int:
        return prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))


def convert_to_gguf(
    checkpoint_dir: Path,
    out_path: Path,
    outtype: OutType = "q8_0",
    progress: ProgressCallback | None = None,
    *,
    name: str | None = None,
    note: Callable[[str], None] | None = None,
) -> Path:
    """Convert an HF-layout Qwen checkpoint to a GGUF at `out_path`; `progress(done, total)` per tensor.

    `note(text)` hears what was left out (a vision tower, an MTP head); by default it goes to the log.
    """
    checkpoint_dir, out_path = Path(checkpoint_dir).expanduser(), Path(out_path).expanduser()
    qtype, ftype = _outtype(outtype)
    if out_path.suffix.lower() != ".gguf":
        raise ConversionError(f"output {out_path} must end in .gguf: pass a path like model-{outtype}.gguf")
    if out_path.is_dir():
        raise ConversionError(f"output {out_path} is a directory: pass a file path ending in .gguf")
    config = _read_config(checkpoint_dir)
    model_type = config["model_type"]
    arch = ARCHES[model_type]
    _check_supported(config, checkpoint_dir)
    try:
        embedding = embedding_spec_from_dir(checkpoint_dir, config) is not None
    except EmbeddingSpecError as exc:
        raise ConversionError(str(exc)) from None
    weight_files = _weight_files(checkpoint_dir)

    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(_open_safetensors(path)) for path in weight_files}
        located = _locate(handles)
        skipped = sorted(k for k in located if k.startswith(_SKIPPED_PREFIXES))
        if skipped:
            (note or logger.warning)(_skipped_note(skipped))
        located = {k: v for k, v in located.items() if not k.startswith(_SKIPPED_PREFIXES)}
        plan = _plan(located, handles, config, arch, qtype)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _check_disk_space(out_path.parent, sum(p.nbytes for p in plan))

        def encoded() -> Iterator[np.ndarray]:
            for done, planned in enumerate(plan, start=1):
                yield _encode(planned, located, handles)
                if progress is not None:  # runs once the array is written
                    progress(done, len(plan))

        with gguf_file(out_path, gguf.MODEL_ARCH_NAMES[arch]) as writer:
            _add_metadata(writer, config, ftype, name or checkpoint_name(checkpoint_dir))
            if embedding:  # llama.cpp reads {arch}.pooling_type; Qwen3-Embedding pools the last token
                writer.add_pooling_type(gguf.PoolingType.LAST)
            _add_vocab(writer, checkpoint_dir, config)
            for planned in plan:
                writer.add_tensor_info(
                    planned.name, planned.shape, np.dtype(np.float32), planned.nbytes, planned.qtype
                )
            write_gguf(writer, encoded())
    return out_path


def gguf_cache_key(checkpoint_dir: Path, outtype: OutType) -> str:
    """sha256 over the config/tokenizer files, each weight file's size, mtime and header, outtype, version."""
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    _outtype(outtype)
    digest = hashlib.sha256(f"qwenkit-gguf {CONVERTER_VERSION} {outtype}\n".encode())
    for name in _HASHED_FILES:
        path = checkpoint_dir / name
        if path.is_file():
            digest.update(f"{name} {path.stat().st_size}\n".encode())
            digest.update(path.read_bytes())
    for path in _weight_files(checkpoint_dir):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        digest.update(_safetensors_header(path))
    return digest.hexdigest()


def ensure_gguf(
    checkpoint_dir: Path,
    outtype: OutType = "q8_0",
    env: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """The checkpoint as a GGUF in the qwenkit cache: converted on first use, reused while inputs match."""
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    _read_config(checkpoint_dir)  # fail on a non-Qwen dir before hashing gigabytes of headers
    target = cache_root(env) / "gguf" / gguf_cache_key(checkpoint_dir, outtype) / f"model-{outtype}.gguf"
    if target.is_file():
        return target
    convert_to_gguf(checkpoint_dir, target, outtype, progress)
    source = {"checkpoint": str(checkpoint_dir.resolve()), "outtype": outtype, "converter": CONVERTER_VERSION}
    (target.parent / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return target


def _outtype(outtype: str) -> tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]:
    try:
        return _OUTTYPES[outtype]
    except KeyError:
        raise ConversionError(
            f"unknown outtype {outtype!r}: use one of {', '.join(get_args(OutType))} "
            "(smaller types come from `qwenkit quantize`)"
        ) from None


def _read_config(directory: Path) -> dict[str, Any]:
    config = read_json(
        directory / "config.json",
        ConversionError,
        "re-download the checkpoint",
        missing=f"no config.json in {directory}: pass a Hugging Face-layout checkpoint directory",
    )
    config = flat_text_config(config) if isinstance(config, dict) else {}
    model_type = config.get("model_type")
    if model_type not in ARCHES:
        raise ConversionError(
            f"{directory} is model_type {model_type!r}: GGUF conversion supports {', '.join(ARCHES)}"
        )
    return config


def flat_text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The text model's settings at the top level: a multimodal config's text_config merged over the rest
    (as llama.cpp's converter reads it); a text tower's own model_type (qwen3_5_text) becomes its family's."""
    text = config.get("text_config")
    flat = {**config, **text} if isinstance(text, dict) else dict(config)
    model_type = config.get("model_type")
    flat["model_type"] = _TEXT_MODEL_TYPES.get(model_type, model_type)  # type: ignore[arg-type]
    return flat


def _check_supported(config: Mapping[str, Any], directory: Path) -> None:
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ConversionError(
            f"{directory} is already quantized ({method}): convert the bf16 original, then `qwenkit quantize`"
        )
    model_type = config["model_type"]
    moe = ARCHES[model_type] in _MOE
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    if moe:
        required += ["num_experts", "num_experts_per_tok", "moe_intermediate_size"]
    required += ["intermediate_size"] if model_type != "qwen3_5_moe" else []  # qwen3_5_moe has no dense FFN
    if ARCHES[model_type] in _HYBRID:
        required += [f"linear_{key}" for key in ("conv_kernel_dim", "key_head_dim", "value_head_dim")]
        required += ["linear_num_key_heads", "linear_num_value_heads", "head_dim"]
    missing = [key for key in required if not isinstance(config.get(key), int)]
    if missing:
        raise ConversionError(f"{directory}/config.json lacks {missing[0]}: re-download the checkpoint")
    if ARCHES[model_type] in _HYBRID:
        _check_hybrid(config, directory)
    deepstack = len((config.get("vision_config") or {}).get("deepstack_visual_indexes") or ())
    if ARCHES[model_type] == gguf.MODEL_ARCH.QWEN3VL and deepstack >= config["num_hidden_layers"]:
        # llama.cpp's qwen3vl graph would abort on the first image (GGML_ASSERT in its deepstack add).
        raise ConversionError(
            f"{directory} has {deepstack} deepstack layers but only {config['num_hidden_layers']} text "
            "layers: llama.cpp's qwen3vl needs more text layers (recreate a demo with `qwenkit demo create`)"
        )
    if moe:
        step = config.get("decoder_sparse_step", 1)
        if config.get("mlp_only_layers") or step != 1:
            raise ConversionError(
                f"{directory} mixes dense and MoE layers (mlp_only_layers/decoder_sparse_step), "
                f"which llama.cpp's {model_type} graph cannot run"
            )
        # llama.cpp hard-codes top-k weight normalisation: off for qwen2moe, on for the others.
        wants_norm = model_type != "qwen2_moe"
        if bool(config.get("norm_topk_prob", wants_norm)) != wants_norm:
            raise ConversionError(
                f"{directory} sets norm_topk_prob={config.get('norm_topk_prob')}, which llama.cpp's "
                f"{model_type} graph does not support: serve this checkpoint with --engine vllm instead"
            )


def _check_hybrid(config: Mapping[str, Any], directory: Path) -> None:
    """What llama.cpp's qwen35 / qwen3next graphs assume of the DeltaNet layers, checked before writing."""
    n_k, n_v = config["linear_num_key_heads"], config["linear_num_value_heads"]
    if config["linear_key_head_dim"] != config["linear_value_head_dim"] or n_v % n_k:
        raise ConversionError(
            f"{directory} has linear-attention key/value heads {n_k}x{config['linear_key_head_dim']} / "
            f"{n_v}x{config['linear_value_head_dim']}: llama.cpp needs equal head dims and value heads a "
            "multiple of key heads"
        )
    interval = _full_attention_interval(config)
    if interval is None:
        raise ConversionError(
            f"{directory}/config.json layer_types is not one full-attention layer every N layers, "
            f"which llama.cpp's {gguf.MODEL_ARCH_NAMES[ARCHES[config['model_type']]]} graph requires"
        )


def _full_attention_interval(config: Mapping[str, Any]) -> int | None:
    """N when every Nth layer (and only those) is full attention, as llama.cpp derives the layer kinds."""
    n_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    if layer_types is None:
        return int(config.get("full_attention_interval", 4))
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if len(layer_types) != n_layers or not full:
        return None
    interval = full[0] + 1
    pattern = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    return interval if list(layer_types) == pattern else None


def _is_recurrent(config: Mapping[str, Any], layer: int) -> bool:
    interval = _full_attention_interval(config)
    assert interval is not None  # checked by _check_hybrid
    return (layer + 1) % interval != 0


def _weight_files(directory: Path) -> tuple[Path, ...]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConversionError(f"{index} is not a valid shard index: re-download the checkpoint") from None
        files = tuple(directory / name for name in names)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(
                f"{directory} lacks shard {missing[0]} named in its index: finish or repeat the download"
            )
        return files
    files = tuple(sorted(directory.glob("*.safetensors")))
    if not files:
        raise ConversionError(
            f"no *.safetensors weights in {directory}: finish the download or convert the weights"
        )
    return files


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConversionError(
            f"{path} is not a readable safetensors file ({reason}): re-download it"
        ) from None
    with handle as opened:
        yield opened


def _safetensors_header(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path} is truncated (no safetensors header): re-download it")
        (length,) = struct.unpack("<Q", head)
        if length > 100_000_000:
            raise ConversionError(f"{path} has a corrupt safetensors header: re-download it")
        return head + f.read(length)


def _locate(handles: Mapping[Path, Any]) -> dict[str, Path]:
    located: dict[str, Path] = {}
    for path, handle in handles.items():
        for key in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
            if key in located:
                raise ConversionError(
                    f"tensor {key} is in both {located[key].name} and {path.name}: re-download"
                )
            located[key] = path
    return located


def _qtype_for(
    name: str, kind: gguf.MODEL_TENSOR, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """llama.cpp's rule: 1-D tensors, norms, biases and routers stay f32; rows that don't fit blocks → f16."""
    if (
        len(shape) <= 1
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")
        or kind in _F32_TENSORS
    ):
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        return gguf.GGMLQuantizationType.F16
    return qtype


def text_tensor_name(key: str) -> str:
    """A text-model tensor's plain HF name: a multimodal checkpoint nests the text model under
    model.language_model; an embedding checkpoint (a bare Qwen3Model) has no "model." prefix at all."""
    prefix = "model.language_model."
    if key.startswith(_BARE_PREFIXES):
        return "model." + key
    return "model." + key.removeprefix(prefix) if key.startswith(prefix) else key


def gguf_tensor_namer(
    arch: gguf.MODEL_ARCH, n_layers: int
) -> Callable[[str, tuple[str, ...]], tuple[gguf.MODEL_TENSOR, str] | None]:
    """HF tensor name (suffixes tried, e.g. .weight) → (kind, llama.cpp's GGUF name), or None: the one name
    map convert_to_gguf() and the LoRA converter (gguf/lora.py) share."""
    names = gguf.get_tensor_name_map(arch, n_layers)

    def name_of(hf_name: str, suffixes: tuple[str, ...]) -> tuple[gguf.MODEL_TENSOR, str] | None:
        return names.get_type_and_name(text_tensor_name(hf_name), try_suffixes=suffixes)

    return name_of


def _plan(
    located: Mapping[str, Path],
    handles: Mapping[Path, Any],
    config: Mapping[str, Any],
    arch: gguf.MODEL_ARCH,
    qtype: gguf.GGMLQuantizationType,
) -> list[_Planned]:
    n_layers = config["num_hidden_layers"]
    names = gguf_tensor_namer(arch, n_layers)
    tied = bool(config.get("tie_word_embeddings", False))
    n_experts = int(config.get("num_experts") or 0)
    plan: list[_Planned] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}

    def shape_of(key: str) -> tuple[int, ...]:
        return tuple(handles[located[key]].get_slice(key).get_shape())

    def gguf_name_of(hf_name: str, suffixes: tuple[str, ...]) -> tuple[gguf.MODEL_TENSOR, str]:
        found = names(hf_name, suffixes)
        if found is None:
            raise ConversionError(
                f"unexpected tensor {hf_name} for {gguf.MODEL_ARCH_NAMES[arch]}: "
                "is this a plain Qwen text checkpoint? (adapters must be merged first)"
            )
        return found

    for key in located:
        if key.endswith(_IGNORED_SUFFIXES) or (tied and key.endswith("lm_head.weight")):
            continue
        dtype = handles[located[key]].get_slice(key).get_dtype()
        if dtype not in ("F32", "F16", "BF16"):
            raise ConversionError(
                f"tensor {key} is {dtype}, not a float checkpoint: convert the bf16/f16 original instead"
            )
        hf_name = text_tensor_name(key)
        if match := _EXPERT.match(hf_name):
            layer, expert, proj = int(match[1]), int(match[2]), match[3]
            experts.setdefault((layer, proj), {})[expert] = key
            continue
        if match := _FUSED_EXPERTS.match(hf_name):
            plan += _fused_experts(
                key, int(match[1]), match[2], shape_of(key), n_experts, gguf_name_of, qtype
            )
            continue
        if arch == gguf.MODEL_ARCH.QWEN3NEXT and hf_name.endswith(_QKVZ):
            plan += _split_qkvz(key, hf_name, shape_of(key), config, gguf_name_of, qtype)
            continue
        lookup = (
            hf_name.removesuffix(".dt_bias") + ".dt_proj.bias" if hf_name.endswith(".dt_bias") else hf_name
        )
        kind, gguf_name = gguf_name_of(lookup, (".weight", ".bias"))
        shape = shape_of(key)
        if kind == gguf.MODEL_TENSOR.SSM_CONV1D:
            shape = (shape[0], shape[-1])  # (channels, 1, kernel) → (channels, kernel)
        transform = _hybrid_transform(hf_name, config) if arch in _HYBRID else None
        plan.append(_Planned(gguf_name, (key,), shape, _qtype_for(gguf_name, kind, shape, qtype), transform))

    for (layer, proj), by_index in sorted(experts.items()):
        if sorted(by_index) != list(range(n_experts)):
            raise ConversionError(
                f"layer {layer} has experts {sorted(by_index)[:4]}... for {proj}, config says num_experts="
                f"{n_experts}: the checkpoint is incomplete, re-download it"
            )
        sources = tuple(by_index[e] for e in range(n_experts))
        shapes = {shape_of(k) for k in sources}
        if len(shapes) != 1:
            raise ConversionError(
                f"layer {layer}'s {proj} experts differ in shape: re-download the checkpoint"
            )
        kind, gguf_name = gguf_name_of(f"model.layers.{layer}.mlp.experts.{proj}.weight", (".weight",))
        shape = (n_experts, *shapes.pop())
        plan.append(_Planned(gguf_name, sources, shape, _qtype_for(gguf_name, kind, shape, qtype)))

    _check_complete(plan, config, arch, tied)
    return sorted(plan, key=_tensor_order)


def _fused_experts(
    key: str,
    layer: int,
    proj: str,
    shape: tuple[int, ...],
    n_experts: int,
    gguf_name_of: Callable[[str, tuple[str, ...]], tuple[gguf.MODEL_TENSOR, str]],
    qtype: gguf.GGMLQuantizationType,
) -> list[_Planned]:
    """One layer's experts stored as one 3-D tensor: down_proj as is, gate_up_proj split into gate and up."""
    if len(shape) != 3 or shape[0] != n_experts or (proj == "gate_up_proj" and shape[1] % 2):
        raise ConversionError(
            f"tensor {key} has shape {list(shape)}, not ({n_experts} experts, ...): re-download it"
        )
    if proj == "down_proj":
        parts: list[tuple[str, tuple[int, ...], Transform | None]] = [("down_proj", shape, None)]
    else:
        ff = shape[1] // 2  # transformers' fused layout: gate rows first, then up rows
        half = (n_experts, ff, shape[2])
        parts = [("gate_proj", half, lambda x: x[:, :ff]), ("up_proj", half, lambda x: x[:, ff:])]
    planned = []
    for name, part_shape, transform in parts:
        kind, gguf_name = gguf_name_of(f"model.layers.{layer}.mlp.experts.{name}.weight", (".weight",))
        planned.append(
            _Planned(gguf_name, (key,), part_shape, _qtype_for(gguf_name, kind, part_shape, qtype), transform)
        )
    return planned


def _split_qkvz(
    key: str,
    hf_name: str,
    shape: tuple[int, ...],
    config: Mapping[str, Any],
    gguf_name_of: Callable[[str, tuple[str, ...]], tuple[gguf.MODEL_TENSOR, str]],
    qtype: gguf.GGMLQuantizationType,
) -> list[_Planned]:
    """Qwen3-Next's in_proj_qkvz rows, per key head [q, k, its v heads, their z], regrouped into attn_qkv
    (all q, all k, all v: the conv's channel order) and attn_gate (all z), value heads kept grouped."""
    n_k, head_k = config["linear_num_key_heads"], config["linear_key_head_dim"]
    value_dim = config["linear_num_value_heads"] * config["linear_value_head_dim"]
    per_head = 2 * head_k + 2 * value_dim // n_k
    if len(shape) != 2 or shape[0] != n_k * per_head:
        raise ConversionError(
            f"tensor {key} has shape {list(shape)}, not ({n_k * per_head}, hidden) as config.json's "
            "linear-attention heads imply: re-download the checkpoint"
        )
    cuts = np.cumsum([head_k, head_k, value_dim // n_k])

    def part(index: int) -> Transform:
        # (rows, hidden) → (key heads, per-head rows, hidden) → this part of every head, heads in order.
        return lambda x: np.split(x.reshape(n_k, per_head, -1), cuts, axis=1)[index].reshape(-1, x.shape[-1])

    def qkv(x: np.ndarray) -> np.ndarray:
        return np.concatenate([part(i)(x) for i in range(3)])

    base = hf_name.removesuffix(_QKVZ) + ".linear_attn."
    planned = []
    for name, rows, transform in (
        ("in_proj_qkv", shape[0] - value_dim, qkv),
        ("in_proj_z", value_dim, part(3)),
    ):
        kind, gguf_name = gguf_name_of(f"{base}{name}.weight", (".weight",))
        out_shape = (rows, shape[1])
        planned.append(
            _Planned(gguf_name, (key,), out_shape, _qtype_for(gguf_name, kind, out_shape, qtype), transform)
        )
    return planned


def _hybrid_transform(name: str, config: Mapping[str, Any]) -> Transform | None:
    """llama.cpp's qwen35 layout for one HF tensor: norms +1, ssm_a = -exp(A_log), value heads tiled."""
    n_k, n_v = config["linear_num_key_heads"], config["linear_num_value_heads"]
    head_v, key_dim = config["linear_value_head_dim"], n_k * config["linear_key_head_dim"]

    def tiled(values: np.ndarray, axis: int, head_dim: int) -> np.ndarray:
        # HF groups value heads by key head (k0: v0..v{r-1}, k1: ...); ggml broadcasts k heads tiled
        # (k0, k1, ..., k0, k1, ...), so value head j of key head i moves to position j * n_k + i.
        moved = np.moveaxis(values, axis, 0)
        grouped = moved.reshape(n_k, n_v // n_k, head_dim, *moved.shape[1:])
        return np.moveaxis(grouped.swapaxes(0, 1).reshape(moved.shape), 0, axis)

    def qkv_channels(values: np.ndarray) -> np.ndarray:
        return np.concatenate([values[: 2 * key_dim], tiled(values[2 * key_dim :], 0, head_v)])

    if ".linear_attn." not in name:
        # Qwen3.5's RMSNorm scales by (1 + weight); llama.cpp's by weight.
        return (lambda x: x + 1) if name.endswith("norm.weight") else None
    if config["model_type"] == "qwen3_next":
        # llama.cpp's qwen3next graph reads value heads grouped by key head, as transformers stores them.
        leaf = name.rsplit(".linear_attn.", 1)[1]
        if leaf == "A_log":
            return lambda x: -np.exp(x)
        return (lambda x: x.reshape(x.shape[0], x.shape[-1])) if leaf == "conv1d.weight" else None
    leaf = name.rsplit(".linear_attn.", 1)[1]
    transforms: dict[str, Transform] = {
        "A_log": lambda x: tiled(-np.exp(x), 0, 1),
        "dt_bias": lambda x: tiled(x, 0, 1),
        "in_proj_a.weight": lambda x: tiled(x, 0, 1),
        "in_proj_b.weight": lambda x: tiled(x, 0, 1),
        "in_proj_z.weight": lambda x: tiled(x, 0, head_v),
        "out_proj.weight": lambda x: tiled(x, 1, head_v),
        "in_proj_qkv.weight": qkv_channels,
        "conv1d.weight": lambda x: qkv_channels(x.reshape(x.shape[0], x.shape[-1])),
    }
    return transforms.get(leaf)  # the gated norm (linear_attn.norm) is a plain scale: written as is


def _tensor_order(planned: _Planned) -> tuple[int, int, str]:
    # One canonical order (embeddings, blocks in number order, head) whatever the shard layout.
    parts = planned.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), planned.name)
    return (0 if parts[0] == "token_embd" else 2, 0, planned.name)


def _check_complete(
    plan: list[_Planned], config: Mapping[str, Any], arch: gguf.MODEL_ARCH, tied: bool
) -> None:
    have = {p.name for p in plan}
    needed = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    for layer in range(config["num_hidden_layers"]):
        needed += [f"blk.{layer}.{part}" for part in _layer_parts(config, arch, layer)]
    missing = [n for n in needed if n not in have]
    if missing:
        hint = " (lm_head.weight with tie_word_embeddings false)" if missing[0] == "output.weight" else ""
        raise ConversionError(
            f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}{hint}: re-download it"
        )


def _layer_parts(config: Mapping[str, Any], arch: gguf.MODEL_ARCH, layer: int) -> list[str]:
    """The GGUF tensors (after blk.N.) llama.cpp requires of one layer."""
    ffn = (
        ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
        if arch in _MOE
        else ["ffn_gate", "ffn_up", "ffn_down"]
    )
    if arch in _SHARED_EXPERT and config.get("shared_expert_intermediate_size"):
        ffn += ["ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
    attention = ["attn_q", "attn_k", "attn_v", "attn_output"]
    if arch not in (gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.QWEN2MOE, gguf.MODEL_ARCH.QWEN2VL):
        attention += ["attn_q_norm", "attn_k_norm"]
    if arch not in _HYBRID:
        return [f"{part}.weight" for part in ["attn_norm", *attention, "ffn_norm", *ffn]]
    if _is_recurrent(config, layer):
        gates = ["ssm_ba"] if arch == gguf.MODEL_ARCH.QWEN3NEXT else ["ssm_alpha", "ssm_beta"]
        linear = ["attn_qkv", "attn_gate", "ssm_conv1d", *gates, "ssm_norm", "ssm_out"]
        mixer = [f"{part}.weight" for part in linear] + ["ssm_dt.bias", "ssm_a"]
    else:
        mixer = [f"{part}.weight" for part in attention]
    return [f"{part}.weight" for part in ["attn_norm", "post_attention_norm", *ffn]] + mixer


def _check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise ConversionError(
            f"the GGUF needs {needed / 2**30:.1f} GiB but {directory} has {free / 2**30:.1f} GiB free: "
            "free some space or write elsewhere"
        )


def _encode(planned: _Planned, located: Mapping[str, Path], handles: Mapping[Path, Any]) -> np.ndarray:
    """Read the planned tensor's sources a block of rows at a time and encode them into one output array.

    A transformed or 3-D (fused experts) source is read whole first: those are small next to the embedding.
    """
    out: np.ndarray | None = None
    for index, key in enumerate(planned.sources):
        source = handles[located[key]].get_slice(key)
        shape = source.get_shape()
        if planned.transform is not None or len(shape) > 2:
            values = source[:].astype(np.float32)
            values = planned.transform(values) if planned.transform is not None else values
            matrix = values.reshape(-1, values.shape[-1])
            n_rows = matrix.shape[0]

            def rows(start: int, stop: int, matrix: np.ndarray = matrix) -> np.ndarray:
                return matrix[start:stop]

        else:
            n_rows = shape[0] if len(shape) == 2 else 1  # sources are matrices or vectors

            def rows(start: int, stop: int, source: Any = source, shape: Any = shape) -> np.ndarray:
                return source[start:stop] if len(shape) == 2 else source[:].reshape(1, -1)

        for start in range(0, n_rows, _ROWS_PER_CHUNK):
            stop = min(start + _ROWS_PER_CHUNK, n_rows)  # safetensors slices do not clamp
            chunk = gguf.quants.quantize(rows(start, stop).astype(np.float32), planned.qtype)
            if out is None:
                out = np.empty((len(planned.sources), n_rows, chunk.shape[-1]), dtype=chunk.dtype)
            out[index, start : start + chunk.shape[0]] = chunk
    assert out is not None
    # The last axis counts output elements: floats for F32/F16, bytes for BF16 and block types.
    return out.reshape(*planned.shape[:-1], out.shape[-1])


def _skipped_note(skipped: list[str]) -> str:
    vision = sum(1 for k in skipped if not k.startswith(("mtp.", "model.mtp.")))
    parts = [f"{vision} vision-tower tensor(s) (in the projector: --mmproj auto)"] if vision else []
    if len(skipped) > vision:
        parts.append(f"{len(skipped) - vision} MTP draft-head tensor(s)")
    return f"converting the text model only: skipped {' and '.join(parts)}"


def checkpoint_name(directory: Path) -> str:
    """A display name for a checkpoint dir: the repo name for a hub cache snapshot, else the dir name."""
    resolved = directory.resolve()
    # A hub cache snapshot lives in models--Org--Name/snapshots/<commit>.
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent.name.split("--")[-1]
    return resolved.name


def _rope(config: Mapping[str, Any]) -> tuple[float, Mapping[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either the hub's fields or transformers 5's rope_parameters."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10_000.0))
    scaling = config.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    return float(theta), scaling


def _add_metadata(
    writer: gguf.GGUFWriter, config: Mapping[str, Any], ftype: gguf.LlamaFileType, name: str
) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(int(config.get("max_position_embeddings", 32_768)))
    writer.add_embedding_length(config["hidden_size"])
    if isinstance(config.get("intermediate_size"), int):
        writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if head_dim := config.get("head_dim"):
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if scaling is not None:
        _add_rope_scaling(writer, scaling)
    if ARCHES[config["model_type"]] in _MOE:
        writer.add_expert_count(int(config["num_experts"]))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
        if shared := config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(int(shared))
    if ARCHES[config["model_type"]] in _HYBRID:
        _add_hybrid_metadata(writer, config)
    if ARCHES[config["model_type"]] in _VL:
        _add_vl_metadata(writer, config)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _mrope_sections(config: Mapping[str, Any], rope_dims: int) -> list[int]:
    """Four section sizes llama.cpp's mrope accepts (their sum at most head_dim), from rope_parameters or
    (Qwen2.5-VL / Qwen3-VL hub configs) rope_scaling.

    Qwen3.5's text tokens carry one position on every axis, so any split that puts each rotary pair on time,
    height or width rotates as transformers does; without mrope_section in the config, transformers' default
    is used when it fits, else an even split. A VL tower must name its split: images use it.
    """
    given = (config.get("rope_parameters") or {}).get("mrope_section")
    given = (config.get("rope_scaling") or {}).get("mrope_section") if given is None else given
    head_dim = _head_dim(config)
    if given is None and ARCHES[config["model_type"]] in _VL:
        raise ConversionError(
            f"config.json lacks rope_scaling.mrope_section, which {config['model_type']} needs to place "
            "image tokens: re-download the checkpoint"
        )
    if given is None:
        even = -(-rope_dims // 6)  # ceil(pairs / 3)
        given = _DEFAULT_MROPE_SECTION if sum(_DEFAULT_MROPE_SECTION) <= head_dim else (even,) * 3
    sections = [int(s) for s in given][:4]
    if sum(sections) > head_dim:
        raise ConversionError(
            f"mrope_section {list(given)} adds up to more than head_dim {head_dim}, "
            "which llama.cpp's mrope cannot run: fix config.json"
        )
    return sections + [0] * (4 - len(sections))


def _add_vl_metadata(writer: gguf.GGUFWriter, config: Mapping[str, Any]) -> None:
    """qwen2vl / qwen3vl: M-RoPE sections over the whole head; qwen3vl's deepstack layer count, which
    llama.cpp reads to widen each input row by one hidden_size per deepstack layer (zeros for text)."""
    writer.add_rope_dimension_sections(_mrope_sections(config, _head_dim(config)))
    if ARCHES[config["model_type"]] == gguf.MODEL_ARCH.QWEN3VL:
        vision = config.get("vision_config") or {}
        writer.add_num_deepstack_layers(len(vision.get("deepstack_visual_indexes") or ()))


def _add_hybrid_metadata(writer: gguf.GGUFWriter, config: Mapping[str, Any]) -> None:
    """Partial rope (Qwen3.5's multi-section, Qwen3-Next's plain) and the Gated DeltaNet sizes."""
    params = config.get("rope_parameters") or {}
    partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25)))
    rope_dims = int(config["head_dim"] * partial)
    writer.add_rope_dimension_count(rope_dims)
    if ARCHES[config["model_type"]] in _QWEN35:
        writer.add_rope_dimension_sections(_mrope_sections(config, rope_dims))
    writer.add_ssm_conv_kernel(config["linear_conv_kernel_dim"])
    writer.add_ssm_state_size(config["linear_key_head_dim"])
    writer.add_ssm_group_count(config["linear_num_key_heads"])
    writer.add_ssm_time_step_rank(config["linear_num_value_heads"])
    writer.add_ssm_inner_size(config["linear_value_head_dim"] * config["linear_num_value_heads"])
    interval = _full_attention_interval(config)
    assert interval is not None  # checked by _check_hybrid
    writer.add_full_attention_interval(interval)


def _add_rope_scaling(writer: gguf.GGUFWriter, scaling: Mapping[str, Any]) -> None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default", "mrope"):  # Qwen2.5-VL's "mrope": plain rope, sections written apart
        return
    if kind not in ("yarn", "linear") or "factor" not in scaling:
        raise ConversionError(
            f"rope scaling {kind!r} is not one llama.cpp runs for Qwen: use yarn or linear, or remove it"
        )
    writer.add_rope_scaling_factor(float(scaling["factor"]))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    if orig := scaling.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(int(orig))


def _token_type(token: str, added: bool, special: bool) -> gguf.TokenType:
    # llama.cpp forces <|...|> tokens (FIM, end-of-generation) to CONTROL, so write them that way up front.
    if not added:
        return gguf.TokenType.NORMAL
    if special or (token.startswith("<|") and token.endswith("|>")):
        return gguf.TokenType.CONTROL
    return gguf.TokenType.USER_DEFINED


def _add_vocab(writer: gguf.GGUFWriter, directory: Path, config: Mapping[str, Any]) -> None:
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConversionError(
            f"no tokenizer.json in {directory}: copy the tokenizer files of the original model"
        )
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # the Rust loader raises bare Exception subclasses
        raise ConversionError(f"{tokenizer_file} is not a valid tokenizer ({exc}): re-download it") from None
    vocab_size = int(config["vocab_size"])
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tokens > vocab_size:
        raise ConversionError(
            f"the tokenizer has {n_tokens} tokens but config vocab_size is {vocab_size}: "
            "the tokenizer files do not belong to these weights"
        )
    added = tokenizer.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    for token_id in range(vocab_size):
        token = tokenizer.id_to_token(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        types.append(_token_type(token, token_id in added, token_id in added and added[token_id].special))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_tokenizer_pre(tokenizer_file))
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    # SpecialVocab reads merges, eos/pad (tokenizer_config.json, then config.json) and the chat template.
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ConversionError(f"no BPE merges in {tokenizer_file}: re-download the tokenizer files")
    ids = special.special_token_ids
    if "eos" not in ids and (eos := _generation_eos(directory)) is not None:
        ids["eos"] = eos
    if "eos" not in ids:
        raise ConversionError(f"{directory} names no eos token: set eos_token in tokenizer_config.json")
    endoftext = tokenizer.token_to_id(ENDOFTEXT)
    if endoftext is not None:
        # What llama.cpp's own Qwen GGUFs carry; add_bos_token false keeps it from being prepended.
        ids.setdefault("bos", endoftext)
        ids.setdefault("pad", endoftext)
    special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(writer, quiet=True)


def _generation_eos(directory: Path) -> int | None:
    try:
        eos = json.loads((directory / "generation_config.json").read_text("utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) else None


def _tokenizer_pre(tokenizer_file: Path) -> str:
    """qwen35 when tokenizer.json's split regex is Qwen3.5's (marks join letters), else qwen2."""
    try:
        pre = json.loads(tokenizer_file.read_text("utf-8")).get("pre_tokenizer")
    except (OSError, ValueError, AttributeError):
        return _TOKENIZER_PRE

    def strings(node: Any) -> Iterator[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict | list):
            for child in node.values() if isinstance(node, dict) else node:
                yield from strings(child)

    return _TOKENIZER_PRE_QWEN35 if any("\\p{M}" in s for s in strings(pre)) else _TOKENIZER_PRE
