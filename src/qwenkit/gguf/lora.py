"""A PEFT LoRA adapter → a llama.cpp LoRA GGUF, so an adapter is served on its base without merging.

Contract: convert_lora(adapter_dir, base_gguf, out) reads adapter_config.json + adapter_model.safetensors
(what `qwenkit tune` and peft's save_pretrained write) and writes general.type=adapter, adapter.type=lora,
adapter.lora.alpha and one `<tensor>.lora_a` / `<tensor>.lora_b` pair per adapted module, named by the map
convert_to_gguf() uses (gguf_tensor_namer) and checked against the base GGUF's tensors and shapes.
llama.cpp scales each pair by alpha / rank; where peft's scale differs (rsLoRA, alpha_pattern) lora_b
carries the rest, so the served model equals the merged one. What a llama.cpp LoRA cannot hold is refused
in one line naming it: DoRA, modules_to_save, trainable tokens, LoRA biases, aLoRA, or a LoRA on a tensor
the converter reshapes (Gated DeltaNet projections, MoE experts).
A tied model (lm_head = embed_tokens) has no output tensor of its own, and llama.cpp applies a LoRA by
tensor name, so a LoRA on lm_head or embed_tokens needs the base untied: untied_gguf() writes a copy with
output.weight (cached); resolve_loras() does that when an adapter needs it, else refuses such a LoRA.
ensure_lora() converts once into <cache root>/gguf/lora/<key>/ and reuses it while the inputs match;
resolve_lora() takes an adapter dir or a ready LoRA .gguf. Bad input raises LoraError (a ConversionError).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
from safetensors import SafetensorError, safe_open

from qwenkit.gguf.convert import ConversionError, gguf_tensor_namer
from qwenkit.gguf.files import gguf_file, read_json, write_gguf
from qwenkit.gguf.reader import GGUFReadError, MetadataReader, check_gguf_magic
from qwenkit.paths import cache_root

__all__ = [
    "LORA_VERSION",
    "LoraError",
    "LoraOutType",
    "convert_lora",
    "ensure_lora",
    "resolve_lora",
    "resolve_loras",
    "touches_tied_layers",
    "untied_gguf",
]

# Bump whenever the bytes convert_lora() writes change, so ensure_lora() rebuilds cached files.
LORA_VERSION = 1
LoraOutType = Literal["f32", "f16"]
_DTYPES = {"f32": np.float32, "f16": np.float16}
_CONFIG, _WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# peft's tensor names: Linear pairs, Embedding pairs (no .weight), and the embedding's copied base weight.
_PAIR = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB]))$")
# peft modules whose base tensor a tied model shares (lm_head is token_embd there), and their GGUF names.
_TIED_MODULES = ("lm_head", "embed_tokens")
_TIED_TENSORS = ("output.weight.", "token_embd.weight.")
_HYBRID = (gguf.MODEL_ARCH.QWEN35, gguf.MODEL_ARCH.QWEN35MOE, gguf.MODEL_ARCH.QWEN3NEXT)
# adapter_config.json fields whose (truthy) value changes the forward pass in ways a llama.cpp LoRA lacks.
_REFUSED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable token rows (trainable_token_indices)",
    "lora_bias": "LoRA biases (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
    "megatron_config": "Megatron layers (megatron_config)",
}
_FIX = "serve the merged model instead (`qwenkit tune merge`, then `qwenkit convert`)"


class LoraError(ConversionError):
    """An adapter that cannot become a llama.cpp LoRA; the message is one line naming the fix."""


@dataclass(frozen=True)
class _Base:
    """What the conversion needs of the base GGUF: its architecture, layer count and tensor shapes."""

    arch: gguf.MODEL_ARCH
    n_layers: int
    shapes: dict[str, tuple[int, ...]]  # GGUF name → numpy (row-major) shape

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _open_gguf(path: Path, not_gguf: str) -> MetadataReader:
    """A GGUF's metadata reader; LoraError(not_gguf) for another kind of file, or naming the damage."""
    try:
        check_gguf_magic(path)
        return MetadataReader(path)
    except GGUFReadError:
        raise LoraError(not_gguf) from None
    except Exception as exc:  # the reader raises ValueError, struct or numpy errors on bad bytes
        raise LoraError(f"{path} is truncated or corrupt ({type(exc).__name__}): re-convert it") from None


