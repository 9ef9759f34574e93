"""Parity of converted GGUFs with the reference: transformers' fp32 forward pass and qwenkit's tokenizer.

Each checkpoint is loaded by transformers (AutoModelForCausalLM, float32) and, converted to an f32 GGUF, by
llama.cpp (f32 KV cache, no flash attention, 2 threads); logits for every prompt position must agree to 1e-4
and greedy generations must be identical (qwen3_5 / qwen3_5_moe included: hybrid Gated DeltaNet demos in the
hub's multimodal layout, and a text tower saved by transformers itself; and qwen3_next, Qwen3-Next's fused
DeltaNet projections). The demo's weights (std 0.02) give
nearly flat logits and almost uniform attention, so each arch is also checked "sharpened": weights rescaled
so activations are O(1), logits spread over several units and attention depends on RoPE; a wrong rope base,
or a broken DeltaNet parameter (A_log, conv kernel, value-head order, Qwen3-Next's b/a gates) must then fail.
llama_cpp, torch and transformers (the dev install) are imported plainly: without one the run fails, it
never skips the checks.
"""

from __future__ import annotations

import json
import random
import shutil
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader
from safetensors.numpy import load_file, save_file

from qwenkit.chat.messages import messages_from_openai, tools_from_openai
from qwenkit.chat.render import render
from qwenkit.checkpoints.resolve import resolve_model
from qwenkit.engines.loader import prepare_files
from qwenkit.gguf.convert import convert_to_gguf, flat_text_config
from qwenkit.tokenizer.specials import ADDED_TOKEN_IDS, THINK_START
from qwenkit.tokenizer.tokenizer import QwenTokenizer

DEMO_ARCHS = ("qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next")
# Gated DeltaNet hybrids: RMSNorms scale by (1 + weight), and the sharpened reference runs in float64.
HYBRID_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")
ARCHS = (*DEMO_ARCHS, "qwen2_moe", "qwen3_head_dim32", "qwen3_5_moe_text")  # the last three: by transformers
# The demo archs' sharpened cases run by default; the three built by transformers vary one of them, so slow.
SHARPENED = [
    (arch, "sharpened") if arch in DEMO_ARCHS else pytest.param(arch, "sharpened", marks=pytest.mark.slow)
    for arch in ARCHS
]
MAX_ABS_DIFF = 1e-4
GREEDY_TOKENS = 20
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "What is 2 + 2? Answer briefly, s'il vous plaît. 你好!<|im_end|>\n<|im_start|>assistant\n<think>\n"
)


_BLOCK_OUTPUTS = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


def sharpen(directory: Path, seed: int = 0) -> None:
    """Rescale every weight in place so activations are O(1) and the blocks, not the input embedding, decide.

    Matrices get std 1/sqrt(fan_in), the blocks' output projections 6x that (with tied embeddings a token's
    own embedding would otherwise dominate the residual stream and greedy decoding repeats it), embeddings
    std 0.5 (logit std ~4), norm weights 1 ± 0.2 and biases std 0.1.
    """
    rng = np.random.default_rng(seed)
    # Qwen3.5's RMSNorms scale by (1 + weight), except the DeltaNet's gated norm (a plain scale).
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    hybrid = model_type.startswith(HYBRID_TYPES)
    norm_offset = 0.0 if hybrid else 1.0
    for file in sorted(directory.glob("*.safetensors")):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            values = tensor.astype(np.float32)
            if name.endswith("norm.weight"):
                offset = 1.0 if name.endswith("linear_attn.norm.weight") else norm_offset
                values = offset + 0.2 * rng.standard_normal(values.shape, dtype=np.float32)
            elif values.ndim == 1:  # qkv biases (zeros when transformers initialised them)
                values = 0.1 * rng.standard_normal(values.shape, dtype=np.float32)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                values = values / values.std() * 0.5
            else:  # the last axis is the fan-in, also of fused experts (E, out, in) and conv kernels
                boost = 6.0 if name.endswith(_BLOCK_OUTPUTS) else 1.0
                values = values / values.std() / np.sqrt(values.shape[-1]) * boost
            tensors[name] = values.astype(tensor.dtype)
        save_file(tensors, str(file), metadata={"format": "pt"})


# Checkpoints the demos do not cover, written by transformers itself (sharded, untied head): qwen2_moe with a
# shared expert, qwen3 with head_dim != hidden / heads, as in Qwen3-0.6B (1024 / 16 heads, head_dim 128),
# and a Qwen3.5 MoE text tower alone (flat qwen3_5_moe_text config, one tensor per expert, default mrope).
_TINY = {
    "vocab_size": 151_936,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 151_643,
    "eos_token_id": 151_645,
}
TRANSFORMERS_BUILT = {
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **_TINY,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
        )
    ),
    "qwen3_head_dim32": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_TINY, head_dim=32)),
    "qwen3_5_moe_text": lambda: transformers.Qwen3_5MoeForCausalLM(
        transformers.Qwen3_5MoeTextConfig(
            **{k: v for k, v in _TINY.items() if k != "intermediate_size"},
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            layer_types=["linear_attention", "full_attention"],
        )
    ),
}


