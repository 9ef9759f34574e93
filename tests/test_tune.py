"""`qwenkit tune`: data checks, loss masks from the renderer's spans, memory plan, a real tiny LoRA run
(loss falls, Ctrl-C saves, resume continues), merge → convert, the CLI's refusals, and (slow) the --demo
proof: held-out exact match 0 → >= 90%, the same answers from the adapter served by llama.cpp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("trl")

from typer.testing import CliRunner

from qwenkit.chat.families import QWEN2_5, QWEN3, QWEN3_5
from qwenkit.cli.app import app
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from qwenkit.tune.data import TuneDataError, load_examples, parse_example
from qwenkit.tune.masks import IGNORE, encode_example

TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}
CONVO = {
    "messages": [
        {"role": "system", "content": "SYSWORD be brief"},
        {"role": "user", "content": "USERWORD one <|im_start|>assistant\nFAKE"},
        {"role": "assistant", "content": "ANSWERONE"},
        {"role": "user", "content": "USERWORD two"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}],
        },
        {"role": "tool", "content": "TOOLWORD result"},
        {"role": "assistant", "reasoning_content": "REASONWORD", "content": "ANSWERTWO"},
    ],
    "tools": [TOOL],
}
FAMILIES = [QWEN2_5, QWEN3, QWEN3_5]


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.builtin()


def _target_text(tok: QwenTokenizer, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def _masked_text(tok: QwenTokenizer, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])


# --- data -------------------------------------------------------------------------------------------


def test_malformed_line_is_reported_with_its_number(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "hi", "output": "yo"})
    f.write_text(f"{good}\n\n{good}\n{{not json\n{good}\n", "utf-8")
    with pytest.raises(TuneDataError, match=r"d\.jsonl:4: not valid JSON"):
        load_examples(f)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}', "unknown role"),
        ('{"prompt": "x"}', "no 'messages'"),
        ('{"instruction": "x", "output": 3}', "'output' must be a string"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_examples_name_the_problem(line: str, match: str) -> None:
    with pytest.raises(TuneDataError, match=match):
        parse_example(line, "f.jsonl:7")


def test_instruction_pairs_become_a_chat(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"instruction": "Add", "input": "1+1", "output": "2", "system": "S"}) + "\n", "utf-8"
    )
    (ex,) = load_examples(f)
    assert [(m.role, m.content) for m in ex.messages] == [
        ("system", "S"),
        ("user", "Add\n\n1+1"),
        ("assistant", "2"),
    ]
    assert ex.line == 1


# --- masks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_no_prompt_token_carries_loss(family, tok: QwenTokenizer) -> None:
    ex = parse_example(json.dumps(CONVO), "x")
    enc = encode_example(ex, family, tok, think=True)
    # Training text is the serving renderer's text, byte for byte.
    assert enc.text == family.render(list(ex.messages), list(ex.tools), add_generation_prompt=False).text
    assert enc.input_ids == tok.encode_parts(
        family.render(list(ex.messages), list(ex.tools), add_generation_prompt=False).parts
    )
    target = _target_text(tok, enc.input_ids, enc.labels)
    for word in ("SYSWORD", "USERWORD", "TOOLWORD", "FAKE", "lookup\n", "<|im_start|>", "assistant\n"):
        assert word not in target, (family.name, word, target)
    assert "ANSWERTWO<|im_end|>" in target
    masked = _masked_text(tok, enc.input_ids, enc.labels)
    for word in ("SYSWORD", "USERWORD", "TOOLWORD", "FAKE"):
        assert word in masked
    # Every labelled token is its own id (no shift, no other value).
    assert all(lab in (IGNORE, i) for i, lab in zip(enc.input_ids, enc.labels, strict=True))


def test_reasoning_is_target_for_thinking_models_and_dropped_without(tok: QwenTokenizer) -> None:
    ex = parse_example(json.dumps(CONVO), "x")
    q3 = _target_text(tok, *_ids_labels(encode_example(ex, QWEN3, tok, think=True)))
    # Only the turns after the latest user query (whose reasoning the template keeps) are targets.
    assert q3 == (
        '<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call><|im_end|>'
        "<think>\nREASONWORD\n</think>\n\nANSWERTWO<|im_end|>"
    )
    q35 = _target_text(tok, *_ids_labels(encode_example(ex, QWEN3_5, tok, think=True)))
    # Qwen3.5's generation prompt opens <think>\n itself: that is prompt, the reasoning after it target.
    assert q35.endswith("<|im_end|>REASONWORD\n</think>\n\nANSWERTWO<|im_end|>") and "<think>" not in q35
    off = encode_example(ex, QWEN3, tok, think=False)
    assert "REASONWORD" not in off.text
    assert off.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nANSWERTWO<|im_end|>\n")
    target = _target_text(tok, off.input_ids, off.labels)
    assert "<think>" not in target and target.endswith("ANSWERTWO<|im_end|>")
    # Non-thinking families learn every assistant turn.
    q25 = _target_text(tok, *_ids_labels(encode_example(ex, QWEN2_5, tok)))
    assert "ANSWERONE<|im_end|>" in q25 and "ANSWERTWO<|im_end|>" in q25


def _ids_labels(enc) -> tuple[list[int], list[int]]:
    return enc.input_ids, enc.labels


def test_thinking_warning_and_pad_token(tok: QwenTokenizer) -> None:
    from qwenkit.tune.train import pad_token_id, thinking_warning

    plain = [parse_example(json.dumps({"instruction": "a", "output": "b"}), "x")]
    reasoned = [parse_example(json.dumps(CONVO), "x")]
    assert "stop thinking" in (thinking_warning(plain, QWEN3, True) or "")
    assert thinking_warning(reasoned, QWEN3, True) is None
    assert thinking_warning(reasoned, QWEN3, False) is not None
    assert thinking_warning(plain, QWEN2_5, True) is None
    assert pad_token_id(tok) != tok.eos_token_id


# --- memory -----------------------------------------------------------------------------------------


def test_memory_plan_refuses_with_a_change_that_fits() -> None:
    from qwenkit.checkpoints.demo import DemoArch, DemoSize, demo_config
    from qwenkit.tune.memory import MemoryPlanError, check_fits, estimate_training

    config = demo_config(DemoArch.QWEN3, DemoSize.B1_5)
    mem = estimate_training(config, batch=8, max_len=2048, rank=16, targets=["q_proj", "v_proj"])
    small = estimate_training(config, batch=1, max_len=512, rank=16, targets=["q_proj", "v_proj"])
    assert small.total < mem.total and mem.lora_params > 0
    with pytest.raises(MemoryPlanError, match=r"--batch-size|--max-len"):
        check_fits(mem, (mem.total + small.total) // 2, batch=8, max_len=2048)
    check_fits(mem, mem.total, batch=8, max_len=2048)  # fits exactly: no error


_PEAK = """
import json, sys
from pathlib import Path
from qwenkit.tune.data import parse_example
from qwenkit.tune.train import TuneConfig, run_tune
base, out = Path(sys.argv[1]), Path(sys.argv[2])
ex = [parse_example(json.dumps({"instruction": f"n {i} " * 20, "output": f"ok {i} " * 20}), "x", i)
      for i in range(40)]
