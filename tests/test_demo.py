"""Demo checkpoints: hub layout and fields, determinism, atomic creation, loading with transformers."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from qwenkit.chat.flavor import Flavor
from qwenkit.chat.template import chat_template
from qwenkit.checkpoints import demo
from qwenkit.checkpoints.demo import (
    DEMO_NOTICE,
    DEMO_SIZES,
    DemoArch,
    DemoError,
    DemoSize,
    create_demo,
    default_demo_dir,
    ensure_default_demo,
    is_demo_checkpoint,
)
from qwenkit.checkpoints.resolve import resolve_model
from qwenkit.paths import cache_root

HUB_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "README.md",
}


# Fields in Qwen3-30B-A3B's config.json that Qwen3MoeConfig does not declare: transformers keeps them as
# plain attributes (the model reads head_dim with getattr).
HUB_ONLY_FIELDS = {DemoArch.QWEN3_MOE: {"head_dim", "max_window_layers"}}
# The text-only generations; the Qwen3.5 family (multimodal layout) and Qwen3-Next have their own tests below.
VL_ARCHS = [DemoArch.QWEN2_5_VL, DemoArch.QWEN3_VL]  # tested in test_vision.py
TEXT_ARCHS = [a for a in DemoArch if not a.hybrid and a not in [*VL_ARCHS, DemoArch.QWEN3_NEXT]]
# VL demos also ship the image/video processor configs.
VL_FILES = {"preprocessor_config.json", "video_preprocessor_config.json"}
HYBRID_ARCHS = [a for a in DemoArch if a.hybrid]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # One qwenkit cache per module so the tokenizer is built once, never in the user's real cache.
    return {"QWENKIT_CACHE_DIR": str(tmp_path_factory.mktemp("qwenkit-cache"))}


@pytest.fixture
def fresh_env(tmp_path: Path, env: dict[str, str], demos: dict[DemoArch, Path]) -> dict[str, str]:
    """An empty qwenkit cache except for the tokenizer build (cache_root/tokenizer), to save its seconds."""
    cache = tmp_path / "cache"
    shutil.copytree(Path(env["QWENKIT_CACHE_DIR"]) / "tokenizer", cache / "tokenizer")
    return {"QWENKIT_CACHE_DIR": str(cache)}


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> dict[DemoArch, Path]:
    root = tmp_path_factory.mktemp("demos")
    return {arch: create_demo(root / arch.value, arch, env=env) for arch in TEXT_ARCHS}


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text("utf-8"))


def _tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(path / "model.safetensors", framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_layout_is_a_hub_download(demos: dict[DemoArch, Path]) -> None:
    for path in demos.values():
        assert {p.name for p in path.iterdir()} == HUB_FILES
        assert is_demo_checkpoint(path)


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_config_loads_in_transformers_with_the_same_fields(
    demos: dict[DemoArch, Path], arch: DemoArch
) -> None:
    from transformers import AutoConfig

    raw = _config(demos[arch])
    config = AutoConfig.from_pretrained(demos[arch])
    assert config.model_type == arch.value
    known = set(AutoConfig.for_model(arch.value).to_dict()) | set(type(config).attribute_map)
    # transformers 5 folds rope_theta/rope_scaling into rope_parameters and torch_dtype into dtype.
    legacy = {"rope_theta", "rope_scaling", "torch_dtype"}
    for key, value in raw.items():
        if key in legacy or key == demo.DEMO_MARKER:
            continue
        assert key in known | HUB_ONLY_FIELDS.get(arch, set()), f"{key} is not a {arch.value} config field"
        if key == "sliding_window" and not raw["use_sliding_window"]:
            value = None  # transformers drops an unused sliding window
        assert getattr(config, key) == value, key
    assert config.rope_parameters["rope_theta"] == raw["rope_theta"]
    assert str(config.dtype).removeprefix("torch.") == "bfloat16"


def test_config_values(demos: dict[DemoArch, Path]) -> None:
    tiny = DEMO_SIZES[DemoSize.TINY]
    for arch, path in demos.items():
        config = _config(path)
        assert config["vocab_size"] == 151936
        assert (config["bos_token_id"], config["eos_token_id"]) == (151643, 151645)
        assert (config["hidden_size"], config["num_hidden_layers"]) == (tiny.hidden, tiny.layers)
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (tiny.heads, tiny.kv_heads)
        assert config["tie_word_embeddings"] is True
        assert config["torch_dtype"] == "bfloat16"
        assert config[demo.DEMO_MARKER]["random_weights"] is True
        assert ("head_dim" in config) == (arch is not DemoArch.QWEN2)
    moe = _config(demos[DemoArch.QWEN3_MOE])
    assert (moe["num_experts"], moe["num_experts_per_tok"]) == (tiny.experts, tiny.experts_per_tok)
    assert moe["moe_intermediate_size"] == tiny.moe_intermediate
    assert moe["mlp_only_layers"] == []


def test_generation_configs_follow_qwen(demos: dict[DemoArch, Path]) -> None:
    for arch, path in demos.items():
        gen = json.loads((path / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [151645, 151643]
        assert (gen["bos_token_id"], gen["pad_token_id"], gen["do_sample"], gen["top_k"]) == (
            151643,
            151643,
            True,
            20,
        )
        if arch is DemoArch.QWEN2:
            assert (gen["temperature"], gen["top_p"], gen["repetition_penalty"]) == (0.7, 0.8, 1.1)
        else:
            assert (gen["temperature"], gen["top_p"]) == (0.6, 0.95)
            assert "repetition_penalty" not in gen


def _expected_names(arch: DemoArch, layers: int, experts: int) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}self_attn.{m}_proj.weight" for m in "qkvo"}
        if arch is DemoArch.QWEN2:
            names |= {f"{p}self_attn.{m}_proj.bias" for m in "qkv"}
        else:
            names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        if arch is DemoArch.QWEN3_MOE:
            names.add(p + "mlp.gate.weight")
            names |= {
                f"{p}mlp.experts.{e}.{m}_proj.weight" for e in range(experts) for m in ("gate", "up", "down")
            }
        else:
            names |= {f"{p}mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    return names


def test_tensor_names_shapes_and_dtype(demos: dict[DemoArch, Path]) -> None:
    d = DEMO_SIZES[DemoSize.TINY]
    for arch, path in demos.items():
        tensors = _tensors(path)
        assert set(tensors) == _expected_names(arch, d.layers, d.experts)
        assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
        assert tensors["model.embed_tokens.weight"].shape == (151936, d.hidden)
        assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (d.heads * d.head_dim, d.hidden)
        assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (d.kv_heads * d.head_dim, d.hidden)
        assert tensors["model.layers.0.self_attn.o_proj.weight"].shape == (d.hidden, d.heads * d.head_dim)
        with safe_open(path / "model.safetensors", framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
    moe = _tensors(demos[DemoArch.QWEN3_MOE])
    assert moe["model.layers.0.mlp.gate.weight"].shape == (d.experts, d.hidden)
    assert moe["model.layers.0.mlp.experts.3.down_proj.weight"].shape == (d.hidden, d.moe_intermediate)
    assert _tensors(demos[DemoArch.QWEN2])["model.layers.0.self_attn.v_proj.bias"].shape == (
        d.kv_heads * d.head_dim,
    )


def test_weight_statistics(demos: dict[DemoArch, Path]) -> None:
    tensors = _tensors(demos[DemoArch.QWEN3])
    embed = tensors["model.embed_tokens.weight"].astype(np.float32)
    assert abs(float(embed.mean())) < 1e-3
    assert 0.019 < float(embed.std()) < 0.021
    for name, tensor in tensors.items():
        if name.endswith("norm.weight"):
            assert np.all(tensor.astype(np.float32) == 1.0), name


def test_tokenizer_files_carry_the_flavour_template(demos: dict[DemoArch, Path]) -> None:
    flavors = {DemoArch.QWEN2: Flavor.QWEN2_5, DemoArch.QWEN3: Flavor.QWEN3, DemoArch.QWEN3_MOE: Flavor.QWEN3}
    for arch, path in demos.items():
        config = json.loads((path / "tokenizer_config.json").read_text("utf-8"))
        assert config["chat_template"] == chat_template(flavors[arch])
        assert config["eos_token"] == "<|im_end|>"


def test_readme_says_random_and_how_to_pass_a_real_model(demos: dict[DemoArch, Path]) -> None:
    readme = (demos[DemoArch.QWEN3] / "README.md").read_text("utf-8")
    assert "random" in readme
    assert "noise" in readme
    assert "--model Qwen/Qwen3-0.6B" in readme
    assert ".gguf" in readme


def test_notice_is_one_line_naming_the_fix() -> None:
    assert "\n" not in DEMO_NOTICE
    assert "random" in DEMO_NOTICE
    assert "--model" in DEMO_NOTICE


def test_same_arguments_give_identical_files(
    tmp_path: Path, demos: dict[DemoArch, Path], env: dict[str, str]
) -> None:
    again = create_demo(tmp_path / "again", DemoArch.QWEN3_MOE, env=env)
    assert _digests(again) == _digests(demos[DemoArch.QWEN3_MOE])
    other_cache = {"QWENKIT_CACHE_DIR": str(tmp_path / "other-cache")}
    fresh = create_demo(tmp_path / "fresh", DemoArch.QWEN2, env=other_cache)
    assert _digests(fresh) == _digests(demos[DemoArch.QWEN2])


def test_another_seed_gives_other_weights(
    tmp_path: Path, demos: dict[DemoArch, Path], env: dict[str, str]
) -> None:
    seeded = create_demo(tmp_path / "seed1", DemoArch.QWEN3, seed=1, env=env)
    a, b = _tensors(seeded), _tensors(demos[DemoArch.QWEN3])
    assert set(a) == set(b)
    assert not np.array_equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert _config(seeded)[demo.DEMO_MARKER]["seed"] == 1


def test_small_size_dimensions(tmp_path: Path, env: dict[str, str]) -> None:
    small = DEMO_SIZES[DemoSize.SMALL]
    config = demo.demo_config(DemoArch.QWEN3_MOE, DemoSize.SMALL)
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (256, 4, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)
    assert (config["num_experts"], config["num_experts_per_tok"]) == (8, 2)
    shapes = demo.demo_tensor_shapes(config)
    assert shapes["model.layers.3.mlp.experts.7.up_proj.weight"] == (small.moe_intermediate, 256)
    assert "model.layers.4.input_layernorm.weight" not in shapes


def test_refuses_to_overwrite_a_non_demo_directory(tmp_path: Path, env: dict[str, str]) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "config.json").write_text('{"model_type": "qwen3"}')
    with pytest.raises(DemoError, match="not a qwenkit demo") as info:
        create_demo(precious, env=env)
    assert "\n" not in str(info.value)
    assert (precious / "config.json").read_text() == '{"model_type": "qwen3"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_replaces_a_demo_and_fills_an_empty_directory(tmp_path: Path, env: dict[str, str]) -> None:
    target = tmp_path / "d"
    target.mkdir()
    create_demo(target, DemoArch.QWEN3, env=env)
    create_demo(target, DemoArch.QWEN2, env=env)
    assert _config(target)["model_type"] == "qwen2"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging or old copies left behind


@pytest.mark.parametrize(("arch", "size"), [("llama", "tiny"), ("qwen3", "huge")])
def test_bad_arch_or_size(tmp_path: Path, env: dict[str, str], arch: str, size: str) -> None:
    with pytest.raises(DemoError, match="use one of"):
        create_demo(tmp_path / "x", arch, size, env=env)
    assert not (tmp_path / "x").exists()


def test_bad_seed(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(DemoError, match="non-negative integer"):
        create_demo(tmp_path / "x", seed=-1, env=env)


def test_is_demo_checkpoint_rejects_other_things(tmp_path: Path) -> None:
    assert not is_demo_checkpoint(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{broken")
    assert not is_demo_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", "qwenkit_demo": "yes"}')
    assert not is_demo_checkpoint(tmp_path)


def test_demo_resolves_as_a_local_qwen_checkpoint(demos: dict[DemoArch, Path]) -> None:
    resolved = resolve_model(str(demos[DemoArch.QWEN3_MOE]), env={"HF_HUB_OFFLINE": "1"})
    assert (resolved.kind, resolved.source, resolved.model_type) == ("hf", "local", "qwen3_moe")
    assert not resolved.has_remote_code


def test_default_demo_is_created_once(fresh_env: dict[str, str]) -> None:
    assert default_demo_dir(fresh_env) == cache_root(fresh_env) / "demo" / "qwen3-tiny"
    path = ensure_default_demo(fresh_env)
    assert path == default_demo_dir(fresh_env)
    assert _config(path)["model_type"] == "qwen3"
    inode = (path / "model.safetensors").stat().st_ino
    assert ensure_default_demo(fresh_env) == path
    assert (path / "model.safetensors").stat().st_ino == inode


def test_default_demo_tolerates_losing_the_race(
    fresh_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    build_aside = demo._build_aside

    def other_process_wins(out_dir: Path, *args: object) -> Path:
        rival = build_aside(out_dir, *args)  # type: ignore[arg-type]
        rival.rename(out_dir)  # the rival finishes first
        return build_aside(out_dir, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(demo, "_build_aside", other_process_wins)
    path = ensure_default_demo(fresh_env)
    assert is_demo_checkpoint(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["qwen3-tiny"]


def test_default_demo_from_two_threads(fresh_env: dict[str, str]) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_default_demo(fresh_env))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [default_demo_dir(fresh_env)] * 2
    assert {p.name for p in results[0].iterdir()} == HUB_FILES


def test_stale_default_demo_is_rebuilt(fresh_env: dict[str, str]) -> None:
    path = ensure_default_demo(fresh_env)
    config = _config(path)
    config[demo.DEMO_MARKER]["version"] = 0
    (path / "config.json").write_text(json.dumps(config))
    ensure_default_demo(fresh_env)
    assert _config(path)[demo.DEMO_MARKER]["version"] == demo.DEMO_FORMAT_VERSION


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_transformers_loads_every_tensor_and_gives_finite_logits(
    demos: dict[DemoArch, Path], arch: DemoArch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(demos[arch], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    file_embed = _tensors(demos[arch])["model.embed_tokens.weight"].astype(np.float32)
    assert np.array_equal(model.get_input_embeddings().weight.detach().float().numpy(), file_embed)
    tokenizer = AutoTokenizer.from_pretrained(demos[arch])
    ids = tokenizer("Hello, Qwen!", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 151936)
    assert torch.isfinite(logits).all()


# --- Qwen3.5 family (hybrid Gated DeltaNet, multimodal hub layout) -----------------------------------------


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> dict[DemoArch, Path]:
    root = tmp_path_factory.mktemp("hybrid")
    return {arch: create_demo(root / arch.value, arch, env=env) for arch in HYBRID_ARCHS}


def test_hybrid_layout_and_config(hybrid: dict[DemoArch, Path]) -> None:
    for arch, path in hybrid.items():
        assert {p.name for p in path.iterdir()} == HUB_FILES | VL_FILES and is_demo_checkpoint(path)
        config = _config(path)
        assert config["model_type"] == arch.value and "text_config" in config and "vision_config" in config
        assert config["architectures"] == [
            "Qwen3_5MoeForConditionalGeneration" if arch.moe else "Qwen3_5ForConditionalGeneration"
        ]
        text = demo.text_config(config)
        assert text["model_type"] == f"{arch.value}_text" and text["vocab_size"] == 248_320
        assert (config["image_token_id"], config["vision_start_token_id"]) == (248_056, 248_053)
        assert text["eos_token_id"] == 248_044 and text["rope_parameters"]["rope_theta"] == 10_000_000
        gen = json.loads((path / "generation_config.json").read_text("utf-8"))
        assert gen["eos_token_id"] == [248_046, 248_044]
        tok_config = json.loads((path / "tokenizer_config.json").read_text("utf-8"))
        assert tok_config["chat_template"] == chat_template("qwen3_5")
        assert tok_config["added_tokens_decoder"]["248069"]["content"] == "</think>"
        readme = (path / "README.md").read_text("utf-8")
        assert "random" in readme and "stand-in" in readme and "248044" in readme


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
@pytest.mark.parametrize("size", list(demo.HYBRID_SIZES))
def test_hybrid_layers_are_three_linear_to_one_full(arch: DemoArch, size: DemoSize) -> None:
    config = demo.demo_config(arch, size)
    text = config["text_config"]
    kinds = text["layer_types"]
    assert len(kinds) == text["num_hidden_layers"] and len(kinds) % 4 == 0
    assert kinds == ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * (
        len(kinds) // 4
    )
    shapes = demo.demo_tensor_shapes(config)
    for i, kind in enumerate(kinds):
        p = f"model.language_model.layers.{i}."
        assert (p + "linear_attn.in_proj_qkv.weight" in shapes) == (kind == "linear_attention")
        assert (p + "self_attn.q_proj.weight" in shapes) == (kind == "full_attention")
    # Rotary dims covered by the M-RoPE sections: head_dim * partial_rotary_factor / 2.
    rope = text["rope_parameters"]
    assert sum(rope["mrope_section"]) * 2 == int(text["head_dim"] * rope["partial_rotary_factor"])


def test_0_8b_shape_is_qwen3_5_0_8b() -> None:
    text = demo.demo_config(DemoArch.QWEN3_5, DemoSize.B0_8)["text_config"]
    expected = {
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 256, "intermediate_size": 3584, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
        "linear_key_head_dim": 128, "linear_conv_kernel_dim": 4, "tie_word_embeddings": True,
    }  # fmt: skip
    got = {k: text[k] for k in expected}
    assert got == expected
    assert text["rope_parameters"]["mrope_section"] == [11, 11, 10]
    with pytest.raises(DemoError, match="not made for qwen3_5"):
        demo.demo_config(DemoArch.QWEN3_5, DemoSize.B0_5)
    with pytest.raises(DemoError, match="not made for qwen3"):
        demo.demo_config(DemoArch.QWEN3, DemoSize.B0_8)


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
@pytest.mark.parametrize("size", [DemoSize.TINY, DemoSize.SMALL])
def test_hybrid_tensor_names_and_shapes_match_transformers(arch: DemoArch, size: DemoSize) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = demo.demo_config(arch, size)
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != demo.DEMO_MARKER})
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        del want["lm_head.weight"]
    got = {k: v for k, v in demo.demo_tensor_shapes(config).items() if not k.startswith("mtp.")}
    assert got == want


# Qwen3.5 by default; the MoE (~3 s) also loads in transformers in test_parity.py's default cases.
@pytest.mark.parametrize(
    "arch", [DemoArch.QWEN3_5, pytest.param(DemoArch.QWEN3_5_MOE, marks=pytest.mark.slow)]
)
def test_hybrid_loads_in_transformers_and_runs_forward(hybrid: dict[DemoArch, Path], arch: DemoArch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = hybrid[arch]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == ("Qwen3_5MoeForCausalLM" if arch.moe else "Qwen3_5ForCausalLM")
    state = model.state_dict()
    file = {
        k: v
        for k, v in _tensors(path).items()
        if k.startswith("model.language_model.") or k == "lm_head.weight"
    }
    for name, value in file.items():
        loaded = state[name.replace("model.language_model.", "model.")]
        assert np.array_equal(loaded.numpy(), value.astype(np.float32)), name  # nothing re-initialised
    assert len(file) == len(state) - (1 if _config(path)["tie_word_embeddings"] else 0)
    hf_tok = AutoTokenizer.from_pretrained(path)
    prompt = "<|im_start|>user\nGated DeltaNet? नमस्ते<|im_end|>\n<|im_start|>assistant\n<think>\n"
    ids = hf_tok.encode(prompt, add_special_tokens=False)
    from qwenkit.tokenizer.tokenizer import QwenTokenizer

    assert QwenTokenizer.from_dir(path).encode(prompt) == ids and ids[0] == 248_045
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 248_320) and bool(torch.isfinite(logits).all())


@pytest.mark.slow  # two more hybrid demos (~4 s); test_same_arguments_give_identical_files runs by default
def test_hybrid_same_arguments_give_identical_files(
    tmp_path: Path, hybrid: dict[DemoArch, Path], env: dict[str, str]
) -> None:
    for arch, path in hybrid.items():
        assert _digests(create_demo(tmp_path / arch.value, arch, env=env)) == _digests(path)
    other = create_demo(tmp_path / "seed1", DemoArch.QWEN3_5_MOE, seed=1, env=env)
    name = "model.language_model.layers.0.linear_attn.in_proj_qkv.weight"
    assert not np.array_equal(_tensors(other)[name], _tensors(hybrid[DemoArch.QWEN3_5_MOE])[name])


# Fields real Qwen3.5 config.json files carry that transformers' Qwen3_5(Moe)*Config does not declare.
HYBRID_HUB_ONLY = {
    "text_config": {"attn_output_gate", "full_attention_interval", "mamba_ssm_dtype", "mlp_only_layers",
                    "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "partial_rotary_factor"},
    "vision_config": {"deepstack_visual_indexes"},
}  # fmt: skip


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_hybrid_config_fields_are_transformers_or_hub_fields(arch: DemoArch) -> None:
    from transformers import AutoConfig

    config = demo.demo_config(arch, DemoSize.TINY)
    hf = AutoConfig.for_model(**{k: v for k, v in config.items() if k != demo.DEMO_MARKER})
    assert {k for k in config if k not in type(hf).__dataclass_fields__} == {demo.DEMO_MARKER}
    for section in ("text_config", "vision_config"):
        sub = getattr(hf, section)
        unknown = {k for k in config[section] if k not in type(sub).__dataclass_fields__}
        assert unknown <= HYBRID_HUB_ONLY[section], unknown
        for key in config[section].keys() - unknown - {"dtype", "model_type"}:
            assert getattr(sub, key) == config[section][key], key
    assert hf.text_config.rope_parameters["partial_rotary_factor"] == 0.25


def test_hybrid_mtp_layer_is_laid_out_like_the_hub() -> None:
    dense = demo.demo_tensor_shapes(demo.demo_config(DemoArch.QWEN3_5, DemoSize.TINY))
    full = "model.language_model.layers.3."  # the first full-attention layer
    mtp = {k.removeprefix("mtp.layers.0."): v for k, v in dense.items() if k.startswith("mtp.layers.0.")}
    assert mtp == {k.removeprefix(full): v for k, v in dense.items() if k.startswith(full)}
    assert dense["mtp.fc.weight"] == (64, 128) and "mtp.norm.weight" in dense
    moe = demo.demo_tensor_shapes(demo.demo_config(DemoArch.QWEN3_5_MOE, DemoSize.TINY))
    # Trunk experts fused, MTP experts one by one (Qwen3.5-35B-A3B's safetensors).
    assert moe["model.language_model.layers.3.mlp.experts.gate_up_proj"] == (4, 64, 64)
    assert moe["mtp.layers.0.mlp.experts.3.down_proj.weight"] == (64, 32)
    assert "mtp.layers.0.mlp.experts.gate_up_proj" not in moe


# --- Qwen3-Next (hybrid Gated DeltaNet, text-only, fused DeltaNet projections, MoE + gated shared expert) ---

# Fields Qwen3-Next-80B-A3B's config.json carries that Qwen3NextConfig does not declare (transformers 5 folds
# rope_theta / partial_rotary_factor into rope_parameters and reads full_attention_interval as layer_types).
NEXT_HUB_ONLY = {
    "full_attention_interval", "mtp_num_hidden_layers", "partial_rotary_factor", "rope_scaling", "rope_theta",
    "torch_dtype", "use_sliding_window",
}  # fmt: skip


@pytest.fixture(scope="module")
def next_demo(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    return create_demo(tmp_path_factory.mktemp("next") / "qwen3_next", DemoArch.QWEN3_NEXT, env=env)


def test_qwen3_next_config_is_the_hub_layout(next_demo: Path) -> None:
    from transformers import AutoConfig

    assert {p.name for p in next_demo.iterdir()} == HUB_FILES and is_demo_checkpoint(next_demo)
    config = _config(next_demo)
    hf = AutoConfig.from_pretrained(next_demo)
    assert type(hf).__name__ == "Qwen3NextConfig" and config["architectures"] == ["Qwen3NextForCausalLM"]
    assert {k for k in config if k not in type(hf).__dataclass_fields__} == NEXT_HUB_ONLY | {demo.DEMO_MARKER}
    for key in config.keys() - NEXT_HUB_ONLY - {demo.DEMO_MARKER}:
        assert getattr(hf, key) == config[key], key
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25 and hf.rope_parameters["rope_theta"] == 1e7
    assert hf.layer_types == demo.layer_types(config["num_hidden_layers"])
    # Real proportions: two value heads per key head, every layer MoE with a shared expert, untied head.
    assert config["linear_num_value_heads"] == 2 * config["linear_num_key_heads"]
    assert config["norm_topk_prob"] is True and config["tie_word_embeddings"] is False
    assert (config["vocab_size"], config["eos_token_id"]) == (151936, 151645)
    gen = json.loads((next_demo / "generation_config.json").read_text("utf-8"))
    assert gen["eos_token_id"] == [151645, 151643] and gen["top_p"] == 0.8
    tok_config = json.loads((next_demo / "tokenizer_config.json").read_text("utf-8"))
    assert tok_config["chat_template"] == chat_template("qwen3")
    assert "Qwen3-Next-80B-A3B" in (next_demo / "README.md").read_text("utf-8")


@pytest.mark.parametrize("size", demo.NEXT_SIZES)
def test_qwen3_next_tensor_names_and_shapes_match_transformers(size: DemoSize) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = demo.demo_config(DemoArch.QWEN3_NEXT, size)
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != demo.DEMO_MARKER})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shapes = demo.demo_tensor_shapes(config)
    # transformers fuses the hub's per-expert tensors on load: expand its fused ones back, expert by expert.
    want: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".experts.")
        if leaf == "gate_up_proj":
            experts, rows, hidden = tensor.shape
            for e in range(experts):
                want[f"{prefix}.experts.{e}.gate_proj.weight"] = (rows // 2, hidden)
                want[f"{prefix}.experts.{e}.up_proj.weight"] = (rows // 2, hidden)
        elif leaf == "down_proj":
            for e in range(tensor.shape[0]):
                want[f"{prefix}.experts.{e}.down_proj.weight"] = tuple(tensor.shape[1:])
        else:
            want[name] = tuple(tensor.shape)
    assert {k: v for k, v in shapes.items() if not k.startswith("mtp.")} == want
    assert any(k.startswith("mtp.layers.0.") for k in shapes)


def test_qwen3_next_loads_in_transformers_and_runs_forward(next_demo: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenkit.tokenizer.tokenizer import QwenTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(
        next_demo, dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == "Qwen3NextForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    file = _tensors(next_demo)
    for name in ("model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.0.linear_attn.A_log"):
        assert np.array_equal(state[name].numpy(), file[name].astype(np.float32)), name  # not re-initialised
    hf_tok = AutoTokenizer.from_pretrained(next_demo)
    prompt = "<|im_start|>user\nGated DeltaNet? 你好<|im_end|>\n<|im_start|>assistant\n"
    ids = hf_tok.encode(prompt, add_special_tokens=False)
    assert QwenTokenizer.from_dir(next_demo).encode(prompt) == ids and ids[0] == 151644
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 151936) and bool(torch.isfinite(logits).all())


def test_qwen3_next_same_arguments_give_identical_files(
    tmp_path: Path, next_demo: Path, env: dict[str, str]
) -> None:
    assert _digests(create_demo(tmp_path / "again", DemoArch.QWEN3_NEXT, env=env)) == _digests(next_demo)
    with pytest.raises(DemoError, match=r"not made for qwen3_next: use one of tiny, small"):
        demo.demo_config(DemoArch.QWEN3_NEXT, DemoSize.B0_8)