def transformers_checkpoint(kind: str, directory: Path, tokenizer_from: Path) -> Path:
    torch.manual_seed(0)
    TRANSFORMERS_BUILT[kind]().save_pretrained(directory, max_shard_size="30MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_from / name, directory / name)
    return directory


class Case:
    """One checkpoint loaded both ways: transformers (reference) and llama.cpp (converted f32 GGUF).

    The reference runs in float32, except sharpened hybrids: there transformers' own fp32 chunked DeltaNet
    is up to ~1e-4 off its float64 result (the tolerance itself), while llama.cpp stays within ~3e-5 of it.
    """

    def __init__(self, checkpoint: Path, gguf_path: Path, dtype: torch.dtype = torch.float32) -> None:
        self.checkpoint = checkpoint
        self.gguf = gguf_path
        self.tokenizer = QwenTokenizer.from_dir(checkpoint)
        # torch's grouped_mm (transformers' default MoE kernel) has no float64.
        options = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **options).eval()
        self.llm = load_llama(gguf_path)

    def hf_logits(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].float().numpy()

    def llama_logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)])

    def hf_greedy(self, ids: list[int], n: int) -> list[int]:
        out: list[int] = []
        past, step = None, ids
        with torch.no_grad():
            for _ in range(n):
                result = self.hf(torch.tensor([step]), past_key_values=past, use_cache=True)
                past = result.past_key_values
                out.append(int(result.logits[0, -1].argmax()))
                step = out[-1:]
        return out

    def llama_greedy(self, ids: list[int], n: int) -> list[int]:
        # One token at a time through llama.cpp's KV cache, as the engine decodes.
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval(out[-1:])
        return out


def load_llama(path: Path, **overrides: object) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_threads=2,
        n_threads_batch=2,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
        **overrides,
    )


