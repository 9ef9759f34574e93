"""The built-in proof task: a made-up fact table ("what colour is the flag of Zorbia?"), held out by pair.

Contract: FLAGS maps 24 made-up countries to one colour word each (a fixed seeded draw from COLOURS, each
colour used three times). TEMPLATES are 48 phrasings (8 openers x 6 questions, the country near the end).
Each country holds out HELD_OUT of them (a fixed seeded draw, HELD): items("test") asks each country
in its held-out phrasings (72 questions), items("train") in the other 45 (1080). So no test question is in
training (check_disjoint() proves it) while every test phrasing is trained with other countries and every
country's fact is trained in other phrasings: a test score measures recalling a learnt fact in a question
never trained on, not replaying one. The random-weight demo model scores 0% before tuning. Words never seen
in training are out of its reach (random embeddings give no hint that a new word is filler):
items("new_wording") asks in such words, a harder score reported beside, not the proof.
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
OPENERS = (
    "", "Quick question: ", "Hi! ", "Please answer in one word. ", "For my quiz: ", "Tell me this. ",
    "Hello there. ", "One more: ",
)  # fmt: skip
# The country ends (or nearly ends) every question, always as the same tokens (" Zorbia").
QUESTIONS = (
    "What colour is the flag of {c}?",
    "Which colour is the flag of {c}?",
    "What is the flag colour of {c}?",
    "Name the flag colour of {c}.",
    "Flag colour of {c}?",
    "What colour does the flag of {c} have?",
)
TEMPLATES = tuple(o + q for o in OPENERS for q in QUESTIONS)
HELD_OUT = 3
NEW_WORDING_TEMPLATES = (
    "I wonder what colour {c}'s flag is?",
    "Please say which colour is used on the national flag of {c}.",
    "If you saw the flag of {c}, what colour would it be?",
)
Item = tuple[str, str]  # (question, expected answer)


def _facts() -> dict[str, str]:
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(COUNTRIES))]
    random.Random(1234).shuffle(colours)  # fixed, whatever the run's seed
    return dict(zip(COUNTRIES, colours, strict=True))


def _held_out() -> dict[str, frozenset[int]]:
    rng = random.Random(7)  # fixed, whatever the run's seed
    held = {}
    for country in COUNTRIES:
        order = list(range(len(TEMPLATES)))
        rng.shuffle(order)
        held[country] = frozenset(order[:HELD_OUT])
    return held


FLAGS = _facts()
HELD = _held_out()


def items(split: str = "train") -> list[Item]:
    """The split's questions: train 24 x 45 = 1080, test 24 x 3 = 72, new_wording 24 x 3 = 72."""
    if split == "new_wording":
        return [(t.format(c=c), FLAGS[c]) for t in NEW_WORDING_TEMPLATES for c in COUNTRIES]
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'test' or 'new_wording'")
    test = split == "test"
    return [
        (t.format(c=c), FLAGS[c])
        for c in COUNTRIES
        for n, t in enumerate(TEMPLATES)
        if (n in HELD[c]) == test
    ]


def check_disjoint(train: Sequence[Item], test: Sequence[Item]) -> None:
    """Raise ValueError when a test question also appears in the training data."""
    seen = {q for q, _ in train}
    if leaked := [q for q, _ in test if q in seen]:
        raise ValueError(f"test question also in training: {leaked[0]!r}")


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
