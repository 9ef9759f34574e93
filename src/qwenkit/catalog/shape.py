"""The shape of a Qwen model as the planner needs it: dimensions, tensors, parameter counts, KV bytes.

Contract: ModelShape is immutable and comes from a catalog entry, a Hugging Face config.json or a GGUF's
metadata; tensors() lists the text model's tensors under llama.cpp's GGUF names with their row length
(ggml ne0) and row count, which is what quantization recipes and memory formulas work on. Parameter
counts are computed from the tensors, so they can be checked against the published figures. A config
that lacks a dimension raises ShapeError (a ValueError) naming the missing field.
Hybrid models (Qwen3.5/3.6 `qwen3_5`, `qwen3_5_moe`; Qwen3-Next) interleave Gated DeltaNet layers with
gated full attention (every `full_attention_interval`-th layer): only full-attention layers carry a KV
cache, and each linear-attention layer keeps a fixed-size recurrent state per sequence (conv + delta
rule), which llama.cpp keeps in f32 (recurrent_state_bytes_per_seq).
VisionTower is a VL model's vision encoder (config.json vision_config): its parameter count, exact for the
two layouts qwenkit converts to a projector (Qwen2.5-VL; Qwen3-VL and Qwen3.5, which share one), is the
shape's encoder_params when known, and its patch count per image sizes the encoder's compute buffer
(compute_bytes: llama.cpp's clip graph on a CPU with flash attention, fitted to measurements, an upper bound
on them; see the constants).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwenkit.gguf.reader import GGUFInfo

__all__ = ["HYBRID_TYPES", "VISION_LAYOUTS", "ModelShape", "ShapeError", "TensorSpec", "VisionTower"]

# GGUF architectures (general.architecture) → the HF model_type they come from.
_GGUF_ARCHES = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "qwen35": "qwen3_5",
    "qwen35moe": "qwen3_5_moe",
    "qwen3next": "qwen3_next",
    "qwen2vl": "qwen2_5_vl",
    "qwen3vl": "qwen3_vl",
}
# Families whose attention has q/k/v biases (Qwen, Qwen1.5, Qwen2, Qwen2.5 and their VL/Audio/Math kin).
_QKV_BIAS = {"qwen", "qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl", "qwen2_audio"}
_QK_NORM = {"qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next", "qwen3_vl", "qwen3_vl_moe"}
# Gated DeltaNet + gated attention hybrids (HF model_type, text tower).
HYBRID_TYPES = frozenset({"qwen3_5", "qwen3_5_moe", "qwen3_next"})
RECURRENT_STATE_BYTES = 4  # llama.cpp keeps the conv and delta-rule states in f32 (llama-model.cpp)


class ShapeError(ValueError):
    """A model description without the dimensions the planner needs; the message names the field."""


# HF model_type → the vision tower's layout: Qwen2.5-VL (RMSNorm, gated SiLU MLP, window attention) or
# Qwen3-VL's (LayerNorm, GELU MLP, learned position grid, optional deepstack mergers), which Qwen3.5 reuses.
VISION_LAYOUTS = {
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl",
    "qwen3_5": "qwen3_vl",
    "qwen3_5_moe": "qwen3_vl",
}


# llama.cpp's clip compute buffer per image (CPU, flash attention on, as mtmd picks it), measured from
# its "compute buffer size" log and the encode's peak RSS growth (equal within 1 MiB; tiny to real widths):
# - Qwen3-VL layout: linear in patches. Bytes per patch 4751 / 4880 / 19984 / 30736 for widths 32 / 64 /
#   768 / 1152 (256 to 16384 patches): 4 B x max(1232, 6.7 x width) bounds them all (+0.4% at 1152).
# - Qwen2.5-VL layout: llama.cpp's window attention is a full patches x patches mask (f32, and an f16 copy
#   for flash attention: 6 B per pair), so quadratic. Per patch, width 32: 4711 / 8510 / 26947 B at 256 /
#   1024 / 4096 patches; width 1280 (every release's): 54.7 / 57.7 / 74.8 / 121.2 KB at 256 / 1024 / 4096 /
#   16384. max(4 B x 1232, 45 B x width) + 6 B x patches bounds them (+8% to +29% at 1280, most at 16384).
CLIP_FLOATS_PER_PATCH_MIN = 1232
CLIP_FLOATS_PER_WIDTH = 6.7
CLIP_WINDOW_BYTES_PER_WIDTH = 45
CLIP_WINDOW_MASK_BYTES = 6


@dataclass(frozen=True)
class VisionTower:
    """A Qwen vision encoder (config.json vision_config): `patch`-pixel patches (times `temporal_patch`
    frames) through `depth` blocks of width `hidden`, then a merger of `merge` x `merge` patches into one
    token of width `out_hidden` (the text model's). Qwen3-VL adds `deepstack` such mergers whose outputs
    feed early text layers, and a learned grid of `positions` position embeddings."""

    layout: str  # a VISION_LAYOUTS value
    depth: int
    hidden: int
    ffn: int
    heads: int
    out_hidden: int
    patch: int
    merge: int = 2
    temporal_patch: int = 2
    positions: int = 0
    deepstack: int = 0

    def __post_init__(self) -> None:
        if self.layout not in set(VISION_LAYOUTS.values()):
            raise ShapeError(f"unknown vision tower layout {self.layout!r}")
        for name in ("depth", "hidden", "ffn", "heads", "out_hidden", "patch", "merge", "temporal_patch"):
            if getattr(self, name) < 1:
                raise ShapeError(f"vision tower: {name} must be positive")
        if self.hidden % self.heads:
            raise ShapeError(f"vision tower: {self.heads} heads do not divide its width {self.hidden}")

    @property
    def params(self) -> int:
        """Every weight and bias, as transformers' vision model counts them (and an mmproj GGUF stores)."""
        h, f, merged = self.hidden, self.ffn, self.hidden * self.merge**2
        qwen3 = self.layout == "qwen3_vl"
        patch_embed = 3 * self.temporal_patch * self.patch**2 * h + (h if qwen3 else 0)  # Conv3d (+ bias)
        attention = 3 * h * h + 3 * h + h * h + h  # fused qkv and the output projection, with biases
        # Qwen3-VL: two LayerNorms (weight + bias), GELU MLP fc1/fc2; Qwen2.5-VL: two RMSNorms, a SiLU-gated
        # MLP (gate, up, down); every projection biased.
        mlp = 4 * h + 2 * h * f + f + h if qwen3 else 2 * h + 3 * h * f + 2 * f + h
        block = attention + mlp
        projection = merged * merged + merged + merged * self.out_hidden + self.out_hidden
        merger = (2 * h if qwen3 else h) + projection  # the norm runs before the 2x2 shuffle
        deepstack = self.deepstack * (2 * merged + projection)  # each normed after the shuffle
        return patch_embed + self.positions * h + self.depth * block + merger + deepstack

    def patches(self, height: int, width: int) -> int:
        """Patches one image of height x width pixels (already on the processor's grid) runs through."""
        return (height // self.patch) * (width // self.patch)

    def compute_bytes(self, patches: int) -> int:
        """llama.cpp's compute buffer for encoding one image of `patches` patches (an upper bound fitted to
        measurements, see CLIP_*). mtmd keeps it at its high-water mark: it is not freed between images."""
        floor = 4 * CLIP_FLOATS_PER_PATCH_MIN
        if self.layout == "qwen3_vl":
            return max(floor, math.ceil(4 * CLIP_FLOATS_PER_WIDTH * self.hidden)) * patches
        per_patch = max(floor, CLIP_WINDOW_BYTES_PER_WIDTH * self.hidden) + CLIP_WINDOW_MASK_BYTES * patches
        return per_patch * patches

    @classmethod
    def from_config(cls, vision: Mapping[str, Any], model_type: str, name: str = "") -> VisionTower:
        """From a config.json's vision_config of a model_type in VISION_LAYOUTS."""
        layout = VISION_LAYOUTS.get(model_type)
        if layout is None:
            raise ShapeError(f"{name or model_type}: no vision tower layout for {model_type!r}")

        def need(key: str) -> int:
            value = vision.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ShapeError(f"{name or model_type}: vision_config lacks an integer {key!r}")
            return value

        return cls(
            layout=layout,
            depth=need("depth"),
            hidden=need("hidden_size"),
            ffn=need("intermediate_size"),
            heads=need("num_heads"),
            out_hidden=need("out_hidden_size"),
            patch=need("patch_size"),
            merge=int(vision.get("spatial_merge_size") or 2),
            temporal_patch=int(vision.get("temporal_patch_size") or 2),
            positions=int(vision.get("num_position_embeddings") or 0) if layout == "qwen3_vl" else 0,
            deepstack=len(vision.get("deepstack_visual_indexes") or ()) if layout == "qwen3_vl" else 0,
        )


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor: `ne0` is its row length (ggml's ne[0]), `rows` its row count over all experts."""

    name: str
    role: str
    layer: int | None
    ne0: int
    rows: int
    experts: int = 1

    @property
    def elements(self) -> int:
        return self.ne0 * self.rows

    @property
    def is_matrix(self) -> bool:
        return self.role not in ("norm", "bias")


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of the text model (plus encoder parameters outside it, for VL and audio models)."""

    name: str
    model_type: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 0
    experts_used: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0
    encoder_params: int = 0
    vision: VisionTower | None = None  # when known, encoder_params is its parameter count
    # Hybrid (Gated DeltaNet) models: every interval-th layer is full attention, the rest linear attention.
    full_attention_interval: int = 0
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_k_dim: int = 0
    linear_v_dim: int = 0
    conv_kernel: int = 0
    context_native: int | None = None
    context_extended: int | None = None
    _tensors: tuple[TensorSpec, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, name) < 1:
                raise ShapeError(f"{self.name}: {name} must be positive")
        if self.heads % self.kv_heads:
            raise ShapeError(f"{self.name}: {self.heads} attention heads do not group into {self.kv_heads}")
        if self.is_moe and not (0 < self.experts_used <= self.experts and self.moe_ffn > 0):
            raise ShapeError(f"{self.name}: an MoE model needs experts, experts_used and moe_ffn")
        if not self.is_moe and self.ffn < 1:
            raise ShapeError(f"{self.name}: a dense model needs its feed-forward size")
        if self.full_attention_interval:
            linear = ("linear_k_heads", "linear_v_heads", "linear_k_dim", "linear_v_dim", "conv_kernel")
            missing = [k for k in linear if getattr(self, k) < 1]
            if missing:
                raise ShapeError(f"{self.name}: a hybrid model needs {', '.join(missing)}")
        if self.vision is not None and not self.encoder_params:
            object.__setattr__(self, "encoder_params", self.vision.params)
        object.__setattr__(self, "_tensors", tuple(self._build_tensors()))

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def is_hybrid(self) -> bool:
        return self.full_attention_interval > 0

    def is_full_attention(self, layer: int) -> bool:
        """Whether `layer` is a (KV-carrying) attention layer; every layer is one in non-hybrid models."""
        return not self.is_hybrid or (layer + 1) % self.full_attention_interval == 0

    @property
    def kv_layers(self) -> int:
        """Layers that carry a KV cache: all of them, or only the full-attention ones of a hybrid."""
        return sum(1 for i in range(self.layers) if self.is_full_attention(i))

    @property
    def linear_layers(self) -> int:
        return self.layers - self.kv_layers

    @property
    def conv_state_elements(self) -> int:
        """One linear-attention layer's conv state: (kernel - 1) × (2 × key dims + value dims)."""
        key_dim, value_dim = self.linear_k_heads * self.linear_k_dim, self.linear_v_heads * self.linear_v_dim
        return max(0, self.conv_kernel - 1) * (2 * key_dim + value_dim)

    @property
    def delta_state_elements(self) -> int:
        """One linear-attention layer's delta-rule state: value heads × key dim × value dim."""
        return self.linear_v_heads * self.linear_k_dim * self.linear_v_dim

    def recurrent_state_bytes_per_seq(self, bytes_per_element: int = RECURRENT_STATE_BYTES) -> int:
        """Conv + delta-rule state of one sequence over all linear-attention layers (0 if not hybrid)."""
        per_layer = self.conv_state_elements + self.delta_state_elements
        return self.linear_layers * per_layer * bytes_per_element

    @property
    def qkv_bias(self) -> bool:
        return self.model_type in _QKV_BIAS

    # ---- tensors and parameters --------------------------------------------------------------------
    def tensors(self) -> tuple[TensorSpec, ...]:
        """The text model's tensors in GGUF order (embeddings, blocks, output)."""
        return self._tensors

    def _build_tensors(self) -> list[TensorSpec]:
        h, d = self.hidden, self.head_dim
        q_out, kv_out = self.heads * d, self.kv_heads * d
        out = [TensorSpec("token_embd.weight", "embed", None, h, self.vocab)]
        for i in range(self.layers):
            p = f"blk.{i}."
            if self.is_hybrid:
                out.extend(self._hybrid_mixer_tensors(p, i))
                out.extend(self._ffn_tensors(p, i))
                continue
            out.append(TensorSpec(p + "attn_norm.weight", "norm", i, h, 1))
            if self.model_type == "qwen":  # first-generation Qwen fuses q, k and v
                out.append(TensorSpec(p + "attn_qkv.weight", "attn_qkv", i, h, q_out + 2 * kv_out))
                out.append(TensorSpec(p + "attn_qkv.bias", "bias", i, q_out + 2 * kv_out, 1))
            else:
                for name, rows in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                    out.append(TensorSpec(f"{p}attn_{name}.weight", f"attn_{name}", i, h, rows))
                    if self.qkv_bias:
                        out.append(TensorSpec(f"{p}attn_{name}.bias", "bias", i, rows, 1))
            if self.model_type in _QK_NORM:
                out.append(TensorSpec(p + "attn_q_norm.weight", "norm", i, d, 1))
                out.append(TensorSpec(p + "attn_k_norm.weight", "norm", i, d, 1))
            out.append(TensorSpec(p + "attn_output.weight", "attn_output", i, q_out, h))
            out.append(TensorSpec(p + "ffn_norm.weight", "norm", i, h, 1))
            out.extend(self._ffn_tensors(p, i))
        out.append(TensorSpec("output_norm.weight", "norm", None, h, 1))
        if not self.tied:
            out.append(TensorSpec("output.weight", "output", None, h, self.vocab))
        return out

    def _hybrid_mixer_tensors(self, p: str, i: int) -> list[TensorSpec]:
        """A Qwen3.5/Qwen3-Next layer's norms and token mixer, as llama.cpp's qwen35 loader names them."""
        h, d = self.hidden, self.head_dim
        out = [
            TensorSpec(p + "attn_norm.weight", "norm", i, h, 1),
            TensorSpec(p + "post_attention_norm.weight", "norm", i, h, 1),
        ]
        if self.is_full_attention(i):
            q_out, kv_out = self.heads * d, self.kv_heads * d
            # Gated attention: q_proj also produces the output gate (twice the query width).
            out += [
                TensorSpec(p + "attn_q.weight", "attn_q", i, h, 2 * q_out),
                TensorSpec(p + "attn_k.weight", "attn_k", i, h, kv_out),
                TensorSpec(p + "attn_v.weight", "attn_v", i, h, kv_out),
                TensorSpec(p + "attn_output.weight", "attn_output", i, q_out, h),
                TensorSpec(p + "attn_q_norm.weight", "norm", i, d, 1),
                TensorSpec(p + "attn_k_norm.weight", "norm", i, d, 1),
            ]
            return out
        key_dim = self.linear_k_heads * self.linear_k_dim
        value_dim = self.linear_v_heads * self.linear_v_dim
        conv_dim = 2 * key_dim + value_dim
        return [
            *out,
            TensorSpec(p + "attn_qkv.weight", "attn_qkv", i, h, conv_dim),
            TensorSpec(p + "attn_gate.weight", "linear_gate", i, h, value_dim),
            TensorSpec(p + "ssm_conv1d.weight", "norm", i, self.conv_kernel, conv_dim),  # never quantized
            TensorSpec(p + "ssm_dt.bias", "bias", i, self.linear_v_heads, 1),
            TensorSpec(p + "ssm_a", "norm", i, self.linear_v_heads, 1),
            TensorSpec(p + "ssm_beta.weight", "linear_beta", i, h, self.linear_v_heads),
            TensorSpec(p + "ssm_alpha.weight", "linear_alpha", i, h, self.linear_v_heads),
            TensorSpec(p + "ssm_norm.weight", "norm", i, self.linear_v_dim, 1),
            TensorSpec(p + "ssm_out.weight", "linear_out", i, value_dim, h),
        ]

    def _ffn_tensors(self, p: str, i: int) -> list[TensorSpec]:
        h = self.hidden
        if not self.is_moe:
            return [
                TensorSpec(p + "ffn_gate.weight", "ffn_gate", i, h, self.ffn),
                TensorSpec(p + "ffn_up.weight", "ffn_up", i, h, self.ffn),
                TensorSpec(p + "ffn_down.weight", "ffn_down", i, self.ffn, h),
            ]
        e, f = self.experts, self.moe_ffn
        out = [
            TensorSpec(p + "ffn_gate_inp.weight", "router", i, h, e),
            TensorSpec(p + "ffn_gate_exps.weight", "ffn_gate_exps", i, h, f * e, e),
            TensorSpec(p + "ffn_up_exps.weight", "ffn_up_exps", i, h, f * e, e),
            TensorSpec(p + "ffn_down_exps.weight", "ffn_down_exps", i, f, h * e, e),
        ]
        if self.shared_ffn:
            s = self.shared_ffn
            out += [
                TensorSpec(p + "ffn_gate_inp_shexp.weight", "router", i, h, 1),
                TensorSpec(p + "ffn_gate_shexp.weight", "ffn_gate_shexp", i, h, s),
                TensorSpec(p + "ffn_up_shexp.weight", "ffn_up_shexp", i, h, s),
                TensorSpec(p + "ffn_down_shexp.weight", "ffn_down_shexp", i, s, h),
            ]
        return out

    @property
    def text_params(self) -> int:
        return sum(t.elements for t in self._tensors)

    @property
    def params_total(self) -> int:
        """All parameters, encoders included (what memory is planned for)."""
        return self.text_params + self.encoder_params

    @property
    def params_active(self) -> int:
        """Parameters one token uses: the routed experts it does not visit are left out."""
        if not self.is_moe:
            return self.params_total
        unused = (self.experts - self.experts_used) / self.experts
        routed = sum(t.elements for t in self._tensors if t.experts > 1)
        return self.params_total - round(routed * unused)

    @property
    def params_embedding(self) -> int:
        return sum(t.elements for t in self._tensors if t.role in ("embed", "output"))

    def kv_bytes_per_token(self, bytes_per_element: float) -> float:
        """K and V of one token over the KV layers: KV layers × KV heads × head dim × 2 × bytes."""
        return self.kv_layers * self.kv_heads * self.head_dim * 2 * bytes_per_element

    @property
    def max_context(self) -> int | None:
        return self.context_extended or self.context_native

    # ---- constructors -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str = "") -> ModelShape:
        """From a Hugging Face config.json (qwen2/qwen3 dense and MoE, qwen3_5/qwen3_5_moe/qwen3_next hybrids,
        and the VL/audio wrappers whose text tower sits in text_config)."""
        model_type = str(config.get("model_type", ""))
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else None
        c: Mapping[str, Any] = {**config, **text} if text and "hidden_size" in text else config
        name = name or str(config.get("_name_or_path") or model_type)

        def need(key: str) -> int:
            value = c.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ShapeError(f"{name}: config.json lacks an integer {key!r}")
            return value

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        experts = int(c.get("num_experts") or 0)
        scaling = c.get("rope_scaling") if isinstance(c.get("rope_scaling"), Mapping) else None
        native = int(c.get("max_position_embeddings") or 0) or None
        extended = None
        if scaling and scaling.get("factor") and scaling.get("original_max_position_embeddings"):
            native = int(scaling["original_max_position_embeddings"])
            extended = int(native * float(scaling["factor"]))
        vision_config = config.get("vision_config")
        vision = (
            VisionTower.from_config(vision_config, model_type, name)
            if isinstance(vision_config, Mapping) and model_type in VISION_LAYOUTS
            else None
        )
        return cls(
            name=name,
            model_type=model_type,
            layers=need("num_hidden_layers"),
            hidden=hidden,
            ffn=int(c.get("intermediate_size") or 0),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            vocab=need("vocab_size"),
            tied=bool(c.get("tie_word_embeddings", False)),
            experts=experts,
            experts_used=int(c.get("num_experts_per_tok") or 0) if experts else 0,
            moe_ffn=int(c.get("moe_intermediate_size") or 0) if experts else 0,
            shared_ffn=int(c.get("shared_expert_intermediate_size") or 0) if experts else 0,
            context_native=native,
            context_extended=extended,
            vision=vision,
            **_hybrid_fields(c, model_type, name),
        )

    @classmethod
    def from_gguf_info(cls, info: GGUFInfo) -> ModelShape:
        """From read_gguf_info(): its sizes, scalar metadata and tensor names (no output.weight: tied)."""
        arch, meta = info.architecture, info.metadata
        if arch not in _GGUF_ARCHES:
            raise ShapeError(f"{info.path.name}: GGUF architecture {arch!r} is not a Qwen text model")

        def get(key: str) -> int:
            return int(meta.get(f"{arch}.{key}") or 0)

        experts = info.expert_count or 0
        return cls(
            name=info.name or info.path.stem,
            model_type=_GGUF_ARCHES[arch],
            layers=info.block_count,
            hidden=info.embedding_length,
            ffn=get("feed_forward_length"),
            heads=info.head_count,
            kv_heads=info.head_count_kv,
            head_dim=get("attention.key_length") or info.embedding_length // info.head_count,
            vocab=info.vocab_size,
            tied="output.weight" not in info.tensors,
            experts=experts,
            experts_used=(info.expert_used_count or 0) if experts else 0,
            moe_ffn=get("expert_feed_forward_length") if experts else 0,
            shared_ffn=get("expert_shared_feed_forward_length") if experts else 0,
            context_native=info.context_length or None,
            **_gguf_hybrid_fields(info, get),
        )

    def with_context(self, native: int | None, extended: int | None) -> ModelShape:
        """The same shape with other context limits (the catalog knows them better than a GGUF does)."""
        return ModelShape(
            **{k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}
            | {"context_native": native, "context_extended": extended}
        )


def _gguf_hybrid_fields(info: GGUFInfo, get: Callable[[str], int]) -> dict[str, int]:
    """A hybrid GGUF's linear-attention fields, named as llama.cpp's qwen35 loader reads them."""
    if _GGUF_ARCHES.get(info.architecture) not in HYBRID_TYPES:
        return {}
    interval = get("full_attention_interval")
    if not interval:  # recurrent_layers is an array (not in metadata): the first layer without a conv
        interval = next(
            (i + 1 for i in range(info.block_count) if f"blk.{i}.ssm_conv1d.weight" not in info.tensors), 0
        )
    state, v_heads = get("ssm.state_size"), get("ssm.time_step_rank")
    return {
        "full_attention_interval": interval,
        "linear_k_heads": get("ssm.group_count"),
        "linear_v_heads": v_heads,
        "linear_k_dim": state,
        "linear_v_dim": get("ssm.inner_size") // max(1, v_heads),
        "conv_kernel": get("ssm.conv_kernel"),
    }


def _hybrid_fields(c: Mapping[str, Any], model_type: str, name: str) -> dict[str, int]:
    """The linear-attention fields of a hybrid config (empty for a plain transformer)."""
    if model_type not in HYBRID_TYPES and "linear_num_value_heads" not in c:
        return {}
    interval = int(c.get("full_attention_interval") or 4)  # transformers' default when neither is given
    layer_types = c.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
        interval = full[0] + 1 if full else 0
        expected = [(i + 1) % interval == 0 if interval else False for i in range(len(layer_types))]
        if not interval or [kind == "full_attention" for kind in layer_types] != expected:
            raise ShapeError(f"{name}: layer_types is not a regular full-attention interval")
    k_heads = int(c.get("linear_num_key_heads") or 16)
    return {
        "full_attention_interval": interval,
        "linear_k_heads": k_heads,
        "linear_v_heads": int(c.get("linear_num_value_heads") or 32),
        "linear_k_dim": int(c.get("linear_key_head_dim") or 128),
        "linear_v_dim": int(c.get("linear_value_head_dim") or 128),
        "conv_kernel": int(c.get("linear_conv_kernel_dim") or 4),
    }


def billions(n: float) -> str:
    """A parameter count for people: 494032768 → '0.49B', 30532122624 → '30.5B'."""
    b = n / 1e9
    digits = 2 if b < 10 else 1 if b < 100 else 0
    return f"{b:.{digits}f}B" if not math.isnan(b) else "unknown"