def _read_base(base_gguf: Path) -> _Base:
    base_gguf = Path(base_gguf).expanduser()
    if not base_gguf.is_file():
        raise LoraError(f"no such base GGUF: {base_gguf}")
    reader = _open_gguf(base_gguf, f"the base model {base_gguf} is not a GGUF: pass the model's .gguf")
    arch_name = _field(reader, "general.architecture")
    arches = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    n_layers = _field(reader, f"{arch_name}.block_count")
    if arch_name not in arches or n_layers is None:
        raise LoraError(f"{base_gguf} is not a model GGUF llama.cpp can put a LoRA on (arch {arch_name!r})")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    return _Base(arches[arch_name], int(n_layers), shapes)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    found = reader.get_field(key)
    return None if found is None else found.contents()


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, checked to be a plain LoRA that llama.cpp can apply (else LoraError)."""
    path = adapter_dir / _CONFIG
    config = read_json(
        path,
        LoraError,
        "re-save the adapter",
        missing=f"{adapter_dir} holds no adapter ({_CONFIG}): "
        "pass a `qwenkit tune` --out dir or a LoRA .gguf",
    )
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise LoraError(
            f"{adapter_dir} is a {kind!r} adapter, not a LoRA: llama.cpp serves LoRA only; {_FIX}"
        )
    for key, what in _REFUSED.items():
        if config.get(key):
            raise LoraError(f"{adapter_dir} uses {what}, which a llama.cpp LoRA cannot hold: {_FIX}")
    if config.get("bias", "none") != "none":
        raise LoraError(
            f"{adapter_dir} trains biases (bias={config['bias']!r}), which a llama.cpp LoRA cannot hold: "
            + _FIX
        )
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise LoraError(f"{path}: lora_alpha must be a positive number, not {alpha!r}")
    return config


def _alpha_for(config: Mapping[str, Any], module: str) -> float:
    """peft's alpha for one module: alpha_pattern's first key that names it (a suffix or a regex), else
    lora_alpha."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(config["lora_alpha"])


