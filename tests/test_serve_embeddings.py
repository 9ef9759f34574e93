"""Embeddings: the Qwen3-Embedding-shaped demo, its GGUF, parity with transformers, and /v1/embeddings.

Parity: the demo converted to an f32 GGUF and embedded by llama.cpp (its own context, last-token pooling)
against transformers' fp32 AutoModel (Qwen3Model) on the checkpoint's own tokenizer (which appends
<|endoftext|>): the last token's final hidden state, L2-normalised. With an f32 KV cache and no flash
attention both sides compute in f32 and only summation order differs: measured <= 1e-7 per component
(unit vectors, components ~0.1), so the bound is F32_BOUND = 1e-6 (a few float32 ulps of 1). The server's
default f16 KV cache rounds K and V to 11-bit mantissas: measured <= 9e-5, bound F16_BOUND = 2e-4.
Negative controls: the second-to-last token's state, the mean over tokens, and another input's vector
each differ by more than 100x F16_BOUND, so the bounds tell pooling and input apart. The server half runs
the official `openai` and `ollama` clients against the live server on the embedding demo.

Batching across requests: decoder_busy() holds the embedder's decoder seat (as a long batch would) while
callers queue, so the batch they share is certain rather than a race. Measured on the demo: a short input's
vector packed with other requests' is bit-identical to it alone; a 700-token one (split over ubatches)
differs by <= 3e-8 relative (f32 KV), 4e-7 (f16), so the checks use the parity bounds above.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import ollama
import openai
import pytest
import requests
import torch
import transformers
from safetensors import safe_open
from typer.testing import CliRunner

from qwenkit.checkpoints.demo import DemoError, create_demo
from qwenkit.checkpoints.embedding import QUERY_PROMPT, EmbeddingSpec, embedding_spec_from_dir
from qwenkit.checkpoints.resolve import resolve_model
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.embedder import LlamaEmbedder
from qwenkit.engines.loader import open_engine, prepare_files
from qwenkit.engines.request import EngineError, RequestTooLong
from qwenkit.gguf.convert import ConversionError, convert_to_gguf
from qwenkit.gguf.reader import read_gguf_info
from qwenkit.serve.config import ServeConfig
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import API_KEY, MODEL, FakeEngine, LiveServer, fake_app, in_process, live_server

F32_BOUND = 1e-6
F16_BOUND = 2e-4
END = 151643  # <|endoftext|>, which Qwen3-Embedding's tokenizer appends
TEXTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "你好, s'il vous plaît!",
    "long " * 700,  # past the 512-token ubatch: llama.cpp splits the sequence, the KV cache joins it
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo(tmp_path_factory.mktemp("emb") / "qwen3-embedding-tiny", embedding=True)


@pytest.fixture(scope="module")
def gguf(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_to_gguf(checkpoint, tmp_path_factory.mktemp("emb-gguf") / "emb-f32.gguf", "f32")


@pytest.fixture(scope="module")
def spec(checkpoint: Path) -> EmbeddingSpec:
    found = embedding_spec_from_dir(checkpoint, json.loads((checkpoint / "config.json").read_text()))
    assert found is not None
    return found


# ---- the demo checkpoint and its GGUF ----------------------------------------------------------------


def test_demo_is_shaped_like_qwen3_embedding(checkpoint: Path, spec: EmbeddingSpec) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["vocab_size"] == 151669 and config["qwenkit_demo"]["embedding"] is True
    with safe_open(str(checkpoint / "model.safetensors"), framework="numpy") as weights:
        names = list(weights.keys())
    assert "embed_tokens.weight" in names and "norm.weight" in names
    assert not [n for n in names if n.startswith("model.") or n.startswith("lm_head")]
    assert spec == EmbeddingSpec(dims=64, prompts={"query": QUERY_PROMPT, "document": ""})
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    assert hf("Hello world")["input_ids"][-1] == END and hf.padding_side == "left"
    with pytest.raises(DemoError, match="--arch qwen3"):
        create_demo(checkpoint.parent / "x", arch="qwen2", embedding=True)


def test_demo_cli_writes_the_embedding_demo(tmp_path: Path) -> None:
    from qwenkit.cli.app import app

    result = CliRunner().invoke(app, ["demo", "create", "--embedding", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "1_Pooling" / "config.json").read_text())["pooling_mode_lasttoken"]


def test_gguf_records_last_token_pooling(gguf: Path, checkpoint: Path, tmp_path: Path) -> None:
    info = read_gguf_info(gguf)
    assert info.metadata["qwen3.pooling_type"] == 3  # llama.cpp's LLAMA_POOLING_TYPE_LAST
    files = prepare_files(resolve_model(str(gguf)))
    assert files.embedding is not None and files.embedding.dims == 64 and files.embedding.end_token
    # Another pooling mode is refused with its name, at conversion.
    other = create_demo(tmp_path / "mean", embedding=True)
    pooling = json.loads((other / "1_Pooling" / "config.json").read_text())
    pooling |= {"pooling_mode_lasttoken": False, "pooling_mode_mean_tokens": True}
    (other / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ConversionError, match="mean_tokens pooling"):
        convert_to_gguf(other, tmp_path / "mean.gguf", "f32")


def test_a_chat_gguf_is_not_an_embedding_model(demo_gguf: Any) -> None:
    info = read_gguf_info(demo_gguf("qwen3", "tiny", "f32"))
    assert "qwen3.pooling_type" not in info.metadata
    assert prepare_files(resolve_model(str(info.path))).embedding is None


# ---- parity with transformers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> tuple[list[list[int]], list[np.ndarray]]:
    """transformers' token ids (its tokenizer appends <|endoftext|>) and fp32 final hidden states."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    with torch.no_grad():
        states = [model(torch.tensor([row])).last_hidden_state[0].numpy() for row in ids]
    return ids, states


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_llamacpp_embeddings_match_transformers(
    gguf: Path, checkpoint: Path, spec: EmbeddingSpec, reference: tuple[list[list[int]], list[np.ndarray]]
) -> None:
    ids, states = reference
    ours = QwenTokenizer.from_dir(checkpoint)
    end = [ours.special_id(spec.end_token)] if spec.end_token else []
    assert [ours.encode_text(t) + end for t in TEXTS] == ids  # the server's tokens are transformers'
    config = EngineConfig(n_ctx=4096, max_seqs=4, threads=2, n_ubatch=512, kv_type="f32")
    embedder = LlamaEmbedder(gguf, config)
    try:
        together = embedder.embed(ids)  # one llama_decode for all four sequences
        alone = [embedder.embed([row])[0] for row in ids]
    finally:
        embedder.shutdown()
    for i, state in enumerate(states):
        want = unit(state[-1])
        for got in (together[i], alone[i]):
            assert np.abs(spec.finish(got) - want).max() <= F32_BOUND, TEXTS[i][:20]
        # Negative controls: another token's state, mean pooling and another input are all far off.
        assert np.abs(unit(state[-2]) - spec.finish(together[i])).max() > 100 * F16_BOUND
        assert np.abs(unit(state.mean(axis=0)) - spec.finish(together[i])).max() > 100 * F16_BOUND
        other = spec.finish(together[(i + 1) % len(ids)])
        assert np.abs(other - spec.finish(together[i])).max() > 100 * F16_BOUND