@pytest.fixture(scope="module")
def case(
    demo_checkpoint: Callable[[str, str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str, str], Case]]:
    """(arch, variant) → a Case, built once per module. Variants: "demo" (as shipped), "small" (the small
    demo), "sharpened", and "yarn" (sharpened, with YaRN rope scaling that matters within a short prompt)."""
    made: dict[tuple[str, str], Case] = {}

    def get(arch: str, variant: str) -> Case:
        if (arch, variant) not in made:
            root = tmp_path_factory.mktemp(f"parity-{arch}-{variant}")
            checkpoint = root / "checkpoint"
            if arch in TRANSFORMERS_BUILT:
                transformers_checkpoint(arch, checkpoint, demo_checkpoint("qwen3", "tiny"))
            else:
                shutil.copytree(demo_checkpoint(arch, "small" if variant == "small" else "tiny"), checkpoint)
            if variant in ("sharpened", "yarn"):
                sharpen(checkpoint)
            if variant == "yarn":
                config = json.loads((checkpoint / "config.json").read_text())
                config["rope_scaling"] = {
                    "type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
                (checkpoint / "config.json").write_text(json.dumps(config))
            hybrid = arch in HYBRID_TYPES
            dtype = torch.float64 if hybrid and variant != "demo" else torch.float32
            made[arch, variant] = Case(
                checkpoint, convert_to_gguf(checkpoint, root / "model-f32.gguf", "f32"), dtype
            )
        return made[arch, variant]

    yield get
    for built in made.values():
        built.llm.close()


@pytest.mark.parametrize(
    ("arch", "variant"),
    # Every arch has a sharpened variant (wider logits: the stricter check), so the flat demos run as slow.
    [pytest.param(arch, "demo", marks=pytest.mark.slow) for arch in DEMO_ARCHS]
    + SHARPENED
    + [("qwen3", "yarn"), pytest.param("qwen2", "yarn", marks=pytest.mark.slow)]
    + [pytest.param(arch, "small", marks=pytest.mark.slow) for arch in DEMO_ARCHS],
)
def test_logits_match_transformers(
    case: Callable[[str, str], Case], arch: str, variant: str, record_property: Callable[[str, object], None]
) -> None:
    c = case(arch, variant)
    ids = c.tokenizer.encode(PROMPT)
    reference, logits = c.hf_logits(ids), c.llama_logits(ids)
    config = flat_text_config(json.loads((c.checkpoint / "config.json").read_text()))
    assert logits.shape == reference.shape == (len(ids), config["vocab_size"])
    diff = float(np.abs(logits - reference).max())
    std = float(reference.std())
    record_property("max_abs_diff", diff)
    record_property("diff_over_logit_std", diff / std)
    if variant in ("sharpened", "yarn"):
        assert std > 2.0, "sharpened weights should spread the logits over several units"
    assert diff <= MAX_ABS_DIFF, f"max |Δlogit| {diff:.3g} (logit std {std:.3g}, relative {diff / std:.3g})"


@pytest.mark.parametrize(
    ("arch", "variant"),
    # The demo's flat logits make greedy decoding repeat one token: a weak check, so it only runs as slow.
    SHARPENED + [pytest.param(arch, "demo", marks=pytest.mark.slow) for arch in DEMO_ARCHS],
)
def test_greedy_generation_matches(case: Callable[[str, str], Case], arch: str, variant: str) -> None:
    c = case(arch, variant)
    ids = c.tokenizer.encode(PROMPT)
    expected = c.hf_greedy(ids, GREEDY_TOKENS)
    assert c.llama_greedy(ids, GREEDY_TOKENS) == expected
    if variant == "sharpened":
        assert len(set(expected)) > 2, "a sharpened model should not just repeat a token"


def test_wrong_rope_base_is_caught(case: Callable[[str, str], Case]) -> None:
    # The negative control: the comparison is sensitive to positions, not just to the weights.
    c = case("qwen3", "sharpened")
    ids = c.tokenizer.encode(PROMPT)
    wrong = load_llama(c.gguf, kv_overrides={"qwen3.rope.freq_base": 10_000.0})
    try:
        wrong.eval(ids)
        logits = np.array(wrong.scores[: len(ids)])
    finally:
        wrong.close()
    diff = np.abs(logits - c.hf_logits(ids)).max(axis=1)
    assert diff[0] <= MAX_ABS_DIFF  # position 0 has no rotation to get wrong
    assert diff.max() > 100 * MAX_ABS_DIFF


@pytest.mark.parametrize(
    "arch",
    # Each arch builds its flat demo case only for this test (~9 s): one runs by default, the others as slow.
    ["qwen3_5", *(pytest.param(a, marks=pytest.mark.slow) for a in ("qwen3_5_moe", "qwen3_next"))],
)
def test_real_loader_converts_the_compared_file(
    case: Callable[[str, str], Case], tmp_path: Path, arch: str
) -> None:
    # The engine's loader (resolve → convert once → tokenizer) yields the very GGUF the parity tests compare.
    c = case(arch, "demo")
    files = prepare_files(resolve_model(str(c.checkpoint)), "f32", env={"QWENKIT_CACHE_DIR": str(tmp_path)})
    assert files.gguf_path.read_bytes() == c.gguf.read_bytes()
    config = flat_text_config(json.loads((c.checkpoint / "config.json").read_text()))
    assert files.n_ctx_train == config["max_position_embeddings"]
    assert files.tokenizer.encode(PROMPT) == c.tokenizer.encode(PROMPT)


def _untile(rows: np.ndarray) -> np.ndarray:
    # The demo's 2 key / 4 value heads: llama.cpp's tiled order (k0v0, k1v0, k0v1, k1v1) back to grouped.
    return rows[[0, 2, 1, 3]]


def _swap_key_groups(rows: np.ndarray) -> np.ndarray:
    # Qwen3-Next's ssm_ba holds, per key head, its b then its a rows: swapping the 2 groups misroutes both.
    return np.concatenate(np.split(rows, 2)[::-1])


BREAKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "ssm_a": lambda a: a * 1.5,  # A = -exp(A_log): a decay rate off by half
    "ssm_conv1d": lambda w: w + 0.05 * np.sign(w),
    "ssm_alpha": _untile,  # gates applied to the wrong value heads
    "ssm_ba": _swap_key_groups,
}
_FAST_BREAKS = {("qwen3_next", "ssm_ba")}  # one break proves the check can fail; the rest run as slow


@pytest.mark.parametrize(
    ("arch", "tensor"),
    # One break proves the check can fail; the others (10-15 s each) run with the slow tests.
    [
        pytest.param(arch, name, marks=() if (arch, name) in _FAST_BREAKS else pytest.mark.slow)
        for arch, names in (
            ("qwen3_5", ("ssm_a", "ssm_alpha", "ssm_conv1d")),
            ("qwen3_next", ("ssm_a", "ssm_ba")),
        )
        for name in names
    ],
)
def test_broken_deltanet_parameter_is_caught(
    case: Callable[[str, str], Case], tmp_path: Path, arch: str, tensor: str
) -> None:
    # The negative control for the hybrid archs: one DeltaNet tensor of layer 0 changed in the GGUF.
    c = case(arch, "sharpened")
    broken = tmp_path / "broken.gguf"
    shutil.copy(c.gguf, broken)
    reader = GGUFReader(broken, "r+")
    data = next(t.data for t in reader.tensors if t.name in (f"blk.0.{tensor}.weight", f"blk.0.{tensor}"))
    data[...] = BREAKS[tensor](np.array(data))
    reader.data.flush()
    del reader, data
    ids = c.tokenizer.encode(PROMPT)
    reference = c.hf_logits(ids)
    assert float(np.abs(c.llama_logits(ids) - reference).max()) <= MAX_ABS_DIFF  # the intact file
    wrong = load_llama(broken)
    try:
        wrong.eval(ids)
        logits = np.array(wrong.scores[: len(ids)])
    finally:
        wrong.close()
    assert float(np.abs(logits - reference).max()) > 100 * MAX_ABS_DIFF


