"""The two LoRA adapters of a MemoryLLM, chosen per call.

`default` serves writing (injection), `decoder_adapter` reading; without a decoder adapter,
`default` serves both, and the plain backbone ("base") uses neither. Which one a computation uses
is chosen by the computation itself, never by switching model-wide state: `AdapterSwitch.use(role)`
sets a context variable for the block it wraps, and every LoRA layer's active adapters are one
shared, never-changing object (`ContextAdapters`, installed once through PEFT's public
`set_adapter`) that answers with the adapter the *calling* context chose. Context variables belong
to the thread (and asyncio task) that set them, so a read and a write running at the same time in
two threads each compute with their own adapter, through PEFT's ordinary LoRA forward (no per-call
copies). Adapters are injected through PEFT's public API for models that are not a `PeftModel`
(`peft.functional`), never by writing private attributes.

For serving, `AdapterSwitch.merge()` precomputes each adapter's merged weight `W + s·BA` per LoRA
layer, so an inference call is one matmul per layer instead of PEFT's base matmul plus two small
LoRA matmuls, a dropout and an add: 13-24% of a lone SmolLM2 forward on a CPU. The merged forward
still picks its weight by the calling context's adapter; it costs one weight copy per adapter
(`merged_bytes`) and is used only without gradients (training always computes through PEFT).
"""

from __future__ import annotations

import contextvars
import types
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.functional import inject_adapter_in_model, set_requires_grad
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

WRITE_ADAPTER = "default"
READ_ADAPTER = "decoder_adapter"
Role = Literal["write", "read", "base"]


class ContextAdapters(Sequence):
    """What PEFT's LoRA layers iterate over as their active adapters: the adapter the calling context chose.

    One object shared by every layer; it holds no choice itself, so no thread can change another's.
    """

    def __init__(self, switch: AdapterSwitch):
        self._switch = switch

    def _names(self) -> tuple[str, ...]:
        name = self._switch.current()
        return (name,) if name is not None else ()

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return f"ContextAdapters({list(self._names())})"


