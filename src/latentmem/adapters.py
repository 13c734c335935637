"""The two LoRA adapters of a MemoryLLM and which one is active.

`default` is active while writing (injection), `decoder_adapter` while reading; without a decoder
adapter, `default` serves both. Adapters are injected and switched through PEFT's public API for
models that are not a `PeftModel` (`peft.functional`, and `enable_adapters` on its tuner layers),
never by writing private attributes.
"""

from __future__ import annotations

import warnings
from typing import Literal

from peft import LoraConfig
from peft.functional import inject_adapter_in_model, set_adapter, set_requires_grad
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

WRITE_ADAPTER = "default"
READ_ADAPTER = "decoder_adapter"
Role = Literal["write", "read", "base"]


class AdapterSwitch:
    """Owns the LoRA adapters of a backbone and activates the one a role needs.

    Switching is remembered, so back-to-back reads (every step of `generate`) cost nothing.
    Whether adapter weights train is decided once (`trainable`), not by which one is active:
    PEFT's `set_adapter` freezes inactive adapters, but training writes with `default` and reads
    with `decoder_adapter` in the same step, so both must keep their gradients.
    """

    def __init__(self, backbone: PreTrainedModel, lora: dict | None, two_adapters: bool):
        self.backbone = backbone
        self.names: list[str] = []
        self.trainable = False
        self.active: str | None = None
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
        self._set_trainable(False)
        self.active = None
        self.activate("read")

    def adapter_for(self, role: Role) -> str | None:
        if role == "base" or not self.names:
            return None
        if role == "read" and READ_ADAPTER in self.names:
            return READ_ADAPTER
        return WRITE_ADAPTER

    def activate(self, role: Role) -> None:
        """Make the adapter for `role` active ("base" turns all adapters off: the plain backbone)."""
        name = self.adapter_for(role)
        if not self.names or name == self.active:
            return
        if name is None:
            for layer in self.layers:
                layer.enable_adapters(False)  # PEFT also freezes every adapter here:
            self._set_trainable(self.trainable)  # a base read mid-step (distillation) must keep their gradients
        else:
            if self.active is None:
                for layer in self.layers:
                    layer.enable_adapters(True)
            set_adapter(self.backbone, name)
            self._set_trainable(self.trainable)
        self.active = name

    def set_trainable(self, trainable: bool) -> None:
        """Let both adapters' weights receive gradients (training) or freeze them (inference)."""
        self.trainable = trainable
        self._set_trainable(trainable)

    def _set_trainable(self, trainable: bool) -> None:
        if self.names:
            set_requires_grad(self.backbone, adapter_names=self.names, requires_grad=trainable)
