"""One LoRA / QLoRA SFT run: data → masked sequences → TRL SFTTrainer + peft → adapter, report, run JSON.

Contract: run_tune(config, examples) trains a PEFT LoRA adapter on the checkpoint at config.model and writes
into config.out: adapter_model.safetensors + adapter_config.json, run.json (settings, data counts, losses,
before/after scores when given), loss.png and report.html, and checkpoints/checkpoint-N (resumable with
resume=True). An out directory that already holds files is refused unless resume or overwrite. The pad token
is never EOS (<|endoftext|> stands in), so the model still learns to stop. An unknown --targets name fails
with one line listing the model's linear layers; --qlora without CUDA fails before loading. The first Ctrl-C
saves a checkpoint and the adapter at the next step and stops cleanly; a second one aborts. Checkpoints are
written by the trainer's own save; a full disk stops the run with one TuneError naming the last complete
checkpoint (kept intact; the half-written one is removed), from which --resume continues.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import random
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.chat.families import ChatFamily, choose_family, template_from_dir
from qwenkit.hardware import memory_info
from qwenkit.paths import atomic_write
from qwenkit.tokenizer.specials import ENDOFTEXT
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from qwenkit.tune.data import Example
from qwenkit.tune.masks import IGNORE, Encoded, Prepared, encode_example
from qwenkit.tune.memory import TrainingMemory, check_fits, estimate_training


class TuneError(ValueError):
    """A run that cannot start or continue; the message is one line naming the fix."""


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TuneConfig:
    model: Path
    out: Path
    epochs: float = 3.0
    lr: float = 2e-4
    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = DEFAULT_TARGETS
    max_len: int = 1024
    batch_size: int = 4
    eval_fraction: float = 0.1
    packing: bool = True
    think: bool = True
    qlora: bool = False
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    threads: int = 2
    max_steps: int = -1
    save_steps: int = 50
    logging_steps: int = 5
    # Whole modules trained beside LoRA (peft modules_to_save), e.g. the demo's final "norm".
    also_train: tuple[str, ...] = ()
    # Embedding rows trained beside LoRA (peft trainable_token_indices), e.g. the demo's answer tokens.
    train_tokens: tuple[int, ...] = ()


@dataclass
class RunResult:
    out: Path
    steps: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing, non-empty out directory unless resuming or overwriting (which empties it)."""
    if resume and overwrite:
        raise TuneError("--resume and --overwrite contradict each other: pick one")
    if out.exists() and not out.is_dir():
        raise TuneError(f"{out} is a file: pass a directory to --out")
    busy = out.is_dir() and any(out.iterdir())
    if resume:
        if not last_checkpoint(out):
            raise TuneError(f"nothing to resume in {out}: it has no checkpoints/checkpoint-N; drop --resume")
    elif busy and not overwrite:
        raise TuneError(
            f"{out} already exists: pass --resume to continue that run or --overwrite to replace it"
        )
    elif busy:
        shutil.rmtree(out)


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete trainer checkpoint under out/checkpoints, or None."""
    root = out / "checkpoints"
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None) if root.is_dir() else None


def prepare(
    examples: Sequence[Example], family: ChatFamily, tokenizer: QwenTokenizer, *, max_len: int, think: bool
) -> Prepared:
    """Encode every example; those longer than max_len are dropped and counted (masks.py's policy)."""
    prepared = Prepared()
    for ex in examples:
        enc = encode_example(ex, family, tokenizer, think=think)
        if len(enc.input_ids) > max_len:
            prepared.dropped_long.append(ex.line)
            continue
        if all(label == IGNORE for label in enc.labels):
            continue
        prepared.examples.append(enc)
        prepared.tokens += len(enc.input_ids)
        prepared.target_tokens += sum(label != IGNORE for label in enc.labels)
    return prepared


def split_eval(examples: list[Encoded], fraction: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """(train, eval): a seeded shuffle; eval gets fraction of them (none with fewer than 10 examples)."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_eval = int(len(order) * fraction) if len(order) >= 10 else 0
    return order[n_eval:], order[:n_eval]


def thinking_warning(examples: Sequence[Example], family: ChatFamily, think: bool) -> str | None:
    """The warning for a thinking model trained only on answers without reasoning (it loses thinking)."""
    if family.thinks and (not think or not any(ex.has_reasoning for ex in examples)):
        why = "--no-think-data renders them" if not think else "no example has reasoning, so all train"
        return (
            f"{family.title} is a thinking model but {why} in non-thinking mode: the tuned model may stop "
            "thinking; add reasoning_content (or <think> blocks) to keep it"
        )
    return None


def pad_token_id(tokenizer: QwenTokenizer) -> int:
    """A pad id that is not EOS: the checkpoint's pad token, else <|endoftext|>."""
    pad = tokenizer.pad_token_id
    if pad is None or pad == tokenizer.eos_token_id:
        pad = tokenizer.special_id(ENDOFTEXT)
    if pad == tokenizer.eos_token_id:
        raise TuneError(
            "the tokenizer's pad token is its EOS token; give the checkpoint a distinct pad_token"
        )
    return pad


def linear_names(model: Any) -> list[str]:
    """The distinct leaf names of the model's Linear layers (what --targets may name), lm_head included: a
    LoRA pair on the output head is what lets a random or frozen head learn new answer tokens."""
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def check_targets(targets: Sequence[str], valid: Sequence[str]) -> None:
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise TuneError(
            f"unknown target module {unknown[0]!r}: this model's linear layers are {', '.join(valid)}"
        )


def check_qlora(qlora: bool) -> None:
    if not qlora:
        return
    import torch

    if not torch.cuda.is_available():
        raise TuneError(
            "--qlora needs a CUDA GPU (bitsandbytes 4-bit); on CPU drop --qlora to train plain LoRA"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TuneError("--qlora needs bitsandbytes: pip install bitsandbytes") from None


def load_base(path: Path, *, qlora: bool = False) -> Any:
    """The checkpoint as a transformers causal LM (float32 on CPU; 4-bit NF4 with qlora on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            ),
            "device_map": "auto",
        }
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def _dataset(rows: Sequence[Encoded]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})


def _trainer_class() -> Any:
    """SFTTrainer whose loss computes the LM head only at the tokens that carry loss: with Qwen's 151k-row
    vocabulary that head dominates a step, and most positions are masked prompt."""
    import torch
    from trl import SFTTrainer

    class Trainer(SFTTrainer):  # type: ignore[misc]
        def __init__(self, *args: Any, model: Any, **kwargs: Any) -> None:
            # TRL refuses a LoRA on lm_head because its fused loss reads lm_head.weight directly; the loss
            # below calls the adapted head itself, so that one check is hidden during construction.
            model.get_output_embeddings = lambda: None
            try:
                super().__init__(*args, model=model, **kwargs)
            finally:
                del model.get_output_embeddings

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            from transformers.modeling_outputs import CausalLMOutput

            inputs = dict(inputs)
            labels = inputs.pop("labels")
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            # The backbone (LoRA layers are injected in place), then the head only at the labelled tokens.
            hidden = getattr(base, base.base_model_prefix)(**inputs, use_cache=False).last_hidden_state
            target = labels[:, 1:]
            where = target != IGNORE
            logits = base.get_output_embeddings()(hidden[:, :-1][where]).float()
            total = torch.nn.functional.cross_entropy(logits, target[where], reduction="sum")
            count = num_items_in_batch if num_items_in_batch is not None else where.sum()
            loss = total / torch.as_tensor(count, dtype=total.dtype, device=total.device).clamp(min=1)
            return (loss, CausalLMOutput(loss=loss, logits=logits[None])) if return_outputs else loss

    return Trainer


class _Stop:
    """First Ctrl-C: ask the trainer to checkpoint and stop at the next step; second: abort."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> _Stop:
        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._old = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _callback(
    stop: _Stop, on_log: Callable[[dict[str, Any]], None], on_step: Callable[[dict[str, Any]], None] | None
) -> Any:
    from transformers import TrainerCallback

    class Callback(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if on_step is not None:
                on_step(
                    {
                        "step": state.global_step,
                        "max_steps": state.max_steps,
                        "tokens": int(getattr(state, "num_input_tokens_seen", 0) or 0),
                    }
                )
            if stop.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            on_log({"step": state.global_step, "max_steps": state.max_steps, **(logs or {})})

    return Callback()


def run_tune(
    config: TuneConfig,
    examples: Sequence[Example],
    *,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[TrainingMemory], None] | None = None,
) -> RunResult:
    """Train (see the module docstring); on_event gets each trainer log dict (step, loss, ...), on_step
    each finished step (step, max_steps, tokens seen), on_start the step total and split sizes, on_plan the
    memory plan (made, and checked against available memory, before the model loads)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig

    check_qlora(config.qlora)
    check_out_dir(config.out, resume=config.resume, overwrite=config.overwrite)
    torch.set_num_threads(config.threads)
    family, warnings = choose_family(template_from_dir(config.model), _model_type(config.model))
    tokenizer = QwenTokenizer.from_dir(config.model)
    pad = pad_token_id(tokenizer)
    if (w := thinking_warning(examples, family, config.think)) is not None:
        warnings.append(w)
    prepared = prepare(examples, family, tokenizer, max_len=config.max_len, think=config.think)
    if prepared.dropped_long:
        lines = ", ".join(map(str, prepared.dropped_long[:5]))
        warnings.append(
            f"{len(prepared.dropped_long)} of {len(examples)} examples are longer than --max-len "
            f"{config.max_len} tokens and were skipped (never cut), e.g. line {lines}"
        )
    if not prepared.examples:
        raise TuneError(f"no example fits in --max-len {config.max_len} tokens: raise --max-len")
    train_rows, eval_rows = split_eval(prepared.examples, config.eval_fraction, config.seed)
    memory = estimate_training(
        json.loads((config.model / "config.json").read_text("utf-8")),
        batch=config.batch_size,
        max_len=config.max_len,
        rank=config.rank,
        targets=config.targets,
        qlora=config.qlora,
        target_share=prepared.target_tokens / max(prepared.tokens, 1),
    )
    check_fits(memory, memory_info().available, batch=config.batch_size, max_len=config.max_len)
    if on_plan is not None:
        on_plan(memory)
    model = load_base(config.model, qlora=config.qlora)
    model.config.pad_token_id = pad
    check_targets(config.targets, linear_names(model))
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        modules_to_save=list(config.also_train) or None,
        trainable_token_indices=list(config.train_tokens) or None,
    )
    model = get_peft_model(model, lora)
    # peft would also save a full copy of a tied embedding when lm_head is a target; the adapter stays
    # lora_A/lora_B pairs only (what llama.cpp's LoRA GGUF holds).
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    events: list[dict[str, Any]] = []

    def on_log(logs: dict[str, Any]) -> None:
        events.append(logs)
        if on_event is not None:
            on_event(logs)

    args = SFTConfig(
        output_dir=str(config.out / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        max_length=config.max_len,
        packing=config.packing,
        packing_strategy="bfd",
        eval_strategy="steps" if eval_rows else "no",
        eval_steps=config.logging_steps * 4,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=config.seed,
        lr_scheduler_type="linear",
        warmup_steps=0,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL's default is on: a recompute the small CPU runs do not need
        include_num_input_tokens_seen="all",
        prediction_loss_only=True,  # eval needs the loss only, not every batch's logits kept in memory
    )
    with _Stop() as stop:
        trainer = _trainer_class()(
            model=model,
            args=args,
            train_dataset=_dataset(train_rows),
            eval_dataset=_dataset(eval_rows) if eval_rows else None,
            processing_class=_hf_tokenizer(config.model, pad),
            callbacks=[_callback(stop, on_log, on_step)],
        )
        if on_start is not None:
            on_start({"max_steps": trainer.args.max_steps, "train": len(train_rows), "eval": len(eval_rows)})
        with _disk_full_stops(config.out):
            trainer.train(resume_from_checkpoint=str(last_checkpoint(config.out)) if config.resume else None)
        interrupted = stop.requested
    with _disk_full_stops(config.out):
        trainer.save_model(str(config.out))
    result = RunResult(
        out=config.out,
        steps=trainer.state.global_step,
        train_loss=[(e["step"], e["loss"]) for e in events if "loss" in e],
        eval_loss=[(e["step"], e["eval_loss"]) for e in events if "eval_loss" in e],
        interrupted=interrupted,
        warnings=warnings,
    )
    run = {
        "base_model": str(config.model.resolve()),
        "family": family.name,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "data": {
            "examples": len(examples),
            "used": len(prepared.examples),
            "dropped_too_long": len(prepared.dropped_long),
            "train": len(train_rows),
            "eval": len(eval_rows),
            "tokens": prepared.tokens,
            "target_tokens": prepared.target_tokens,
            "truncation_policy": "examples longer than --max-len are skipped, never cut",
        },
        "steps": result.steps,
        "interrupted": interrupted,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "log_history": trainer.state.log_history,
        "warnings": warnings,
        "pad_token_id": pad,
        "eos_token_id": tokenizer.eos_token_id,
        "memory": memory.as_dict(),
    }
    write_run(config.out, run)
    return result


@contextlib.contextmanager
def _disk_full_stops(out: Path) -> Iterator[None]:
    """A full disk (ENOSPC/EDQUOT) mid-run becomes one TuneError: the half-written checkpoint (it has no
    trainer_state.json, which the trainer writes last) is removed and the last complete one is named."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        root = out / "checkpoints"
        for partial in root.glob("checkpoint-*") if root.is_dir() else ():
            if not (partial / "trainer_state.json").is_file():
                shutil.rmtree(partial, ignore_errors=True)
        good = last_checkpoint(out)
        keep = f"{good.name} is intact: free space, then --resume" if good else "no checkpoint was complete"
        raise TuneError(f"disk full while writing to {out}: {keep}") from None


def write_run(out: Path, run: dict[str, Any]) -> None:
    """run.json, merged over an existing one (so scores added later keep the training record)."""
    path = out / "run.json"
    old = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    atomic_write(path, json.dumps({**old, **run}, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _model_type(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _hf_tokenizer(path: Path, pad: int) -> Any:
    """The transformers tokenizer TRL wants as processing_class (the data is already tokenized)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.pad_token = tok.convert_ids_to_tokens(pad)
    return tok
