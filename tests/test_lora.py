"""Serving a LoRA adapter without merging: the PEFT → llama.cpp LoRA GGUF conversion, the engine's adapter
groups and cache keys, `serve --lora` and "model": "M:name", and what is refused.

The reference is the merged model: `tune merge` of the same adapter, converted to the same GGUF type (f32),
on the tiny qwen3 demo (saved as float32, so merging rounds nothing). Adapters get random nonzero B
(peft init_lora_weights=False), so each visibly changes the output.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.llamacpp.state_cache import StateCache
from qwenkit.engines.request import EngineError, GenerationRequest
from qwenkit.engines.sampling import SamplingParams
from qwenkit.gguf.convert import convert_to_gguf
from qwenkit.gguf.lora import (
    LoraError,
    convert_lora,
    ensure_lora,
    resolve_lora,
    resolve_loras,
    touches_tied_layers,
    untied_gguf,
)
from qwenkit.gguf.reader import MetadataReader

pytest.importorskip("peft")

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = "qwen3-demo"


def prompt(seed: int, n: int = 12) -> tuple[int, ...]:
    return tuple(1000 + (seed * 7919 + i * 104729) % 100000 for i in range(n))


def make_adapter(base: Path, out: Path, seed: int, **lora: object) -> Path:
    """A peft LoRA on base with random nonzero A and B, saved as `qwenkit tune` leaves it (run.json)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        init_lora_weights=False, **{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora}
    )
    get_peft_model(model, config).save_pretrained(str(out))
    (out / "run.json").write_text(json.dumps({"base_model": str(base)}), "utf-8")
    return out


@dataclass
class Files:
    root: Path
    base_dir: Path
    base: Path  # base GGUF (f32)
    adapters: dict[str, Path]  # name → peft adapter dir


@pytest.fixture(scope="module")
def files(demo_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("lora")
    base_dir = root / "base"
    shutil.copytree(demo_checkpoint("qwen3", "tiny"), base_dir)
    config = json.loads((base_dir / "config.json").read_text("utf-8"))
    (base_dir / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}), "utf-8")
    adapters = {
        "plain": make_adapter(base_dir, root / "plain", seed=1),
        # rsLoRA with a per-module alpha: llama.cpp's alpha / rank differs, so lora_b carries the rest.
        "rs": make_adapter(
            base_dir, root / "rs", seed=2, r=8, lora_alpha=4, use_rslora=True, alpha_pattern={"v_proj": 16}
        ),
    }
    return Files(root, base_dir, convert_to_gguf(base_dir, root / "base.gguf", "f32"), adapters)


@pytest.fixture(scope="module")
def loras(files: Files) -> dict[str, Path]:
    return {name: resolve_lora(path, files.base) for name, path in files.adapters.items()}


def new_engine(gguf_path: Path, loras: dict[str, Path] | None = None) -> LlamaCppEngine:
    config = EngineConfig(n_ctx=1024, max_seqs=4, threads=2, poll=0, loras=loras or {})
    return LlamaCppEngine(gguf_path, config)


@pytest.fixture(scope="module")
def engine(files: Files, loras: dict[str, Path]) -> Iterator[LlamaCppEngine]:
    eng = new_engine(files.base, loras)
    yield eng
    eng.close()


def greedy(engine: LlamaCppEngine, rid: str, p: tuple[int, ...], adapter: str | None = None) -> list[int]:
    events = list(engine.generate_sync(GenerationRequest(rid, p, GREEDY, ignore_eos=True, adapter=adapter)))
    return [t for ev in events for t in ev.token_ids]


@pytest.fixture(scope="module")
def reference(files: Files) -> dict[str | None, list[list[int]]]:
    """Greedy outputs of prompts 0 and 1 on the base model alone and on each merged model (`tune merge`,
    then converted to f32 like the base)."""
    from qwenkit.tune.merge import merge_adapter

    models: list[tuple[str | None, Path]] = [(None, files.base)]
    for name, adapter in files.adapters.items():
        merge_adapter(adapter, files.root / f"merged-{name}")
        models.append(
            (name, convert_to_gguf(files.root / f"merged-{name}", files.root / f"{name}.gguf", "f32"))
        )
    out: dict[str | None, list[list[int]]] = {}
    for name, path in models:
        eng = new_engine(path)
        try:
            out[name] = [greedy(eng, f"ref-{name}-{i}", prompt(i)) for i in range(2)]
        finally:
            eng.close()
    assert out["plain"] != out[None] and out["rs"] != out[None] and out["plain"] != out["rs"]
    return out


