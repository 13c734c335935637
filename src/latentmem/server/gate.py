"""Sharing one model between threads that write and threads that read.

Every read and write names its LoRA adapter per call (adapters.py: a per-thread choice, handed to
PEFT per batch row), and inference only reads the weights, so reads and writes of different states
may run at the same time in any mix. What is left to gate is how many run at once: `ModelGate`
admits up to `max_parallel` model calls, first come, first served, so nobody starves under a
steady stream of others (a long injection takes a turn per chunk, `inject_in_turns`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from ..writing import InjectionResult, compute_new_slots, store_slots

Role = Literal["read", "write"]


class ModelGate:
    def __init__(self, max_parallel: int = 4) -> None:
        if max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
        self.max_parallel = max_parallel
        self._cond = threading.Condition()
        self._queue: deque[tuple[Role, object]] = deque()
        self._active = 0

    @contextmanager
    def hold(self, role: Role) -> Iterator[None]:
        """Use the model (to `role`: "read" or "write") for the duration of the block."""
        if role not in ("read", "write"):
            raise ValueError(f"role must be 'read' or 'write', got {role!r}")
        ticket = (role, object())
        with self._cond:
            self._queue.append(ticket)
            while not (self._active < self.max_parallel and self._queue[0] is ticket):
                self._cond.wait()
            self._queue.popleft()
            self._active += 1
            self._cond.notify_all()  # the next in line may fit as well
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()


@torch.no_grad()
def inject_in_turns(model, gate: ModelGate, state, chunks: list[torch.Tensor], source: str) -> InjectionResult:
    """`model.inject` of pre-split `chunks`, taking a turn on the model per chunk.

    The same computation, chunk for chunk (writing.py), but the gate is released after each chunk,
    so a long text does not hold every other user's reads for its whole length: whoever queued
    meanwhile goes next, and the injection continues after them. The state itself stays locked by
    the caller, so nobody sees it half-written.
    """
    model.check_state(state)
    tokens = sum(chunk.numel() for chunk in chunks)
    record = state.record_injection(source, tokens)
    slots = 0
    for chunk in chunks:
        with gate.hold("write"):
            new = compute_new_slots(model, state, chunk.to(model.device))
            store_slots(model, state, new, record.id, chunk)
        slots += new.shape[1]
    return InjectionResult(record.id, len(chunks), tokens, slots)
