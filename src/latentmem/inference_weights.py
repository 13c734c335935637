"""Inference matmuls from weight copies laid out for the CPU (float32, no gradients).

For the shapes inference produces (a few rows against a wide weight: decoding steps, short reads,
the output head over a 32k-49k vocabulary), PyTorch's default CPU matmul for `x @ W.T` runs well
below what a core can do. Two layouts of the same weight do better, each for its own row count:

- several rows: oneDNN (which PyTorch ships and uses for its own compiled inference) computes
  from a weight reordered once into its blocked layout ("prepacked"). On the 2-core AMD EPYC the
  benchmarks ran on, a 32000 x 512 output head: 24.9 -> 11.9 ms for 32 rows, 14.5 -> 6.0 ms for 2;
  SmolLM2's 49152 x 576 head: 19.3 -> 9.6 ms for 8 rows.
- one row (a decoding step) through a wide weight (more outputs than inputs: the head, the MLP's
  gate and up projections): `x @ Wt` with the transpose stored contiguously streams the weight
  fastest: 6.2 -> 2.9 ms for the 32000 x 512 head; the weights of 8 layers of d512, read from
  memory, 9.3 ms through `F.linear`, 7.8 all packed, 7.8 all transposed, 7.1 as chosen here.

`benchmarks/bench_packed.py` measures your machine. Results agree with `F.linear` to float32
rounding, not bit for bit (the sums run in another order). Each layout is built at the first call
that needs it, so a process that never decodes one row at a time never holds the transposed copy.

`InferenceWeight` holds the copies and rebuilds them when a tensor they were made from changed: a
tensor's version counter moves with every in-place write (loading a state dict included) and its
storage with every `.data =`, so a copy is never stale. Where oneDNN packing is unavailable (another
device or dtype, a build without it), and for weights under `MIN_LAYOUT_ELEMENTS`, the weight is used
as made, by `F.linear`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_AVAILABLE: bool | None = None
# Smaller weights gain nothing from another layout (bench_packed.py: 512 x 512 is about the break-even)
MIN_LAYOUT_ELEMENTS = 512 * 512


def packing_available() -> bool:
    """Whether this PyTorch build packs float32 linear weights for oneDNN (checked once, on a probe)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            g = torch.Generator().manual_seed(0)
            w, x = torch.randn(24, 16, generator=g), torch.randn(3, 16, generator=g)
            got = torch.ops.mkldnn._linear_pointwise(x, _pack(w), None, "none", [], "")
            _AVAILABLE = bool(torch.allclose(got, F.linear(x, w), atol=1e-5, rtol=1e-5))
        except (AttributeError, RuntimeError, NotImplementedError):
            _AVAILABLE = False
    return _AVAILABLE


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # the batch-size hint picks oneDNN's blocking; 32 rows measured best from 2 to 64 rows
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32)


def eager_layout(weight: torch.Tensor) -> str:
    """The layout to build ahead of use for a weight: "packed" where oneDNN computes it, else "plain"."""
    return "packed" if cpu_layouts(weight) and weight.numel() >= MIN_LAYOUT_ELEMENTS else "plain"


def cpu_layouts(x: torch.Tensor) -> bool:
    """Whether `x` is computed from the CPU layouts: float32 on a CPU where oneDNN packing works."""
    return x.is_cpu and x.dtype == torch.float32 and packing_available()


class InferenceWeight:
    """Copies of the weight `make()` builds from `sources()`, rebuilt when a source changes.

    `sources()` returns the tensors the weight is made from, the first shaped like it; `extra()`
    adds plain values it depends on (e.g. a LoRA scaling). Nothing is computed or held before a
    call needs it; `linear(x, bias)` picks the layout for `x`'s row count. Per call this costs a
    few attribute reads (about 2 us), so sources should be read without `nn.Module.__getattr__`.
    """

    def __init__(
        self, make: Callable[[], torch.Tensor], sources: Callable[[], tuple], extra: Callable[[], tuple] = tuple
    ):
        self._make, self._sources, self._extra = make, sources, extra
        self._lock = threading.Lock()
        self._held: tuple[tuple | None, dict[str, torch.Tensor]] = (None, {})  # (stamp, copies), swapped whole

    def _stamp(self, sources: tuple) -> tuple:
        # moving a tensor to another device or dtype gives it new storage, so the pointer covers that too
        stamp = []
        for t in sources:
            stamp += (_version(t), t.data_ptr())
        return (*stamp, *self._extra())

    @staticmethod
    def _layout(x: torch.Tensor, weight: torch.Tensor) -> str:
        if not cpu_layouts(x) or x.numel() == 0 or weight.numel() < MIN_LAYOUT_ELEMENTS:
            return "plain"
        # one row through a wide weight streams fastest from its transpose; anything else packed
        one_row = x.numel() == x.shape[-1]
        return "transposed" if one_row and weight.shape[0] > weight.shape[1] else "packed"

    def copy(self, layout: str, sources: tuple | None = None) -> torch.Tensor:
        """The weight in `layout` ("plain", "packed" or "transposed"), built now if missing or stale."""
        stamp = self._stamp(sources if sources is not None else self._sources())
        held_stamp, copies = self._held
        if stamp == held_stamp and layout in copies:
            return copies[layout]
        with self._lock, torch.no_grad():
            held_stamp, copies = self._held
            if stamp != held_stamp:
                copies = {}
            if layout not in copies:
                made = self._make().detach()
                if layout == "packed":
                    made = _pack(made)
                elif layout == "transposed":
                    made = made.t().contiguous()
                copies = {**copies, layout: made}
            self._held = (stamp, copies)
            return copies[layout]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`F.linear(x, W, bias)` from the copy laid out for `x`."""
        sources = self._sources()
        layout = self._layout(x, sources[0])
        weight = self.copy(layout, sources)
        if layout == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        if layout == "transposed":
            out = x @ weight
            return out if bias is None else out + bias
        return F.linear(x, weight, bias)

    @property
    def layouts(self) -> tuple[str, ...]:
        """The layouts held now."""
        return tuple(self._held[1])

    def drop(self) -> None:
        """Free the copies (the next call builds what it needs again)."""
        with self._lock:
            self._held = (None, {})


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # a tensor made under torch.inference_mode() keeps no version counter
        return -1


def use_inference_copies(module: nn.Linear) -> None:
    """Compute `module`'s inference calls from copies of its weight laid out for the CPU (see the module doc).

    Calls with gradients, and calls where oneDNN is unavailable, run the module's own forward.
    """
    if not isinstance(module, nn.Linear) or "forward" in vars(module):
        return
    params = module._parameters  # read directly: nn.Module.__getattr__ costs microseconds per call
    copies = InferenceWeight(lambda: params["weight"], lambda: (params["weight"],))
    own_forward = type(module).forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = params["weight"]
        if not torch.is_grad_enabled() and cpu_layouts(x) and weight.dtype == x.dtype and (
            weight.numel() >= MIN_LAYOUT_ELEMENTS
        ):
            return copies.linear(x, params["bias"])
        return own_forward(self, x)

    module.forward = forward.__get__(module)
    module.inference_copies = copies


def stop_inference_copies(module: nn.Module) -> None:
    """Undo `use_inference_copies`: the module computes with its own forward again; the copies are freed."""
    if hasattr(module, "inference_copies"):
        vars(module).pop("forward", None)
        del module.inference_copies