def test_lora_gguf_layout(files: Files, loras: dict[str, Path]) -> None:
    reader = MetadataReader(loras["plain"])
    field = reader.get_field("general.type")
    assert field is not None and field.contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"  # type: ignore[union-attr]
    assert reader.get_field("adapter.lora.alpha").contents() == 8.0  # type: ignore[union-attr]
    assert reader.get_field("general.architecture").contents() == "qwen3"  # type: ignore[union-attr]
    names = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    base = {t.name: tuple(int(d) for d in t.shape) for t in MetadataReader(files.base).tensors}
    # One A/B pair per adapted matrix of every layer, named like the base tensor (ggml shapes: ne0 first).
    pairs = {n.rsplit(".lora_", 1)[0] for n in names}
    assert len(names) == 2 * len(pairs) == 2 * 7 * 2
    for name in pairs:
        assert names[f"{name}.lora_a"] == (base[name][0], 4) and names[f"{name}.lora_b"] == (4, base[name][1])


@pytest.mark.parametrize("name", ["plain", "rs"])
def test_served_adapter_equals_merged_model(
    engine: LlamaCppEngine, reference: dict[str | None, list[list[int]]], name: str
) -> None:
    assert [greedy(engine, f"{name}-{i}", prompt(i), name) for i in range(2)] == reference[name]


def test_request_without_adapter_equals_base(
    engine: LlamaCppEngine, reference: dict[str | None, list[list[int]]]
) -> None:
    assert [greedy(engine, f"base-{i}", prompt(i)) for i in range(2)] == reference[None]


def test_concurrent_adapters_never_share_a_step(
    engine: LlamaCppEngine, reference: dict[str | None, list[list[int]]]
) -> None:
    got: dict[tuple[str | None, int], list[int]] = {}
    steps: list[set[str | None]] = []
    decode = engine.model.decode

    def watched(tokens: list[int], positions: list[int], seq_ids: list[int], wants: list[bool]) -> int:
        by_slot = {s.seq_id: s.request.adapter for s in engine.scheduler.running}
        steps.append({by_slot[i] for i in seq_ids})
        return decode(tokens, positions, seq_ids, wants)

    engine.model.decode = watched  # type: ignore[method-assign]
    try:
        for name in (None, "plain", "rs"):
            for i in range(2):
                got[(name, i)] = []
                request = GenerationRequest(f"c-{name}-{i}", prompt(i), GREEDY, ignore_eos=True, adapter=name)
                engine.submit(request, lambda ev, k=(name, i): got[k].extend(ev.token_ids))  # type: ignore[misc]
        switches = engine.adapters.switches
        while engine.step():
            pass
    finally:
        del engine.model.decode
    assert all(len(groups) == 1 for groups in steps)  # one adapter group per llama_decode
    assert len({next(iter(g)) for g in steps}) == 3 and engine.adapters.switches - switches >= 3
    for (name, i), tokens in got.items():
        assert tokens == reference[name][i], (name, i)


def test_cached_prefix_belongs_to_its_adapter(engine: LlamaCppEngine) -> None:
    p = prompt(7)  # used by no other test: no cached cells of it yet

    def run(rid: str, adapter: str | None) -> tuple[int, list[int]]:
        request = GenerationRequest(rid, p, GREEDY, ignore_eos=True, adapter=adapter)
        events = list(engine.generate_sync(request))
        return events[-1].cached_tokens, [t for ev in events for t in ev.token_ids]

    _, base = run("warm-base", None)
    n, tuned = run("then-plain", "plain")
    assert n == 0 and tuned != base  # the base model's cells are not the adapter's
    assert run("again-plain", "plain") == (len(p) - 1, tuned)  # within one adapter the prefix is reused
    assert run("again-base", None) == (len(p) - 1, base)


def test_state_cache_spaces_are_apart() -> None:
    cache = StateCache(1000)
    assert cache.put((1, 2, 3), b"x" * 10, space="a")
    assert cache.best((1, 2, 3, 4), exact=False) is None
    assert cache.best((1, 2, 3, 4), exact=False, space="b") is None
    hit = cache.best((1, 2, 3, 4), exact=False, space="a")
    assert hit is not None and hit.length == 3 and hit.space == "a"
    assert cache.holds((1, 2, 3), "a") and (1, 2, 3) not in cache


