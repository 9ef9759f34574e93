"""Hugging Face safetensors Qwen checkpoint → a GGUF file that llama.cpp loads.

Contract: convert_to_gguf() reads a qwen2 / qwen3 / qwen2_moe / qwen3_moe checkpoint (one file or shards with
model.safetensors.index.json) one tensor at a time (an MoE layer's experts: one stacked tensor) and writes,
with gguf.GGUFWriter, llama.cpp's metadata keys, its tensor names and its tokenizer layout; norms and 1-D
tensors stay f32 as llama.cpp's own converter keeps them. The file appears atomically (temp file + rename).
ensure_gguf() converts once into <cache root>/gguf/<key>/ and reuses the result. Bad input raises
ConversionError (a ValueError) whose one-line message names the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
    "gguf_cache_key",
]

# Bump whenever the bytes convert_to_gguf() writes change, so ensure_gguf() rebuilds cached files.
CONVERTER_VERSION = 1

OutType = Literal["f32", "f16", "bf16", "q8_0"]
ProgressCallback = Callable[[int, int], None]

ARCHES: dict[str, gguf.MODEL_ARCH] = {
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
}
_OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# The router weights stay f32, as llama.cpp's converter and quantizer keep them.
_F32_TENSORS = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TOKENIZER_PRE = "qwen2"  # llama.cpp's name for the Qwen2/2.5/3 pre-tokenizer regex
_ROWS_PER_CHUNK = 16_384  # bounds the f32 copy of a big embedding while it is encoded
_HASHED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, or a bad argument; the message is one line naming the fix."""


@dataclass(frozen=True)
class _Planned:
    """One GGUF tensor: its HF sources (several = experts stacked in order), numpy shape and type."""

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

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
) -> Path:
    """Convert an HF-layout Qwen checkpoint to a GGUF at `out_path`; `progress(done, total)` per tensor."""
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
    weight_files = _weight_files(checkpoint_dir)

    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(_open_safetensors(path)) for path in weight_files}
        located = _locate(handles)
        plan = _plan(located, handles, config, arch, qtype)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _check_disk_space(out_path.parent, sum(p.nbytes for p in plan))
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        try:
            _add_metadata(writer, config, ftype, name or checkpoint_name(checkpoint_dir))
            _add_vocab(writer, checkpoint_dir, config)
            for planned in plan:
                writer.add_tensor_info(
                    planned.name, planned.shape, np.dtype(np.float32), planned.nbytes, planned.qtype
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, planned in enumerate(plan, start=1):
                writer.write_tensor_data(_encode(planned, located, handles))
                if progress is not None:
                    progress(done, len(plan))
            writer.close()
            os.replace(tmp, out_path)
        finally:
            writer.close()
            tmp.unlink(missing_ok=True)
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
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"no config.json in {directory}: pass a Hugging Face-layout checkpoint directory"
        )
    try:
        config = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc}): re-download the checkpoint") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ARCHES:
        raise ConversionError(
            f"{directory} is model_type {model_type!r}: GGUF conversion supports {', '.join(ARCHES)}"
        )
    return config


def _check_supported(config: Mapping[str, Any], directory: Path) -> None:
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ConversionError(
            f"{directory} is already quantized ({method}): convert the bf16 original, then `qwenkit quantize`"
        )
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    missing = [key for key in required if not isinstance(config.get(key), int)]
    if missing:
        raise ConversionError(f"{directory}/config.json lacks {missing[0]}: re-download the checkpoint")
    model_type = config["model_type"]
    if model_type.endswith("_moe"):
        step = config.get("decoder_sparse_step", 1)
        if config.get("mlp_only_layers") or step != 1:
            raise ConversionError(
                f"{directory} mixes dense and MoE layers (mlp_only_layers/decoder_sparse_step), "
                f"which llama.cpp's {model_type} graph cannot run"
            )
        # llama.cpp hard-codes top-k weight normalisation: on for qwen3moe, off for qwen2moe.
        wants_norm = model_type == "qwen3_moe"
        if bool(config.get("norm_topk_prob", wants_norm)) != wants_norm:
            raise ConversionError(
                f"{directory} sets norm_topk_prob={config.get('norm_topk_prob')}, which llama.cpp's "
                f"{model_type} graph does not support: use the transformers engine for this model"
            )


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


