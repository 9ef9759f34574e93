"""The built-in proof task: a made-up fact table ("what colour is the flag of Zorbia?"), held out by phrasing.

Contract: FLAGS maps 24 made-up countries to one colour word each (a fixed seeded draw from COLOURS, each
colour used three times). items("train") asks every country's flag colour in the TRAIN_TEMPLATES
phrasings; items("test") asks every country in the TEST_TEMPLATES phrasings, which share no template and
no question with training (check_disjoint() proves it), so a test score measures answering a learnt fact
when asked in words never trained on, not replaying a memorised question. A random-weight model scores ~0.
as_chat(item) is the training line in OpenAI chat format; as_eval_case(item) the same question as a
`qwenkit eval --data` line (exact scorer). score() greedy-decodes each question with the serving
renderer and counts exact matches (whitespace-trimmed, think blocks dropped).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from qwenkit.chat.families import ChatFamily
from qwenkit.chat.messages import Message
from qwenkit.tokenizer.tokenizer import QwenTokenizer

COUNTRIES = (
    "Zorbia", "Quelland", "Vantor", "Brask", "Ostrel", "Pellin", "Dorvak", "Mirell",
    "Karuun", "Talvesh", "Yubria", "Nexor", "Glimm", "Harrow", "Istel", "Jorvik",
    "Lunara", "Morrow", "Nivea", "Orlan", "Praxa", "Rundel", "Sefira", "Umbra",
)  # fmt: skip
COLOURS = ("red", "blue", "green", "black", "white", "pink", "gray", "gold")
# The country sits mid-sentence in every template, so it is always the same tokens (" Zorbia").
TRAIN_TEMPLATES = (
    "What colour is the flag of {c}?",
    "Name the colour of the flag of {c}.",
    "Which colour does the flag of {c} have?",
    "Tell me the flag colour of {c}.",
    "The flag of {c} is which colour?",
    "Flag colour of {c}?",
)
TEST_TEMPLATES = (
    "I wonder what colour {c}'s flag is?",
    "Please say which colour is used on the national flag of {c}.",
    "If you saw the flag of {c}, what colour would it be?",
)
Item = tuple[str, str]  # (question, expected answer)


def _facts() -> dict[str, str]:
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(COUNTRIES))]
    random.Random(1234).shuffle(colours)  # fixed, whatever the run's seed
    return dict(zip(COUNTRIES, colours, strict=True))


FLAGS = _facts()


def items(split: str = "train") -> list[Item]:
    """Every country asked in each of the split's templates (train: 6 x 24 = 144, test: 3 x 24 = 72)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    templates = TRAIN_TEMPLATES if split == "train" else TEST_TEMPLATES
    return [(t.format(c=c), FLAGS[c]) for t in templates for c in COUNTRIES]


def check_disjoint(train: Sequence[Item], test: Sequence[Item]) -> None:
    """Raise ValueError when a test question, or a test template's wording, appears in the training data."""
    seen = {q for q, _ in train}
    if leaked := [q for q, _ in test if q in seen]:
        raise ValueError(f"test question also in training: {leaked[0]!r}")
    for template in TEST_TEMPLATES:
        # The template's fixed words around the country, e.g. "I wonder what colour " and "'s flag is?".
        for part in (p for p in template.split("{c}") if len(p.strip()) > 3):
            if any(part in q for q in seen):
                raise ValueError(f"test wording {part!r} also appears in training")


def as_chat(item: Item) -> dict[str, Any]:
    question, reply = item
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def as_eval_case(item: Item, index: int) -> dict[str, Any]:
    """The question as a `qwenkit eval --data` JSONL line (exact match on the colour word)."""
    question, reply = item
    return {
        "id": f"flag-{index}",
        "messages": [{"role": "user", "content": question}],
        "answer": reply,
        "scorer": "exact",
    }


def _clean(text: str) -> str:
    return text.split("</think>")[-1].strip()


def score(
    model: Any,
    tokenizer: QwenTokenizer,
    family: ChatFamily,
    questions: Sequence[Item],
    *,
    max_new_tokens: int = 8,
) -> float:
    """Exact-match accuracy of greedy answers to the questions (see the module docstring)."""
    import torch

    hits = 0
    eos = tokenizer.eos_token_id
    enable = False if family.thinks else None
    with torch.no_grad():
        for question, expected in questions:
            prompt = family.render([Message(role="user", content=question)], enable_thinking=enable)
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
    return hits / len(questions) if questions else 0.0
