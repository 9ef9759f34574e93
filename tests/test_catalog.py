"""The Qwen catalog: complete, cited, consistent, findable, and shown by `qwenkit models catalog`."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from qwenkit.catalog import CatalogError, load_catalog
from qwenkit.catalog.schema import default_catalog_path
from qwenkit.catalog.shape import ModelShape, ShapeError
from qwenkit.checkpoints.demo import DemoArch, DemoSize, demo_config
from qwenkit.cli import models

# Every variant the issue names (one entry per size; chat/instruct repo first, base repo alongside).
REQUIRED = {
    "qwen": ["Qwen-7B-Chat", "Qwen-14B-Chat", "Qwen-72B-Chat"],
    "qwen1.5": [f"Qwen1.5-{s}-Chat" for s in ("0.5B", "1.8B", "4B", "7B", "14B", "32B", "72B", "110B")]
    + ["Qwen1.5-MoE-A2.7B-Chat"],
    "qwen2": [f"Qwen2-{s}-Instruct" for s in ("0.5B", "1.5B", "7B", "57B-A14B", "72B")],
    "qwen2-vl": [f"Qwen2-VL-{s}-Instruct" for s in ("2B", "7B", "72B")],
    "qwen2-audio": ["Qwen2-Audio-7B-Instruct"],
    "qwen2-math": [f"Qwen2-Math-{s}-Instruct" for s in ("1.5B", "7B", "72B")],
    "qwen2.5": [f"Qwen2.5-{s}-Instruct" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")],
    "qwen2.5-1m": ["Qwen2.5-7B-Instruct-1M", "Qwen2.5-14B-Instruct-1M"],
    "qwen2.5-turbo": ["Qwen2.5-Turbo"],
    "qwen2.5-coder": [f"Qwen2.5-Coder-{s}-Instruct" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B")],
    "qwen2.5-math": [f"Qwen2.5-Math-{s}-Instruct" for s in ("1.5B", "7B", "72B")],
    "qwen2.5-vl": [f"Qwen2.5-VL-{s}-Instruct" for s in ("3B", "7B", "32B", "72B")],
    "qwen3": [f"Qwen3-{s}" for s in ("0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B", "235B-A22B")],
}


@pytest.fixture(scope="module")
def catalog():  # type: ignore[no-untyped-def]
    return load_catalog()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(models.app, name="models")
    return app


def test_every_named_variant_is_in_its_family(catalog) -> None:  # type: ignore[no-untyped-def]
    for family, names in REQUIRED.items():
        for name in names:
            assert catalog.get(name).family_key == family, name


def test_every_entry_cites_https_sources_including_release_notes(catalog) -> None:  # type: ignore[no-untyped-def]
    for entry in catalog:
        assert entry.sources, entry.name
        assert all(url.startswith("https://") for url in entry.sources), entry.name
        assert entry.family.release_notes in entry.sources
        arch = entry.model.arch
        if entry.model.hf and arch is not None and arch.layers is not None:
            # The config.json a planner fact comes from is cited; numbers read from a secondary source
            # (a model with no stored config here) are listed as unverified instead.
            config = f"https://huggingface.co/{entry.model.hf}/blob/main/config.json"
            assert config in entry.sources or entry.model.unverified, entry.name


@pytest.mark.parametrize("kind", ["total", "active", "non_embedding"])
def test_published_parameter_counts_match_the_architecture(catalog, kind: str) -> None:  # type: ignore[no-untyped-def]
    # Two independent sources in one file (model cards vs config dimensions) must agree.
    tolerance = {"total": 0.025, "active": 0.05, "non_embedding": 0.035}[kind]
    checked = 0
    for entry in catalog:
        published = getattr(entry.model.params, kind)
        if published is None or entry.model.arch is None:
            continue
        try:
            shape = entry.shape()
        except ShapeError:
            continue  # dimensions not confirmed: test_unverified_numbers_..._cannot_be_planned
        computed = {
            "total": shape.params_total,
            # An MoE's "A17B" counts the text tower a token reads (a vision encoder runs per image);
            # dense VL cards publish active = total, encoder included.
            "active": shape.params_active - (shape.encoder_params if shape.is_moe else 0),
            "non_embedding": shape.text_params - shape.params_embedding,
        }[kind] / 1e9
        assert computed == pytest.approx(published, rel=tolerance), entry.name
        checked += 1
    assert checked >= 20


def test_qwen2_family_head_geometry(catalog) -> None:  # type: ignore[no-untyped-def]
    for entry in catalog:
        a = entry.model.arch
        if a is None or a.heads is None or a.kv_heads is None:
            continue  # dimensions not confirmed (the newest entries)
        assert a.heads % a.kv_heads == 0, entry.name
        if a.type.startswith(("qwen2", "qwen1", "qwen")) and not a.type.startswith("qwen3"):
            # Before Qwen3, head_dim is hidden / heads (configs have no head_dim field).
            assert a.heads * a.head_dim == a.hidden, entry.name


def test_known_shapes(catalog) -> None:  # type: ignore[no-untyped-def]
    qwen3_moe = catalog.get("Qwen3-30B-A3B").shape()
    assert (qwen3_moe.experts, qwen3_moe.experts_used, qwen3_moe.kv_heads) == (128, 8, 4)
    assert qwen3_moe.params_active / qwen3_moe.params_total < 0.12
    # Qwen1.5 (except 32B/110B) has no grouped-query attention: 8× the KV cache of Qwen2.5 at 7B.
    q15 = catalog.get("Qwen1.5-7B-Chat").shape().kv_bytes_per_token(2)
    q25 = catalog.get("Qwen2.5-7B-Instruct").shape().kv_bytes_per_token(2)
    assert q15 / q25 == pytest.approx(32 * 32 / (28 * 4))


def test_demo_real_shapes_mirror_the_catalog(catalog) -> None:  # type: ignore[no-untyped-def]
    for size, name in ((DemoSize.B0_5, "Qwen2.5-0.5B-Instruct"), (DemoSize.B1_5, "Qwen2.5-1.5B-Instruct")):
        demo = ModelShape.from_config(demo_config(DemoArch.QWEN2, size))
        assert demo.params_total == catalog.get(name).shape().params_total


def test_quantized_repos_are_named_after_the_model(catalog) -> None:  # type: ignore[no-untyped-def]
    for entry in catalog:
        for repo in entry.model.quantized.values():
            assert repo.startswith(entry.model.hf), (entry.name, repo)


def test_unconfirmed_facts_stay_null(catalog) -> None:  # type: ignore[no-untyped-def]
    turbo = catalog.get("Qwen2.5-Turbo")
    assert not turbo.model.open_weights and turbo.model.arch is None and turbo.model.params.total is None
    with pytest.raises(ValueError, match="no published architecture"):
        turbo.shape()
    # Unconfirmed tying is planned as untied (the larger estimate).
    q15 = catalog.get("Qwen1.5-0.5B-Chat")
    assert q15.model.arch.tied is None and not q15.shape().tied


def test_find_by_name_and_hub_ids(catalog) -> None:  # type: ignore[no-untyped-def]
    entry, fmt = catalog.find("qwen/qwen2.5-7b-instruct")
    assert entry.name == "Qwen2.5-7B-Instruct" and fmt is None
    assert catalog.find("Qwen/Qwen2.5-7B")[0].name == "Qwen2.5-7B-Instruct"  # the base repo
    assert catalog.find("modelscope:Qwen/Qwen3-8B")[0].name == "Qwen3-8B"
    assert catalog.find("hf:Qwen/Qwen3-8B")[0].name == "Qwen3-8B"
    entry, fmt = catalog.find("Qwen/Qwen2.5-7B-Instruct-AWQ")
    assert entry.name == "Qwen2.5-7B-Instruct" and fmt == "awq"
    assert catalog.find("Qwen/Qwen3-30B-A3B-GGUF")[1] == "gguf"
    assert catalog.find("meta-llama/Llama-3-8B") is None


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.dump(data, Dumper=yaml.CSafeDumper, sort_keys=False), "utf-8")
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["arch"].update(kv_heads=3), r"Qwen3-8B\.arch.*kv_heads 3 does not divide"),
        (lambda m: m.update(family="qwen9"), r"Qwen3-8B: unknown family 'qwen9'"),
        (lambda m: m.update(sources=[]), r"Qwen3-8B\.sources"),
        (lambda m: m.update(sources=["http://example.com"]), r"not an https URL"),
        (lambda m: m["params"].update(active=99.0), r"active parameters exceed total"),
        (lambda m: m["context"].update(extended=1024), r"extended context is shorter"),
        (lambda m: m.update(hf="not a repo"), r"not a hub id"),
        (lambda m: m.update(name="Qwen3-4B"), r"Qwen3-4B is listed twice"),
        (lambda m: m["arch"].update(full_attention_interval=4), r"qwen3 is not a hybrid architecture"),
        (lambda m: m.update(unverified=["arch.nonsense"]), r"'arch.nonsense' is not a field"),
    ],
)
def test_loader_rejects_inconsistent_data(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    data = yaml.load(default_catalog_path().read_text("utf-8"), Loader=yaml.CSafeLoader)
    target = next(m for m in data["models"] if m["name"] == "Qwen3-8B")
    edit(target)
    with pytest.raises(CatalogError, match=message):
        load_catalog(_write(tmp_path, data))


def test_loader_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read the catalog"):
        load_catalog(tmp_path / "missing.yaml")


def test_cli_table_lists_models_and_filters() -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["models", "catalog", "--family", "qwen3"])
    assert result.exit_code == 0, result.output
    assert "Qwen3-235B-A22B" in result.output and "Qwen2.5-7B-Instruct" not in result.output
    assert "235 (22.0 act.)" in result.output
    vision = runner.invoke(_app(), ["models", "catalog", "--modality", "image", "--json"])
    found = json.loads(vision.output)
    # The VL models and the natively multimodal Qwen3.5 generation; never a text-only model.
    assert {"Qwen2.5-VL-7B-Instruct", "Qwen3.5-9B"} <= {m["name"] for m in found}
    assert all("image" in m["modalities"] for m in found)
    long = json.loads(
        runner.invoke(_app(), ["models", "catalog", "--min-context", "1000000", "--json"]).output
    )
    assert {"Qwen2.5-7B-Instruct-1M", "Qwen2.5-14B-Instruct-1M", "Qwen2.5-Turbo", "Qwen3.5-27B"} <= {
        m["name"] for m in long
    }
    assert all(max(m["context"]["native"] or 0, m["context"]["extended"] or 0) >= 1000000 for m in long)
    small = runner.invoke(_app(), ["models", "catalog", "--max-params", "1", "--json"])
    assert all(
        (m["params_published_b"]["total"] or m["params_computed_b"]["total"]) <= 1
        for m in json.loads(small.output)
    )


def test_cli_json_carries_facts_sources_and_computed_counts() -> None:
    result = CliRunner().invoke(_app(), ["models", "catalog", "--name", "Qwen3-30B-A3B", "--json"])
    # The name filter matches substrings: the 2507 Instruct/Thinking releases share the prefix.
    entry = next(m for m in json.loads(result.output) if m["name"] == "Qwen3-30B-A3B")
    assert entry["arch"]["experts"] == 128 and entry["params_published_b"]["active"] == 3.3
    assert entry["params_computed_b"]["active"] == pytest.approx(3.3, rel=0.05)
    assert entry["capabilities"]["thinking"] is True and entry["capabilities"]["languages"] == 119
    assert entry["quantized"]["gguf"] == "Qwen/Qwen3-30B-A3B-GGUF"
    assert any(re.search(r"qwenlm\.github\.io/blog/qwen3", s) for s in entry["sources"])
    hybrid = CliRunner().invoke(_app(), ["models", "catalog", "--name", "Qwen3.5-0.8B", "--json"])
    (small,) = json.loads(hybrid.output)
    assert small["kv_layers"] == 6 and small["arch"]["linear_v_heads"] == 16
    # Its text tower is from the official config.json; only its vision tower is from uncitable copies.
    assert small["runs_on_qwenkit_llamacpp"] and small["unverified"]
    assert all(field.startswith("vision.") for field in small["unverified"])


def test_cli_unknown_filter_is_one_line() -> None:
    result = CliRunner().invoke(_app(), ["models", "catalog", "--task", "poetry"])
    assert result.exit_code == 2
    assert "unknown task 'poetry'" in result.output and "Traceback" not in result.output


# ---- Qwen3.5 / 3.6 / 3.8 and the other Qwen3 variants ---------------------------------------------
QWEN3_5_ERA = {
    "Qwen3.5-0.8B", "Qwen3.5-2B", "Qwen3.5-4B", "Qwen3.5-9B", "Qwen3.5-27B", "Qwen3.5-35B-A3B",
    "Qwen3.5-122B-A10B", "Qwen3.5-397B-A17B", "Qwen3.6-27B", "Qwen3.6-35B-A3B", "Qwen3.8-27B",
}  # fmt: skip
QWEN3_VARIANTS = {
    "Qwen3-4B-Instruct-2507", "Qwen3-4B-Thinking-2507", "Qwen3-30B-A3B-Instruct-2507",
    "Qwen3-30B-A3B-Thinking-2507", "Qwen3-235B-A22B-Instruct-2507", "Qwen3-235B-A22B-Thinking-2507",
    "Qwen3-Next-80B-A3B-Instruct", "Qwen3-Coder-480B-A35B-Instruct", "Qwen3-Coder-30B-A3B-Instruct",
    "Qwen3-Coder-Next", "Qwen3-VL-4B-Instruct", "Qwen3-Omni-30B-A3B-Instruct",
}  # fmt: skip


def test_the_hybrid_generation_and_qwen3_variants_are_listed(catalog) -> None:  # type: ignore[no-untyped-def]
    names = {e.name for e in catalog}
    assert names >= QWEN3_5_ERA and names >= QWEN3_VARIANTS
    for name in QWEN3_5_ERA:
        e = catalog.get(name)
        assert e.model.arch.hybrid and e.model.arch.vocab == 248320, name
        assert set(e.modalities) >= {"text", "image"}, name
        caps = e.capabilities
        assert (caps.thinking_style, caps.tool_format) == ("opened-by-template", "qwen3-coder-xml"), name
    assert catalog.get("Qwen3-235B-A22B-Thinking-2507").capabilities.thinking_style == "always"
    assert catalog.get("Qwen3-30B-A3B-Instruct-2507").capabilities.thinking_style == "none"
    assert catalog.get("Qwen3-Coder-30B-A3B-Instruct").capabilities.tool_format == "qwen3-coder-xml"
    assert catalog.get("Qwen3-4B-Instruct-2507").capabilities.tool_format == "hermes-json"
    assert "audio" in catalog.get("Qwen3-Omni-30B-A3B-Instruct").modalities


def test_hybrid_entries_carry_kv_only_on_full_attention_layers(catalog) -> None:  # type: ignore[no-untyped-def]
    small = catalog.get("Qwen3.5-0.8B").shape()
    # Qwen3.5-0.8B's config.json: 24 layers, full_attention_interval 4 -> layers 3, 7, ..., 23 carry KV.
    assert [i for i in range(24) if small.is_full_attention(i)] == [3, 7, 11, 15, 19, 23]
    assert small.kv_bytes_per_token(2) == 6 * 2 * 256 * 2 * 2
    moe = catalog.get("Qwen3.5-35B-A3B").shape()
    assert (moe.kv_layers, moe.linear_layers, moe.experts, moe.experts_used) == (10, 30, 256, 8)
    # 35B total as published (the vision tower is the difference); "A3B": about 3B read per token.
    assert moe.params_total == pytest.approx(35e9, rel=0.02)
    assert 3e9 < moe.params_active < 4e9


def test_unverified_numbers_are_marked_and_unknown_ones_cannot_be_planned(catalog) -> None:  # type: ignore[no-untyped-def]
    # Qwen3.6-35B-A3B's expert sizes rest on "same architecture as Qwen3.5-35B-A3B", not its own config.
    assert "arch.moe_ffn" in catalog.get("Qwen3.6-35B-A3B").model.unverified
    assert "arch.shared_ffn" not in catalog.get("Qwen3.5-35B-A3B").model.unverified  # read from its config
    # Dimensions from training scripts and third-party copies of a config stay marked.
    for name, field in (
        ("Qwen3.5-122B-A10B", "hidden"),
        ("Qwen3.5-2B", "ffn"),
        ("Qwen3-Coder-Next", "vocab"),
        ("Qwen3-VL-8B-Instruct", "layers"),
    ):
        assert f"arch.{field}" in catalog.get(name).model.unverified, name
    # A dimension no source states stays null, and such an entry cannot be planned.
    for name, missing in (("Qwen3.5-2B", "hidden"), ("Qwen3-VL-8B-Instruct", "layers")):
        entry = catalog.get(name)
        arch = entry.model.arch.model_copy(update={missing: None})
        unknown = dataclasses.replace(entry, model=entry.model.model_copy(update={"arch": arch}))
        with pytest.raises(ShapeError, match=f"does not confirm.*{missing}"):
            unknown.shape()


def test_dimensions_filled_from_cited_configs(catalog) -> None:  # type: ignore[no-untyped-def]
    # Qwen3.5-397B-A17B from a verbatim copy of its config.json: nothing secondary left, and the shape it
    # gives matches the published 397B total / 17B active (the vision tower is the difference in total).
    big = catalog.get("Qwen3.5-397B-A17B")
    assert big.model.unverified == [] and any("aiconfigurator" in url for url in big.sources)
    s = big.shape()
    assert (s.layers, s.kv_layers, s.linear_layers, s.experts, s.experts_used) == (60, 15, 45, 512, 10)
    assert s.params_active - s.encoder_params == pytest.approx(17e9, rel=0.05)  # the text tower's
    # Numbers from training frameworks stay marked, but are enough to plan.
    coder = catalog.get("Qwen3-Coder-480B-A35B-Instruct")
    assert {"arch.hidden", "arch.vocab", "arch.moe_ffn"} <= set(coder.model.unverified)
    c = coder.shape()
    assert c.params_total == pytest.approx(480e9, rel=0.025)
    assert c.params_active == pytest.approx(35e9, rel=0.05)
    assert catalog.get("Qwen3.8-27B").shape().kv_layers == 16
    assert catalog.get("Qwen3-Coder-Next").model.arch.experts_used == 10
