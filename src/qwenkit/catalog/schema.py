"""Types of the Qwen catalog and the loader that validates models.yaml against them.

Contract: load_catalog() reads the reviewed data file (or another path) and returns a Catalog whose every
model has a known family, at least one https source, consistent numbers (KV heads divide heads, active
≤ total parameters, extended ≥ native context) and hub ids of the form org/name; anything else raises
CatalogError naming the entry. Catalog.find() accepts a catalog name, a Hugging Face or ModelScope id
(the model's, its base's or an official quantized repo's), case-insensitively. `None` in the data means
"not confirmed"; Entry merges a model with its family's defaults. Hybrid (Gated DeltaNet) models record
which layers carry KV (full_attention_interval) and their linear-attention heads, head dims and conv
kernel; a model may list `unverified` fields: numbers recorded from a secondary source (not the model's
own config.json or card), which `qwenkit models` shows as such. A VL model may record its vision tower
(`vision`, the config.json's vision_config): its parameter count is then the shape's encoder_params (the
projector the planner counts); without it, a published total less the text tower stands in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qwenkit.catalog.formats import WeightFormat
from qwenkit.catalog.shape import HYBRID_TYPES, VISION_LAYOUTS, ModelShape, ShapeError, VisionTower

__all__ = [
    "TASKS",
    "Catalog",
    "CatalogError",
    "Entry",
    "Task",
    "load_catalog",
]

Task = Literal[
    "chat", "code", "math", "reasoning", "vision", "audio", "multilingual", "tools", "long-context"
]
TASKS: tuple[str, ...] = Task.__args__  # type: ignore[attr-defined]
Modality = Literal["text", "image", "video", "audio"]
QuantKey = Literal["gguf", "awq", "gptq-int4", "gptq-int8", "fp8"]
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CatalogError(ValueError):
    """The catalog data is inconsistent; the message names the entry and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arch(_Strict):
    type: str
    layers: int | None = Field(default=None, ge=1)
    hidden: int | None = Field(default=None, ge=1)
    ffn: int | None = Field(default=None, ge=1)
    heads: int | None = Field(default=None, ge=1)
    kv_heads: int | None = Field(default=None, ge=1)
    head_dim: int | None = Field(default=None, ge=1)
    vocab: int | None = Field(default=None, ge=1)
    tied: bool | None = None
    experts: int | None = Field(default=None, ge=1)
    experts_used: int | None = Field(default=None, ge=1)
    moe_ffn: int | None = Field(default=None, ge=1)
    shared_ffn: int | None = Field(default=None, ge=1)
    # Gated DeltaNet hybrids: every interval-th layer is gated full attention (with a KV cache), the
    # others linear attention with a per-sequence state (conv kernel, key/value heads and head dims).
    full_attention_interval: int | None = Field(default=None, ge=1)
    linear_k_heads: int | None = Field(default=None, ge=1)
    linear_v_heads: int | None = Field(default=None, ge=1)
    linear_k_dim: int | None = Field(default=None, ge=1)
    linear_v_dim: int | None = Field(default=None, ge=1)
    conv_kernel: int | None = Field(default=None, ge=2)

    @property
    def hybrid(self) -> bool:
        return self.type in HYBRID_TYPES

    @model_validator(mode="after")
    def _consistent(self) -> Arch:
        if self.heads and self.kv_heads and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads {self.kv_heads} does not divide heads {self.heads}")
        if self.experts and not self.experts_used:
            raise ValueError("an MoE arch needs experts_used")
        linear = [self.linear_k_heads, self.linear_v_heads, self.linear_k_dim, self.linear_v_dim]
        if not self.hybrid and (self.full_attention_interval or any(linear)):
            raise ValueError(f"{self.type} is not a hybrid architecture: drop the linear-attention fields")
        if self.linear_v_heads and self.linear_k_heads and self.linear_v_heads % self.linear_k_heads:
            raise ValueError("linear_k_heads does not divide linear_v_heads")
        if self.experts and self.experts_used and self.experts_used > self.experts:
            raise ValueError("experts_used exceeds experts")
        return self