def test_matryoshka_truncates_then_normalises(spec: EmbeddingSpec) -> None:
    full = np.arange(1, 65, dtype=np.float32)
    short = spec.finish(full, 32)
    assert short.shape == (32,) and abs(float(np.linalg.norm(short)) - 1) < 1e-6
    assert np.allclose(short, full[:32] / np.linalg.norm(full[:32]))


# ---- the server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    gguf: Path, checkpoint: Path, spec: EmbeddingSpec, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    batches = str(tmp_path_factory.mktemp("emb-batches"))
    config = ServeConfig(api_keys=(API_KEY,), batch_dir=batches)  # type: ignore[arg-type]
    with live_server(gguf, checkpoint, config, n_ctx=1024, max_seqs=4, embedding=spec) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server: LiveServer, path: str, body: dict[str, Any], key: str | None = API_KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server.base_url + path, json=body, headers=headers, timeout=120)


def test_openai_client_embeds_text_batches_and_token_ids(
    client: openai.OpenAI, checkpoint: Path, reference: tuple[list[list[int]], list[np.ndarray]]
) -> None:
    ids, states = reference
    texts = TEXTS[:3]
    # The SDK asks for base64 by default and decodes it; float lists must give the same vectors.
    packed = client.embeddings.create(model=MODEL, input=texts)
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in packed.data] == [0, 1, 2] and packed.model == MODEL
    assert packed.usage.prompt_tokens == packed.usage.total_tokens == sum(len(r) for r in ids[:3])
    for i in range(3):
        want = unit(states[i][-1])
        for data in (packed.data[i], floats.data[i]):
            assert np.abs(np.array(data.embedding) - want).max() <= F16_BOUND
    one = client.embeddings.create(model=MODEL, input=texts[1], encoding_format="float")
    assert np.abs(np.array(one.data[0].embedding) - np.array(floats.data[1].embedding)).max() <= F16_BOUND
    by_ids = client.embeddings.create(model=MODEL, input=ids[:2], encoding_format="float")
    flat = client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")
    for got, want in (
        (by_ids.data[0], floats.data[0]),
        (by_ids.data[1], floats.data[1]),
        (flat.data[0], floats.data[0]),
    ):
        assert np.abs(np.array(got.embedding) - np.array(want.embedding)).max() <= F16_BOUND
    # Token ids are embedded as given: without the end token the vector changes.
    bare = client.embeddings.create(model=MODEL, input=ids[0][:-1], encoding_format="float")
    assert np.abs(np.array(bare.data[0].embedding) - np.array(floats.data[0].embedding)).max() > 0.01


