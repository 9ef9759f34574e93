"""Turn a model reference (local dir, .gguf file, `org/name`, `modelscope:org/name`) into a local checkpoint.

Contract: resolve_model() returns a ResolvedModel for a Qwen checkpoint on local disk, downloading from the
Hugging Face Hub (honouring HF_HUB_OFFLINE and the HF cache variables of `env`) or ModelScope when needed.
Only safetensors weights are accepted unless allow_pickle=True; config.json "auto_map" is reported, never
imported. An existing local path always wins over a hub id; `hf:org/name` forces the Hugging Face Hub.
Every failure is a ModelRefError whose message is one line naming the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qwenkit.gguf.reader import GGUFReadError, check_gguf_magic

TEXT_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next")
VISION_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SUPPORTED_MODEL_TYPES = TEXT_MODEL_TYPES + VISION_MODEL_TYPES
MODELSCOPE_PREFIX = "modelscope:"
HF_PREFIX = "hf:"

# What a checkpoint needs besides pickle weights; pickle files are fetched only on a second, opt-in pass.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.tiktoken", "*.model", "README.md"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}


class ModelRefError(ValueError):
    """A model reference that cannot be used; the message is one line naming the fix."""


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint on local disk: an HF-layout directory or a single .gguf file."""

    path: Path
    kind: Literal["hf", "gguf"]
    source: Literal["local", "hf", "modelscope"]
    model_type: str | None
    config: dict[str, Any] | None
    has_remote_code: bool = False
    weight_files: tuple[Path, ...] = ()
    name: str = ""  # for display: the hub id, else the directory or file name (a hub snapshot dir is a hash)

    @property
    def uses_pickle(self) -> bool:
        """True when the weights are pickle files (only possible with allow_pickle=True)."""
        return any(p.suffix in _PICKLE_SUFFIXES for p in self.weight_files)


def resolve_model(
    ref: str, *, allow_pickle: bool = False, env: Mapping[str, str] | None = None
) -> ResolvedModel:
    """Resolve `ref` to a local, checked Qwen checkpoint (see the module docstring for accepted forms)."""
    env = os.environ if env is None else env
    ref = ref.strip()
    if not ref:
        raise ModelRefError(
            "empty model reference: pass a local directory, a .gguf file, org/name or modelscope:org/name"
        )
    if ref.startswith(MODELSCOPE_PREFIX):
        repo_id = _check_repo_id(ref[len(MODELSCOPE_PREFIX) :], ref)
        return _check_dir(_modelscope_dir(repo_id, allow_pickle, env), "modelscope", allow_pickle, repo_id)
    path = Path(ref).expanduser()
    if path.exists():
        return _resolve_local(path, allow_pickle)
    if ref.startswith(HF_PREFIX):
        repo_id = _check_repo_id(ref[len(HF_PREFIX) :], ref)
        return _check_dir(_hf_dir(repo_id, allow_pickle, env), "hf", allow_pickle, repo_id)
    if ref.lower().endswith(".gguf") or ref.startswith((".", "/", "~")) or not _REPO_ID.match(ref):
        raise ModelRefError(
            f"no such file or directory: {ref}: pass an existing local directory or .gguf file, "
            "or a hub id like Qwen/Qwen3-0.6B"
        )
    return _check_dir(_hf_dir(ref, allow_pickle, env), "hf", allow_pickle, ref)


def _check_repo_id(repo_id: str, ref: str) -> str:
    if not _REPO_ID.match(repo_id):
        raise ModelRefError(f"bad model id {ref!r}: write it as org/name, e.g. Qwen/Qwen3-0.6B")
    return repo_id


def _resolve_local(path: Path, allow_pickle: bool) -> ResolvedModel:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelRefError(
                f"{path} is a file but not a .gguf: pass a .gguf file or the checkpoint's directory"
            )
        return _check_gguf(path)
    return _check_dir(path, "local", allow_pickle)


