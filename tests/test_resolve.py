"""resolve_model on local dirs laid out like the Hugging Face and ModelScope caches (never online)."""

from __future__ import annotations

import json
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qwenkit.checkpoints.resolve import ModelRefError, ResolvedModel, resolve_model

REV = "0123456789abcdef0123456789abcdef01234567"


def _config(model_type: str = "qwen3", **extra: object) -> dict[str, object]:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": model_type, "hidden_size": 8, **extra}


def make_checkpoint(
    directory: Path, model_type: str = "qwen3", weights: str = "safetensors", **extra: object
) -> Path:
    """A minimal HF-layout checkpoint: config.json plus weights in the requested format."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_config(model_type, **extra)))
    (directory / "tokenizer_config.json").write_text("{}")
    if weights == "safetensors":
        save_file({"model.norm.weight": np.ones(8, np.float32)}, str(directory / "model.safetensors"))
    elif weights == "pickle":
        (directory / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    return directory


def make_hf_cache(cache: Path, repo_id: str) -> Path:
    """Lay out `repo_id` like huggingface_hub's cache: blobs, refs/main and a snapshot of symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    staging = make_checkpoint(cache / "staging" / repo_id)
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted(staging.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snapshot


@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "MODELSCOPE_CACHE": str(tmp_path / "ms"),
    }


def test_local_directory(tmp_path: Path, offline_env: dict[str, str]) -> None:
    directory = make_checkpoint(tmp_path / "m")
    resolved = resolve_model(str(directory), env=offline_env)
    assert resolved == ResolvedModel(
        path=directory.resolve(),
        kind="hf",
        source="local",
        model_type="qwen3",
        config=_config(),
        has_remote_code=False,
        weight_files=(directory / "model.safetensors",),
        name="m",
    )
    assert not resolved.uses_pickle


@pytest.mark.parametrize("model_type", ["qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen2_vl", "qwen2_5_vl"])
def test_every_supported_model_type(tmp_path: Path, offline_env: dict[str, str], model_type: str) -> None:
    assert resolve_model(str(make_checkpoint(tmp_path, model_type)), env=offline_env).model_type == model_type


def test_hf_cache_layout_offline(tmp_path: Path, offline_env: dict[str, str]) -> None:
    snapshot = make_hf_cache(Path(offline_env["HF_HUB_CACHE"]), "Qwen/Qwen3-0.6B")
    resolved = resolve_model("Qwen/Qwen3-0.6B", env=offline_env)
    assert resolved.source == "hf"
    assert resolved.path == snapshot.resolve()
    assert resolved.model_type == "qwen3"
    assert [p.name for p in resolved.weight_files] == ["model.safetensors"]
    assert resolved.name == "Qwen/Qwen3-0.6B"
    assert resolve_model("hf:Qwen/Qwen3-0.6B", env=offline_env).path == snapshot.resolve()


def test_hf_cache_from_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = make_hf_cache(tmp_path / "home" / "hub", "Qwen/Qwen2.5-0.5B-Instruct")
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct").path == snapshot.resolve()