class Vision(_Strict):
    """A vision tower's sizes as its config.json's vision_config states them (depth, hidden_size,
    intermediate_size, num_heads, out_hidden_size, patch_size, spatial_merge_size, temporal_patch_size,
    num_position_embeddings, len(deepstack_visual_indexes))."""

    depth: int = Field(ge=1)
    hidden: int = Field(ge=1)
    ffn: int = Field(ge=1)
    heads: int = Field(ge=1)
    out_hidden: int = Field(ge=1)
    patch: int = Field(ge=1)
    merge: int = Field(default=2, ge=1)
    temporal_patch: int = Field(default=2, ge=1)
    positions: int = Field(default=0, ge=0)
    deepstack: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _heads(self) -> Vision:
        if self.hidden % self.heads:
            raise ValueError(f"vision heads {self.heads} do not divide its width {self.hidden}")
        return self


class Params(_Strict):
    total: float | None = Field(default=None, gt=0, description="billions")
    active: float | None = Field(default=None, gt=0)
    non_embedding: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.total and self.active and self.active > self.total * 1.0001:
            raise ValueError("active parameters exceed total")
        if self.total and self.non_embedding and self.non_embedding > self.total:
            raise ValueError("non-embedding parameters exceed total")
        return self


class Context(_Strict):
    native: int | None = Field(default=None, ge=512)
    extended: int | None = Field(default=None, ge=512)

    @model_validator(mode="after")
    def _consistent(self) -> Context:
        if self.native and self.extended and self.extended < self.native:
            raise ValueError("extended context is shorter than native")
        return self


ThinkingStyle = Literal["none", "switch", "opened-by-template", "always"]
ToolFormat = Literal["hermes-json", "qwen3-coder-xml"]


class Capabilities(_Strict):
    """`thinking_style`: none; switch (enable_thinking, the model writes <think>); opened-by-template (the
    prompt ends in <think>, so output holds only </think>); always (thinking-only, template opens it).
    `tool_format`: hermes-json (<tool_call>{json}</tool_call>) or qwen3-coder-xml (<function=...>)."""

    thinking: bool | None = None
    thinking_style: ThinkingStyle | None = None
    tool_format: ToolFormat | None = None
    tools: bool | None = None
    languages: int | None = Field(default=None, ge=1)
    programming_languages: int | None = Field(default=None, ge=1)


class Policy(_Strict):
    quality_scale: float = Field(gt=0)
    fit: dict[Task, float]
    why: str = Field(min_length=10)
    gives_up: str = Field(min_length=10)

    @field_validator("fit")
    @classmethod
    def _fit_range(cls, fit: dict[str, float]) -> dict[str, float]:
        for task, value in fit.items():
            if not 0 <= value <= 1:
                raise ValueError(f"fit for {task} must be between 0 and 1")
        return fit


class Family(_Strict):
    title: str
    released: date
    release_notes: str
    specialty: Literal["general", "code", "math", "vision", "audio", "long-context", "omni", "embedding"]
    modalities: list[Modality]
    capabilities: Capabilities
    context_extension: str | None
    license: str | None = None
    supported_by_qwenkit: bool
    policy: Policy


