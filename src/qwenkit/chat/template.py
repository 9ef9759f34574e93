"""The Jinja chat templates qwenkit writes into checkpoints it creates (templates/<flavor>.jinja).

Contract: chat_template(flavor) returns the template text; rendered with transformers'
apply_chat_template it is byte-identical to qwenkit.chat.render for the same conversation and options.
"""

from __future__ import annotations

from importlib import resources

from qwenkit.chat.flavor import Flavor


def chat_template(flavor: Flavor) -> str:
    """The Jinja chat template text for this flavour."""
    return resources.files("qwenkit.chat").joinpath("templates", f"{flavor.value}.jinja").read_text("utf-8")
