"""Configuration of a MemoryLLM: a Llama-family backbone plus the sizes of its memory pool."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

# The projections the released 8B models put LoRA adapters on.
DEFAULT_LORA = {
    "r": 8,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "gate_proj"],
}


class MemoryLLMConfig(PretrainedConfig):
    r"""Configuration of [`MemoryLLM`].

    Args:
        backbone_config: config of the wrapped causal LM (Llama, Mistral, Qwen2, ...), or its dict.
        num_tokens: K, the slots written per injection (256 in the released 8B models).
        num_blocks: the pool holds `num_blocks * num_tokens` slots per layer (N).
        add_bos_embedding: a learned per-layer vector is placed at position 0, before memory.
        drop_memory_per_layer: draw the slots to forget independently in every layer.
        lora: LoRA settings (`r`, `lora_alpha`, `lora_dropout`, `target_modules`), or None for none.
        add_decoder_lora: a second adapter, `decoder_adapter`, is active while reading; the
            `default` adapter is active while writing. Without it `default` serves both.
        chunk_size: long texts are injected in chunks of at most this many tokens.
        min_context_tokens: shorter contexts are refused unless the caller allows them.
    """

    model_type = "latentmem_memoryllm"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict | None = None,
        num_tokens: int = 256,
        num_blocks: int = 50,
        add_bos_embedding: bool = True,
        drop_memory_per_layer: bool = False,
        lora: dict | None = None,
        add_decoder_lora: bool = True,
        chunk_size: int = 512,
        min_context_tokens: int = 16,
        **kwargs: Any,
    ):
        if isinstance(backbone_config, dict):
            backbone_config = AutoConfig.for_model(**backbone_config)
        self.backbone_config = backbone_config
        self.num_tokens = num_tokens
        self.num_blocks = num_blocks
        self.add_bos_embedding = add_bos_embedding
        self.drop_memory_per_layer = drop_memory_per_layer
        self.lora = dict(lora) if lora is not None else None
        self.add_decoder_lora = add_decoder_lora and lora is not None
        self.chunk_size = chunk_size
        self.min_context_tokens = min_context_tokens
        super().__init__(**kwargs)
        if num_tokens < 1 or num_blocks < 1:
            raise ValueError(f"num_tokens and num_blocks must be >= 1, got {num_tokens} and {num_blocks}")
        if chunk_size < min_context_tokens:
            raise ValueError(f"chunk_size ({chunk_size}) must be >= min_context_tokens ({min_context_tokens})")

    @property
    def memory_size(self) -> int:
        """N: slots in one layer's short-term pool."""
        return self.num_blocks * self.num_tokens

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        # Generation utilities (caches, stopping criteria) size themselves from the backbone.
        return self.backbone_config
