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
    return {arch: create_demo(root / arch.value, arch, env=env) for arch in DemoArch}


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


@pytest.mark.parametrize("arch", list(DemoArch))
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


@pytest.mark.parametrize("arch", list(DemoArch))
def test_transformers_loads_every_tensor_and_gives_finite_logits(
    demos: dict[DemoArch, Path], arch: DemoArch
) -> None:
    torch = pytest.importorskip("torch")
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
