"""HF → GGUF conversion, llama.cpp quantization, the GGUF reader, the conversion cache and their CLI commands.

Numerical agreement with transformers is in test_parity.py; here the files themselves are checked: metadata,
tensor types, the vocabulary as llama.cpp loads it, and that llama.cpp runs each file close to the f32 one.
llama_cpp (the cpu extra) is imported plainly: without it the run fails, it never skips the checks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import llama_cpp
import ml_dtypes
import numpy as np
import pytest
import typer
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from qwenkit.cli.convert import convert_command, quantize_command
from qwenkit.gguf.convert import (
    ConversionError,
    convert_to_gguf,
    ensure_gguf,
    flat_text_config,
    gguf_cache_key,
)
from qwenkit.gguf.quantize import QuantizeError, quantize_gguf
from qwenkit.gguf.reader import GGUFReadError, read_gguf_info
from qwenkit.gguf.vocab import tokenizer_from_gguf
from qwenkit.tokenizer.specials import ADDED_TOKEN_IDS, CONFIG_VOCAB_SIZE, ENDOFTEXT, IM_END, IM_START
from qwenkit.tokenizer.tokenizer import QwenTokenizer

ARCHS = ("qwen2", "qwen3", "qwen3_moe")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}
# 1-D tensors (norms, biases) plus MoE routers stay f32; the rest takes the outtype.
F32_TENSORS = {"qwen2": 1 + 2 * (2 + 3), "qwen3": 1 + 2 * 4, "qwen3_moe": 1 + 2 * (4 + 1)}
ALL_TENSORS = {"qwen2": 26, "qwen3": 24, "qwen3_moe": 26}
WEIGHT_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
# By default: every arch to f32 and q8_0 (the default outtype), qwen3 to every type; the rest is slow.
MATRIX = [
    pytest.param(
        arch, outtype, marks=[pytest.mark.slow] if arch != "qwen3" and outtype in ("f16", "bf16") else []
    )
    for arch in ARCHS
    for outtype in OUTTYPES
]
PROMPT = "<|im_start|>user\nHello, GGUF! Привет, 你好<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def demos(demo_checkpoint: Callable[[str, str], Path]) -> dict[str, Path]:
    return {arch: demo_checkpoint(arch, "tiny") for arch in ARCHS}


@pytest.fixture(scope="module")
def converted(demo_gguf: Callable[[str, str, str], Path]) -> Callable[[str, str], Path]:
    """(arch, outtype) → the tiny demo converted to GGUF (once per session)."""
    return lambda arch, outtype: demo_gguf(arch, "tiny", outtype)


def llama_logits(path: Path, text: str = PROMPT) -> np.ndarray:
    """Logits for every position of `text` (added tokens parsed) as llama.cpp computes them from `path`."""
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False
    )
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / b.std())


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --- conversion -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "outtype"), MATRIX)
def test_convert_demo_metadata_and_tensor_types(
    converted: Callable[[str, str], Path], demos: dict[str, Path], arch: str, outtype: str
) -> None:
    info = read_gguf_info(converted(arch, outtype))
    config = json.loads((demos[arch] / "config.json").read_text())
    meta, prefix = info.metadata, GGUF_ARCH[arch]
    assert info.architecture == prefix
    assert (info.block_count, info.embedding_length, info.head_count, info.head_count_kv) == (2, 64, 4, 2)
    assert info.context_length == config["max_position_embeddings"]
    assert info.vocab_size == CONFIG_VOCAB_SIZE
    assert info.file_type_name == WEIGHT_TYPE[outtype].upper()
    assert info.name == demos[arch].name  # the checkpoint directory's name
    assert meta[f"{prefix}.feed_forward_length"] == 128
    assert meta[f"{prefix}.rope.freq_base"] == 1_000_000.0
    assert meta[f"{prefix}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    if arch == "qwen2":
        assert f"{prefix}.attention.key_length" not in meta
    else:
        assert meta[f"{prefix}.attention.key_length"] == meta[f"{prefix}.attention.value_length"] == 16
    if arch == "qwen3_moe":
        assert (info.expert_count, info.expert_used_count) == (4, 2)
        assert meta[f"{prefix}.expert_feed_forward_length"] == 32
        assert info.tensors["blk.1.ffn_gate_inp.weight"] == "F32"
        assert info.tensors["blk.1.ffn_down_exps.weight"] == WEIGHT_TYPE[outtype]
    # Tied embeddings: no output.weight; llama.cpp reuses token_embd.
    assert "output.weight" not in info.tensors
    assert info.tensor_count == ALL_TENSORS[arch]
    expected = {"F32": F32_TENSORS[arch]}
    expected[WEIGHT_TYPE[outtype]] = (
        expected.get(WEIGHT_TYPE[outtype], 0) + ALL_TENSORS[arch] - F32_TENSORS[arch]
    )
    assert info.tensor_types == expected
    assert info.tensors["output_norm.weight"] == "F32"
    # Tokenizer metadata llama.cpp needs.
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert info.eos_token_id == ADDED_TOKEN_IDS[IM_END]
    assert (
        meta["tokenizer.ggml.bos_token_id"]
        == meta["tokenizer.ggml.padding_token_id"]
        == ADDED_TOKEN_IDS[ENDOFTEXT]
    )
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert (
        info.chat_template == json.loads((demos[arch] / "tokenizer_config.json").read_text())["chat_template"]
    )


@pytest.mark.parametrize(("arch", "outtype"), [p for p in MATRIX if p.values[1] != "f32"])
def test_llama_cpp_runs_each_outtype_close_to_f32(
    converted: Callable[[str, str], Path], arch: str, outtype: str
) -> None:
    reference = llama_logits(converted(arch, "f32"))
    logits = llama_logits(converted(arch, outtype))
    assert np.isfinite(logits).all()
    # bf16/f16 round activations too (ggml's vec_dot types); q8_0 also rounds weights to 8 bits.
    limit = 0.05 if outtype in ("f16", "bf16") else 0.2
    assert 0 < relative_diff(logits, reference) < limit
    assert correlation(logits, reference) > 0.999


def test_vocabulary_as_llama_cpp_loads_it(
    converted: Callable[[str, str], Path], demos: dict[str, Path]
) -> None:
    llm = llama_cpp.Llama(model_path=str(converted("qwen3", "q8_0")), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        tokenizer = QwenTokenizer.from_dir(demos["qwen3"])
        assert llama_cpp.llama_vocab_n_tokens(vocab) == CONFIG_VOCAB_SIZE
        assert llama_cpp.llama_vocab_eos(vocab) == ADDED_TOKEN_IDS[IM_END]
        assert llama_cpp.llama_vocab_is_eog(vocab, ADDED_TOKEN_IDS[ENDOFTEXT])

        def attr(token_id: int) -> int:
            return llama_cpp.llama_vocab_get_attr(vocab, token_id)

        for token_id in (0, 100, 9707, 151_642):
            assert attr(token_id) & llama_cpp.LLAMA_TOKEN_ATTR_NORMAL
            assert llama_cpp.llama_vocab_get_text(vocab, token_id).decode() == tokenizer.id_to_token(token_id)
        for token in (ENDOFTEXT, IM_START, IM_END, "<|vision_pad|>", "<|fim_prefix|>", "<|file_sep|>"):
            assert attr(ADDED_TOKEN_IDS[token]) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, token
        for token in ("<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>"):
            assert attr(ADDED_TOKEN_IDS[token]) & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED, token
        padding = max(ADDED_TOKEN_IDS.values()) + 1
        assert attr(padding) & llama_cpp.LLAMA_TOKEN_ATTR_UNUSED
        assert (
            llama_cpp.llama_vocab_get_text(vocab, CONFIG_VOCAB_SIZE - 1)
            == f"[PAD{CONFIG_VOCAB_SIZE - 1}]".encode()
        )
    finally:
        llm.close()


def test_progress_reports_every_tensor(demos: dict[str, Path], tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    convert_to_gguf(
        demos["qwen3"], tmp_path / "m.gguf", "f32", progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(i, ALL_TENSORS["qwen3"]) for i in range(1, ALL_TENSORS["qwen3"] + 1)]


# Slow: a second full conversion of a demo (~4 s).
@pytest.mark.slow
def test_sharded_checkpoint_converts_to_the_same_file(demos: dict[str, Path], tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    shutil.copytree(demos["qwen3"], sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(demos["qwen3"] / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    single = convert_to_gguf(demos["qwen3"], tmp_path / "single.gguf", "q8_0", name="same")
    split = convert_to_gguf(sharded, tmp_path / "split.gguf", "q8_0", name="same")
    assert single.read_bytes() == split.read_bytes()

    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="lacks shard model-00002-of-00002"):
        convert_to_gguf(sharded, tmp_path / "broken.gguf", "f32")


def _qwen2_moe_checkpoint(directory: Path, tokenizer_from: Path) -> Path:
    """A tiny untied qwen2_moe checkpoint (shared expert, qkv bias) in the hub's layout."""
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_from / name, directory / name)
    hidden, moe, shared, experts, layers, vocab = 64, 32, 64, 4, 2, CONFIG_VOCAB_SIZE
    config = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": hidden,
        "intermediate_size": 128,
        "moe_intermediate_size": moe,
        "shared_expert_intermediate_size": shared,
        "num_experts": experts,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    (directory / "config.json").write_text(json.dumps(config))
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        for proj, out in (("q", 64), ("k", 32), ("v", 32)):
            shapes |= {
                f"{p}self_attn.{proj}_proj.weight": (out, hidden),
                f"{p}self_attn.{proj}_proj.bias": (out,),
            }
        shapes[p + "self_attn.o_proj.weight"] = (hidden, 64)
        shapes |= {p + "mlp.gate.weight": (experts, hidden), p + "mlp.shared_expert_gate.weight": (1, hidden)}
        for owner, width in [(f"mlp.experts.{e}.", moe) for e in range(experts)] + [
            ("mlp.shared_expert.", shared)
        ]:
            shapes |= {
                p + owner + "gate_proj.weight": (width, hidden),
                p + owner + "up_proj.weight": (width, hidden),
                p + owner + "down_proj.weight": (hidden, width),
            }
    rng = np.random.default_rng(0)
    tensors = {
        k: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        for k, s in shapes.items()
    }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_qwen2_moe_with_shared_expert_and_untied_head(demos: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = _qwen2_moe_checkpoint(tmp_path / "q2moe", demos["qwen3"])
    info = read_gguf_info(convert_to_gguf(checkpoint, tmp_path / "q2moe.gguf", "q8_0"))
    assert info.architecture == "qwen2moe"
    assert info.metadata["qwen2moe.expert_shared_feed_forward_length"] == 64
    assert info.metadata["qwen2moe.expert_feed_forward_length"] == 32
    assert info.tensors["output.weight"] == "Q8_0"
    assert info.tensors["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    assert info.tensors["blk.0.ffn_up_shexp.weight"] == "Q8_0"
    assert info.tensors["blk.1.ffn_gate_exps.weight"] == "Q8_0"
    assert info.tensors["blk.0.attn_q.bias"] == "F32"
    assert np.isfinite(llama_logits(info.path)).all()  # llama.cpp accepts every tensor's shape


# --- Qwen3.5 hybrids (Gated DeltaNet + gated attention, dense and MoE) ----------------------------------

HYBRIDS = ("qwen3_5", "qwen3_5_moe")
# By default each hybrid converts to q8_0 and Qwen3.5 to f32 and bf16 as well; the rest of the matrix is slow.
_HYBRID_FAST = {("qwen3_5", "f32"), ("qwen3_5", "bf16"), ("qwen3_5", "q8_0"), ("qwen3_5_moe", "q8_0")}
HYBRID_MATRIX = [
    pytest.param(arch, outtype, marks=[] if (arch, outtype) in _HYBRID_FAST else [pytest.mark.slow])
    for arch in HYBRIDS
    for outtype in OUTTYPES
]
# Per layer kind, what llama.cpp's qwen35 graph loads (ssm_a has no .weight suffix, ssm_dt is a bias).
LINEAR = {
    "attn_qkv",
    "attn_gate",
    "ssm_conv1d",
    "ssm_dt",
    "ssm_a",
    "ssm_alpha",
    "ssm_beta",
    "ssm_norm",
    "ssm_out",
}
FULL = {"attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm"}


def _text_config(directory: Path) -> dict[str, object]:
    return flat_text_config(json.loads((directory / "config.json").read_text()))


@pytest.mark.parametrize(("arch", "outtype"), HYBRID_MATRIX)
def test_convert_hybrid_demo(
    demo_checkpoint: Callable[[str, str], Path],
    demo_gguf: Callable[[str, str, str], Path],
    arch: str,
    outtype: str,
) -> None:
    path = demo_gguf(arch, "tiny", outtype)
    info, config = read_gguf_info(path), _text_config(demo_checkpoint(arch, "tiny"))
    prefix, meta = ("qwen35moe" if arch.endswith("moe") else "qwen35"), info.metadata
    assert info.architecture == prefix and info.file_type_name == WEIGHT_TYPE[outtype]
    assert info.block_count == config["num_hidden_layers"] and info.vocab_size == config["vocab_size"]
    assert meta[f"{prefix}.ssm.conv_kernel"] == config["linear_conv_kernel_dim"]
    assert meta[f"{prefix}.ssm.state_size"] == config["linear_key_head_dim"]
    assert meta[f"{prefix}.ssm.group_count"] == config["linear_num_key_heads"]
    assert meta[f"{prefix}.ssm.time_step_rank"] == config["linear_num_value_heads"]
    assert (
        meta[f"{prefix}.ssm.inner_size"] == config["linear_value_head_dim"] * config["linear_num_value_heads"]
    )
    assert (
        meta[f"{prefix}.rope.dimension_count"]
        == config["head_dim"] * config["rope_parameters"]["partial_rotary_factor"]
    )
    full = [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"]
    assert meta[f"{prefix}.full_attention_interval"] == full[0] + 1
    assert meta["tokenizer.ggml.pre"] == "qwen35"  # the demo carries Qwen3.5's split regex
    # The text model only: no vision tower, no MTP head; each layer has its kind's tensors.
    for layer in range(info.block_count):
        parts = {name.split(".")[2] for name in info.tensors if name.startswith(f"blk.{layer}.")}
        assert parts & (LINEAR | FULL) == (FULL if layer in full else LINEAR), layer
    assert not any(name.startswith(("v.", "mm.")) for name in info.tensors)
    assert info.tensors["blk.0.ssm_conv1d.weight"] == info.tensors["blk.0.ssm_a"] == "F32"
    assert info.tensors["blk.0.ssm_norm.weight"] == info.tensors["blk.0.post_attention_norm.weight"] == "F32"
    assert info.tensors["blk.0.attn_qkv.weight"] == WEIGHT_TYPE[outtype]
    if arch == "qwen3_5_moe":
        assert info.expert_count == config["num_experts"]
        assert (
            info.tensors["blk.0.ffn_gate_inp.weight"]
            == info.tensors["blk.0.ffn_gate_inp_shexp.weight"]
            == "F32"
        )
        assert info.tensors["blk.0.ffn_gate_exps.weight"] == WEIGHT_TYPE[outtype]
    if outtype != "f32":
        logits, reference = llama_logits(path), llama_logits(demo_gguf(arch, "tiny", "f32"))
        assert np.isfinite(logits).all() and correlation(logits, reference) > 0.999


def test_hybrid_tokenizer_from_gguf_matches_the_checkpoint(
    demo_checkpoint: Callable[[str, str], Path], demo_gguf: Callable[[str, str, str], Path]
) -> None:
    # tokenizer.ggml.pre "qwen35" brings back Qwen3.5's split regex (marks join letters) and added tokens.
    rebuilt, original = (
        tokenizer_from_gguf(demo_gguf("qwen3_5", "tiny", "f32")),
        QwenTokenizer.from_dir(demo_checkpoint("qwen3_5", "tiny")),
    )
    text = "<|im_start|>user\nनमस्ते café\u0301 <think>ok</think> 你好<|im_end|>"
    assert rebuilt.encode(text) == original.encode(text)
    assert rebuilt.encode_text(text) == original.encode_text(text)


def test_vision_tower_and_mtp_are_skipped_with_a_note(
    demo_checkpoint: Callable[[str, str], Path], tmp_path: Path
) -> None:
    notes: list[str] = []
    convert_to_gguf(demo_checkpoint("qwen3_5", "tiny"), tmp_path / "m.gguf", "f32", note=notes.append)
    assert len(notes) == 1 and "vision-tower" in notes[0] and "MTP" in notes[0]


# Slow: two full conversions of the MoE demo (~6 s).
@pytest.mark.slow
def test_fused_and_per_expert_layouts_convert_to_the_same_file(
    demo_checkpoint: Callable[[str, str], Path], tmp_path: Path
) -> None:
    # The demo stores each layer's experts fused (as the hub does); transformers saves one tensor per expert.
    fused = demo_checkpoint("qwen3_5_moe", "tiny")
    split = tmp_path / "split"
    shutil.copytree(fused, split)
    files = sorted(split.glob("*.safetensors"))
    for file in files:
        tensors, out = load_file(file), {}
        for name, value in tensors.items():
            if name.endswith("mlp.experts.gate_up_proj"):
                ff = value.shape[1] // 2
                for e in range(value.shape[0]):
                    out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = value[e, :ff]
                    out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = value[e, ff:]
            elif name.endswith("mlp.experts.down_proj"):
                for e in range(value.shape[0]):
                    out[name.replace("down_proj", f"{e}.down_proj.weight")] = value[e]
            else:
                out[name] = value
        assert len(out) > len(tensors)
        save_file(out, str(file), metadata={"format": "pt"})
    a = convert_to_gguf(fused, tmp_path / "fused.gguf", "q8_0", name="same")
    b = convert_to_gguf(split, tmp_path / "split.gguf", "q8_0", name="same")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(("arch", "gguf_arch"), [("qwen3_5_moe", "qwen35moe"), ("qwen3_next", "qwen3next")])
def test_quantize_hybrid(
    demo_gguf: Callable[[str, str, str], Path], tmp_path: Path, arch: str, gguf_arch: str
) -> None:
    src = demo_gguf(arch, "tiny", "f32")
    info = read_gguf_info(quantize_gguf(src, tmp_path / "m-q8_0.gguf", "q8_0", threads=2))
    assert info.file_type_name == "Q8_0" and info.architecture == gguf_arch
    assert info.tensors["blk.0.ssm_conv1d.weight"] == "F32"  # llama.cpp never quantizes conv kernels
    assert info.tensors["blk.0.attn_qkv.weight"] == "Q8_0"
    assert correlation(llama_logits(info.path), llama_logits(src)) > 0.999


# --- Qwen3-Next (qwen3next: Qwen3.5's layers, fused DeltaNet projections, a gated shared expert) -----------

# What llama.cpp's qwen3next graph loads of a DeltaNet layer: b and a come fused (ssm_ba).
NEXT_LINEAR = (LINEAR - {"ssm_alpha", "ssm_beta"}) | {"ssm_ba"}


@pytest.mark.parametrize(
    "outtype", [pytest.param(t, marks=[pytest.mark.slow] if t in ("f16", "bf16") else []) for t in OUTTYPES]
)
def test_convert_qwen3_next_demo(
    demo_checkpoint: Callable[[str, str], Path], demo_gguf: Callable[[str, str, str], Path], outtype: str
) -> None:
    path = demo_gguf("qwen3_next", "tiny", outtype)
    info, config = read_gguf_info(path), _text_config(demo_checkpoint("qwen3_next", "tiny"))
    meta = info.metadata
    assert info.architecture == "qwen3next" and info.file_type_name == WEIGHT_TYPE[outtype]
    assert info.block_count == config["num_hidden_layers"] and info.vocab_size == config["vocab_size"]
    assert meta["qwen3next.ssm.group_count"] == config["linear_num_key_heads"]
    assert meta["qwen3next.ssm.time_step_rank"] == config["linear_num_value_heads"]
    assert meta["qwen3next.rope.dimension_count"] == config["head_dim"] * config["partial_rotary_factor"]
    assert "qwen3next.rope.dimension_sections" not in meta  # plain rope, not Qwen3.5's mrope
    assert meta["qwen3next.expert_shared_feed_forward_length"] == config["shared_expert_intermediate_size"]
    assert info.expert_count == config["num_experts"]
    assert meta["tokenizer.ggml.pre"] == "qwen2"  # Qwen3-Next keeps the Qwen2/3 vocabulary and regex
    full = [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"]
    for layer in range(info.block_count):
        parts = {name.split(".")[2] for name in info.tensors if name.startswith(f"blk.{layer}.")}
        assert parts & (NEXT_LINEAR | FULL | LINEAR) == (FULL if layer in full else NEXT_LINEAR), layer
        assert {"ffn_gate_inp_shexp", "ffn_gate_exps", "ffn_up_shexp"} <= parts
    assert not any(name.startswith("mtp") or "nextn" in name for name in info.tensors)
    assert info.tensors["blk.0.ssm_conv1d.weight"] == info.tensors["blk.0.ssm_a"] == "F32"
    assert info.tensors["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    assert (
        info.tensors["blk.0.attn_qkv.weight"] == info.tensors["blk.0.ssm_ba.weight"] == WEIGHT_TYPE[outtype]
    )
    if outtype != "f32":
        logits, reference = llama_logits(path), llama_logits(demo_gguf("qwen3_next", "tiny", "f32"))
        assert np.isfinite(logits).all() and correlation(logits, reference) > 0.999


# Slow (~8 s): a wrong split would also fail Qwen3-Next's default parity test (test_parity.py).
@pytest.mark.slow
def test_qwen3_next_qkvz_is_split_by_key_head(
    demo_checkpoint: Callable[[str, str], Path], demo_gguf: Callable[[str, str, str], Path]
) -> None:
    # in_proj_qkvz rows, per key head [q, k, v, z], become attn_qkv (all q, all k, all v) and attn_gate (z).
    checkpoint = demo_checkpoint("qwen3_next", "tiny")
    config = _text_config(checkpoint)
    qkvz = load_file(checkpoint / "model.safetensors")["model.layers.0.linear_attn.in_proj_qkvz.weight"]
    n_k, head = config["linear_num_key_heads"], config["linear_key_head_dim"]
    per_v = config["linear_num_value_heads"] // n_k * config["linear_value_head_dim"]
    heads = qkvz.astype(np.float32).reshape(n_k, 2 * head + 2 * per_v, -1)
    q, k = heads[:, :head], heads[:, head : 2 * head]
    v, z = heads[:, 2 * head : 2 * head + per_v], heads[:, 2 * head + per_v :]
    tensors = {
        t.name: np.array(t.data) for t in gguf.GGUFReader(demo_gguf("qwen3_next", "tiny", "f32")).tensors
    }
    flat = [part.reshape(-1, qkvz.shape[1]) for part in (q, k, v, z)]
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"], np.concatenate(flat[:3]))
    np.testing.assert_array_equal(tensors["blk.0.attn_gate.weight"], flat[3])
    ba = load_file(checkpoint / "model.safetensors")["model.layers.0.linear_attn.in_proj_ba.weight"]
    np.testing.assert_array_equal(tensors["blk.0.ssm_ba.weight"], ba.astype(np.float32))


def test_qwen3_next_mtp_is_skipped_with_a_note(
    demo_checkpoint: Callable[[str, str], Path], tmp_path: Path
) -> None:
    notes: list[str] = []
    convert_to_gguf(demo_checkpoint("qwen3_next", "tiny"), tmp_path / "m.gguf", "f32", note=notes.append)
    assert len(notes) == 1 and "MTP" in notes[0] and "vision" not in notes[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"linear_value_head_dim": 32}, "equal head dims"),
        (
            {"layer_types": ["full_attention", "linear_attention", "linear_attention", "full_attention"]},
            "layer_types",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e7,
                    "partial_rotary_factor": 0.25,
                    "mrope_section": [24, 24, 16],
                }
            },
            "mrope_section",
        ),
    ],
)
def test_hybrid_configs_llama_cpp_cannot_run(
    demo_checkpoint: Callable[[str, str], Path], tmp_path: Path, change: dict[str, object], message: str
) -> None:
    checkpoint = tmp_path / "c"
    shutil.copytree(demo_checkpoint("qwen3_5", "tiny"), checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"] |= change
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


# --- conversion errors ----------------------------------------------------------------------------------


def _copy_demo(demos: dict[str, Path], tmp_path: Path, arch: str = "qwen3") -> Path:
    target = tmp_path / f"copy-{arch}"
    shutil.copytree(demos[arch], target)
    return target


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_non_qwen_model_type_is_refused(demos: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = _copy_demo(demos, tmp_path)
    _edit_config(checkpoint, model_type="llama")
    with pytest.raises(
        ConversionError,
        match=r"model_type 'llama'.*supports qwen2, qwen3, qwen2_moe, qwen3_moe, qwen3_5, qwen3_5_moe, "
        r"qwen3_next, qwen2_5_vl, qwen3_vl$",
    ):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "f32")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "no \\*.safetensors weights"),
        ("garbage", "not a readable safetensors file"),
        ("truncated", "not a readable safetensors file"),
    ],
)
def test_missing_or_corrupt_weights(
    demos: dict[str, Path], tmp_path: Path, damage: str, message: str
) -> None:
    checkpoint = _copy_demo(demos, tmp_path)
    weights = checkpoint / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "garbage":
        weights.write_bytes(b"\x00not safetensors at all" * 10)
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConversionError, match=message):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


