"""The Qwen catalog: complete, cited, consistent, findable, and shown by `qwenkit models catalog`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from qwenkit.catalog import CatalogError, load_catalog
from qwenkit.catalog.schema import default_catalog_path
from qwenkit.catalog.shape import ModelShape
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
        if entry.model.hf:
            # The config.json a planner fact comes from is cited for every open-weights model.
            assert f"https://huggingface.co/{entry.model.hf}/blob/main/config.json" in entry.sources


@pytest.mark.parametrize("kind", ["total", "active", "non_embedding"])
def test_published_parameter_counts_match_the_architecture(catalog, kind: str) -> None:  # type: ignore[no-untyped-def]
    # Two independent sources in one file (model cards vs config dimensions) must agree.
    tolerance = {"total": 0.025, "active": 0.05, "non_embedding": 0.035}[kind]
    checked = 0
    for entry in catalog:
        published = getattr(entry.model.params, kind)
        if published is None or entry.model.arch is None:
            continue
        shape = entry.shape()
        computed = {
            "total": shape.params_total,
            "active": shape.params_active,
            "non_embedding": shape.text_params - shape.params_embedding,
        }[kind] / 1e9
        assert computed == pytest.approx(published, rel=tolerance), entry.name
        checked += 1
    assert checked >= 20


def test_qwen2_family_head_geometry(catalog) -> None:  # type: ignore[no-untyped-def]
    for entry in catalog:
        a = entry.model.arch
        if a is None:
            continue
        assert a.heads % a.kv_heads == 0, entry.name
        if a.type != "qwen3" and a.type != "qwen3_moe":
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
    names = {m["name"] for m in json.loads(vision.output)}
    assert names and all("VL" in n for n in names)
    long = runner.invoke(_app(), ["models", "catalog", "--min-context", "1000000", "--json"])
    assert {m["name"] for m in json.loads(long.output)} == {
        "Qwen2.5-7B-Instruct-1M",
        "Qwen2.5-14B-Instruct-1M",
        "Qwen2.5-Turbo",
    }
    small = runner.invoke(_app(), ["models", "catalog", "--max-params", "1", "--json"])
    assert all(
        (m["params_published_b"]["total"] or m["params_computed_b"]["total"]) <= 1
        for m in json.loads(small.output)
    )


def test_cli_json_carries_facts_sources_and_computed_counts() -> None:
    result = CliRunner().invoke(_app(), ["models", "catalog", "--name", "Qwen3-30B-A3B", "--json"])
    (entry,) = json.loads(result.output)
    assert entry["arch"]["experts"] == 128 and entry["params_published_b"]["active"] == 3.3
    assert entry["params_computed_b"]["active"] == pytest.approx(3.3, rel=0.05)
    assert entry["capabilities"]["thinking"] is True and entry["capabilities"]["languages"] == 119
    assert entry["quantized"]["gguf"] == "Qwen/Qwen3-30B-A3B-GGUF"
    assert any(re.search(r"qwenlm\.github\.io/blog/qwen3", s) for s in entry["sources"])


def test_cli_unknown_filter_is_one_line() -> None:
    result = CliRunner().invoke(_app(), ["models", "catalog", "--task", "poetry"])
    assert result.exit_code == 2
    assert "unknown task 'poetry'" in result.output and "Traceback" not in result.output
