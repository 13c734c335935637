"""Sharing one model between threads that write and threads that read.

A MemoryLLM's active LoRA adapter is model-wide state: writes run with `default`, reads with
`decoder_adapter` (adapters.py), and `model.adapters.activate` switches it for every thread at once. So
a write must never run while a read is mid-forward, or either would compute with the wrong
adapter. Calls in the *same* role do not disturb each other (inference only reads the weights),
so reads may overlap reads and writes may overlap writes, up to `max_parallel` at once.

Waiters are served first come, first served, in phases: whoever is at the head of the queue goes
next, together with the waiters right behind it in the same role; nobody overtakes a waiter of the
other role, so neither role starves under a steady stream of the other.
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
        self._role: Role | None = None
        self._active = 0

    @contextmanager
    def hold(self, role: Role) -> Iterator[None]:
        """Use the model in `role` for the duration of the block."""
        ticket = (role, object())
        with self._cond:
            self._queue.append(ticket)
            while not self._may_enter(ticket):
                self._cond.wait()
            self._queue.remove(ticket)
            self._role = role
            self._active += 1
            self._cond.notify_all()  # the next in line may be able to join
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._role = None
                self._cond.notify_all()

    def _may_enter(self, ticket: tuple[Role, object]) -> bool:
        role = ticket[0]
        if self._active and (self._role != role or self._active >= self.max_parallel):
            return False
        for waiting in self._queue:  # only waiters of the same role may be ahead
            if waiting is ticket:
                return True
            if waiting[0] != role:
                return False
        return False


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
            model.adapters.activate("write")  # a read may have switched the adapter in between
            new = compute_new_slots(model, state, chunk.to(model.device))
            store_slots(model, state, new, record.id, chunk.numel())
        slots += new.shape[1]
    return InjectionResult(record.id, len(chunks), tokens, slots)