def test_bad_arguments_and_unsupported_checkpoints(demos: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"unknown outtype 'q4_0'.*qwenkit quantize"):
        convert_to_gguf(demos["qwen3"], tmp_path / "out.gguf", "q4_0")  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match=r"must end in \.gguf"):
        convert_to_gguf(demos["qwen3"], tmp_path / "out.bin", "f32")
    with pytest.raises(ConversionError, match=r"no config\.json"):
        convert_to_gguf(tmp_path, tmp_path / "out.gguf", "f32")
    checkpoint = _copy_demo(demos, tmp_path, "qwen3_moe")
    _edit_config(checkpoint, norm_topk_prob=False)
    with pytest.raises(ConversionError, match="norm_topk_prob"):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "f32")
    _edit_config(checkpoint, norm_topk_prob=True, quantization_config={"quant_method": "awq"})
    with pytest.raises(ConversionError, match="already quantized \\(awq\\)"):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "f32")


def test_unexpected_or_missing_tensors(demos: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = _copy_demo(demos, tmp_path)
    tensors = load_file(checkpoint / "model.safetensors")
    extra = dict(tensors, **{"model.vision.patch_embed.weight": tensors["model.norm.weight"]})
    save_file(extra, str(checkpoint / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected tensor model\.vision\.patch_embed\.weight"):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "f32")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(checkpoint / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"lacks 1 tensor.*blk\.1\.ffn_up\.weight"):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "f32")
    _edit_config(checkpoint, tie_word_embeddings=False)
    with pytest.raises(ConversionError, match=r"output\.weight"):
        convert_to_gguf(checkpoint, tmp_path / "out.gguf", "f32")


def test_failed_conversion_leaves_no_file(demos: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"previous file")

    def interrupt(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_to_gguf(demos["qwen3"], out, "f32", progress=interrupt)
    assert out.read_bytes() == b"previous file"
    assert os.listdir(out.parent) == ["m.gguf"]


# --- the reader -----------------------------------------------------------------------------------------


def test_reader_rejects_bad_magic_truncation_and_missing_files(
    converted: Callable[[str, str], Path], tmp_path: Path
) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file, not a model")
    with pytest.raises(GGUFReadError, match=r"not a GGUF file.*qwenkit convert"):
        read_gguf_info(not_gguf)
    data = converted("qwen3", "q8_0").read_bytes()
    for cut in (len(data) - 4096, 5000):  # in the tensor data, in the vocabulary
        cut_file = tmp_path / f"cut{cut}.gguf"
        cut_file.write_bytes(data[:cut])
        with pytest.raises(GGUFReadError, match="is truncated"):
            read_gguf_info(cut_file)
    with pytest.raises(GGUFReadError, match="no such GGUF file"):
        read_gguf_info(tmp_path / "absent.gguf")


def test_reader_rejects_other_architectures(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFReadError, match="is a 'llama' model, not a Qwen one"):
        read_gguf_info(path)


# --- quantization ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantize_tiny(converted: Callable[[str, str], Path], tmp_path: Path, qtype: str) -> None:
    src = converted("qwen3", "f32")
    out = quantize_gguf(src, tmp_path / f"m-{qtype}.gguf", qtype, threads=2)  # type: ignore[arg-type]
    info = read_gguf_info(out)
    assert info.file_type_name == qtype.upper()
    assert info.tensor_types["F32"] == F32_TENSORS["qwen3"]
    assert info.tensors["blk.0.ffn_up.weight"] == qtype.upper()
    assert info.size_bytes < src.stat().st_size / 2.5
    # The tiny demo's logits are nearly flat (std ~0.16), so q4_0's error is large next to them.
    assert correlation(llama_logits(out), llama_logits(src)) > (0.999 if qtype == "q8_0" else 0.97)


def test_k_quants_fall_back_on_rows_narrower_than_256(
    converted: Callable[[str, str], Path], tmp_path: Path
) -> None:
    # The tiny demo's rows are 64/128 wide: llama.cpp quantizes them to q5_0 instead of q4_K.
    info = read_gguf_info(quantize_gguf(converted("qwen3", "f32"), tmp_path / "m.gguf", "q4_k_m", threads=2))
    assert info.file_type_name == "Q4_K_M"
    assert "Q4_K" not in info.tensor_types and info.tensor_types["Q5_0"] > 0


# Slow (~5 s): the planner's default layout test also reads a small q4_k_m file's tensor types.
@pytest.mark.slow
def test_q4_k_m_on_the_small_demo(demo_gguf: Callable[[str, str, str], Path], tmp_path: Path) -> None:
    src = demo_gguf("qwen3", "small", "bf16")
    info = read_gguf_info(quantize_gguf(src, tmp_path / "small-q4_k_m.gguf", "q4_k_m", threads=2))
    assert info.file_type_name == "Q4_K_M"
    # q4_k_m: Q4_K for most matrices, Q6_K for some ffn_down/attn_v and the tied embeddings; no fallbacks.
    assert info.tensors["blk.0.attn_q.weight"] == "Q4_K"
    assert info.tensor_types["Q4_K"] > info.tensor_types["Q6_K"] > 0
    assert set(info.tensor_types) == {"F32", "Q4_K", "Q6_K"}
    assert np.isfinite(llama_logits(info.path)).all()


def test_quantize_errors(converted: Callable[[str, str], Path], tmp_path: Path) -> None:
    src = converted("qwen3", "f32")
    with pytest.raises(QuantizeError, match="unknown quantization 'q3_k'"):
        quantize_gguf(src, tmp_path / "m.gguf", "q3_k")  # type: ignore[arg-type]
    with pytest.raises(QuantizeError, match="already quantized \\(Q8_0\\)"):
        quantize_gguf(converted("qwen3", "q8_0"), tmp_path / "m.gguf", "q4_0")
    with pytest.raises(QuantizeError, match="is the input file"):
        quantize_gguf(src, src, "q4_0")
    with pytest.raises(QuantizeError, match=r"must end in \.gguf"):
        quantize_gguf(src, tmp_path / "m.bin", "q4_0")
    with pytest.raises(QuantizeError, match="threads must be at least 1"):
        quantize_gguf(src, tmp_path / "m.gguf", "q4_0", threads=0)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(GGUFReadError, match="not a GGUF file"):
        quantize_gguf(not_gguf, tmp_path / "m.gguf", "q4_0")
    assert not (tmp_path / "m.gguf").exists()


def test_llama_cpp_failure_becomes_a_quantize_error(tmp_path: Path) -> None:
    # A Qwen GGUF our reader accepts but llama.cpp cannot load: its error line ends up in the exception.
    src = tmp_path / "incomplete.gguf"
    writer = gguf.GGUFWriter(src, "qwen3")
    writer.add_context_length(128)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QuantizeError, match=r"could not quantize .*key not found in model: qwen3\.attention"):
        quantize_gguf(src, tmp_path / "out.gguf", "q4_0", threads=2)
    assert os.listdir(tmp_path) == ["incomplete.gguf"]


# --- the conversion cache -------------------------------------------------------------------------------


def test_ensure_gguf_converts_once_and_reuses(
    demos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"QWENKIT_CACHE_DIR": str(tmp_path / "cache")}  # an empty cache of its own
    first = ensure_gguf(demos["qwen2"], "q8_0", env=env)
    assert first.is_relative_to(tmp_path / "cache" / "gguf") and first.name == "model-q8_0.gguf"
    assert read_gguf_info(first).architecture == "qwen2"

    def no_conversion(*args: object, **kwargs: object) -> Path:
        raise AssertionError("ensure_gguf converted again")

    monkeypatch.setattr("qwenkit.gguf.convert.convert_to_gguf", no_conversion)
    assert ensure_gguf(demos["qwen2"], "q8_0", env=env) == first


def test_cache_key_follows_inputs(demos: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = _copy_demo(demos, tmp_path, "qwen2")
    key = gguf_cache_key(checkpoint, "q8_0")
    assert gguf_cache_key(checkpoint, "q8_0") == key
    assert gguf_cache_key(checkpoint, "f16") != key
    weights = checkpoint / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten weights
    touched = gguf_cache_key(checkpoint, "q8_0")
    assert touched != key
    _edit_config(checkpoint, rope_theta=10000.0)
    assert gguf_cache_key(checkpoint, "q8_0") not in (key, touched)


# --- CLI ------------------------------------------------------------------------------------------------


@pytest.fixture()
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("convert")(convert_command)
    app.command("quantize")(quantize_command)
    return app


def test_cli_convert_then_quantize(cli: typer.Typer, demos: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "m-f16.gguf"
    result = runner.invoke(
        cli, ["convert", "--model", str(demos["qwen3"]), "--outtype", "f16", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert read_gguf_info(out).file_type_name == "F16"
    result = runner.invoke(cli, ["quantize", str(out), "--qtype", "q8_0", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "m-q8_0.gguf")  # "-f16" replaced by the new type
    result = runner.invoke(cli, ["quantize", str(tmp_path / "m-q8_0.gguf"), "--qtype", "q4_0"])
    assert result.exit_code == 2
    assert "already quantized (Q8_0)" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(cli, ["convert", "--model", str(out)])
    assert result.exit_code == 2 and "already a GGUF" in result.stderr
    # A checkpoint goes through a temporary bf16 GGUF beside the output, which is then removed.
    target = tmp_path / "direct" / "q.gguf"
    result = runner.invoke(cli, ["quantize", str(demos["qwen2"]), "-q", "q8_0", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert read_gguf_info(target).file_type_name == "Q8_0"
    assert os.listdir(target.parent) == ["q.gguf"]


def test_cli_convert_notes_the_skipped_vision_tower(
    cli: typer.Typer, demo_checkpoint: Callable[[str, str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(
        cli, ["convert", "--model", str(demo_checkpoint("qwen3_5", "tiny")), "-t", "f16", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "note:" in result.stderr and "vision-tower" in result.stderr
    assert read_gguf_info(out).architecture == "qwen35"