def _check_gguf(path: Path) -> ResolvedModel:
    try:
        check_gguf_magic(path)
    except GGUFReadError as exc:
        raise ModelRefError(str(exc)) from None
    path = path.absolute()  # not resolve(): a hub cache's symlink names the blob, not the model
    return ResolvedModel(
        path=path,
        kind="gguf",
        source="local",
        model_type=None,
        config=None,
        weight_files=(path,),
        name=path.stem,
    )


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        if ggufs:
            raise ModelRefError(
                f"{directory} holds .gguf files but no config.json: pass the file, e.g. {ggufs[0]}"
            )
        raise ModelRefError(
            f"no config.json in {directory}: pass a Hugging Face-layout checkpoint directory or a .gguf file"
        )
    try:
        config = json.loads(config_path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelRefError(
            f"{config_path} is not valid JSON ({error}): re-download the checkpoint"
        ) from None
    if not isinstance(config, dict):
        raise ModelRefError(f"{config_path} is not a JSON object: re-download the checkpoint")
    return config


def _model_type(config: Mapping[str, Any], directory: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelRefError(
            f"{directory} is model_type {model_type!r}, not a Qwen model: qwenkit supports "
            f"{', '.join(TEXT_MODEL_TYPES)} (text) and {', '.join(VISION_MODEL_TYPES)} (vision)"
        )
    return str(model_type)


def _safetensors_files(directory: Path) -> tuple[Path, ...]:
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text("utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise ModelRefError(
                f"{index_path} is not a valid shard index: re-download the checkpoint"
            ) from None
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ModelRefError(
                f"{directory} lacks {len(missing)} shard(s) named in its index, e.g. {missing[0]}: "
                "finish or repeat the download"
            )
        return tuple(shards)
    return tuple(sorted(directory.glob("*.safetensors")))


def _check_dir(
    directory: Path, source: Literal["local", "hf", "modelscope"], allow_pickle: bool, name: str = ""
) -> ResolvedModel:
    config = _read_config(directory)
    model_type = _model_type(config, directory)
    weights = _safetensors_files(directory)
    if not weights:
        pickles = tuple(
            sorted(p for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
        )
        if pickles and not allow_pickle:
            raise ModelRefError(
                f"{directory} has only pickle weights ({pickles[0].name}), which can run code when loaded: "
                "convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        if not pickles:
            raise ModelRefError(
                f"no weights (*.safetensors) in {directory}: finish the download or pass another model"
            )
        weights = pickles
    directory = directory.resolve()
    return ResolvedModel(
        path=directory,
        kind="hf",
        source=source,
        model_type=model_type,
        config=config,
        has_remote_code="auto_map" in config,
        weight_files=tuple(directory / p.name for p in weights),
        name=name or directory.name,
    )


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in _TRUE


def hf_offline(env: Mapping[str, str]) -> bool:
    """Whether `env` asks for Hugging Face offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return _is_true(env.get("HF_HUB_OFFLINE")) or _is_true(env.get("TRANSFORMERS_OFFLINE"))


def hf_cache_dir(env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache `env` selects, in huggingface_hub's order of precedence."""
    # huggingface_hub reads these once at import; reading them here honours an explicit `env`.
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _hf_dir(repo_id: str, allow_pickle: bool, env: Mapping[str, str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hf_offline(env)
    cache_dir = hf_cache_dir(env)
    options = {
        "cache_dir": cache_dir,
        "local_files_only": offline,
        "endpoint": env.get("HF_ENDPOINT") or None,
    }
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, **options))
        if allow_pickle and not _safetensors_files(path):
            path = Path(
                snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS + PICKLE_PATTERNS, **options)
            )
    except GatedRepoError:
        raise ModelRefError(
            f"{repo_id} is gated on the Hugging Face Hub: accept its licence, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelRefError(
            f"no model {repo_id} on the Hugging Face Hub (or it is private): check the id, or `hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise ModelRefError(f"{repo_id} has no main revision on the Hugging Face Hub: check the id") from None
    except HFValidationError:
        raise ModelRefError(f"bad model id {repo_id!r}: write it as org/name, e.g. Qwen/Qwen3-0.6B") from None
    except IncompleteSnapshotError:
        raise ModelRefError(
            f"the cached copy of {repo_id} in {cache_dir} is incomplete and the Hub cannot be reached: "
            "set HF_HUB_OFFLINE=0 with internet access to finish the download, or pass a local directory"
        ) from None
    except (LocalEntryNotFoundError, OSError) as error:
        why = (
            "HF_HUB_OFFLINE is set"
            if offline
            else f"the Hugging Face Hub is unreachable ({type(error).__name__})"
        )
        raise ModelRefError(
            f"{repo_id} is not in the Hugging Face cache ({cache_dir}) and {why}: set HF_HUB_OFFLINE=0 with "
            "internet access, download it on a machine with internet and copy the cache, "
            "or pass a local directory"
        ) from None
    return path


def modelscope_cache_root(env: Mapping[str, str]) -> Path:
    """ModelScope's hub cache: MODELSCOPE_CACHE, else ~/.cache/modelscope/hub."""
    return Path(env.get("MODELSCOPE_CACHE") or "~/.cache/modelscope/hub").expanduser()


def modelscope_cache_candidates(repo_id: str, env: Mapping[str, str]) -> list[Path]:
    """Where ModelScope may cache `repo_id`: `<cache>/models/org/name` (newer) or `<cache>/org/name`."""
    root = modelscope_cache_root(env)
    org, name = repo_id.split("/", 1)
    # ModelScope stores dots in names as "___" (Qwen2.5 → Qwen2___5); older versions kept them.
    names = list(dict.fromkeys([name.replace(".", "___"), name]))
    return [parent / org / n for parent in (root / "models", root) for n in names]


def _modelscope_dir(repo_id: str, allow_pickle: bool, env: Mapping[str, str]) -> Path:
    for candidate in modelscope_cache_candidates(repo_id, env):
        if (candidate / "config.json").is_file():
            return candidate
    if importlib.util.find_spec("modelscope") is None:
        raise ModelRefError(
            f"{repo_id} is not in the ModelScope cache ({modelscope_cache_root(env)}) "
            "and the modelscope package is missing: `pip install modelscope`, or pass a local directory"
        )
    modelscope = importlib.import_module("modelscope")
    patterns = DOWNLOAD_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        return Path(modelscope.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # modelscope raises many unrelated types for network/auth failures
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise ModelRefError(
            f"could not download {repo_id} from ModelScope ({type(error).__name__}: {first_line}): "
            "check the id and your connection, or pass a local directory"
        ) from None