def test_not_cached_offline_is_a_one_line_error_naming_the_fix(offline_env: dict[str, str]) -> None:
    with pytest.raises(ModelRefError) as info:
        resolve_model("Qwen/Qwen3-8B", env=offline_env)
    message = str(info.value)
    assert "\n" not in message
    assert "Qwen/Qwen3-8B" in message
    assert "HF_HUB_OFFLINE=0" in message
    assert "local directory" in message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_and_not_cached_is_a_one_line_error(offline_env: dict[str, str]) -> None:
    # A loopback port nobody listens on: a real connection failure without leaving the machine.
    env = {**offline_env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    with pytest.raises(ModelRefError) as info:
        resolve_model("Qwen/Qwen3-8B", env=env)
    assert "\n" not in str(info.value)
    assert "local directory" in str(info.value)


def test_unreachable_hub_falls_back_to_the_cache(offline_env: dict[str, str]) -> None:
    snapshot = make_hf_cache(Path(offline_env["HF_HUB_CACHE"]), "Qwen/Qwen3-0.6B")
    env = {**offline_env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    assert resolve_model("Qwen/Qwen3-0.6B", env=env).path == snapshot.resolve()


@pytest.mark.parametrize("layout", ["models/Qwen/Qwen2___5-0___5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"])
def test_modelscope_cache_layouts(tmp_path: Path, offline_env: dict[str, str], layout: str) -> None:
    directory = make_checkpoint(Path(offline_env["MODELSCOPE_CACHE"]) / layout, "qwen2")
    resolved = resolve_model("modelscope:Qwen/Qwen2.5-0.5B-Instruct", env=offline_env)
    assert resolved.source == "modelscope"
    assert resolved.path == directory.resolve()
    assert resolved.model_type == "qwen2"
    assert resolved.name == "Qwen/Qwen2.5-0.5B-Instruct"


def test_modelscope_not_cached_without_package_names_pip_install(
    offline_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes find_spec/import report it missing
    with pytest.raises(ModelRefError) as info:
        resolve_model("modelscope:Qwen/Qwen3-0.6B", env=offline_env)
    assert "pip install modelscope" in str(info.value)
    assert "\n" not in str(info.value)


def test_modelscope_package_downloads_when_not_cached(
    tmp_path: Path, offline_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    downloaded = make_checkpoint(tmp_path / "downloaded")
    calls: list[tuple[str, list[str]]] = []

    def snapshot_download(model_id: str, allow_patterns: list[str]) -> str:
        calls.append((model_id, allow_patterns))
        return str(downloaded)

    fake = types.ModuleType("modelscope")
    fake.__spec__ = types.SimpleNamespace(name="modelscope")  # type: ignore[assignment]
    fake.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    resolved = resolve_model("modelscope:Qwen/Qwen3-0.6B", env=offline_env)
    assert resolved.path == downloaded.resolve()
    assert calls[0][0] == "Qwen/Qwen3-0.6B"
    assert "*.safetensors" in calls[0][1]
    assert "*.bin" not in calls[0][1]


def test_gguf_file(tmp_path: Path, offline_env: dict[str, str]) -> None:
    gguf = tmp_path / "qwen3-0.6b-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    resolved = resolve_model(str(gguf), env=offline_env)
    assert (resolved.kind, resolved.source, resolved.model_type, resolved.config) == (
        "gguf",
        "local",
        None,
        None,
    )
    assert resolved.path == gguf.absolute()
    assert resolved.weight_files == (gguf.absolute(),)
    assert resolved.name == "qwen3-0.6b-q4_k_m"


def test_gguf_with_bad_magic(tmp_path: Path, offline_env: dict[str, str]) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelRefError, match="not a GGUF file"):
        resolve_model(str(bad), env=offline_env)


def test_directory_with_only_gguf_points_at_the_file(tmp_path: Path, offline_env: dict[str, str]) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(8))
    with pytest.raises(ModelRefError, match=r"pass the file.*m\.gguf"):
        resolve_model(str(tmp_path), env=offline_env)


def test_pickle_only_is_refused_unless_allowed(tmp_path: Path, offline_env: dict[str, str]) -> None:
    directory = make_checkpoint(tmp_path / "old", weights="pickle")
    with pytest.raises(ModelRefError, match="--allow-pickle") as info:
        resolve_model(str(directory), env=offline_env)
    assert "\n" not in str(info.value)
    resolved = resolve_model(str(directory), allow_pickle=True, env=offline_env)
    assert resolved.uses_pickle
    assert [p.name for p in resolved.weight_files] == ["pytorch_model.bin"]


def test_safetensors_are_preferred_over_pickle(tmp_path: Path, offline_env: dict[str, str]) -> None:
    directory = make_checkpoint(tmp_path / "both")
    (directory / "pytorch_model.bin").write_bytes(b"x")
    resolved = resolve_model(str(directory), allow_pickle=True, env=offline_env)
    assert not resolved.uses_pickle


def test_no_weights_at_all(tmp_path: Path, offline_env: dict[str, str]) -> None:
    with pytest.raises(ModelRefError, match="no weights"):
        resolve_model(str(make_checkpoint(tmp_path / "empty", weights="none")), env=offline_env)


def test_sharded_checkpoint_and_missing_shard(tmp_path: Path, offline_env: dict[str, str]) -> None:
    directory = make_checkpoint(tmp_path / "sharded", weights="none")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1], "c": shards[1]}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"a": np.zeros(2, np.float32)}, str(directory / shards[0]))
    with pytest.raises(ModelRefError, match="00002-of-00002"):
        resolve_model(str(directory), env=offline_env)
    save_file({"b": np.zeros(2, np.float32), "c": np.zeros(2, np.float32)}, str(directory / shards[1]))
    resolved = resolve_model(str(directory), env=offline_env)
    assert [p.name for p in resolved.weight_files] == shards


def test_remote_code_is_reported_not_run(tmp_path: Path, offline_env: dict[str, str]) -> None:
    directory = make_checkpoint(tmp_path / "rc", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (directory / "configuration_evil.py").write_text("raise SystemExit('remote code was imported')\n")
    resolved = resolve_model(str(directory), env=offline_env)
    assert resolved.has_remote_code
    assert "configuration_evil" not in sys.modules


def test_non_qwen_model_type_lists_supported(tmp_path: Path, offline_env: dict[str, str]) -> None:
    directory = make_checkpoint(tmp_path / "llama", "llama")
    with pytest.raises(ModelRefError) as info:
        resolve_model(str(directory), env=offline_env)
    message = str(info.value)
    assert "'llama'" in message
    for supported in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen2_5_vl"):
        assert supported in message


def test_missing_config(tmp_path: Path, offline_env: dict[str, str]) -> None:
    with pytest.raises(ModelRefError, match=r"no config\.json"):
        resolve_model(str(tmp_path), env=offline_env)


def test_bad_config_json(tmp_path: Path, offline_env: dict[str, str]) -> None:
    directory = make_checkpoint(tmp_path / "bad")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ModelRefError, match="not valid JSON"):
        resolve_model(str(directory), env=offline_env)


@pytest.mark.parametrize("ref", ["./no/such/dir", "/definitely/missing", "missing.gguf", "a/b/c", "  "])
def test_missing_path_or_bad_reference(ref: str, offline_env: dict[str, str]) -> None:
    with pytest.raises(ModelRefError) as info:
        resolve_model(ref, env=offline_env)
    assert "\n" not in str(info.value)


def test_non_gguf_file_is_refused(tmp_path: Path, offline_env: dict[str, str]) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelRefError, match=r"not a \.gguf"):
        resolve_model(str(weights), env=offline_env)


@pytest.mark.parametrize("ref", ["modelscope:not-an-id", "hf:", "modelscope:a/b/c"])
def test_bad_prefixed_ids(ref: str, offline_env: dict[str, str]) -> None:
    with pytest.raises(ModelRefError, match="org/name"):
        resolve_model(ref, env=offline_env)
