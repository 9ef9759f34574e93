"""What a step costs, learned from measured step times, and the prompt chunk that keeps decodes steady.

Contract: observe(n_decode, n_prefill, seconds) after every llama_decode; chunk(n_decode) is the prompt
tokens per prefilling sequence for a step beside n_decode decoding sequences, so that the step costs about
step_cost_factor decode-only steps (floor MIN_CHUNK, cap max_prompt: the engine's ubatch). A decode-only
step is modelled as a + b·n_decode (least squares over recent decode-only steps): on hybrid models
(Qwen3.5) each decoding sequence reads and writes its whole recurrent state, so 8 decodes cost ~5x one,
and a constant would charge the decodes' cost to the prompt tokens and starve prefill. A prompt token's
cost is what a step took beyond its predicted decode part, per prompt token (EMA). Before anything is
measured: initial_chunk.
budget(n_decode, n_prefilling) is the step's prompt tokens for all prefilling sequences: one prompt
beside running streams gets one chunk (the streams' ITL is protected); k queued prompts get k**QUEUE_POWER
chunks, since then the queue is what users wait on (a queued prompt's TTFT includes every prompt ahead).
"""

from __future__ import annotations

from collections import deque

MIN_CHUNK = 8
# Measured on the multi-turn benchmark (8 chats, Qwen3.5 0.8B, 2 threads): TTFT p50 on turns >= 2 was 14.4 s
# with k chunks for k queued prompts, 12.8 s with k**2 and 11.9 s with k**3, output tok/s 9.1, 10.2, 10.0.
QUEUE_POWER = 3
_WINDOW = 64  # decode-only steps kept for the fit


class StepCosts:
    def __init__(self, step_cost_factor: float, max_prompt: int, initial_chunk: int = 64) -> None:
        self.factor = step_cost_factor
        self.max_prompt = max_prompt  # prompt tokens of one step beside decodes, at most
        self.initial_chunk = initial_chunk
        self._decode: deque[tuple[int, float]] = deque()
        self._sums = [0.0, 0.0, 0.0, 0.0]  # over the window: n, t, n*n, n*t (kept as steps come and go)
        self._fit: tuple[float, float] | None = None  # (a, b): seconds = a + b * n_decode
        self._stale = False  # steps came since the fit: refit when a cost is next asked for
        self.prefill_token: float | None = None  # seconds per prompt token (EMA)

    def decode_cost(self, n_decode: int) -> float | None:
        """Predicted seconds of a decode-only step with n_decode sequences (None before any measurement)."""
        if self._stale:
            self._refit()
        if self._fit is None or n_decode <= 0:
            return None if self._fit is None else 0.0
        a, b = self._fit
        return max(a + b * n_decode, 0.0)

    def observe(self, n_decode: int, n_prefill: int, seconds: float) -> None:
        if n_prefill == 0 and n_decode > 0:
            self._window(n_decode, seconds, 1)
            self._decode.append((n_decode, seconds))
            if len(self._decode) > _WINDOW:
                self._window(*self._decode.popleft(), -1)
            self._stale = True
            return
        if n_prefill == 0:
            return
        decode_part = self.decode_cost(n_decode) if n_decode else 0.0
        if decode_part is None or seconds <= decode_part:
            return  # nothing to attribute yet, or noise: the step cost less than its decodes alone
        per_token = (seconds - decode_part) / n_prefill
        old = self.prefill_token
        self.prefill_token = per_token if old is None else 0.8 * old + 0.2 * per_token

    def _window(self, n: int, t: float, sign: int) -> None:
        sums = self._sums
        sums[0] += sign * n
        sums[1] += sign * t
        sums[2] += sign * n * n
        sums[3] += sign * n * t

    def _refit(self) -> None:
        # Least squares of seconds on n_decode from running sums.
        self._stale = False
        k = len(self._decode)
        sn, st, snn, snt = self._sums
        var = snn - sn * sn / k
        if var <= 1e-9:
            # One batch size seen so far: cost proportional to it (an over-estimate for more sequences).
            self._fit = (0.0, st / sn)
            return
        b = max((snt - sn * st / k) / var, 0.0)
        self._fit = (max((st - b * sn) / k, 0.0), b)

    def chunk(self, n_decode: int) -> int:
        """Prompt tokens per prefilling sequence for a step beside n_decode decoding sequences."""
        decode = self.decode_cost(n_decode)
        if not decode or not self.prefill_token:
            return self.initial_chunk
        tokens = int((self.factor - 1) * decode / self.prefill_token)
        return max(MIN_CHUNK, min(tokens, self.max_prompt))

    def budget(self, n_decode: int, n_prefilling: int) -> int:
        """Prompt tokens for all n_prefilling sequences together in a step beside n_decode decodes."""
        if n_prefilling <= 0:
            return 0
        return min(self.chunk(n_decode) * n_prefilling**QUEUE_POWER, self.max_prompt)