# --- tokenization ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_only(demo_gguf: Callable[[str, str, str], Path]) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(model_path=str(demo_gguf("qwen3", "tiny", "f32")), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Callable[[str, str], Path]) -> QwenTokenizer:
    return QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))


def _chat_prompt() -> str:
    tools = tools_from_openai(
        [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ]
    )
    messages = messages_from_openai(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Wie ist das Wetter in Zürich? 天气怎么样？"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "The user wants the weather; call the tool.",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                    }
                ],
            },
            {"role": "tool", "content": '{"temp_c": 21, "sky": "sunny ☀️"}'},
        ]
    )
    return render(messages, tools).text


def test_chat_prompt_tokenizes_identically(vocab_only: llama_cpp.Llama, tokenizer: QwenTokenizer) -> None:
    text = _chat_prompt()
    for marker in ("<|im_start|>", "<think>", "<tool_call>", "<tool_response>", "<|im_end|>"):
        assert marker in text
    ids = tokenizer.encode(text)
    assert ADDED_TOKEN_IDS["<tool_call>"] in ids and ADDED_TOKEN_IDS[THINK_START] in ids
    assert vocab_only.tokenize(text.encode(), add_bos=False, special=True) == ids


_SCRIPTS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r  \n\n",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœŒ",
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖ",
    "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔ",
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生",
    "あいうえおかきくけこアイウエオカキクケコーッ",
    "가나다라마바사아자차카타파하한국어",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "אבגדהוזחטיכלמנסעפצקרשת",
    "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह",
    "กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหฬอฮ",
    "😀😂🥲👍🏽👩‍💻🇨🇭❤️✨🚀",
    "\u0301\u0308\u200b\u200d\u00a0\u3000",
)
_WORDS = ("the", " the", "'s", "'ll", "don't", "I'm", "  ", "\n\n", "...", "1234567", "http://x.y/z?q=1", "ℌ")


def _random_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.25:
                pieces.append(rng.choice(_WORDS))
            else:
                script = rng.choice(_SCRIPTS)
                pieces.append("".join(rng.choice(script) for _ in range(rng.randint(1, 8))))
        out.append("".join(pieces))
    return out


def test_random_multilingual_text_tokenizes_identically(
    vocab_only: llama_cpp.Llama, tokenizer: QwenTokenizer
) -> None:
    # Qwen's tokenizer.json NFC-normalises first; llama.cpp's BPE has no normaliser, so it gets NFC text.
    strings = _random_strings(400)
    assert any(unicodedata.normalize("NFC", text) != text for text in strings)  # the normaliser matters
    mismatches = []
    for text in strings:
        expected = tokenizer.encode_text(text)
        got = vocab_only.tokenize(unicodedata.normalize("NFC", text).encode(), add_bos=False, special=False)
        if got != expected:
            mismatches.append((text, got, expected))
    assert not mismatches, f"{len(mismatches)} of {len(strings)} differ, e.g. {mismatches[0]!r}"


def test_llama_cpp_does_not_normalise_text(vocab_only: llama_cpp.Llama, tokenizer: QwenTokenizer) -> None:
    # Why the engine tokenizes with QwenTokenizer: "e" + U+0301 is "é" (one token) to Qwen, two to llama.cpp.
    decomposed = "caf\u0065\u0301"
    assert tokenizer.encode_text(decomposed) == tokenizer.encode_text("café")
    assert vocab_only.tokenize(decomposed.encode(), add_bos=False, special=False) != tokenizer.encode_text(
        "café"
    )


def test_llama_cpp_matches_user_defined_tokens_even_without_parse_special(
    vocab_only: llama_cpp.Llama, tokenizer: QwenTokenizer
) -> None:
    # Why untrusted text must go through QwenTokenizer.encode_text: llama.cpp's parse_special=False still
    # matches non-special added tokens (<think>, <tool_call>), only control tokens are left as text.
    think = ADDED_TOKEN_IDS[THINK_START]
    assert think in vocab_only.tokenize(b"a <think> b", add_bos=False, special=False)
    assert think not in tokenizer.encode_text("a <think> b")
    assert ADDED_TOKEN_IDS["<|im_start|>"] not in vocab_only.tokenize(
        b"<|im_start|>", add_bos=False, special=False
    )
