"""The built-in proof task: translate a 3-digit number into a made-up "Zorbian" colour code.

Contract: task_items(n, seed, split) gives (number, answer) pairs where every digit maps through one fixed
made-up table (0→red, 1→blue, ...); the train and test splits hold disjoint numbers (split by a seeded
permutation of 000-999), so a test score measures generalisation to numbers never seen, not memorised items.
A random-weight model scores ~0; learning the table and the position-to-digit lookup scores ~100%.
as_chat(item) is the training line in OpenAI chat format; score() greedy-decodes each test prompt with the
serving renderer and counts exact matches of the answer (whitespace-trimmed, think blocks dropped).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from qwenkit.chat.families import ChatFamily
from qwenkit.chat.messages import Message
from qwenkit.tokenizer.tokenizer import QwenTokenizer

ZORBIAN = ("red", "blue", "green", "black", "white", "pink", "gray", "gold", "brown", "silver")
QUESTION = "Zorbian colour code for {n}?"
TEST_SHARE = 200  # numbers held out for testing; the other 800 may be trained on


def answer_token_ids(tokenizer: QwenTokenizer) -> tuple[int, ...]:
    """The ids answers are made of (each colour word, with and without a leading space, and EOS)."""
    ids = {tokenizer.eos_token_id}
    for word in ZORBIAN:
        ids.update(tokenizer.encode_text(word))
        ids.update(tokenizer.encode_text(" " + word))
    return tuple(sorted(ids))


def answer(number: str) -> str:
    return " ".join(ZORBIAN[int(d)] for d in number)


def task_items(n: int, seed: int = 0, split: str = "train") -> list[tuple[str, str]]:
    """n (number, answer) pairs from the split's own numbers (train and test never share a number)."""
    numbers = [f"{i:03d}" for i in range(1000)]
    random.Random(1234).shuffle(numbers)  # fixed split, whatever the sampling seed
    pool = numbers[:TEST_SHARE] if split == "test" else numbers[TEST_SHARE:]
    if n > len(pool):
        raise ValueError(f"the {split} split has only {len(pool)} numbers; ask for at most that many")
    chosen = random.Random(seed).sample(pool, n)
    return [(num, answer(num)) for num in chosen]


def as_chat(item: tuple[str, str]) -> dict[str, Any]:
    number, reply = item
    return {
        "messages": [
            {"role": "user", "content": QUESTION.format(n=number)},
            {"role": "assistant", "content": reply},
        ]
    }


def _clean(text: str) -> str:
    return text.split("</think>")[-1].strip()


def score(
    model: Any,
    tokenizer: QwenTokenizer,
    family: ChatFamily,
    items: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int = 12,
) -> float:
    """Exact-match accuracy of greedy answers to the items' questions (see the module docstring)."""
    import torch

    hits = 0
    eos = tokenizer.eos_token_id
    enable = False if family.thinks else None
    with torch.no_grad():
        for number, expected in items:
            prompt = family.render(
                [Message(role="user", content=QUESTION.format(n=number))], enable_thinking=enable
            )
            ids = torch.tensor([tokenizer.encode_parts(prompt.parts)])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            new = [int(t) for t in out[0, ids.shape[1] :] if int(t) != eos]
            hits += _clean(tokenizer.decode(new, skip_special_tokens=False)) == expected
    return hits / len(items) if items else 0.0