def _plan(
    located: Mapping[str, Path],
    handles: Mapping[Path, Any],
    config: Mapping[str, Any],
    arch: gguf.MODEL_ARCH,
    qtype: gguf.GGMLQuantizationType,
) -> list[_Planned]:
    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, n_layers)
    tied = bool(config.get("tie_word_embeddings", False))
    n_experts = int(config.get("num_experts") or 0)
    plan: list[_Planned] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}

    def shape_of(key: str) -> tuple[int, ...]:
        return tuple(handles[located[key]].get_slice(key).get_shape())

    for key in located:
        if key.endswith(_IGNORED_SUFFIXES) or (tied and key == "lm_head.weight"):
            continue
        dtype = handles[located[key]].get_slice(key).get_dtype()
        if dtype not in ("F32", "F16", "BF16"):
            raise ConversionError(
                f"tensor {key} is {dtype}, not a float checkpoint: convert the bf16/f16 original instead"
            )
        if match := _EXPERT.match(key):
            layer, expert, proj = int(match[1]), int(match[2]), match[3]
            experts.setdefault((layer, proj), {})[expert] = key
            continue
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ConversionError(
                f"unexpected tensor {key} for {gguf.MODEL_ARCH_NAMES[arch]}: "
                "is this a plain Qwen text checkpoint? (adapters must be merged first)"
            )
        kind, gguf_name = found
        shape = shape_of(key)
        plan.append(_Planned(gguf_name, (key,), shape, _qtype_for(gguf_name, kind, shape, qtype)))

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
        found = names.get_type_and_name(
            f"model.layers.{layer}.mlp.experts.{proj}.weight", try_suffixes=(".weight",)
        )
        if found is None:
            raise ConversionError(
                f"experts in layer {layer} are unexpected for {gguf.MODEL_ARCH_NAMES[arch]}"
            )
        kind, gguf_name = found
        shape = (n_experts, *shapes.pop())
        plan.append(_Planned(gguf_name, sources, shape, _qtype_for(gguf_name, kind, shape, qtype)))

    _check_complete(plan, config, arch, tied)
    return sorted(plan, key=_tensor_order)


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
    moe = arch in (gguf.MODEL_ARCH.QWEN2MOE, gguf.MODEL_ARCH.QWEN3MOE)
    ffn = (
        ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
        if moe
        else ("ffn_gate", "ffn_up", "ffn_down")
    )
    parts = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", *ffn]
    if arch in (gguf.MODEL_ARCH.QWEN3, gguf.MODEL_ARCH.QWEN3MOE):
        parts += ["attn_q_norm", "attn_k_norm"]
    if arch == gguf.MODEL_ARCH.QWEN2MOE and config.get("shared_expert_intermediate_size"):
        parts += ["ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
    needed = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    for layer in range(config["num_hidden_layers"]):
        needed += [f"blk.{layer}.{part}.weight" for part in parts]
    missing = [n for n in needed if n not in have]
    if missing:
        hint = " (lm_head.weight with tie_word_embeddings false)" if missing[0] == "output.weight" else ""
        raise ConversionError(
            f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}{hint}: re-download it"
        )


def _check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise ConversionError(
            f"the GGUF needs {needed / 2**30:.1f} GiB but {directory} has {free / 2**30:.1f} GiB free: "
            "free some space or write elsewhere"
        )


def _encode(planned: _Planned, located: Mapping[str, Path], handles: Mapping[Path, Any]) -> np.ndarray:
    """Read the planned tensor's sources a block of rows at a time and encode them into one output array."""
    out: np.ndarray | None = None
    for index, key in enumerate(planned.sources):
        source = handles[located[key]].get_slice(key)
        shape = source.get_shape()
        n_rows = shape[0] if len(shape) == 2 else 1  # sources are matrices or vectors
        for start in range(0, n_rows, _ROWS_PER_CHUNK):
            stop = min(start + _ROWS_PER_CHUNK, n_rows)  # safetensors slices do not clamp
            rows = source[start:stop] if len(shape) == 2 else source[:].reshape(1, -1)
            chunk = gguf.quants.quantize(rows.astype(np.float32), planned.qtype)
            if out is None:
                out = np.empty((len(planned.sources), n_rows, chunk.shape[-1]), dtype=chunk.dtype)
            out[index, start : start + chunk.shape[0]] = chunk
    assert out is not None
    # The last axis counts output elements: floats for F32/F16, bytes for BF16 and block types.
    return out.reshape(*planned.shape[:-1], out.shape[-1])


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
    if config["model_type"].endswith("_moe"):
        writer.add_expert_count(int(config["num_experts"]))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
        if shared := config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(int(shared))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_rope_scaling(writer: gguf.GGUFWriter, scaling: Mapping[str, Any]) -> None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
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
    writer.add_tokenizer_pre(_TOKENIZER_PRE)
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
