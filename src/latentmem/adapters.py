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

For inference, `AdapterSwitch.merge()` keeps each adapter's merged weight `W + s·BA` per LoRA
layer, so an inference call is one matmul per layer instead of PEFT's base matmul plus two small
LoRA matmuls, a dropout and an add: 13-24% of a lone SmolLM2 forward on a CPU. The merged forward
still picks its weight by the calling context's adapter; it costs one weight copy per adapter and
layout (`merged_bytes`, inference_weights.py), follows every change of the weights it was made
from, and is used only without gradients (training always computes through PEFT). A MemoryLLM
merges its read adapter at the first read (`MemoryLLM.set_fast_inference`); the server merges both.
"""

from __future__ import annotations

import contextvars
import types
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from peft import LoraConfig
from peft.functional import inject_adapter_in_model, set_requires_grad
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from .inference_weights import InferenceWeight, eager_layout

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
            self._drop_merged_copies()  # training computes through PEFT; copies are rebuilt after it
        self.trainable = trainable
        self._set_trainable(trainable)

    # --- merged weights for inference ----------------------------------------------------------
    def merged_bytes(self, adapters: Sequence[str] | None = None) -> int:
        """Bytes of one layout of the copies `merge(adapters)` makes (default: all adapters).

        Every LoRA layer's weight once per adapter; on a CPU a copy may be held in two layouts
        (inference_weights.py), each built only when a call needs it.
        """
        count = len(self.names if adapters is None else [a for a in adapters if a in self.names])
        return count * sum(layer.get_base_layer().weight.nbytes for layer in self.layers)

    @property
    def merged(self) -> tuple[str, ...]:
        """The adapters whose inference calls compute with merged weights (empty: none)."""
        names = set()
        for layer in self.layers:
            names.update(getattr(layer, "_latentmem_merged", {}))
        return tuple(n for n in self.names if n in names)

    @torch.no_grad()
    def merge(self, adapters: Sequence[str] | None = None, lazy: bool = False) -> None:
        """Compute inference calls of `adapters` (all by default) with merged weights (see the module doc).

        Each merged copy follows its sources: it is rebuilt when the base weight, either LoRA matrix
        or the scaling changed since (loading new adapter weights included). `lazy`: build each copy
        at its layer's first inference call instead of now. Calls with gradients enabled, calls while
        the adapters are trainable, and layers the merge cannot express (dropout in training mode,
        LoRA variants such as DoRA, inputs on another device or dtype) run PEFT's own forward;
        `unmerge()` goes back to PEFT everywhere.
        """
        chosen = self.names if adapters is None else list(adapters)
        for name in chosen:
            if name not in self.names:
                raise ValueError(f"no adapter named {name!r}; this model has {self.names}")
        for layer in self.layers:
            base = layer.get_base_layer()
            if not isinstance(base, torch.nn.Linear) or any(name in layer.lora_variant for name in self.names):
                continue
            if "forward" not in vars(layer):
                layer._latentmem_merged = {}
                layer.forward = types.MethodType(_merged_forward(self, base, type(layer).forward), layer)
            for name in chosen:
                if name in layer.lora_A and name not in layer._latentmem_merged:
                    layer._latentmem_merged[name] = _merged_copy(layer, base, name)
                if not lazy and name in layer._latentmem_merged:
                    layer._latentmem_merged[name].copy(eager_layout(base.weight))

    def unmerge(self) -> None:
        """Back to PEFT's forward (base matmul + LoRA) everywhere; the merged copies are freed."""
        for layer in self.layers:
            vars(layer).pop("forward", None)
            vars(layer).pop("_latentmem_merged", None)

    def _drop_merged_copies(self) -> None:
        for layer in self.layers:
            for copy in getattr(layer, "_latentmem_merged", {}).values():
                copy.drop()

    def _set_trainable(self, trainable: bool) -> None:
        if self.names:
            set_requires_grad(self.backbone, adapter_names=self.names, requires_grad=trainable)


def _merged_copy(layer, base: torch.nn.Linear, name: str) -> InferenceWeight:
    """`W + s·BA` for adapter `name`, rebuilt whenever W, A, B or s changed."""
    # parameters read from the modules' dicts: nn.Module.__getattr__ would cost microseconds per call
    w, a, b = base._parameters, layer.lora_A[name]._parameters, layer.lora_B[name]._parameters

    def make() -> torch.Tensor:
        delta = (b["weight"].float() @ a["weight"].float()) * layer.scaling[name]
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        weight = w["weight"]
        return (weight.float() + delta.to(weight.device)).to(weight.dtype)

    return InferenceWeight(make, lambda: (w["weight"], a["weight"], b["weight"]), lambda: (layer.scaling[name],))


def _merged_forward(switch: AdapterSwitch, base: torch.nn.Linear, peft_forward):
    """A LoRA layer's forward with the calling context's adapter merged in (PEFT's own when it cannot be)."""
    params = base._parameters

    def forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = switch.current()
        copy = layer._latentmem_merged.get(name) if name is not None else None
        weight = params["weight"]
        usable = (
            copy is not None
            and not args
            and not kwargs
            and not switch.trainable
            and not torch.is_grad_enabled()
            and x.device == weight.device
            and x.dtype == weight.dtype
            and not (layer.training and getattr(layer.lora_dropout[name], "p", 0) > 0)
        )
        if not usable:
            return peft_forward(layer, x, *args, **kwargs)
        return copy.linear(x, params["bias"])

    return forward


def _check_role(role: str) -> None:
    if role not in ("write", "read", "base"):
        raise ValueError(f"role must be 'write', 'read' or 'base', got {role!r}")