class Model(_Strict):
    name: str
    family: str
    size: str
    open_weights: bool = True
    hf: str | None = None
    hf_base: str | None = None
    modelscope: str | None = None
    arch: Arch | None = None
    params: Params
    context: Context
    license: str | None = None
    modalities: list[Modality] | None = None
    capabilities: Capabilities | None = None
    vision: Vision | None = None
    quantized: dict[QuantKey, str] = Field(default_factory=dict)
    notes: str | None = None
    unverified: list[str] = Field(default_factory=list)  # fields taken from a secondary source
    sources: list[str] = Field(min_length=1)

    @field_validator("hf", "hf_base", "modelscope")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        if value is not None and not _REPO.match(value):
            raise ValueError(f"{value!r} is not a hub id of the form org/name")
        return value

    @field_validator("quantized")
    @classmethod
    def _quant_repos(cls, value: dict[str, str]) -> dict[str, str]:
        for repo in value.values():
            if not _REPO.match(repo):
                raise ValueError(f"{repo!r} is not a hub id of the form org/name")
        return value

    @field_validator("sources")
    @classmethod
    def _https(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith("https://"):
                raise ValueError(f"source {url!r} is not an https URL")
        return value

    @field_validator("unverified")
    @classmethod
    def _unverified(cls, value: list[str]) -> list[str]:
        for key in value:
            section, _, name = key.partition(".")
            fields = {
                "arch": Arch,
                "params": Params,
                "context": Context,
                "capabilities": Capabilities,
                "vision": Vision,
            }
            if section not in fields or name not in fields[section].model_fields:
                raise ValueError(f"unverified entry {key!r} is not a field such as arch.layers")
        return value

    @model_validator(mode="after")
    def _weights(self) -> Model:
        if self.open_weights and not self.hf:
            raise ValueError("an open-weights model needs its Hugging Face id")
        if not self.open_weights and (self.hf or self.quantized):
            raise ValueError("a model without open weights has no hub repos")
        if self.vision and (self.arch is None or self.arch.type not in VISION_LAYOUTS):
            raise ValueError("vision: only Qwen2.5-VL, Qwen3-VL and Qwen3.5 vision towers are described")
        if self.vision and self.arch and self.arch.hidden and self.vision.out_hidden != self.arch.hidden:
            raise ValueError("vision.out_hidden must be the text model's width (arch.hidden)")
        return self


class FormatPolicy(_Strict):
    fidelity: dict[WeightFormat, float]


class _File(_Strict):
    version: int
    formats: FormatPolicy
    families: dict[str, Family]
    models: list[Model]


@dataclass(frozen=True)
class Entry:
    """A model merged with its family's defaults: what the planner and `select` read."""

    model: Model
    family_key: str
    family: Family

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def modalities(self) -> list[str]:
        return list(self.model.modalities or self.family.modalities)

    @property
    def capabilities(self) -> Capabilities:
        own = self.model.capabilities
        if own is None:
            return self.family.capabilities
        merged = self.family.capabilities.model_dump() | {
            k: v for k, v in own.model_dump().items() if v is not None
        }
        return Capabilities(**merged)

    @property
    def license(self) -> str | None:
        return self.model.license or self.family.license

    @property
    def sources(self) -> list[str]:
        notes = self.family.release_notes
        return self.model.sources + ([notes] if notes not in self.model.sources else [])

    @property
    def is_moe(self) -> bool:
        return bool(self.model.arch and self.model.arch.experts)

    def shape(self) -> ModelShape:
        """The planner's shape; ShapeError when the entry lacks a dimension (or has no open weights)."""
        a = self.model.arch
        if a is None:
            raise ShapeError(
                f"{self.name} has no published architecture (no open weights): it cannot be planned"
            )
        missing = [
            k for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab") if getattr(a, k) is None
        ]
        if missing:
            raise ShapeError(f"{self.name}: the catalog does not confirm {', '.join(missing)}")
        hybrid: dict[str, int] = {}
        if a.hybrid:
            linear = ("full_attention_interval", "linear_k_heads", "linear_v_heads", "linear_k_dim")
            missing = [k for k in (*linear, "linear_v_dim", "conv_kernel") if getattr(a, k) is None]
            if missing:
                raise ShapeError(f"{self.name}: the catalog does not confirm {', '.join(missing)}")
            hybrid = {k: getattr(a, k) for k in (*linear, "linear_v_dim", "conv_kernel")}
        if a.experts and a.moe_ffn is None:
            raise ShapeError(f"{self.name}: the catalog does not confirm moe_ffn")
        shape = ModelShape(
            name=self.name,
            model_type=a.type,
            layers=a.layers or 0,
            hidden=a.hidden or 0,
            ffn=a.ffn or 0,
            heads=a.heads or 0,
            kv_heads=a.kv_heads or 0,
            head_dim=a.head_dim or 0,
            vocab=a.vocab or 0,
            tied=bool(a.tied),  # unconfirmed → untied: the larger, safer estimate
            experts=a.experts or 0,
            experts_used=a.experts_used or 0,
            moe_ffn=a.moe_ffn or 0,
            shared_ffn=a.shared_ffn or 0,
            context_native=self.model.context.native,
            context_extended=self.model.context.extended,
            **hybrid,
        )
        v = self.model.vision
        if v is not None:
            layout = VISION_LAYOUTS[a.type]
            tower = VisionTower(layout=layout, **v.model_dump())
            return ModelShape(
                **{k: getattr(shape, k) for k in shape.__dataclass_fields__ if not k.startswith("_")}
                | {"vision": tower, "encoder_params": tower.params}
            )
        total = self.model.params.total
        if total and set(self.modalities) - {"text"}:
            # Vision/audio encoders are not in the text tensors: the published total minus the text part.
            encoder = max(0, round(total * 1e9) - shape.text_params)
            return ModelShape(
                **{k: getattr(shape, k) for k in shape.__dataclass_fields__ if not k.startswith("_")}
                | {"encoder_params": encoder}
            )
        return shape


class Catalog:
    """The validated catalog: entries in file order, lookups by name or hub id."""

    def __init__(self, data: _File) -> None:
        self.version = data.version
        self.families = data.families
        self.fidelity = data.formats.fidelity
        self.entries: tuple[Entry, ...] = tuple(
            Entry(model=m, family_key=m.family, family=data.families[m.family]) for m in data.models
        )
        self._index: dict[str, tuple[Entry, str | None]] = {}
        for e in self.entries:
            m = e.model
            keys: list[tuple[str | None, str | None]] = [(m.name, None), (m.hf, None), (m.hf_base, None)]
            keys += [(m.modelscope, None), (f"modelscope:{m.modelscope}" if m.modelscope else None, None)]
            keys += [(repo, fmt) for fmt, repo in m.quantized.items()]
            for key, fmt in keys:
                if key:
                    self._index.setdefault(key.lower(), (e, fmt))

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> Entry:
        """The entry named exactly `name` (case-insensitive); KeyError otherwise."""
        found = self._index.get(name.lower())
        if found is None or found[0].name.lower() != name.lower():
            raise KeyError(name)
        return found[0]

    def find(self, ref: str) -> tuple[Entry, str | None] | None:
        """(entry, quantized-repo key or None) for a name or hub id; `hf:` prefixes are accepted."""
        key = ref.strip().lower().removeprefix("hf:")
        return self._index.get(key)


def default_catalog_path() -> Path:
    return Path(str(resources.files("qwenkit.catalog").joinpath("models.yaml")))


def load_catalog(path: Path | None = None) -> Catalog:
    """Read and validate the catalog (default: the reviewed models.yaml shipped with qwenkit)."""
    path = path or default_catalog_path()
    try:
        raw = yaml.load(Path(path).read_text("utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError) as error:
        raise CatalogError(f"cannot read the catalog {path}: {str(error).splitlines()[0]}") from None
    try:
        data = _File.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = _where(raw, first["loc"])
        raise CatalogError(f"catalog {path}: {where}: {first['msg']}") from None
    seen: set[str] = set()
    for m in data.models:
        if m.family not in data.families:
            raise CatalogError(f"catalog {path}: {m.name}: unknown family {m.family!r}")
        if m.name.lower() in seen:
            raise CatalogError(f"catalog {path}: {m.name} is listed twice")
        seen.add(m.name.lower())
    return Catalog(data)


def _where(raw: object, loc: tuple[int | str, ...]) -> str:
    # Name the model ("models.12" is hard to find in a 1,000-line file).
    if len(loc) >= 2 and loc[0] == "models" and isinstance(raw, dict) and isinstance(loc[1], int):
        try:
            name = raw["models"][loc[1]]["name"]
        except (KeyError, IndexError, TypeError):
            name = f"model #{loc[1]}"
        return ".".join([str(name), *map(str, loc[2:])])
    return ".".join(map(str, loc)) or "top level"
