"""Configuration of a MemoryLLM: a Llama-family backbone plus the sizes of its memory pool."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .positions import check_scheme

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
        forgetting: which K slots a write drops. "random" (the release): drawn uniformly, so a
            write keeps a fraction (1 - K/N)^t of its slots t writes later, and a focused read of
            an old write reads a few of them. "oldest": the pool's oldest K (it is kept in write
            order), so a write stays whole for N/K - 1 later writes, then leaves at once (M+: into
            long-term memory). Pinned (protected) slots go last under either.
        lora: LoRA settings (`r`, `lora_alpha`, `lora_dropout`, `target_modules`), or None for none.
        add_decoder_lora: a second adapter, `decoder_adapter`, is active while reading; the
            `default` adapter is active while writing. Without it `default` serves both.
        chunk_size: long texts are injected in chunks of at most this many tokens.
        min_context_tokens: shorter contexts are refused unless the caller allows them.
        token_shift: add a learned map of the previous token's embedding to each token's input
            embedding, in writes and reads alike (off in the released models). Small models trained
            from scratch learn in-context and memory recall far faster with it (measured on the
            tiny preset: in-context exact-hit 0.44 instead of 0.07 after the same 1,500 steps).
        memory_positions: RoPE positions of memory slots relative to the prompt (`positions.py`):
            "pool" (the release: slot i at i, the prompt after the last slot, so an old write's
            distance grows with every later write), "per_write" (every write keeps the positions
            it had as the newest write; distances never grow) or "fixed" (every slot one step
            before the prompt). Official checkpoints always use "pool".
        focused_writes: 0 (the release): a read attends to the whole short-term pool (M+: plus
            what it retrieves). n > 0: a focused read (`focus.py`), in which each prompt attends
            only to the n writes that share its rarest tokens, gathered from wherever their slots
            are now (short-term pool; M+: long-term memory too), K slots each, once, the best
            nearest the prompt: [bos ; K slots ; prompt], the layout the adapters were trained on.
            They read one write alone far better than one write among many (docs/experiments.md);
            n=1 read best on SmolLM2. A prompt sharing no ranked token with any write is read
            by the base model (`MemoryLLM.reads_without_memory`).
        isolated_writes: False (the release): a write reads the newest K slots before its text,
            so each write's slots depend on the one before, and so on down the stream. True: every
            write is computed from its text alone, as a write into an empty pool is (a text
            shorter than K repeats its slots to K). On SmolLM2 the chained writes of a long stream
            were read far worse than the same texts written alone (docs/experiments.md), so a
            write's slots should not depend on how long the memory has been in use.
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
        token_shift: bool = False,
        memory_positions: str = "pool",
        focused_writes: int = 0,
        isolated_writes: bool = False,
        forgetting: str = "random",
        **kwargs: Any,
    ):
        if forgetting not in ("random", "oldest"):
            raise ValueError(f"forgetting must be 'random' or 'oldest', got {forgetting!r}")
        self.forgetting = forgetting
        if focused_writes < 0:
            raise ValueError(f"focused_writes must be >= 0, got {focused_writes}")
        self.focused_writes = focused_writes
        self.isolated_writes = isolated_writes
        self.token_shift = token_shift
        self.memory_positions = check_scheme(memory_positions)
        if isinstance(backbone_config, dict):
            backbone_config = AutoConfig.for_model(**backbone_config)
        elif backbone_config is not None:
            # A copy: PretrainedConfig.__init__ resets its sub-configs' attention backend, and a
            # loaded model's config passed in here must keep its own (None means no causal mask).
            backbone_config = copy.deepcopy(backbone_config)
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


class MPlusConfig(MemoryLLMConfig):
    r"""Configuration of [`MPlus`]: MemoryLLM plus a long-term memory with a co-trained retriever (docs/design.md).

    Of `num_blocks` blocks of K slots, `num_ltm_blocks` are retrieved from long-term memory per
    prompt and the rest form short-term memory, so a read attends to the same number of slots.

    Args:
        num_ltm_blocks: blocks of K slots retrieved from long-term memory for each prompt.
        selector_hidden_dim: h, the retrieval key size.
        num_selector_layers: layers of each retriever MLP (2: Linear -> SiLU -> Linear).
        initial_rf_when_moving_stm_to_ltm: recall frequency an evicted slot starts with.
        decay_frequency: subtracted from every frequency each `update_ltm_frequency` writes.
        update_ltm_frequency: writes between frequency decays (and pruning).
        ltm_max_slots: hard per-layer budget of long-term slots (None: unbounded); the lowest-value
            slots (recall frequency x importance) go first.
        ltm_index: "exact" (default), "ivf" or "hnsw" search over long-term keys.
        promote_on_retrieval: recall frequency added to retrieved slots (0 keeps the release's
            behaviour, which never raises it and so forgets first-in-first-out). Default: 1, or 0
            with `release_compatible`.
        release_compatible: reproduce the official M+ release exactly where latentmem differs on
            purpose (`ltm/release.py`): evicted slots wait in a pending buffer merged every
            `update_ltm_frequency` writes, arriving with the release's ages; the release's
            all-or-nothing decay; no promotion on retrieval; fewer long-term slots than the budget
            read tiled; equal ages read in the release's order. On when an official folder is
            loaded (which also sets `drop_memory_per_layer`: the release's M+ draws every layer's
            drops separately), off for latentmem's own models.
        protect_pinned_fraction: at most this fraction of short-term slots is spared by random
            drops because it belongs to pinned injections (0: off, as in the release).
        retrieved_slots_position: where a read puts the retrieved slots. "first": [bos ; retrieved ;
            STM ; prompt], as the release. "before_newest_write": [bos ; older STM ; retrieved ;
            newest K STM slots ; prompt]. "last": [bos ; STM ; retrieved ; prompt]. A model that
            reads well only what sits close to the prompt (measured: the `tiny` preset) can use
            what it retrieves only in the latter two.
        retrieval_unit: "slot" (the release: the top `num_ltm_blocks * K` single slots) or "write":
            whole writes (blocks of slots one injection wrote) ranked by their best slot's score and
            read whole, in write order (hierarchical retrieval).
        write_candidates: with `retrieval_unit="write"`, the index proposes this many times the
            retrieved slot count as candidates before they are grouped into writes (1: the same
            search as single-slot retrieval; more found no better writes on `tiny`, and a search
            of 4x as many slots at 1M slots per layer cost 10x as long).
        write_ranking: with `retrieval_unit="write"`, how writes are chosen. "per_layer": every
            layer ranks writes with its own learned retriever. "first_layer": writes are ranked once
            per prompt, from the first layer's slots, and every layer reads the same writes (a write
            is one block across all layers). The first layer's slots still carry their tokens'
            identity, so its retrieval keys are a fixed random projection of them
            (`ltm/matching.py`), and a write scores by how well it matches every prompt token
            (late interaction: the sum over prompt tokens of the best cosine among its slots). Needs
            no training; on `tiny` it found the answering write for 0.95 of held-out questions
            where the learned per-layer retrievers found 0.21 (docs/experiments.md). "tokens": also
            once per prompt for every layer, but from the writes' own tokens: each write is indexed
            by its distinct tokens when written, and a write scores by the rarity (inverse document
            frequency among the writes in memory) of the prompt tokens it contains. For models whose
            first-layer slots do not keep their tokens: on `smollm2-135m-mplus` it ranked the
            answering write in the top 4 for 0.97 of held-out questions, the first layer's slots 0.10.
        focused_writes (see `MemoryLLMConfig`): M+ ranks writes for a focused read with its
            token index, so it needs `write_ranking="tokens"`.
    """

    RETRIEVED_POSITIONS = ("first", "before_newest_write", "last")
    WRITE_RANKINGS = ("per_layer", "first_layer", "tokens")

    model_type = "latentmem_mplus"

    def __init__(
        self,
        num_ltm_blocks: int = 10,
        selector_hidden_dim: int = 256,
        num_selector_layers: int = 2,
        initial_rf_when_moving_stm_to_ltm: float = 10.0,
        decay_frequency: float = 1.0,
        update_ltm_frequency: int = 60,
        ltm_max_slots: int | None = None,
        ltm_index: str = "exact",
        promote_on_retrieval: float | None = None,
        protect_pinned_fraction: float = 0.0,
        retrieved_slots_position: str = "first",
        retrieval_unit: str = "slot",
        write_candidates: int = 1,
        write_ranking: str = "per_layer",
        release_compatible: bool = False,
        **kwargs: Any,
    ):
        if promote_on_retrieval is None:
            promote_on_retrieval = 0.0 if release_compatible else 1.0
        if release_compatible and promote_on_retrieval:
            raise ValueError("release_compatible reads never promote: leave promote_on_retrieval at 0")
        self.release_compatible = release_compatible
        if retrieval_unit not in ("slot", "write"):
            raise ValueError(f"retrieval_unit must be 'slot' or 'write', got {retrieval_unit!r}")
        if write_candidates < 1:
            raise ValueError(f"write_candidates must be >= 1, got {write_candidates}")
        if release_compatible and retrieval_unit == "write":
            raise ValueError("release_compatible retrieves single slots, as the release does: retrieval_unit='slot'")
        if release_compatible and kwargs.get("memory_positions", "pool") != "pool":
            raise ValueError("release_compatible reads memory in the release's pool order: memory_positions='pool'")
        if write_ranking not in self.WRITE_RANKINGS:
            raise ValueError(f"write_ranking must be one of {', '.join(map(repr, self.WRITE_RANKINGS))}, got {write_ranking!r}")
        if write_ranking != "per_layer" and retrieval_unit != "write":
            raise ValueError(f"write_ranking={write_ranking!r} ranks whole writes: set retrieval_unit='write'")
        if kwargs.get("focused_writes", 0) and write_ranking != "tokens":
            raise ValueError("M+ ranks writes for focused reads by their tokens: set write_ranking='tokens' "
                             "(with retrieval_unit='write')")  # fmt: skip
        self.retrieval_unit = retrieval_unit
        self.write_candidates = write_candidates
        self.write_ranking = write_ranking
        self.num_ltm_blocks = num_ltm_blocks
        self.selector_hidden_dim = selector_hidden_dim
        self.num_selector_layers = num_selector_layers
        self.initial_rf_when_moving_stm_to_ltm = initial_rf_when_moving_stm_to_ltm
        self.decay_frequency = decay_frequency
        self.update_ltm_frequency = update_ltm_frequency
        self.ltm_max_slots = ltm_max_slots
        self.ltm_index = ltm_index
        self.promote_on_retrieval = promote_on_retrieval
        self.protect_pinned_fraction = protect_pinned_fraction
        self.retrieved_slots_position = retrieved_slots_position
        super().__init__(**kwargs)
        if not 0 < num_ltm_blocks < self.num_blocks:
            raise ValueError(f"num_ltm_blocks ({num_ltm_blocks}) must be between 1 and num_blocks - 1 ({self.num_blocks - 1})")
        if retrieved_slots_position not in self.RETRIEVED_POSITIONS:
            raise ValueError(
                f"retrieved_slots_position must be one of {self.RETRIEVED_POSITIONS}, got {retrieved_slots_position!r}"
            )
        if ltm_index not in ("exact", "ivf", "hnsw"):
            raise ValueError(f"ltm_index must be 'exact', 'ivf' or 'hnsw', got {ltm_index!r}")

    @property
    def memory_size(self) -> int:
        """N: short-term slots per layer (the blocks not reserved for retrieved long-term slots)."""
        return (self.num_blocks - self.num_ltm_blocks) * self.num_tokens

    @property
    def retrieved_slots(self) -> int:
        """Long-term slots retrieved per layer and prompt (at most)."""
        return self.num_ltm_blocks * self.num_tokens


# Let transformers' Auto classes (e.g. AutoTokenizer reading a latentmem folder) recognise these configs.
AutoConfig.register(MemoryLLMConfig.model_type, MemoryLLMConfig, exist_ok=True)
AutoConfig.register(MPlusConfig.model_type, MPlusConfig, exist_ok=True)
