"""Legacy chat flavours, picked from model_type alone; the chat families (chat/families) replace them.

A Flavor still names its family wherever a family is taken (QWEN3 → qwen3, QWEN2_5 → qwen2_5), so older
call sites keep working; new code picks the family from the checkpoint's own template (choose_family).
QWEN3: thinking mode (<think> blocks, /think and /no_think soft switches), no default system message.
QWEN2_5: Qwen2/Qwen2.5 instruct conventions: a default system message when none is given, no think tags.
Flavor.thinks: whether the model may open an answer with a <think> block, whatever the mode in force.
"""

from __future__ import annotations

from enum import StrEnum


class Flavor(StrEnum):
    QWEN3 = "qwen3"
    QWEN2_5 = "qwen2_5"

    @property
    def thinks(self) -> bool:
        """Whether this flavour's models write <think> blocks (even with thinking switched off, they may)."""
        return self is Flavor.QWEN3


QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def flavor_for_model_type(model_type: str) -> Flavor:
    """The flavour a config.json model_type implies (qwen2/qwen2_moe → QWEN2_5, qwen3* → QWEN3)."""
    if model_type.startswith("qwen3"):
        return Flavor.QWEN3
    if model_type.startswith("qwen2"):
        return Flavor.QWEN2_5
    raise ValueError(
        f"not a Qwen text model type: {model_type!r} (expected qwen2, qwen2_moe, qwen3 or qwen3_moe)"
    )
