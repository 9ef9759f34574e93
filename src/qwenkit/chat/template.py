"""The Jinja chat templates qwenkit writes into checkpoints it creates (templates/<family>.jinja).

Contract: chat_template(family) returns the template text for a family name ("qwen2_5", "qwen3", "qwen3_5")
or a Flavor; applied by transformers' apply_chat_template it is byte-identical to that family's renderer
(qwenkit.chat.families) for the same conversation and options, and detect_family() recognises it.
"""

from __future__ import annotations

from importlib import resources

from qwenkit.chat.flavor import Flavor

DEMO_TEMPLATES: tuple[str, ...] = ("qwen2_5", "qwen3", "qwen3_5")


def chat_template(family: Flavor | str) -> str:
    """The Jinja chat template text for this family (a Flavor names its family)."""
    name = family.value if isinstance(family, Flavor) else str(family)
    if name not in DEMO_TEMPLATES:
        raise ValueError(f"no qwenkit chat template for {name!r}: use one of {', '.join(DEMO_TEMPLATES)}")
    return resources.files("qwenkit.chat").joinpath("templates", f"{name}.jinja").read_text("utf-8")