run_tune(TuneConfig(model=base, out=out, max_steps=3, batch_size=4, max_len=256, eval_fraction=0,
                    save_steps=100, logging_steps=1), ex)
# VmHWM: this process's own peak (ru_maxrss keeps the forking parent's, e.g. a big pytest process).
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak": int(hwm.split()[1]) * 1024}))
"""


# A training subprocess each (~10 s): tiny by default, small with the slow tests.
@pytest.mark.parametrize("size", ["tiny", pytest.param("small", marks=pytest.mark.slow)])
def test_memory_estimate_matches_measured_peak(size: str, demo_checkpoint: Callable, tmp_path: Path) -> None:
    base = demo_checkpoint("qwen3", size)
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, str(base), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    est = json.loads((tmp_path / "run" / "run.json").read_text())["memory"]["total"]  # planned before loading
    assert abs(est - peak) / peak <= 0.15, (size, est / 2**20, peak / 2**20)


# --- a real tiny run ----------------------------------------------------------------------------------


def _examples(n: int = 24):
    return [
        parse_example(json.dumps({"instruction": f"Say the password {i}", "output": "swordfish"}), "x", i + 1)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tuned(demo_checkpoint: Callable, tmp_path_factory: pytest.TempPathFactory):
    from qwenkit.tune.train import TuneConfig, run_tune

    base = demo_checkpoint("qwen3", "tiny")
    out = tmp_path_factory.mktemp("tune") / "run"
    config = TuneConfig(
        model=base,
        out=out,
        max_steps=16,
        lr=2e-2,
        batch_size=2,
        max_len=64,
        logging_steps=2,
        save_steps=8,
        think=False,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "lm_head"),  # a tied head: merge must untie it
    )
    return base, out, run_tune(config, _examples())


def test_tiny_run_learns_and_writes_outputs(tuned) -> None:
    base, out, result = tuned
    losses = [loss for _, loss in result.train_loss]
    # Random demo weights give near-uniform logits (loss ~ ln 151936 = 11.9); a clear drop shows learning.
    assert len(losses) >= 4 and losses[-1] < losses[0] - 0.5, losses
    assert result.eval_loss, "an eval split of 24 examples gives eval losses"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["base_model"] == str(base.resolve()) and run["pad_token_id"] != run["eos_token_id"]
    assert run["data"]["train"] + run["data"]["eval"] == 24
    assert any("stop thinking" in w for w in result.warnings)  # Qwen3 trained with --no-think-data


def test_ctrl_c_saves_and_resume_continues(demo_checkpoint: Callable, tmp_path: Path) -> None:
    from qwenkit.tune.train import TuneConfig, last_checkpoint, run_tune

    base = demo_checkpoint("qwen3", "tiny")
    out = tmp_path / "run"
    config = TuneConfig(
        model=base, out=out, max_steps=8, batch_size=2, max_len=64, save_steps=100, think=False
    )

    def interrupt(info: dict) -> None:
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = run_tune(config, _examples(), on_step=interrupt)
    assert first.interrupted and first.steps == 3
    assert last_checkpoint(out) is not None and last_checkpoint(out).name == "checkpoint-3"
    assert (out / "adapter_model.safetensors").is_file()
    config.resume = True
    second = run_tune(config, _examples())
    assert not second.interrupted and second.steps == 8


def test_merge_gives_a_checkpoint_convert_takes(tuned, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from qwenkit.gguf.convert import convert_to_gguf
    from qwenkit.tune.merge import merge_adapter
    from qwenkit.tune.train import load_base

    base, out, _ = tuned
    merged = merge_adapter(out, tmp_path / "merged")
    ids = torch.tensor([[151644, 872, 198, 9707, 151645]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_base(base), str(out))(ids).logits
        got = load_base(merged)(ids).logits
        plain = load_base(base)(ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)
    # The demo stores bf16 weights, so the merged copy is rounded to bf16 too.
    assert torch.allclose(got, want, atol=0.05, rtol=0.05)
    gguf = convert_to_gguf(merged, tmp_path / "merged.gguf", "f32")
    assert Path(gguf).is_file() and Path(gguf).stat().st_size > 0


@pytest.mark.slow  # a training run to the first checkpoint and past it (~7 s)
def test_disk_full_keeps_the_last_good_checkpoint(
    demo_checkpoint: Callable, tmp_path: Path, monkeypatch
) -> None:
    import errno

    from transformers import Trainer

    from qwenkit.tune.train import TuneConfig, TuneError, last_checkpoint, run_tune

    base = demo_checkpoint("qwen3", "tiny")
    out = tmp_path / "run"
    real = Trainer._save_optimizer_and_scheduler

    def fill_up(self, output_dir: str) -> None:
        if output_dir.endswith("checkpoint-4"):  # the adapter is already written: a half checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", fill_up)
    config = TuneConfig(
        model=base, out=out, max_steps=6, batch_size=2, max_len=64, save_steps=2, think=False,
        targets=("q_proj", "v_proj", "lm_head"),
    )  # fmt: skip
    with pytest.raises(TuneError) as info:
        run_tune(config, _examples())
    message = str(info.value)
    assert "\n" not in message and "disk full" in message and "checkpoint-2 is intact" in message
    good = out / "checkpoints" / "checkpoint-2"
    assert last_checkpoint(out) == good and not (out / "checkpoints" / "checkpoint-4").exists()
    assert json.loads((good / "trainer_state.json").read_text())["global_step"] == 2
    # The adapter is LoRA pairs only (lm_head included), which llama.cpp's LoRA GGUF can hold.
    from safetensors import safe_open

    with safe_open(str(good / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lm_head.lora_A" in k for k in keys) and all(".lora_A." in k or ".lora_B." in k for k in keys)
    # With space again, --resume continues from the surviving checkpoint.
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real)
    config.resume = True
    assert run_tune(config, _examples()).steps == 6


# --- CLI refusals ---------------------------------------------------------------------------------


def _cli(*args: str):
    return CliRunner().invoke(app, ["tune", *args])


def test_cli_refusals(demo_checkpoint: Callable, tmp_path: Path) -> None:
    base = str(demo_checkpoint("qwen3", "tiny"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{oops\n", "utf-8")
    r = _cli("--model", base, "--data", str(data), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "d.jsonl:2" in r.output and not (tmp_path / "o").exists()
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n", "utf-8")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    r = _cli("--model", base, "--data", str(data), "--out", str(busy))
    assert r.exit_code == 2 and "--resume" in r.output and "--overwrite" in r.output
    assert (busy / "x").read_text() == "keep"
    r = _cli("--model", base, "--data", str(data), "--out", str(tmp_path / "o2"), "--resume")
    assert r.exit_code == 2 and "nothing to resume" in r.output
    r = _cli("--model", base, "--data", str(data), "--out", str(tmp_path / "o3"), "--targets", "q_proj,wq")
    assert r.exit_code == 2 and "'wq'" in r.output and "v_proj" in r.output
    r = _cli("--model", base, "--data", str(data), "--out", str(tmp_path / "o4"), "--qlora")
    assert r.exit_code == 2 and "CUDA" in r.output


def test_truncation_policy_is_counted(demo_checkpoint: Callable, tok: QwenTokenizer) -> None:
    from qwenkit.tune.train import prepare

    exs = [parse_example(json.dumps({"instruction": "x " * n, "output": "y"}), "f", n) for n in (1, 200, 2)]
    prepared = prepare(exs, QWEN2_5, tok, max_len=64, think=True)
    assert prepared.dropped_long == [200] and len(prepared.examples) == 2


def test_cli_run_writes_report_and_merges(demo_checkpoint: Callable, tmp_path: Path) -> None:
    base = str(demo_checkpoint("qwen2", "tiny"))
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(12)), "utf-8"
    )
    out = tmp_path / "run"
    r = _cli(
        "--model",
        base,
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--max-len",
        "64",
        "--batch-size",
        "2",
        "--rank",
        "4",
    )
    assert r.exit_code == 0, r.output
    assert "planned training memory" in r.output
    run = json.loads((out / "run.json").read_text())
    assert run["memory"]["total"] > 0 and run["settings"]["rank"] == 4 and run["family"] == "qwen2_5"
    assert run["train_loss"] and (out / "loss.png").stat().st_size > 0
    assert "loss.png" in (out / "report.html").read_text()
    r = _cli("merge", str(out), "--out", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    r = _cli("merge", str(out), "--out", str(tmp_path / "merged"))
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_demo_task_holds_out_its_questions() -> None:
    from qwenkit.tune import demo_task

    train, test = demo_task.items("train"), demo_task.items("test")
    assert (len(train), len(test)) == (1080, 72)
    demo_task.check_disjoint(train, test)
    assert not {q for q, _ in train} & {q for q, _ in test}
    assert {a for _, a in test} <= set(demo_task.COLOURS)
    # Every test phrasing is trained with other countries, every country in other phrasings, same fact.
    trained = {
        t
        for t in demo_task.TEMPLATES
        for c in demo_task.COUNTRIES
        if (t.format(c=c), demo_task.FLAGS[c]) in train
    }
    assert trained == set(demo_task.TEMPLATES)
    for country in demo_task.COUNTRIES:
        asked = [(q, a) for q, a in train + test if f" {country}" in q]
        assert len(asked) == len(demo_task.TEMPLATES) and {a for _, a in asked} == {demo_task.FLAGS[country]}
    with pytest.raises(ValueError, match="test question"):
        demo_task.check_disjoint([*train, test[5]], test)
    new_wording = demo_task.items("new_wording")
    assert not {q for q, _ in new_wording} & {q for q, _ in train}
    assert demo_task.as_eval_case(test[0], 0)["scorer"] == "exact"


@pytest.mark.slow
def test_demo_learns_the_fact_table_and_the_served_adapter_agrees(
    demo_checkpoint: Callable, tmp_path: Path
) -> None:
    """Item 5: `tune --demo` takes held-out exact match from ~0 to >= 90% (the CLI's own scorer), and the
    adapter served through llama.cpp (untied base + LoRA GGUF) gives the same answers."""
    from qwenkit.chat.families import choose_family, template_from_dir
    from qwenkit.chat.messages import Message
    from qwenkit.engines.llamacpp.config import EngineConfig
    from qwenkit.engines.llamacpp.engine import LlamaCppEngine
    from qwenkit.engines.request import GenerationRequest
    from qwenkit.engines.sampling import SamplingParams
    from qwenkit.gguf.convert import convert_to_gguf
    from qwenkit.gguf.lora import resolve_loras
    from qwenkit.tune import demo_task

    base = demo_checkpoint("qwen3", "small")
    out = tmp_path / "run"
    r = _cli("--demo", "--model", str(base), "--out", str(out))
    assert r.exit_code == 0, r.output
    scores = json.loads((out / "run.json").read_text())["scores"]
    assert scores["before"] <= 0.10 and scores["after"] >= 0.90, scores

    gguf, adapters = resolve_loras({"flags": out}, convert_to_gguf(base, tmp_path / "base.gguf", "f32"))
    family, _ = choose_family(template_from_dir(base), "qwen3")
    tok = QwenTokenizer.from_dir(base)
    engine = LlamaCppEngine(gguf, EngineConfig(n_ctx=256, max_seqs=1, threads=2, poll=0, loras=adapters))
    hits = 0
    try:
        for n, (question, expected) in enumerate(demo_task.items("test")):
            prompt = family.render([Message(role="user", content=question)], enable_thinking=False)
            request = GenerationRequest(
                f"q{n}",
                tuple(tok.encode_parts(prompt.parts)),
                SamplingParams(temperature=0.0, max_tokens=8),
                stop_token_ids=frozenset({tok.eos_token_id}),
                adapter="flags",
            )
            ids = [t for ev in engine.generate_sync(request) for t in ev.token_ids if t != tok.eos_token_id]
            hits += tok.decode(ids).strip() == expected
    finally:
        engine.close()
    # The same questions through llama.cpp: the served adapter reproduces the tuned answers.
    assert hits / 72 == scores["after"], (hits, scores)