def _load_pairs(adapter_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """{peft module name: {"A": ..., "B": ..., "embedding": bool}} from adapter_model.safetensors."""
    path = adapter_dir / _WEIGHTS
    if not path.is_file():
        other = (
            " (adapter_model.bin is pickle: re-save it with safe_serialization)"
            if (adapter_dir / "adapter_model.bin").is_file()
            else ""
        )
        raise LoraError(f"{adapter_dir} has no {_WEIGHTS}{other}")
    pairs: dict[str, dict[str, Any]] = {}
    try:
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                if key.endswith(".base_layer.weight"):
                    continue  # peft copies a targeted embedding's base weight: the base GGUF has it
                match = _PAIR.match(key)
                if match is None:
                    raise LoraError(
                        f"{path} holds {key}, not a LoRA A/B matrix (a fully trained module): {_FIX}"
                    )
                module = match["module"].removeprefix(_PEFT_PREFIX)
                entry = pairs.setdefault(module, {"embedding": match["eab"] is not None})
                entry[match["ab"] or match["eab"]] = handle.get_tensor(key).astype(np.float32)
    except SafetensorError as exc:
        raise LoraError(f"{path} is not a readable safetensors file ({exc}): re-save the adapter") from None
    for module, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            raise LoraError(f"{path} has only one of {module}'s LoRA A/B matrices: re-save the adapter")
    if not pairs:
        raise LoraError(f"{path} holds no LoRA matrices: re-save the adapter")
    return pairs


def _plan_tensors(
    adapter_dir: Path, config: Mapping[str, Any], base: _Base, file_alpha: float
) -> list[tuple[str, np.ndarray]]:
    """The (name, array) pairs the GGUF holds, in llama.cpp's layout, checked against the base's shapes."""
    name_of = gguf_tensor_namer(base.arch, base.n_layers)
    out: list[tuple[str, np.ndarray]] = []
    for module, entry in sorted(_load_pairs(adapter_dir).items()):
        a, b = entry["A"], entry["B"]
        if base.arch in _HYBRID and ".linear_attn." in module:
            raise LoraError(
                f"{module}: a LoRA on the linear-attention projections cannot be served (llama.cpp "
                f"reorders those weights); train on attention/MLP modules or {_FIX}"
            )
        found = name_of(f"{module}.weight", (".weight",))
        if found is None:
            raise LoraError(f"{module}: no matching tensor in the {base.arch_name} base model; {_FIX}")
        kind, name = found
        base_shape = base.shapes.get(name)
        if base_shape is None or (
            kind == gguf.MODEL_TENSOR.TOKEN_EMBD and "output.weight" not in base.shapes
        ):
            if kind in (gguf.MODEL_TENSOR.OUTPUT, gguf.MODEL_TENSOR.TOKEN_EMBD):
                raise LoraError(
                    f"{module}: the base model ties its output layer to its embeddings, which a LoRA on "
                    "either needs apart: serve it with `qwenkit serve --lora` (it unties the base) or "
                    "untie it with qwenkit.gguf.lora.untied_gguf()"
                )
            raise LoraError(f"{module}: the base GGUF has no {name}: is it the adapter's base model?")
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != rank:
            raise LoraError(f"{module}: LoRA A {list(a.shape)} and B {list(b.shape)} do not pair up")
        if entry["embedding"]:
            # peft keeps A (rank, vocab), B (hidden, rank); llama.cpp gathers rows of A^T per token.
            fits = base_shape == (a.shape[1], b.shape[0])
            a = a.T
        else:
            fits = base_shape == (b.shape[0], a.shape[1])
        if not fits:
            raise LoraError(
                f"{module}: the adapter's shape does not match the base's {name} {list(base_shape)}: "
                "it was trained on another model"
            )
        module_alpha = _alpha_for(config, module)
        scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        factor = scale / (file_alpha / rank)  # llama.cpp applies file_alpha / rank; B carries the rest
        if not math.isclose(factor, 1.0, rel_tol=1e-9):
            b = b * np.float32(factor)
        out += [(f"{name}.lora_a", a), (f"{name}.lora_b", b)]
    return out


def convert_lora(adapter_dir: Path, base_gguf: Path, out_path: Path, outtype: LoraOutType = "f32") -> Path:
    """Write the adapter in adapter_dir as a llama.cpp LoRA GGUF for the base model in base_gguf."""
    adapter_dir, out_path = Path(adapter_dir).expanduser(), Path(out_path).expanduser()
    if outtype not in _DTYPES:
        raise LoraError(f"unknown LoRA outtype {outtype!r}: use f32 or f16")
    config = read_adapter_config(adapter_dir)
    base = _read_base(base_gguf)
    # With uniform ranks llama.cpp's alpha / rank is peft's scale as is (rsLoRA: alpha / sqrt(rank)).
    file_alpha = float(config["lora_alpha"])
    if config.get("use_rslora") and isinstance(config.get("r"), int):
        file_alpha *= math.sqrt(config["r"])
    tensors = _plan_tensors(adapter_dir, config, base, file_alpha)
    with gguf_file(out_path, base.arch_name) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(adapter_dir.resolve().name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, file_alpha)
        for name, array in tensors:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=_DTYPES[outtype]))
        write_gguf(writer)
    return out_path


def _cache_key(adapter_dir: Path, base: _Base, outtype: str) -> str:
    """sha256 over the adapter's config and weights (size, mtime, header), the base facts used, outtype."""
    digest = hashlib.sha256(
        f"qwenkit-lora {LORA_VERSION} {outtype} {base.arch_name} {base.n_layers}\n".encode()
    )
    digest.update(f"tied {'output.weight' not in base.shapes}\n".encode())
    digest.update((adapter_dir / _CONFIG).read_bytes())
    weights = adapter_dir / _WEIGHTS
    if weights.is_file():
        stat = weights.stat()
        digest.update(f"{stat.st_size} {stat.st_mtime_ns}\n".encode())
        with weights.open("rb") as f:
            digest.update(f.read(1 << 16))
    return digest.hexdigest()


