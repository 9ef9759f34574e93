"""LoRA adapters on the llama.cpp engine: loaded once at start, one adapter group per decode step.

Contract: Adapters(model, {name: LoRA GGUF}) loads every adapter when the engine starts (a file llama.cpp
refuses fails there, EngineError naming the adapter). check(name) refuses a request for an adapter not
loaded, naming those that are. llama.cpp applies adapters to the whole context, never per sequence, so a
decode step serves one group (the sequences with the same adapter, or none): choose(running) keeps the
current group for up to TURN_STEPS steps, then passes the turn to the group served least recently, so
groups take turns and none starves; with one group it returns every running sequence, unchanged.
activate(name) sets the step's adapter before the decode. A sequence's cached prefixes and saved states
belong to its adapter: callers key them on the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq
from pathlib import Path

from qwenkit.engines.llamacpp.model import LlamaModel
from qwenkit.engines.llamacpp.sequence import Sequence
from qwenkit.engines.request import EngineError

# Steps a group keeps the context before the next group's turn: switching adapters makes llama.cpp plan its
# graph again (about a third of a decode step on the tiny demo), so a turn of a few steps amortises it.
TURN_STEPS = 4


class Adapters:
    def __init__(self, model: LlamaModel, paths: Mapping[str, Path]) -> None:
        self.model = model
        self._loaded: dict[str, object] = {}
        for name, path in paths.items():  # names are checked by EngineConfig
            try:
                self._loaded[name] = model.load_lora(Path(path))
            except EngineError as exc:
                raise EngineError(f"adapter {name!r}: {exc}") from None
        self._active: str | None = None
        self._served: dict[str | None, int] = {}  # group → the step it was last served
        self._turn: str | None = None  # the group whose turn it is, and the steps it has had
        self._turn_steps = 0
        self._clock = 0
        self.switches = 0  # how often the context's adapter changed (each change re-plans llama.cpp's graph)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._loaded)

    def check(self, name: str | None) -> None:
        """Raise EngineError unless name is None (the base model) or a loaded adapter."""
        if name is not None and name not in self._loaded:
            loaded = ", ".join(self._loaded) or "none"
            raise EngineError(f"unknown adapter {name!r}: loaded adapters: {loaded}")

    def choose(self, running: Seq[Sequence]) -> list[Sequence]:
        """The running sequences the next step serves: one adapter group (see the module docstring)."""
        groups = {seq.request.adapter for seq in running}
        if len(groups) <= 1:
            return list(running)
        if self._turn not in groups or self._turn_steps >= TURN_STEPS:
            # Least recently served first (never served: first of all; ties: the base model, then names).
            others = groups - {self._turn} or groups
            self._turn = min(others, key=lambda g: (self._served.get(g, -1), g is not None, g or ""))
            self._turn_steps = 0
        self._clock += 1
        self._turn_steps += 1
        self._served[self._turn] = self._clock
        return [seq for seq in running if seq.request.adapter == self._turn]

    def activate(self, name: str | None) -> None:
        """Apply this adapter (None: none) to every following decode."""
        if name == self._active:
            return
        self.model.set_loras([self._loaded[name]] if name is not None else [])
        self._active = name
        self.switches += 1