def test_unknown_adapter_and_bad_names_are_refused(engine: LlamaCppEngine, files: Files) -> None:
    with pytest.raises(EngineError, match=r"unknown adapter 'nope': loaded adapters: plain, rs"):
        engine.submit(GenerationRequest("x", prompt(0), GREEDY, adapter="nope"), lambda ev: None)
    with pytest.raises(ValueError, match="adapter name 'a:b'"):
        EngineConfig(loras={"a:b": files.base})
    # A model GGUF is not an adapter: refused before llama.cpp sees it.
    with pytest.raises(LoraError, match="not a LoRA adapter"):
        resolve_lora(files.base, files.base)


def test_ensure_lora_converts_once(files: Files, tmp_path: Path) -> None:
    env = {"QWENKIT_CACHE_DIR": str(tmp_path)}
    first = ensure_lora(files.adapters["plain"], files.base, env=env)
    assert first.is_relative_to(tmp_path / "gguf" / "lora")
    stamp = first.stat().st_mtime_ns
    assert ensure_lora(files.adapters["plain"], files.base, env=env) == first
    assert first.stat().st_mtime_ns == stamp
    assert ensure_lora(files.adapters["rs"], files.base, env=env) != first


def _edited(adapter: Path, tmp_path: Path, **changes: object) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text("utf-8"))
    (out / "adapter_config.json").write_text(json.dumps({**config, **changes}), "utf-8")
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, r"DoRA \(use_dora\)"),
        ({"modules_to_save": ["norm"]}, r"fully trained modules \(modules_to_save\)"),
        ({"trainable_token_indices": [5, 6]}, "trainable token rows"),
        ({"bias": "all"}, "trains biases"),
        ({"peft_type": "IA3"}, "'IA3' adapter, not a LoRA"),
        ({"lora_alpha": 0}, "lora_alpha must be a positive number"),
    ],
)
def test_what_llama_cpp_cannot_hold_is_refused(
    files: Files, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(LoraError, match=message):
        convert_lora(_edited(files.adapters["plain"], tmp_path, **changes), files.base, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_tied_output_or_embedding_lora_needs_an_untied_base(
    files: Files, demo_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    # The demo ties lm_head to embed_tokens (one tensor in the GGUF): a LoRA on either is refused there.
    import numpy as np
    from safetensors.numpy import load_file, save_file

    pairs = [
        ("model.embed_tokens", "lora_embedding_A", "lora_embedding_B"),
        ("lm_head", "lora_A.weight", "lora_B.weight"),
    ]
    for module, a, b in pairs:
        tied = tmp_path / module
        shutil.copytree(files.adapters["plain"], tied)
        tensors = load_file(tied / "adapter_model.safetensors")
        prefix = f"base_model.model.{module}"
        # Shapes do not matter: the tie is refused first.
        tensors |= {
            f"{prefix}.{a}": np.ones((4, 8), np.float32),
            f"{prefix}.{b}": np.ones((8, 4), np.float32),
        }
        save_file(tensors, tied / "adapter_model.safetensors")
        assert touches_tied_layers(tied) and not touches_tied_layers(files.adapters["plain"])
        with pytest.raises(
            LoraError, match=f"{module}: the base model ties its output layer to its embeddings"
        ):
            convert_lora(tied, files.base, tmp_path / "tied.gguf")
    with pytest.raises(LoraError, match="trained on another model"):
        convert_lora(files.adapters["plain"], demo_gguf("qwen3", "small", "bf16"), tmp_path / "small.gguf")
    with pytest.raises(LoraError, match="holds no adapter"):
        resolve_lora(tmp_path, files.base)
    with pytest.raises(LoraError, match="no such adapter"):
        resolve_lora(tmp_path / "missing", files.base)
    (tmp_path / "notes.txt").write_text("not an adapter", "utf-8")
    with pytest.raises(LoraError, match="neither an adapter dir nor a GGUF"):
        resolve_lora(tmp_path / "notes.txt", files.base)


@pytest.mark.slow
def test_lora_on_tied_lm_head_and_embeddings_is_served_untied(
    files: Files, reference: dict[str | None, list[list[int]]], tmp_path: Path
) -> None:
    """peft trains a LoRA on lm_head and embed_tokens of a tied model as two layers; served from the untied
    copy of the base it equals that model merged after untying (tune merge would fold both into one)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(
        files.base_dir, tmp_path / "ad", seed=4, target_modules=["q_proj", "lm_head", "embed_tokens"]
    )
    model = AutoModelForCausalLM.from_pretrained(str(files.base_dir), dtype=torch.float32)
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(
        str(tmp_path / "merged")
    )
    shutil.copy(files.base_dir / "tokenizer.json", tmp_path / "merged")
    shutil.copy(files.base_dir / "tokenizer_config.json", tmp_path / "merged")
    merged = new_engine(convert_to_gguf(tmp_path / "merged", tmp_path / "merged.gguf", "f32"))
    try:
        expected = greedy(merged, "merged", prompt(0))
    finally:
        merged.close()

    base, loras = resolve_loras({"t": adapter, "plain": files.adapters["plain"]}, files.base)
    assert base != files.base and untied_gguf(base) == base  # a cached copy, now with output.weight
    engine = new_engine(base, loras)
    try:
        assert greedy(engine, "t", prompt(0), "t") == expected != reference[None][0]
        assert greedy(engine, "untied-base", prompt(0)) == reference[None][0]  # the same base model
        assert greedy(engine, "untied-plain", prompt(0), "plain") == reference["plain"][0]
    finally:
        engine.close()


def test_serve_routes_model_colon_adapter(files: Files, loras: dict[str, Path]) -> None:
    from qwenkit.chat.flavor import Flavor
    from qwenkit.serve.app import create_app
    from qwenkit.tokenizer.tokenizer import QwenTokenizer
    from serve_fixtures import in_process

    tokenizer = QwenTokenizer.from_dir(files.base_dir)
    app = create_app(new_engine(files.base, loras), tokenizer, Flavor.QWEN3, MODEL, adapters=tuple(loras))
    body = {"prompt": "Hello there", "max_tokens": 8, "temperature": 0}
    with in_process(app) as client:
        listed = client.get("/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in listed] == [
            (MODEL, None),
            (f"{MODEL}:plain", MODEL),
            (f"{MODEL}:rs", MODEL),
        ]
        assert client.get(f"/v1/models/{MODEL}:rs").json()["parent"] == MODEL
        texts = {}
        for model in (MODEL, f"{MODEL}:plain", f"{MODEL}:rs"):
            r = client.post("/v1/completions", json={**body, "model": model})
            assert r.status_code == 200 and r.json()["model"] == model, r.text
            texts[model] = r.json()["choices"][0]["text"]
        assert len(set(texts.values())) == 3  # each adapter answers differently from the base
        r = client.post("/v1/completions", json={**body, "model": f"{MODEL}:nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert f"'{MODEL}:plain'" in r.json()["error"]["message"]
        chat = {"model": f"{MODEL}:rs", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        assert r.json()["model"] == f"{MODEL}:rs"


def test_serve_cli_refuses_bad_lora_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qwenkit.cli.app import app

    runner = CliRunner()
    for value, message in [
        ("nodir", "write name=DIR"),
        ("a:b=./x", "write name=DIR"),
        (f"x={tmp_path / 'missing'}", "no such adapter"),
    ]:
        result = runner.invoke(app, ["serve", "--port", "0", "--lora", value])
        assert result.exit_code == 2 and message in result.stderr, result.stderr
    result = runner.invoke(
        app, ["serve", "--port", "0", "--lora", f"a={tmp_path}", "--lora", f"a={tmp_path}"]
    )
    assert result.exit_code == 2 and "given twice" in result.stderr


@pytest.mark.slow
def test_generate_with_lora_equals_the_merged_model(
    files: Files, reference: dict[str | None, list[list[int]]]
) -> None:
    from typer.testing import CliRunner

    from qwenkit.cli.app import app

    def generate(*args: str) -> str:
        common = [
            "generate",
            "Name a colour",
            "-n",
            "8",
            "--temperature",
            "0",
            "--no-think",
            "--quant",
            "f32",
        ]
        result = CliRunner().invoke(app, [*common, "--threads", "2", *args])
        assert result.exit_code == 0, result.stderr
        return result.stdout

    tuned = generate("--model", str(files.base_dir), "--lora", str(files.adapters["plain"]))
    assert tuned == generate("--model", str(files.root / "merged-plain"))  # merged by the reference fixture
    assert tuned != generate("--model", str(files.base_dir))
