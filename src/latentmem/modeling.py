"""MemoryLLM: a Llama-family causal LM with a short-term memory pool in every decoder layer.

The model owns weights only: the backbone (its embeddings, layers, norm, rotary embedding and
lm_head are reused as they are), a learned bos vector per layer, the new-memory positional
embedding and two LoRA adapters. Memory lives in `MemoryState` objects that callers pass in:

    model = MemoryLLM.from_pretrained(path)
    memory = model.new_memory(seed=0)
    model.inject(memory, text="Ada's locker code is 4711.", tokenizer=tok, allow_short=True)
    out = model.generate(**tok("Ada's locker code is", return_tensors="pt"), memory=memory)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from . import inference_weights
from .adapters import AdapterSwitch
from .attention import use_folded_gqa_attention
from .config import MemoryLLMConfig
from .focus import focused_pool, rank_pool_writes
from .pool import forget_injections
from .positions import prompt_start
from .reading import MemoryPrefix, PrefixCache, compute_memory_prefix
from .state import MemoryState
from .writing import InjectionResult, inject

logger = logging.get_logger(__name__)

# Reads merge their adapter into weight copies by default while the copies (two layouts on a CPU,
# inference_weights.py) take at most this (SmolLM2-135M: 2 x 367 MiB).
AUTO_MERGE_BYTES = 1 << 30


class MemoryLLM(PreTrainedModel, GenerationMixin):
    config_class = MemoryLLMConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    # A read attends to [bos ; STM] and nothing else, so training may batch reads of several states
    # (M+ also reads slots retrieved from long-term memory, and says False).
    reads_short_term_only = True

    def __init__(self, config: MemoryLLMConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModelForCausalLM.from_config(config.backbone_config)
        use_folded_gqa_attention(self.backbone)
        config.backbone_config = self.backbone.config
        L, d = self.backbone.config.num_hidden_layers, self.backbone.config.hidden_size
        # Placed at position 0 of every layer, in front of memory.
        self.bos_embedding = nn.Parameter(torch.randn(L, 1, d) * 0.02) if config.add_bos_embedding else None
        # Added to the last K positions of a layer's input while writing, marking "these become memory".
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d))
        # Optional: every token also sees the previous token's embedding (starts as a no-op).
        self.token_shift = nn.Linear(d, d, bias=False) if config.token_shift else None
        if self.token_shift is not None:
            nn.init.zeros_(self.token_shift.weight)
        self.adapters = AdapterSwitch(self.backbone, config.lora, config.add_decoder_lora)
        self.set_fast_inference(True)
        self.prefix_cache = PrefixCache()
        self.checkpoint_memory: MemoryState | None = None  # the pool an official checkpoint ships
        self._ranking_skip: torch.Tensor | None = None  # prompt tokens focused reads ignore (`skip_in_ranking`)
        self.generation_config = self.backbone.generation_config

    # --- structure ------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The backbone's decoder stack (embed_tokens, layers, norm, rotary_emb)."""
        return self.backbone.get_decoder()

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def embed(
        self,
        input_ids: torch.Tensor,
        previous_token_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings `[B, n, d]` of `input_ids [B, n]`, token-shifted if the model has token shift.

        With token shift, position t also gets `token_shift(embedding of token t-1)`. The first
        position's previous token is `previous_token_ids [B]` (a continued sequence, e.g. a generation
        step) or nothing; padding (`attention_mask` 0, the mask may cover earlier tokens too) counts as nothing.
        """
        embed_tokens = self.decoder.embed_tokens
        hidden = embed_tokens(input_ids)
        if self.token_shift is None:
            return hidden
        n = input_ids.shape[1]
        if previous_token_ids is not None:
            first = embed_tokens(previous_token_ids)[:, None]
        else:
            first = torch.zeros_like(hidden[:, :1])
        previous = torch.cat([first, hidden[:, :-1]], dim=1)
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[:, -n - 1 :]  # the previous position's too, when the mask covers it
            if real.shape[1] == n:
                real = F.pad(real, (1, 0), value=int(previous_token_ids is not None))
            previous = previous * real[:, :-1, None].to(previous.dtype)
        return hidden + self.token_shift(previous)

    def _embedded_inputs(self, input_ids, inputs_embeds, previous_token_ids, attention_mask):
        """(input_ids, inputs_embeds) for the backbone: ids turned into shifted embeddings if needed."""
        if self.token_shift is None or input_ids is None or inputs_embeds is not None:
            return input_ids, inputs_embeds
        return None, self.embed(input_ids, previous_token_ids, attention_mask)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args, **kwargs) -> dict:
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new_ids = inputs.get("input_ids")
        # A generation step feeds only the new tokens; token shift needs the one before them.
        if self.token_shift is not None and new_ids is not None and input_ids.shape[1] > new_ids.shape[1]:
            inputs["previous_token_ids"] = input_ids[:, -new_ids.shape[1] - 1]
        return inputs

    def set_fast_inference(self, enabled: bool = True) -> None:
        """Compute inference calls (no gradients) the fast way (the default), or exactly as the release does.

        Enabled: reads compute with the read adapter merged into copies of the layers it adapts
        (`AdapterSwitch.merge`; skipped when the copies would exceed `AUTO_MERGE_BYTES`), those
        copies and the output head are laid out for the CPU's matmuls (inference_weights.py:
        oneDNN-packed for several rows, transposed for one), and a decoding step's attention is two
        batched products instead of SDPA's blocked kernel (attention.py). Copies are built at the
        first call that needs them and follow every change of the weights. Outputs agree with the
        exact path to float32 rounding, not bit for bit. Disabled: every call computes the release's
        arithmetic (PEFT's LoRA, the plain output head, SDPA), bit for bit, and no copy is held.
        Training computes the same either way.
        """
        head = self.backbone.get_output_embeddings()
        self.adapters.unmerge()
        inference_weights.stop_inference_copies(head)
        if hasattr(self, "prefix_cache"):  # memory keys/values were projected the other way
            self.prefix_cache.clear()
        for layer in self.decoder.layers:
            if hasattr(layer, "self_attn"):  # attention.py reads it: SDPA's kernel for decoding steps too
                layer.self_attn.exact_arithmetic = not enabled
        self._fast_inference = enabled
        if not enabled:
            return
        inference_weights.use_inference_copies(head)
        read = self.adapters.adapter_for("read")
        if read is not None and 2 * self.adapters.merged_bytes([read]) <= AUTO_MERGE_BYTES:
            self.adapters.merge([read], lazy=True)

    @property
    def fast_inference(self) -> bool:
        """Whether inference calls compute the fast way (`set_fast_inference`)."""
        return self._fast_inference

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone initialises itself; this model adds only plain parameters set in __init__.
        pass

    def train(self, mode: bool = True) -> "MemoryLLM":
        # Weights may change while training: cached memory keys/values would go stale.
        self.prefix_cache.clear()
        return super().train(mode)

    @property
    def fingerprint(self) -> str:
        """Identifies the memory shape and backbone architecture a MemoryState belongs to."""
        b = self.backbone.config
        key = {
            "model_type": b.model_type,
            "layers": b.num_hidden_layers,
            "hidden": b.hidden_size,
            "heads": b.num_attention_heads,
            "kv_heads": getattr(b, "num_key_value_heads", b.num_attention_heads),
            "vocab": b.vocab_size,
            "num_tokens": self.config.num_tokens,
            "slots": self.config.memory_size,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    # --- memory states --------------------------------------------------------------------
    def new_memory(self, seed: int = 0) -> MemoryState:
        """An empty memory for this model; `seed` fixes which slots later writes forget."""
        return MemoryState(
            self.backbone.config.num_hidden_layers,
            self.config.memory_size,
            self.backbone.config.hidden_size,
            dtype=self.dtype,
            device=self.device,
            seed=seed,
            fingerprint=self.fingerprint,
        )

    def initial_memory(self, seed: int = 0) -> MemoryState:
        """A fresh state holding the pool the checkpoint shipped (empty if it shipped none)."""
        state = self.new_memory(seed)
        if self.checkpoint_memory is not None and self.checkpoint_memory.initialized:
            state.stm = self.checkpoint_memory.stm
        return state

    def check_state(self, state: MemoryState) -> None:
        if not isinstance(state, MemoryState):
            raise TypeError(f"memory must be a MemoryState (from model.new_memory()), got {type(state).__name__}")
        if state.fingerprint != self.fingerprint:
            raise ValueError(
                f"this MemoryState belongs to another model (fingerprint {state.fingerprint!r}, "
                f"this model {self.fingerprint!r}); create one with model.new_memory()"
            )
        if state.device != self.device:
            raise ValueError(f"memory is on {state.device} but the model is on {self.device}; call memory.to(...)")

    # --- writing and decay (writing.py, pool.py) -----------------------------------------
    def inject(
        self,
        memory: MemoryState,
        input_ids=None,
        text: str | None = None,
        tokenizer=None,
        *,
        allow_short: bool = False,
        source: str = "",
        importance: float = 1.0,
        pin: bool = False,
    ) -> InjectionResult:
        """Write a context into `memory` (in place). Long contexts go in as several chunks.

        Args:
            memory: the state to write into.
            input_ids: token ids of the context (1-D or [1, n]), without BOS. Or:
            text, tokenizer: the context as text; it is tokenized without special tokens.
            allow_short: accept contexts under `config.min_context_tokens` tokens.
            source: a label kept with the injection's provenance record.
            importance, pin: how valuable the written slots are (M+ long-term budgets evict
                low-value slots first; `pin=True` means importance infinity).
        """
        importance = float("inf") if pin else importance
        return inject(
            self, memory, input_ids, text, tokenizer, allow_short=allow_short, source=source, importance=importance
        )

    def protected_slots(self, memory: MemoryState) -> torch.Tensor | None:
        """Short-term slots that random drops should spare (none in MemoryLLM)."""
        return None

    def note_write(self, memory: MemoryState, injection_id: int, token_ids: torch.Tensor) -> None:
        """Called before a write's pool update with its token ids: with `focused_writes`, the
        injection records the distinct ones (a long text's chunks add to the same record)."""
        if not self.config.focused_writes:
            return
        record = memory.injections[injection_id]
        record.distinct_tokens = list(dict.fromkeys([*(record.distinct_tokens or []), *token_ids.reshape(-1).tolist()]))

    def after_write(self, memory: MemoryState, evicted) -> None:
        """Called after every pool update with the evicted slots (MemoryLLM lets them go)."""

    def forget(self, memory: MemoryState, *, source: str | None = None, injection_ids=None) -> int:
        """Remove the slots written by the injections under `source` (or with these ids). Returns the count."""
        self.check_state(memory)
        if (source is None) == (injection_ids is None):
            raise ValueError("pass exactly one of source= or injection_ids=")
        ids = memory.injections_from(source) if source is not None else list(injection_ids)
        unknown = set(ids) - set(memory.injections)
        if unknown:
            raise KeyError(f"no injections with ids {sorted(unknown)} in this memory")
        return forget_injections(memory, ids)

    # --- reading (reading.py; focused reads: focus.py) ----------------------------------------
    def focuses(self, memory) -> bool:
        """Whether a read of `memory` is focused (`focused_writes`, see `focus.py`)."""
        return bool(self.config.focused_writes) and isinstance(memory, MemoryState) and memory.initialized

    def rank_writes_for(self, memory: MemoryState, prompt_ids: torch.Tensor):
        """Writes best first for a focused read of `prompt_ids`: those in the pool, by shared rare tokens."""
        return rank_pool_writes(memory, self.ranking_tokens(prompt_ids))

    def skip_in_ranking(self, token_ids) -> None:
        """Never rank writes by these prompt tokens: the chat template's own text and question words
        (`load_model` passes `models.ranking_stop_tokens(tokenizer)`). SmolLM2's system prompt ("...
        named SmolLM, trained by Hugging Face") is in every prompt, and its pieces (" H", "ol") are
        rare among writes: the one write holding them ("... I started Honaiazol.") was ranked first
        for questions about anything (measured: docs/experiments.md)."""
        self._ranking_skip = torch.as_tensor(sorted({int(t) for t in token_ids}), dtype=torch.long)

    def ranking_tokens(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """`prompt_ids` without the tokens set by `skip_in_ranking`: the ones a focused read ranks by."""
        ids = prompt_ids.reshape(-1)
        skip = self._ranking_skip
        return ids if skip is None or len(skip) == 0 else ids[~torch.isin(ids, skip.to(ids.device))]

    def reads_without_memory(self, memory, prompt_ids: torch.Tensor | None = None, *, ranked=None) -> bool:
        """Whether a read of `memory` (by the prompt `prompt_ids [n]`, when given; or by a prompt whose
        writes `rank_writes_for` already `ranked`) runs as the plain base model (no memory, no read
        adapter).

        A focused model reads so an empty memory, and a memory in which no write shares a token with
        the prompt (besides `skip_in_ranking`'s): its read adapter learned to answer from memory,
        bare answers only. With nothing written it answered a greeting with one word of it
        ("Biscuit"); with a memory in use it answered "What is the capital of France?" with a town
        from a note (docs/experiments.md), where the base model replies. The release
        (focused_writes=0) reads every memory through its read adapter, as the official code does.
        """
        if not self.config.focused_writes or not isinstance(memory, MemoryState):
            return False
        if not memory.initialized:
            return True
        if ranked is None and prompt_ids is not None:
            ranked = self.rank_writes_for(memory, torch.as_tensor(prompt_ids))
        return ranked is not None and len(ranked) == 0

    def focused_prefix(self, memory: MemoryState, ranked) -> MemoryPrefix:
        """The keys/values one prompt's focused read attends to, [bos ; its best-ranked writes' slots]
        (`focus.focused_pool`), given its writes ranked best first (`rank_writes_for`)."""
        with self.adapters.use("read"):
            pool, sources = focused_pool(self, memory, ranked=ranked)
            return compute_memory_prefix(self, pool, sources=sources)

    def reads_depend_on_prompt(self, memory: MemoryState) -> bool:
        """Whether what a read of `memory` attends to depends on the prompt (focused reads)."""
        return self.focuses(memory)

    def read_prefix_length(self, memory: MemoryState) -> int:
        """Entries a read of a written `memory` puts before the prompt: [bos ; pool], or [bos ; the
        focused writes' slots] (`focus.py`)."""
        slots = self.config.focused_writes * self.config.num_tokens if self.focuses(memory) else memory.num_slots
        return (1 if self.bos_embedding is not None else 0) + slots

    def memory_prefix(self, memory: MemoryState | torch.Tensor):
        """Memory keys/values for reading.

        A `MemoryState`'s are cached per memory version (fresh, with gradients, in training mode);
        a raw pool `[L, M, d]` (e.g. slots just written, still carrying gradients) is projected anew.
        """
        if isinstance(memory, torch.Tensor):
            L, d = self.backbone.config.num_hidden_layers, self.backbone.config.hidden_size
            if memory.dim() != 3 or memory.shape[0] != L or memory.shape[2] != d:
                raise ValueError(f"a memory tensor must be [layers={L}, slots, hidden={d}], got {list(memory.shape)}")
            with self.adapters.use("read"):
                return compute_memory_prefix(self, memory)
        self.check_state(memory)
        if self.training and torch.is_grad_enabled():
            with self.adapters.use("read"):
                return compute_memory_prefix(self, memory.stm if memory.initialized else None, sources=memory.sources)
        return self.prefix_cache.get(self, memory)  # projects with the read adapter itself

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        memory: MemoryState | torch.Tensor | None = None,
        past_key_values=None,
        previous_token_ids: torch.LongTensor | None = None,
        focused: bool = True,
        ranking_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward that reads `memory`; with `memory=None`, exactly the plain backbone.

        `memory` is a `MemoryState`, or a raw pool `[L, M, d]` of slots (read as is, not cached;
        training reads freshly written slots this way so gradients reach the write path).

        `attention_mask` and `position_ids` describe the prompt only (positions count from its
        first token); the memory prefix is placed in front of them here. A `cache` passed back in
        must come from a previous call with the same memory. `previous_token_ids [B]`: the token
        before `input_ids` when continuing a cache (only models with token shift use it; `generate`
        passes it). With `focused_writes`, each prompt reads its best-ranked writes (`focus.py`);
        `focused=False` reads the pool as it is. `ranking_ids [B, m]` (-1 pads): the tokens each row's
        focused read ranks writes by, instead of its whole prompt (a chat passes the message asked,
        not the window of earlier turns).
        """
        cache = cache if cache is not None else past_key_values
        if focused and self.focuses(memory):
            return self._focused_forward(
                memory, cache, input_ids, attention_mask, position_ids, labels, use_cache, logits_to_keep,
                previous_token_ids, ranking_ids=ranking_ids, **kwargs,
            )  # fmt: skip
        if self.reads_without_memory(memory):
            memory = None
        if memory is None:
            return self._base_forward(input_ids, inputs_embeds, attention_mask, position_ids, cache, labels, use_cache,
                                      logits_to_keep, previous_token_ids, **kwargs)  # fmt: skip
        input_ids, inputs_embeds = self._embedded_inputs(input_ids, inputs_embeds, previous_token_ids, attention_mask)
        common = dict(labels=labels, logits_to_keep=logits_to_keep, inputs_embeds=inputs_embeds, **kwargs)

        prefix = self.memory_prefix(memory)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if cache is None:
            cache = DynamicCache(config=self.backbone.config)
        if cache.get_seq_length() == 0:
            prefix.seed(cache, batch_size)
        return self.read_after_prefix(
            prefix.length, cache, input_ids, attention_mask, position_ids, use_cache,
            prompt_start=prefix.prompt_start, **common,
        )  # fmt: skip

    def _focused_forward(
        self, memory: MemoryState, cache, input_ids, attention_mask, position_ids, labels, use_cache,
        logits_to_keep, previous_token_ids, ranking_ids=None, **kwargs,
    ) -> CausalLMOutputWithPast:
        """A read with `focused_writes`: each prompt attends to its best-ranked writes' K slots, once
        each (`focus.py`); later generation steps continue the cache that first pass filled."""
        self.check_state(memory)
        if input_ids is None:
            raise ValueError("focused reads rank writes by the prompt's tokens: pass input_ids (not inputs_embeds)")
        fresh = cache is None or cache.get_seq_length() == 0
        # The first pass ranks each row's writes once; a batch in which no row ranks any write reads
        # as the base model, and so do later steps continuing the cache it filled.
        rows = _ranked_rows(input_ids, attention_mask, ranking_ids) if fresh else []
        ranked = [self.rank_writes_for(memory, ids) for ids in rows]
        if all(len(writes) == 0 for writes in ranked) if fresh else getattr(cache, "reads_as_base", False):
            out = self._base_forward(input_ids, None, attention_mask, position_ids, cache, labels, use_cache,
                                     logits_to_keep, previous_token_ids, **kwargs)  # fmt: skip
            if out.cache is not None:
                out.cache.reads_as_base = True  # later generation steps continue without memory
            return out
        prefix_length = self.read_prefix_length(memory)
        start = prompt_start(self.config.memory_positions, prefix_length, self.config.num_tokens)
        if fresh:
            cache = DynamicCache(config=self.backbone.config)
            prefixes = [self.focused_prefix(memory, writes) for writes in ranked]
            for i in range(memory.num_layers):  # one cache row per prompt, each with its own prefix
                keys, values = zip(*(prefix.layer(i) for prefix in prefixes))
                cache.update(torch.cat(keys), torch.cat(values), i)
        input_ids, inputs_embeds = self._embedded_inputs(input_ids, None, previous_token_ids, attention_mask)
        return self.read_after_prefix(
            prefix_length, cache, input_ids, attention_mask, position_ids, use_cache, prompt_start=start,
            labels=labels, logits_to_keep=logits_to_keep, inputs_embeds=inputs_embeds, **kwargs,
        )  # fmt: skip

    def _base_forward(
        self, input_ids, inputs_embeds, attention_mask, position_ids, cache, labels, use_cache, logits_to_keep,
        previous_token_ids, **kwargs,
    ) -> CausalLMOutputWithPast:
        """The plain backbone, no memory and no adapter (token shift, if any, still applies)."""
        input_ids, inputs_embeds = self._embedded_inputs(input_ids, inputs_embeds, previous_token_ids, attention_mask)
        with self.adapters.use("base"):
            return self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep, inputs_embeds=inputs_embeds,
                **kwargs,
            )  # fmt: skip

    def read_after_prefix(
        self, prefix_length: int, cache, input_ids, attention_mask, position_ids, use_cache,
        prompt_start: int | None = None, **common,
    ) -> CausalLMOutputWithPast:
        """Run the backbone on a prompt whose `cache` already starts with `prefix_length` memory positions.

        The prompt's first token sits at RoPE position `prompt_start` (default: right after the prefix).
        """  # fmt: skip
        inputs = input_ids if input_ids is not None else common["inputs_embeds"]
        batch_size, n = inputs.shape[:2]
        prompt_start = prefix_length if prompt_start is None else prompt_start
        if prompt_start != prefix_length and position_ids is None:
            # The backbone would number tokens by their cache index; number them from prompt_start.
            done = cache.get_seq_length() - prefix_length  # prompt tokens already in the cache
            position_ids = torch.arange(done, done + n, device=inputs.device).expand(batch_size, -1)
        if prefix_length:
            if attention_mask is not None:
                ones = attention_mask.new_ones(batch_size, prefix_length)
                attention_mask = torch.cat([ones, attention_mask], dim=-1)
            if position_ids is not None:
                position_ids = position_ids + prompt_start
        with self.adapters.use("read"):
            out = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=True, **common,
            )  # fmt: skip
        if use_cache is False:
            out.cache = None
        return out

    # --- checkpoints ----------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel, **memory_config) -> "MemoryLLM":
        """Wrap an already loaded causal LM (e.g. `AutoModelForCausalLM.from_pretrained(path)`)."""
        config = MemoryLLMConfig(backbone_config=backbone.config, **memory_config)
        return cls(config, backbone=backbone).to(device=backbone.device, dtype=backbone.dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        attn_implementation: str | None = None,
        **hf_kwargs,
    ) -> "MemoryLLM":
        """Load a latentmem folder or an official MemoryLLM checkpoint folder (checkpoint.py).

        `dtype` defaults to the checkpoint's own ("auto"). For drop-in use where transformers'
        arguments are passed, `torch_dtype` is read as `dtype` and a single-device `device_map` as
        `device`; loading-strategy flags (`low_cpu_mem_usage`, `trust_remote_code`, ...) are ignored.
        """
        from .checkpoint import load_pretrained

        dtype = dtype if dtype is not None else hf_kwargs.pop("torch_dtype", None)
        device_map = hf_kwargs.pop("device_map", None)
        if device is None and isinstance(device_map, (str, torch.device, int)) and device_map != "auto":
            device = device_map
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        if hf_kwargs:
            logger.info("from_pretrained ignores %s", sorted(hf_kwargs))
        return load_pretrained(path, dtype=dtype, device=device, attn_implementation=attn_implementation)

    def save_pretrained(self, path: str | Path, *, layout: str = "native", memory: MemoryState | None = None) -> None:
        """Write the weights: `layout="native"` (no memory inside) or `"official"` (with `memory`)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, layout=layout, memory=memory)


def _ranked_rows(input_ids: torch.Tensor, attention_mask, ranking_ids) -> list[torch.Tensor]:
    """Per row, the tokens a focused read ranks writes by: `ranking_ids`' row (its -1 pads dropped)
    when given, else the row's real prompt tokens."""
    if ranking_ids is not None:
        ranking_ids = torch.as_tensor(ranking_ids, device=input_ids.device).reshape(len(input_ids), -1)
        return [row[row >= 0] for row in ranking_ids]
    return [row if attention_mask is None else row[attention_mask[b].bool()] for b, row in enumerate(input_ids)]