class AdapterSwitch:
    """Owns the LoRA adapters of a backbone; `use(role)` picks the adapter for the calls inside it.

    Calls outside any `use` block run with `default_role` (set by `activate`; "read" at first), so
    `model.backbone(...)` called directly still computes as a read. The library's own reads and
    writes always say which role they compute in. Whether adapter weights train is decided once
    (`trainable`), not by which one a call uses: training writes with `default` and reads with
    `decoder_adapter` in the same step, so both keep their gradients.
    """

    def __init__(self, backbone: PreTrainedModel, lora: dict | None, two_adapters: bool):
        self.backbone = backbone
        self.names: list[str] = []
        self.trainable = False
        self.default_role: Role = "read"
        self.layers: list[BaseTunerLayer] = []
        # per switch, so two models in one process never see each other's choice
        self._role: contextvars.ContextVar[Role | None] = contextvars.ContextVar(
            f"latentmem_adapter_role_{id(self)}", default=None
        )
        if lora is None:
            return
        for name in [WRITE_ADAPTER, READ_ADAPTER] if two_adapters else [WRITE_ADAPTER]:
            config = LoraConfig(
                r=lora["r"],
                lora_alpha=lora["lora_alpha"],
                lora_dropout=lora.get("lora_dropout", 0.0),
                target_modules=lora.get("target_modules"),  # None: PEFT's default for the architecture
            )
            with warnings.catch_warnings():  # PEFT warns on any second adapter, which is the design here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, backbone, adapter_name=name)
            self.names.append(name)
        self.layers = [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]
        selector = ContextAdapters(self)  # set once; PEFT's active adapter is never switched again
        for layer in self.layers:
            layer.set_adapter(selector)
        self._set_trainable(False)

    def adapter_for(self, role: Role) -> str | None:
        if role == "base" or not self.names:
            return None
        if role == "read" and READ_ADAPTER in self.names:
            return READ_ADAPTER
        return WRITE_ADAPTER

    def current(self) -> str | None:
        """The adapter of a call made now, in this thread (None: the plain backbone)."""
        role = self._role.get()
        return self.adapter_for(role if role is not None else self.default_role)

    @contextmanager
    def use(self, role: Role) -> Iterator[None]:
        """Compute the block's calls with the adapter for `role`; only the calling thread (or task) is affected.

        Blocks nest, the innermost wins.
        """
        _check_role(role)
        token = self._role.set(role)
        try:
            yield
        finally:
            self._role.reset(token)

    def activate(self, role: Role) -> None:
        """Set the role of calls made outside any `use` block (e.g. the backbone called directly).

        Only such calls are affected: reads and writes of this library choose their adapter per call.
        """
        _check_role(role)
        self.default_role = role

    @property
    def active(self) -> str | None:
        """The adapter of calls outside any `use` block."""
        return self.adapter_for(self.default_role)

    def set_trainable(self, trainable: bool) -> None:
        """Let both adapters' weights receive gradients (training) or freeze them (inference)."""
        if trainable:
            self.unmerge()  # merged weights would go stale as the adapters train
        self.trainable = trainable
        self._set_trainable(trainable)

    # --- merged weights for inference ----------------------------------------------------------
    def merged_bytes(self) -> int:
        """The memory `merge()` takes: one copy of every LoRA layer's weight per adapter."""
        return len(self.names) * sum(layer.get_base_layer().weight.nbytes for layer in self.layers)

    @property
    def merged(self) -> bool:
        return any("forward" in vars(layer) for layer in self.layers)

    @torch.no_grad()
    def merge(self) -> None:
        """Compute inference calls with each adapter merged into its layer's weight (see the module doc).

        Call it once the adapters hold their final weights (after loading): the merged copies are
        taken now. Calls with gradients enabled, and layers the merge cannot express (dropout in
        training mode, LoRA variants such as DoRA, weights moved to another device or dtype since),
        still run PEFT's own forward; `unmerge()` (and `set_trainable(True)`) drop the copies.
        """
        for layer in self.layers:
            base = layer.get_base_layer()
            if not isinstance(base, torch.nn.Linear) or any(name in layer.lora_variant for name in self.names):
                continue
            merged = {name: _merged_weight(layer, base, name) for name in self.names if name in layer.lora_A}
            layer.forward = types.MethodType(_merged_forward(self, base, merged, type(layer).forward), layer)

    def unmerge(self) -> None:
        """Back to PEFT's forward (base matmul + LoRA) everywhere; the merged copies are freed."""
        for layer in self.layers:
            vars(layer).pop("forward", None)

    def _set_trainable(self, trainable: bool) -> None:
        if self.names:
            set_requires_grad(self.backbone, adapter_names=self.names, requires_grad=trainable)


def _merged_weight(layer, base: torch.nn.Linear, name: str) -> torch.Tensor:
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    delta = (lora_b.float() @ lora_a.float()) * layer.scaling[name]
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return (base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype)


def _merged_forward(switch: AdapterSwitch, base: torch.nn.Linear, merged: dict[str, torch.Tensor], peft_forward):
    """A LoRA layer's forward with the calling context's adapter merged in (PEFT's own when it cannot be)."""

    def forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = switch.current()
        weight = base.weight if name is None else merged.get(name)
        usable = (
            weight is not None
            and not args
            and not kwargs
            and not torch.is_grad_enabled()
            and weight.device == base.weight.device
            and weight.dtype == base.weight.dtype
            and not (layer.training and name is not None and getattr(layer.lora_dropout[name], "p", 0) > 0)
        )
        if not usable:
            return peft_forward(layer, x, *args, **kwargs)
        return F.linear(x.to(weight.dtype), weight, base.bias)

    return forward


def _check_role(role: str) -> None:
    if role not in ("write", "read", "base"):
        raise ValueError(f"role must be 'write', 'read' or 'base', got {role!r}")
