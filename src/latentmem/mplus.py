"""M+: MemoryLLM whose evicted slots move to a long-term memory, recalled by a co-trained retriever.

Everything MemoryLLM does stays as it is (writing, short-term pool, decay); M+ adds:
- a retriever per layer (`ltm/retriever.py`) that keys slots and queries prompts in h dimensions;
- the eviction path: slots a write drops from short-term memory are keyed and appended to the
  state's `LongTermStore` (age 0, recall frequency `initial_rf_when_moving_stm_to_ltm`); every
  write ages long-term slots by K; every `update_ltm_frequency` writes frequencies decay and
  forgotten slots are pruned;
- reading: per layer, the top R long-term slots for the prompt, oldest first, go between bos and
  short-term memory (`ltm/recall.py`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import MPlusConfig
from .ltm import release
from .ltm.recall import prefill_with_retrieval, token_ranking
from .ltm.matching import distinct_first, match_projection, match_vectors
from .ltm.retriever import LayerRetriever
from .modeling import MemoryLLM
from .pool import Evicted
from .positions import prompt_start
from .state import EXTERNAL, MemoryState


class MPlus(MemoryLLM):
    config_class = MPlusConfig
    reads_short_term_only = False  # reads also retrieve long-term slots

    def __init__(self, config: MPlusConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config, backbone)
        b = self.backbone.config
        self.retrievers = nn.ModuleList(
            LayerRetriever(b.hidden_size, config.selector_hidden_dim, config.num_selector_layers)
            for _ in range(b.num_hidden_layers)
        )
        if config.write_ranking != "per_layer":  # fixed, so not saved: rebuilt identically (ltm/matching.py)
            self.register_buffer("match_projection", match_projection(b.hidden_size, config.selector_hidden_dim),
                                 persistent=False)  # fmt: skip

    def retrieval_keys(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """Long-term keys `[..., h]` of slots already passed through `layer`'s input norm."""
        if layer == 0 and self.config.write_ranking == "first_layer":
            return match_vectors(normed, self.match_projection)
        return self.retrievers[layer].keys(normed)

    def retrieval_queries(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """Retrieval queries `[..., h]` of prompt states already passed through `layer`'s input norm."""
        if layer == 0 and self.config.write_ranking == "first_layer":
            return match_vectors(normed, self.match_projection)
        return self.retrievers[layer].queries(normed)

    def token_match_vectors(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Match vectors `[n, h]` of tokens `[n]` (`write_ranking="tokens"`): each token's own
        embedding (no token shift: a token must match itself in any context) through the first
        layer's input norm and the fixed projection."""
        ids = token_ids.reshape(-1).to(self.decoder.embed_tokens.weight.device)
        normed = self.decoder.layers[0].input_layernorm(self.decoder.embed_tokens(ids))
        return match_vectors(normed, self.match_projection).cpu()

    @torch.no_grad()
    def note_write(self, memory: MemoryState, injection_id: int, token_ids: torch.Tensor) -> None:
        """Index a write's distinct tokens for `write_ranking="tokens"` (other rankings: nothing to do)."""
        if self.config.write_ranking != "tokens":
            return
        ids = token_ids.reshape(-1).cpu()
        first = distinct_first(ids)
        memory.ltm.add_write_tokens(injection_id, self.token_match_vectors(ids[first]))

    @property
    def fingerprint(self) -> str:
        matched = {"first_layer": "-first-layer", "tokens": "-tokens"}.get(self.config.write_ranking, "")
        return super().fingerprint + f"-ltm{self.config.selector_hidden_dim}{matched}"

    def new_memory(self, seed: int = 0) -> MemoryState:
        """An empty memory with an empty long-term store."""
        from .ltm.store import LongTermStore

        state = super().new_memory(seed)
        cfg, b = self.config, self.backbone.config
        state.ltm = LongTermStore(
            b.num_hidden_layers, b.hidden_size, cfg.selector_hidden_dim,
            dtype=self.dtype if self.dtype != torch.float32 else torch.float32,
            index=cfg.ltm_index, max_slots=cfg.ltm_max_slots, min_slots=cfg.retrieved_slots,
        )  # fmt: skip
        return state

    def initial_memory(self, seed: int = 0) -> MemoryState:
        """A fresh state holding the short- and long-term memory the checkpoint shipped (the long-term
        store is copied cheaply: its memory-mapped slots are shared, see `LongTermStore.copy`)."""
        state = super().initial_memory(seed)
        if self.checkpoint_memory is not None and self.checkpoint_memory.ltm is not None:
            state.ltm = self.checkpoint_memory.ltm.copy()
        if self.config.release_compatible:
            state.ltm.release_reads = True
            state.ltm.stm_ages = np.zeros((state.num_layers, state.num_slots), np.int64)  # the release starts at 0
        return state

    # --- writing: the eviction path -------------------------------------------------------
    def protected_slots(self, memory: MemoryState) -> torch.Tensor | None:
        """Pinned injections' short-term slots, up to `protect_pinned_fraction` of the pool (opt-in)."""
        budget = int(self.config.protect_pinned_fraction * memory.num_slots)
        pinned = [i.id for i in memory.injections.values() if i.importance == float("inf")]
        if budget == 0 or not pinned:
            return None
        protected = torch.isin(memory.sources, torch.tensor(pinned))
        # Over budget: protect the newest pinned slots (the pool keeps newer slots to the right).
        excess = protected.cumsum(dim=1) > protected.sum(dim=1, keepdim=True) - budget
        return protected & ~excess if protected.sum(dim=1).max() > budget else protected

    @torch.no_grad()
    def after_write(self, memory: MemoryState, evicted: Evicted | None) -> None:
        cfg, ltm = self.config, memory.ltm
        ltm.advance_ages(cfg.num_tokens)
        if cfg.release_compatible:  # see ltm/release.py
            ltm.release_reads = True
            arrivals = release.track_short_term_ages(ltm, memory.shape[:2], cfg.num_tokens, evicted)
        if evicted is not None:
            importance = self._importance(memory, evicted.sources)
            for i, layer in enumerate(self.decoder.layers):
                slots = evicted.slots[i].to(self.dtype)
                keys = self.retrieval_keys(i, layer.input_layernorm(slots))
                rf, sources = cfg.initial_rf_when_moving_stm_to_ltm, evicted.sources[i]
                if cfg.release_compatible:
                    ltm.add_pending(i, slots, keys, sources, ages=arrivals[i], frequency=rf, importance=importance[i])
                else:
                    ltm.add(i, slots, keys, sources, frequency=rf, importance=importance[i])
        if memory.write_count % cfg.update_ltm_frequency == 0:
            if cfg.release_compatible:
                ltm.merge_pending(cfg.decay_frequency, keep_more_than=cfg.retrieved_slots)
            else:
                ltm.decay(cfg.decay_frequency)
            if cfg.write_ranking == "tokens":
                # Drop the token keys of writes with no slot left anywhere (they can no longer be read).
                # With the decay, not every write: evicted slots stay in long-term memory, so writes
                # vanish in decays (and budget evictions, caught here later); a scan of every slot's
                # source per write would cost ~0.3 s at 8B shape, and a stale key only ranks a write
                # that then contributes no slots.
                alive = [memory.sources.reshape(-1).cpu()] + [ltm.sources(i) for i in range(memory.num_layers)]
                ltm.keep_write_tokens(torch.unique(torch.cat(alive)))

    @staticmethod
    def _importance(memory: MemoryState, sources: torch.Tensor) -> torch.Tensor:
        by_id = {i.id: i.importance for i in memory.injections.values()}
        flat = [by_id.get(int(s), 1.0) if s != EXTERNAL else 1.0 for s in sources.view(-1)]
        return torch.tensor(flat, dtype=torch.float32).view(sources.shape)

    def forget(self, memory: MemoryState, *, source: str | None = None, injection_ids=None) -> int:
        """Remove an injection's slots from short-term and long-term memory."""
        ids = memory.injections_from(source) if source is not None else list(injection_ids or [])
        removed = super().forget(memory, source=source, injection_ids=injection_ids)
        return removed + memory.ltm.remove_sources(ids)

    # --- reading --------------------------------------------------------------------------
    def retrieval_count(self, memory: MemoryState) -> int:
        """R: long-term slots each layer retrieves (equal across layers, so one mask fits all)."""
        return min(memory.ltm.retrievable(i, self.config.retrieved_slots) for i in range(memory.num_layers))

    def rank_writes_for(self, memory: MemoryState, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Writes best first for a focused read of `prompt_ids`: by the token index (`write_ranking="tokens"`)."""
        return token_ranking(self, memory, self.ranking_tokens(prompt_ids))

    def reads_depend_on_prompt(self, memory: MemoryState) -> bool:
        """Whether what a read of `memory` attends to depends on the prompt (retrieved or focused slots)."""
        return super().reads_depend_on_prompt(memory) or (memory.initialized and self.retrieval_count(memory) > 0)

    def read_prefix_length(self, memory: MemoryState) -> int:
        """Entries a read of `memory` puts before the prompt: [bos ; retrieved ; STM], or [bos ; focused pool]."""
        count = 0 if self.focuses(memory) or not memory.initialized else self.retrieval_count(memory)
        return super().read_prefix_length(memory) + count

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
        retrieve_fn=None,
        ranking_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As `MemoryLLM.forward`; a state with long-term slots also reads what the prompt retrieves.

        `retrieve_fn` replaces the learned retrieval of the first pass (see `prefill_with_retrieval`).
        """
        cache = cache if cache is not None else past_key_values
        if retrieve_fn is None and self.focuses(memory):
            return self._focused_forward(
                memory, cache, input_ids, attention_mask, position_ids, labels, use_cache, logits_to_keep,
                previous_token_ids, ranking_ids=ranking_ids, **kwargs,
            )  # fmt: skip
        count = self.retrieval_count(memory) if isinstance(memory, MemoryState) and memory.initialized else 0
        if count == 0:
            return super().forward(
                input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, use_cache, logits_to_keep,
                memory, previous_token_ids=previous_token_ids, focused=False, **kwargs,
            )  # fmt: skip
        self.check_state(memory)
        if input_ids is None:
            raise ValueError("M+ retrieval needs input_ids (not inputs_embeds)")
        if cache is None or cache.get_seq_length() == 0:
            with self.adapters.use("read"):
                return prefill_with_retrieval(
                    self, memory, input_ids, attention_mask, position_ids, count, labels, logits_to_keep, use_cache,
                    retrieve_fn=retrieve_fn,
                )  # fmt: skip
        # Later generation steps: [bos ; retrieved ; STM] is already in the cache (here even with
        # focused_writes: a retrieve_fn asked for retrieval).
        prefix_length = (1 if self.bos_embedding is not None else 0) + count + memory.num_slots
        input_ids, inputs_embeds = self._embedded_inputs(input_ids, None, previous_token_ids, attention_mask)
        start = prompt_start(self.config.memory_positions, prefix_length, self.config.num_tokens)
        return self.read_after_prefix(
            prefix_length, cache, input_ids, attention_mask, position_ids, use_cache, prompt_start=start,
            labels=labels, logits_to_keep=logits_to_keep, inputs_embeds=inputs_embeds, **kwargs,
        )  # fmt: skip
