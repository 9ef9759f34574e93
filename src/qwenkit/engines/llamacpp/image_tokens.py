"""Images inside a sequence's token list: the keys that stand for image tokens, and where they put positions.

Contract: an image of n tokens occupies n entries of Sequence.tokens, each a negative int (image_keys) that
encodes the image's sha256, its token count, its position count and the token's index in it. Text ids
are >= 0, so prefix matching (kv.py, state_cache.py) compares tokens and images alike: the same image
matches, a different image with the same token count does not. Positions are not indices: an image
advances the position by n_pos (M-RoPE: max(grid width, height)), so position_after() converts a token
count into the position the next token takes, and image_boundary() rounds a cut down to an image's start
(an image's cells share one position and cannot be cut in the middle). Pure Python: no llama.cpp here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_BITS = 20  # per field: token index, token count, position count (an image has far fewer than 2**20)
_MASK = (1 << _BITS) - 1


def image_keys(sha256: str, n_tokens: int, n_pos: int) -> list[int]:
    """The n_tokens keys standing for one image in a token list."""
    if not 0 < n_tokens <= _MASK or not 0 < n_pos <= _MASK:
        raise ValueError(f"an image of {n_tokens} tokens and {n_pos} positions cannot be keyed")
    base = ((int(sha256, 16) << _BITS | n_pos) << _BITS | n_tokens) << _BITS
    return [-1 - (base | j) for j in range(n_tokens)]


def _fields(key: int) -> tuple[int, int, int]:
    """(index in the image, token count, position count) of an image key."""
    k = -1 - key
    return k & _MASK, (k >> _BITS) & _MASK, (k >> 2 * _BITS) & _MASK


def position_after(tokens: Sequence[int], n: int) -> int:
    """The position the token after tokens[:n] takes. A cut inside an image gives the image's own position."""
    if n <= 0:
        return 0
    head = tokens[:n]
    if min(head) >= 0:  # text only: positions are indices (min() runs in C)
        return n
    pos = 0
    for key in head:
        if key >= 0:
            pos += 1
        else:
            j, n_tokens, n_pos = _fields(key)
            if j == n_tokens - 1:
                pos += n_pos
    return pos


def image_boundary(tokens: Sequence[int], n: int) -> int:
    """n, or the start of the image that tokens[n - 1] is inside of when tokens[:n] ends mid-image."""
    if 0 < n <= len(tokens) and tokens[n - 1] < 0:
        j, n_tokens, _ = _fields(tokens[n - 1])
        if j < n_tokens - 1:
            return n - 1 - j
    return n


@dataclass(eq=False)
class ImageSpan:
    """One image of a prompt: tokens[start:end] stand for it. prepared is the engine's handle on it (the
    preprocessed image, see vision.PreparedImage); embd its encoded rows while they wait to be decoded."""

    start: int
    n_tokens: int
    n_pos: int
    sha256: str
    prepared: object
    embd: np.ndarray | None = None
    encoding: bool = False
    positions: np.ndarray | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.start + self.n_tokens
