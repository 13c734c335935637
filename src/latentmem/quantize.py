"""int8 storage of memory slots: per-slot symmetric absmax quantization (docs/design.md, Compact state).

Each slot (a row of `d` values) is stored as `d` int8 codes and one float32 scale:
`scale = max|x| / 127`, `q = round(x / scale)`, read back as `q * scale`. The error of a value is at
most half a step, `scale / 2 = max|x| / 254`, relative to the slot's largest value; an all-zero
slot has scale 0 and comes back as zeros. In float32, quantizing a read-back slot gives the same codes
again, so a slot loses precision once, whatever the number of saves (a bfloat16 pool rounds the
read-back values to 8 significant bits, about one int8 step: a second trip may move a value one step).

Used by `save_state(..., slot_dtype="int8")` (persistence.py) for the short-term pool, and by
`round_trip_` to keep a state at exactly what an int8 file would give back (the retention
measurement quantizes after every write, as reloading after every write would).
"""

from __future__ import annotations

import torch

LEVELS = 127  # symmetric: codes -127..127 (-128 unused)
LAYERS_PER_STEP = 1  # the pool is converted a layer at a time: float32 temporaries of one layer only


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [..., d]` -> (codes `[..., d]` int8, scales `[...]` float32), one scale per row."""
    xf = x.detach().float()
    scale = xf.abs().amax(dim=-1) / LEVELS
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(xf / divisor[..., None]).clamp_(-LEVELS, LEVELS).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values `codes * scale` in `dtype` (computed in float32)."""
    return (codes.float() * scale.float()[..., None]).to(dtype)


def quantize_pool(stm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of a pool `[L, N, d]`, a layer at a time (bounded temporaries), on the CPU."""
    L, N, d = stm.shape
    codes = torch.empty(L, N, d, dtype=torch.int8)
    scales = torch.empty(L, N, dtype=torch.float32)
    for start in range(0, L, LAYERS_PER_STEP):
        q, s = quantize_rows(stm[start : start + LAYERS_PER_STEP])
        codes[start : start + LAYERS_PER_STEP], scales[start : start + LAYERS_PER_STEP] = q.cpu(), s.cpu()
    return codes, scales


def dequantize_pool(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_rows` of a pool `[L, N, d]`, a layer at a time."""
    out = torch.empty(codes.shape, dtype=dtype)
    for start in range(0, codes.shape[0], LAYERS_PER_STEP):
        stop = start + LAYERS_PER_STEP
        out[start:stop] = dequantize_rows(codes[start:stop], scales[start:stop], dtype)
    return out


@torch.no_grad()
def round_trip_(state, slots: int | None = None) -> None:
    """Replace the pool's values (or only its newest `slots` per layer) by their int8 round trip, in place.

    What loading an int8 file gives back; older slots already round-tripped are unchanged by a
    second one (up to float rounding of the scale). Marks the state changed (cached reads are stale).
    """
    if not state.initialized:
        return
    stm = state.stm
    start = 0 if slots is None else stm.shape[1] - slots
    for layer in range(stm.shape[0]):
        part = stm[layer, start:]
        codes, scale = quantize_rows(part)
        part.copy_(dequantize_rows(codes, scale, stm.dtype))
    state.touch()