def test_dimensions_base64_and_query_prompt(client: openai.OpenAI, server: LiveServer) -> None:
    full = np.array(
        client.embeddings.create(model=MODEL, input="hi", encoding_format="float").data[0].embedding
    )
    short = client.embeddings.create(model=MODEL, input="hi", dimensions=32, encoding_format="float")
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (32,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    assert np.abs(vector - unit(full[:32])).max() <= F16_BOUND
    raw = post(server, "/v1/embeddings", {"model": MODEL, "input": "hi", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, full.astype(np.float32))
    # prompt_name "query" embeds the model's instruction prefix before the text.
    query = post(server, "/v1/embeddings", {"model": MODEL, "input": "hi", "prompt_name": "query"}).json()
    prefixed = client.embeddings.create(model=MODEL, input=QUERY_PROMPT + "hi", encoding_format="float")
    assert np.abs(np.array(query["data"][0]["embedding"]) - np.array(prefixed.data[0].embedding)).max() < 1e-6
    assert query["usage"]["prompt_tokens"] == prefixed.usage.prompt_tokens


def test_chat_routes_answer_400_naming_why(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "embedding model" in err.value.message and "/v1/embeddings" in err.value.message
    messages = post(server, "/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": []})
    assert messages.status_code == 400 and messages.json()["type"] == "error"  # Anthropic's shape
    ollama = post(server, "/api/chat", {"model": MODEL, "messages": []})
    assert ollama.status_code == 400 and "embedding model" in ollama.json()["error"]  # Ollama's shape
    assert post(server, "/v1/embeddings", {"model": MODEL, "input": "x"}, key=None).status_code == 401


BAD: list[tuple[str, dict[str, Any], int]] = [
    ("no input", {}, 400),
    ("input number", {"input": 3}, 400),
    ("input null", {"input": None}, 400),
    ("input object", {"input": {"text": "x"}}, 400),
    ("empty list", {"input": []}, 400),
    ("empty string", {"input": ""}, 400),
    ("empty token list", {"input": [[1, 2], []]}, 400),
    ("mixed list", {"input": ["a", 1]}, 400),
    ("float ids", {"input": [1.5, 2.0]}, 400),
    ("bool ids", {"input": [True]}, 400),
    ("negative id", {"input": [-1]}, 400),
    ("id past vocab", {"input": [151669]}, 400),
    ("nested too deep", {"input": [[[1]]]}, 400),
    ("too many inputs", {"input": ["a"] * 2049}, 400),
    ("too long", {"input": "word " * 1500}, 400),
    ("dimensions too small", {"input": "a", "dimensions": 8}, 400),
    ("dimensions too big", {"input": "a", "dimensions": 65}, 400),
    ("dimensions zero", {"input": "a", "dimensions": 0}, 400),
    ("dimensions string", {"input": "a", "dimensions": "32"}, 400),
    ("bad encoding", {"input": "a", "encoding_format": "int8"}, 400),
    ("unknown prompt", {"input": "a", "prompt_name": "passage"}, 400),
    ("user number", {"input": "a", "user": 5}, 400),
    ("unknown model", {"model": "gpt-4", "input": "a"}, 404),
]


@pytest.mark.parametrize(("case", "body", "status"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx(server: LiveServer, case: str, body: dict[str, Any], status: int) -> None:
    reply = post(server, "/v1/embeddings", {"model": MODEL, **body})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert post(server, "/v1/embeddings", {"model": MODEL, "input": "still serving"}).status_code == 200


def test_rate_limit_and_metrics_apply(gguf: Path, checkpoint: Path, spec: EmbeddingSpec) -> None:
    config = ServeConfig(api_keys=(API_KEY,), rate_limit_tpm=20)  # type: ignore[arg-type]
    with live_server(gguf, checkpoint, config, n_ctx=256, max_seqs=2, embedding=spec) as live:
        assert post(live, "/v1/embeddings", {"model": MODEL, "input": "one two three"}).status_code == 200
        limited = post(live, "/v1/embeddings", {"model": MODEL, "input": "word " * 30})
        assert limited.status_code == 429, limited.text
        metrics = requests.get(
            live.base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}
        ).text
    assert 'qwenkit_requests_total{route="/v1/embeddings",status="200"} 1.0' in metrics
    assert 'qwenkit_requests_total{route="/v1/embeddings",status="429"} 1.0' in metrics


def test_a_chat_model_answers_embeddings_with_the_fix(demo_checkpoint: Any) -> None:
    engine = FakeEngine(QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny")))
    with in_process(fake_app(engine)) as http:
        reply = http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert reply.status_code == 400
    assert "qwenkit serve --model Qwen/Qwen3-Embedding-0.6B" in reply.json()["error"]["message"]
    assert engine.requests == []


def test_open_engine_picks_the_embedder(checkpoint: Path) -> None:
    files = prepare_files(resolve_model(str(checkpoint)), "f32")
    engine = open_engine(files, EngineConfig(n_ctx=512, max_seqs=2, threads=2))
    try:
        assert isinstance(engine, LlamaEmbedder) and engine.n_ctx == 256 and engine.n_embd == 64
    finally:
        engine.shutdown()


def test_batches_of_embeddings_in_process_and_through_the_server(
    gguf: Path, client: openai.OpenAI, tmp_path: Path
) -> None:
    def line(custom_id: str, url: str, body: dict[str, Any]) -> str:
        return json.dumps(
            {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": MODEL, **body}}
        )

    one = line("one", "/v1/embeddings", {"input": TEXTS[0]})
    two = line("two", "/v1/embeddings", {"input": TEXTS[1:3], "encoding_format": "float"})
    chat = line("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    want = [np.array(d.embedding) for d in client.embeddings.create(model=MODEL, input=TEXTS[:3]).data]

    def vectors(records: dict[str, Any]) -> list[np.ndarray]:
        data = [*records["one"]["response"]["body"]["data"], *records["two"]["response"]["body"]["data"]]
        return [np.array(d["embedding"]) for d in data]

    # qwenkit batch in process: the loader opens the embedder; a chat line is that line's 400.
    from qwenkit.cli.app import app

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join([one, two, chat]) + "\n")
    flags = ["--threads", "2", "--max-seqs", "2", "--ctx", "2048", "--poll", "0"]
    result = CliRunner().invoke(app, ["batch", str(src), str(out), "--model", str(gguf), *flags])
    assert result.exit_code == 0, result.stderr
    got = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert got["chat"]["response"]["status_code"] == 400
    assert got["chat"]["response"]["body"]["error"]["code"] == "embedding_model"
    for have, expected in zip(vectors(got), want, strict=True):
        assert np.abs(have - expected).max() <= F16_BOUND

    # /v1/batches on the embedding server: embeddings only.
    upload = client.files.create(file=("in.jsonl", ("\n".join([one, two]) + "\n").encode()), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    assert batch.status == "completed" and batch.output_file_id
    lines = client.files.content(batch.output_file_id).read().decode().splitlines()
    served = {r["custom_id"]: r for r in map(json.loads, lines)}
    for have, expected in zip(vectors(served), want, strict=True):
        assert np.abs(have - expected).max() <= F16_BOUND


# ---- batching across requests ------------------------------------------------------------------------


@contextlib.contextmanager
def decoder_busy(embedder: LlamaEmbedder) -> Iterator[None]:
    """Hold the embedder's decoder seat, as a batch in progress does: embed() callers queue behind it."""
    with embedder._cond:
        assert not embedder._decoding
        embedder._decoding = True
    try:
        yield
    finally:
        with embedder._cond:
            embedder._decoding = False
            embedder._cond.notify_all()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_concurrent_callers_share_decode_calls(
    gguf: Path, spec: EmbeddingSpec, reference: tuple[list[list[int]], list[np.ndarray]]
) -> None:
    ids, _ = reference
    embedder = LlamaEmbedder(gguf, EngineConfig(n_ctx=4096, max_seqs=4, threads=2, kv_type="f32"))
    try:
        ids = ids[:3]  # short inputs keep this quick; the long one's packing is checked above
        alone = [embedder.embed([row])[0] for row in ids]
        good = [[ids[0]], [ids[1], ids[2]], [ids[2]], [ids[0], ids[1]], [ids[1]]]
        bad: list[tuple[list[list[int]], type[EngineError], str]] = [
            ([[5] * (embedder.n_ctx + 1)], RequestTooLong, "at most 1024"),
            ([[embedder.n_vocab]], EngineError, "outside the vocabulary"),
        ]
        steps = embedder.stats().steps
        with ThreadPoolExecutor(len(good) + len(bad)) as pool, decoder_busy(embedder):
            futures = [pool.submit(embedder.embed, rows) for rows in good]
            # A bad caller fails at once, on its own: it never waits in (or fails) the shared batch.
            for rows, error, match in bad:
                with pytest.raises(error, match=match):
                    pool.submit(embedder.embed, rows).result(timeout=60)
            wait_for(lambda: embedder.stats().waiting == len(good), "the callers to queue")
            assert not any(f.done() for f in futures)
        results = [f.result(timeout=120) for f in futures]
        calls = embedder.stats().steps - steps
        assert calls == 2  # 7 inputs of 5 callers, at most 4 sequences per call
        assert embedder.stats().running == embedder.stats().waiting == 0
        for rows, got in zip(good, results, strict=True):
            assert len(got) == len(rows)
            for row, vector in zip(rows, got, strict=True):
                want = alone[ids.index(row)]
                assert np.abs(spec.finish(vector) - spec.finish(want)).max() <= F32_BOUND
    finally:
        embedder.shutdown()
    with pytest.raises(EngineError, match="shut down"):
        embedder.embed([ids[0]])


def test_concurrent_requests_share_decode_calls(server: LiveServer, client: openai.OpenAI) -> None:
    embedder = server.engine
    assert isinstance(embedder, LlamaEmbedder)
    bodies: list[dict[str, Any]] = [
        {"input": TEXTS[0]},
        {"input": TEXTS[1:3]},
        {"input": "another text", "dimensions": 32},
        {"input": TEXTS[2]},
        {"input": [TEXTS[1], "short"]},
        {"input": TEXTS[0], "prompt_name": "query"},
    ]

    def vectors(body: dict[str, Any]) -> list[np.ndarray]:
        reply = post(server, "/v1/embeddings", {"model": MODEL, "encoding_format": "float", **body})
        assert reply.status_code == 200, reply.text
        return [np.array(d["embedding"]) for d in reply.json()["data"]]

    alone = [vectors(body) for body in bodies]
    steps = embedder.stats().steps
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        with decoder_busy(embedder):
            futures = [pool.submit(vectors, body) for body in bodies]
            # A client that gives up while queued: its request is embedded and dropped, nobody else fails.
            gone = pool.submit(
                requests.post,
                server.base_url + "/v1/embeddings",
                json={"model": MODEL, "input": "I will not wait"},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=1,
            )
            # A too-long input gets its own 400 at once, not held behind (or failing) the queued batch.
            too_long = post(server, "/v1/embeddings", {"model": MODEL, "input": "word " * 1500})
            assert too_long.status_code == 400
            assert f"at most {embedder.n_ctx} " in too_long.json()["error"]["message"]
            wait_for(lambda: embedder.stats().waiting == len(bodies) + 1, "the requests to queue")
            with pytest.raises(requests.exceptions.ReadTimeout):
                gone.result(timeout=60)
        together = [f.result(timeout=120) for f in futures]
    calls = embedder.stats().steps - steps
    assert calls < len(bodies), calls  # 10 inputs of 7 requests, 4 sequences per call: 3 calls
    for want, got in zip(alone, together, strict=True):
        assert len(got) == len(want)
        for a, b in zip(want, got, strict=True):
            assert a.shape == b.shape and np.abs(a - b).max() <= F16_BOUND
    assert vectors({"input": "still serving"})


# ---- the Ollama API on an embedding model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ollama_client(server: LiveServer) -> ollama.Client:
    return ollama.Client(host=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def test_ollama_client_embeds_and_shows_an_embedding_model(
    ollama_client: ollama.Client, client: openai.OpenAI, server: LiveServer
) -> None:
    shown = ollama_client.show(MODEL)
    assert shown.capabilities == ["embedding"]  # what Ollama reports for an embedding model
    assert shown.modelinfo is not None and shown.modelinfo["qwen3.embedding_length"] == 64
    want = client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="float")
    got = ollama_client.embed(model=MODEL, input=TEXTS[:3])
    assert got.model == MODEL and got.prompt_eval_count == want.usage.prompt_tokens
    assert len(got.embeddings) == 3
    for mine, theirs in zip(got.embeddings, want.data, strict=True):
        assert np.abs(np.array(mine) - np.array(theirs.embedding)).max() <= F16_BOUND
    one = ollama_client.embed(model=MODEL, input=TEXTS[1], dimensions=32).embeddings
    assert len(one) == 1 and len(one[0]) == 32 and abs(float(np.linalg.norm(one[0])) - 1) < 1e-5
    assert len(ollama_client.embed(model=MODEL, input=TEXTS[1], dimensions=64).embeddings[0]) == 64
    assert ollama_client.embed(model=MODEL, input="").embeddings == []  # Ollama: empty input, no vectors
    legacy = ollama_client.embeddings(model=MODEL, prompt=TEXTS[0]).embedding
    assert np.abs(np.array(legacy) - np.array(got.embeddings[0])).max() <= F16_BOUND
    # Ollama truncates a too-long input unless told not to; the end token stays last.
    long = ollama_client.embed(model=MODEL, input="word " * 1500)
    assert long.prompt_eval_count == server.engine.n_ctx and len(long.embeddings) == 1
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.embed(model=MODEL, input="word " * 1500, truncate=False)
    assert refused.value.status_code == 400 and f"at most {server.engine.n_ctx} " in refused.value.error


OLLAMA_BAD: list[tuple[str, str, dict[str, Any], int]] = [
    ("input number", "/api/embed", {"input": 3}, 400),
    ("input ids", "/api/embed", {"input": [1, 2]}, 400),
    ("input mixed", "/api/embed", {"input": ["a", 1]}, 400),
    ("empty string in a list", "/api/embed", {"input": ["a", ""]}, 400),
    ("truncate a string", "/api/embed", {"input": "a", "truncate": "yes"}, 400),
    ("dimensions too small", "/api/embed", {"input": "a", "dimensions": 8}, 400),
    ("dimensions negative", "/api/embed", {"input": "a", "dimensions": -1}, 400),
    ("num_ctx too large", "/api/embed", {"input": "a", "options": {"num_ctx": 10**6}}, 400),
    ("options a list", "/api/embed", {"input": "a", "options": [1]}, 400),
    ("input object", "/api/embed", {"input": {"text": "a"}}, 400),
    ("dimensions a float", "/api/embed", {"input": "a", "dimensions": 32.0}, 400),
    ("num_ctx a string", "/api/embed", {"input": "a", "options": {"num_ctx": "big"}}, 400),
    ("keep_alive a list", "/api/embed", {"input": "a", "keep_alive": [5]}, 400),
    ("model empty", "/api/embed", {"model": "", "input": "a"}, 400),
    ("model a number", "/api/embed", {"model": 7, "input": "a"}, 400),
    ("too many inputs", "/api/embed", {"input": ["a"] * 2049}, 400),
    ("unknown model", "/api/embed", {"model": "llama3:8b", "input": "a"}, 404),
    ("prompt a list", "/api/embeddings", {"prompt": ["a"]}, 400),
    ("prompt too long", "/api/embeddings", {"prompt": "word " * 1500}, 400),
    ("prompt a number", "/api/embeddings", {"prompt": 5}, 400),
    ("legacy unknown model", "/api/embeddings", {"model": "x", "prompt": "a"}, 404),
]


@pytest.mark.parametrize(("case", "path", "body", "status"), OLLAMA_BAD, ids=[b[0] for b in OLLAMA_BAD])
def test_ollama_embed_bad_input_in_ollamas_shape(
    server: LiveServer, case: str, path: str, body: dict[str, Any], status: int
) -> None:
    reply = post(server, path, {"model": MODEL, **body})
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]
    assert post(server, "/api/embed", {"model": MODEL, "input": "still serving"}).status_code == 200


def test_a_q8_0_kv_cache_embeds_with_flash_attention(
    tmp_path_factory: pytest.TempPathFactory, reference: tuple[list[list[int]], list[np.ndarray]]
) -> None:
    """`serve --kv q8_0` on an embedding model: the embedder keeps exact attention only where it can
    (llama.cpp quantizes V only with flash attention), and the vectors stay close to an f32 cache's. The
    small demo: a q8_0 cache needs head dims divisible by 32 (every real Qwen's are; the tiny demo's: 16)."""
    ids, _ = reference
    where = tmp_path_factory.mktemp("emb") / "qwen3-embedding-small"
    small = create_demo(where, size="small", embedding=True)
    small_gguf = convert_to_gguf(small, tmp_path_factory.mktemp("emb-gguf") / "small.gguf", "f32")
    vectors = {}
    for kv in ("f32", "q8_0"):
        embedder = LlamaEmbedder(small_gguf, EngineConfig(n_ctx=4096, max_seqs=4, threads=2, kv_type=kv))
        try:
            vectors[kv] = [unit(v) for v in embedder.embed(ids[:2])]
        finally:
            embedder.shutdown()
    for exact, quantized in zip(vectors["f32"], vectors["q8_0"], strict=True):
        assert float(exact @ quantized) > 0.999