def ensure_lora(
    adapter_dir: Path,
    base_gguf: Path,
    outtype: LoraOutType = "f32",
    env: Mapping[str, str] | None = None,
) -> Path:
    """The adapter as a LoRA GGUF in the qwenkit cache: converted on first use, reused while inputs match."""
    adapter_dir = Path(adapter_dir).expanduser()
    read_adapter_config(adapter_dir)  # refuse what cannot be served before hashing anything
    base = _read_base(base_gguf)
    target = (
        cache_root(env) / "gguf" / "lora" / _cache_key(adapter_dir, base, outtype) / f"adapter-{outtype}.gguf"
    )
    if target.is_file():
        return target
    convert_lora(adapter_dir, base_gguf, target, outtype)
    source = {"adapter": str(adapter_dir.resolve()), "base_arch": base.arch_name, "lora": LORA_VERSION}
    (target.parent / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return target


def resolve_lora(
    spec: Path, base_gguf: Path, outtype: LoraOutType = "f32", env: Mapping[str, str] | None = None
) -> Path:
    """A LoRA GGUF for base_gguf from spec: a peft adapter dir (converted, cached) or a LoRA .gguf
    (checked)."""
    spec = Path(spec).expanduser()
    if spec.is_dir():
        return ensure_lora(spec, base_gguf, outtype, env)
    if not spec.is_file():
        raise LoraError(f"no such adapter: {spec}: pass a `qwenkit tune` --out dir or a LoRA .gguf")
    reader = _open_gguf(spec, f"{spec} is neither an adapter dir nor a GGUF: pass a `qwenkit tune` --out dir")
    kind, adapter = _field(reader, "general.type"), _field(reader, gguf.Keys.Adapter.TYPE)
    if kind != "adapter" or adapter != "lora":
        raise LoraError(
            f"{spec} is a GGUF {kind or 'model'}, not a LoRA adapter: pass its adapter dir or LoRA .gguf"
        )
    base = _read_base(base_gguf)
    arch = _field(reader, "general.architecture")
    if arch != base.arch_name:
        raise LoraError(f"{spec} is a LoRA for {arch!r} models, but the base model is {base.arch_name!r}")
    return spec


def touches_tied_layers(spec: Path) -> bool:
    """Whether an adapter (dir or LoRA .gguf) has a LoRA on lm_head or embed_tokens (see untied_gguf)."""
    spec = Path(spec).expanduser()
    try:
        if spec.is_dir():
            with safe_open(str(spec / _WEIGHTS), framework="numpy") as handle:
                modules = {m["module"] for k in handle.keys() if (m := _PAIR.match(k))}  # noqa: SIM118
            return any(m.rsplit(".", 1)[-1] in _TIED_MODULES for m in modules)
        return any(t.name.startswith(_TIED_TENSORS) for t in MetadataReader(spec).tensors)
    except Exception:  # unreadable: resolve_lora() says what is wrong with it
        return False


def untied_gguf(base_gguf: Path, env: Mapping[str, str] | None = None) -> Path:
    """base_gguf itself when it has an output.weight; else a copy that adds one (token_embd.weight's bytes),
    cached under <cache root>/gguf/untied/, so a LoRA applies to the output layer or the embeddings alone,
    as peft trained it. The copy serves the same model: llama.cpp reads output.weight when there is one."""
    base_gguf = Path(base_gguf).expanduser()
    if "output.weight" in _read_base(base_gguf).shapes:
        return base_gguf
    stat = base_gguf.stat()
    key = hashlib.sha256(
        f"qwenkit-untie {LORA_VERSION} {base_gguf.resolve()} {stat.st_size} {stat.st_mtime_ns}".encode()
    ).hexdigest()
    target = cache_root(env) / "gguf" / "untied" / key / base_gguf.name
    if target.is_file():
        return target
    reader = gguf.GGUFReader(base_gguf)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    with gguf_file(target, str(arch.contents()) if arch else "", endianess=reader.endianess) as writer:
        if (alignment := reader.get_field(gguf.Keys.General.ALIGNMENT)) is not None:
            writer.data_alignment = int(alignment.contents())  # the tensor data must start where it says
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer adds these itself
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        tensors = [(t.name, t) for t in reader.tensors]
        tensors += [("output.weight", t) for t in reader.tensors if t.name == "token_embd.weight"]
        for name, t in tensors:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        write_gguf(writer, (t.data for _, t in tensors))
    return target


def resolve_loras(
    specs: Mapping[str, Path], base_gguf: Path, env: Mapping[str, str] | None = None
) -> tuple[Path, dict[str, Path]]:
    """(the base GGUF to serve, {name: LoRA GGUF}): the base is untied (untied_gguf) when an adapter puts a
    LoRA on lm_head or embed_tokens."""
    if any(touches_tied_layers(spec) for spec in specs.values()):
        base_gguf = untied_gguf(base_gguf, env)
    return base_gguf, {name: resolve_lora(spec, base_gguf, env=env) for name, spec in specs.items()}
