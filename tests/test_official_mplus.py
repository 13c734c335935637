"""Official M+ checkpoints (SPEC §5-§6, issue 18): load, read, write, generate and save as the release does.

The folder is built the way the release builds and saves its model: a `LlamaForCausalLM` subclass
whose `__init__` adds `memory`, `bos_embedding`, `new_memory_positional_emb`, PEFT adapters
`default` and `decoder_adapter`, the retriever MLPs inside every attention module, and long-term
memory as `nn.ParameterList`s of float tensors (ages and recall frequencies too), cast to the model
dtype and written by transformers' `save_pretrained` (sharded). The expected numbers come from
`Release`, a slow re-statement of the release's algorithm on raw weights (tests/reference.py): its
pending buffer, ages, merges, decay and read order, with its global-RNG drops.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import latentmem
from latentmem.ltm.recall import retrieve

from conftest import LORA, SMALL, random_ids
from reference import layer_forward, reference_new_slots, rms_norm

K, BLOCKS, LTM_BLOCKS, H = 8, 6, 2, 16
N, R = (BLOCKS - LTM_BLOCKS) * K, LTM_BLOCKS * K
MPLUS_FIELDS = dict(
    num_tokens=K, num_blocks=BLOCKS, num_memory_tokens=N, add_bos_embedding=True, drop_memory_per_layer=False,
    add_decoder_lora=True, lora_config={**LORA, "inference_mode": True}, num_ltm_blocks=LTM_BLOCKS,
    update_ltm_mode="immediate", update_ltm_frequency=3, decay_frequency=1.0, initial_rf_when_moving_stm_to_ltm=10.0,
    selector_hidden_dim=H, num_selector_layers=2, add_selector=True, add_encoder_retriever=True, detach_hidden_state=True,
)  # fmt: skip


class MPlus(LlamaForCausalLM):
    """The release's model as its `__init__` lays out parameters (named MPlus, so that
    `save_pretrained` writes `architectures: ["MPlus"]` as the release's checkpoints have)."""

    def __init__(self, config):
        from peft import LoraConfig, get_peft_model

        super().__init__(config)
        L, d, h, M = config.num_hidden_layers, config.hidden_size, config.selector_hidden_dim, config.ltm_initial_size
        self.memory = nn.Parameter(torch.randn(L, N, d), requires_grad=False)
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d))
        self.bos_embedding = nn.Parameter(torch.randn(L, 1, d))
        lora = LoraConfig(inference_mode=True, **LORA)
        get_peft_model(self.model, lora)
        get_peft_model(self.model, lora, adapter_name="decoder_adapter")
        for layer in self.model.layers:
            for name in ("query_proj", "key_proj", "encoder_query_proj"):
                mlp = nn.Sequential(nn.Linear(d, 2 * h, bias=False), nn.SiLU(), nn.Linear(2 * h, h, bias=False))
                setattr(layer.self_attn, name, mlp)
        self.ltm = nn.ParameterList([nn.Parameter(torch.randn(M, d)) for _ in range(L)])
        self.ltm_keys = nn.ParameterList([nn.Parameter(torch.randn(M, h)) for _ in range(L)])
        self.ltm_recall_frequencies = nn.ParameterList([nn.Parameter(torch.zeros(M)) for _ in range(L)])
        self.ltm_ages = nn.ParameterList([nn.Parameter(torch.zeros(M)) for _ in range(L)])


def build_release_folder(
    folder, dtype=torch.float32, ltm_size=40, seed=0, max_shard_size="150KB", ages=None, frequencies=None,
    backbone=None, **fields,
):  # fmt: skip
    """Save an official M+ folder as the release would; return the model (cast to `dtype`)."""
    torch.manual_seed(seed)
    llama = LlamaConfig(**{**SMALL, **(backbone or {})}, **{**MPLUS_FIELDS, **fields}, ltm_initial_size=ltm_size)
    model = MPlus(llama).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name in ("bos_embedding", "new_memory_positional_emb"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for i, layer in enumerate(model.model.layers):
            model.ltm[i].copy_(torch.randn(ltm_size, llama.hidden_size, generator=g))
            model.ltm_keys[i].copy_(layer.self_attn.key_proj(layer.input_layernorm(model.ltm[i])))
            # ages in whole tokens with ties (writes of K slots age together), frequencies 1..10
            model.ltm_ages[i].copy_(ages if ages is not None else torch.randint(0, 6, (ltm_size,), generator=g) * K * 7 + 3)
            shipped = torch.randint(1, 11, (ltm_size,), generator=g).float()
            model.ltm_recall_frequencies[i].copy_(frequencies if frequencies is not None else shipped)
    model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


class Release:
    """The release's M+ inference on raw weights: `read`, `write`, `greedy`, after `put_ltm_to_numpy`."""

    def __init__(self, model: MPlus):
        self.model, self.cfg = model, model.config
        self.ref = SimpleNamespace(backbone=model, config=model.config, bos_embedding=model.bos_embedding,
                                   new_memory_positional_emb=model.new_memory_positional_emb)  # fmt: skip
        self.memory = model.memory.detach().clone()
        self.memory_ages = [np.zeros(N) for _ in self.layers]
        self.ltm = [x.detach().clone() for x in model.ltm]
        self.keys = [x.detach().clone() for x in model.ltm_keys]
        self.rf = [x.detach().float().numpy() for x in model.ltm_recall_frequencies]
        self.ages = [x.detach().int().numpy() for x in model.ltm_ages]
        self.pending = None  # (slots [L, P, d], keys [L, P, h], ages [L, P]) evicted since the last merge
        self.step = 0

    @property
    def layers(self):
        return self.model.model.layers

    def retrieve(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's long-term slots for prompt hidden states h [n, d], in the order the release reads them."""
        size = len(self.keys[i])
        if size < R:  # tiled, pending slots unseen
            indices = torch.cat([torch.arange(size)] * -(-R // size))[-R:]
            return self.ltm[i][indices[np.argsort(self.ages[i][indices.numpy()])[::-1].copy()]]
        attn = self.layers[i].self_attn
        queries = attn.query_proj(rms_norm(self.layers[i].input_layernorm, h))
        scores = (queries @ self.keys[i].T).sigmoid().mean(0)
        slots, ages = self.ltm[i], self.ages[i].astype(np.float64)
        if self.pending is not None:
            scores = torch.cat([scores, (queries @ self.pending[1][i].T).sigmoid().mean(0)])
            slots, ages = torch.cat([slots, self.pending[0][i]]), np.concatenate([ages, self.pending[2][i]])
        top = torch.topk(scores, R).indices.sort().values
        return slots[top][np.argsort(ages[top.numpy()])[::-1].copy()]

    @torch.no_grad()
    def read(self, ids: torch.Tensor, retrieved=None):
        """Logits [1, n, V] of a prompt, and the slots each layer retrieved (or reads `retrieved`)."""
        h = F.embedding(ids.view(1, -1), self.model.model.embed_tokens.weight)
        retrieved = list(retrieved) if retrieved is not None else None
        used = []
        for i, layer in enumerate(self.layers):
            # generation retrieves once, for the prompt: later tokens reuse the cached prefix
            got = retrieved[i] if retrieved is not None else self.retrieve(i, h[0])
            used.append(got)
            z = torch.cat([self.model.bos_embedding[i], got, self.memory[i], h[0]])[None]
            h = layer_forward(layer, z, z.shape[1] - h.shape[1], self.model.config, "decoder_adapter")
        h = rms_norm(self.model.model.norm, h)
        return F.linear(h, self.model.lm_head.weight), used

    def greedy(self, ids: torch.Tensor, steps: int) -> torch.Tensor:
        _, retrieved = self.read(ids)
        for _ in range(steps):
            next_id = self.read(ids, retrieved)[0][0, -1].argmax()
            ids = torch.cat([ids.view(1, -1), next_id.view(1, 1)], dim=1)
        return ids

    @torch.no_grad()
    def write(self, ids: torch.Tensor) -> None:
        """Inject a context: new slots, random drops per layer (global RNG), dropped slots to pending."""
        new = reference_new_slots(self.ref, self.memory, ids, adapter="default")
        dropped, dropped_ages = [], []
        for i in range(len(self.layers)):
            perm = torch.randperm(N)
            kept, gone = perm[: N - K].sort().values, perm[N - K :].sort().values
            dropped.append(self.memory[i][gone])
            dropped_ages.append(self.memory_ages[i][gone.numpy()])
            self.memory[i] = torch.cat([self.memory[i][kept], new[i]])
            self.memory_ages[i] = np.concatenate([self.memory_ages[i][kept.numpy()], np.arange(K)[::-1]])
        for i in range(len(self.layers)):
            self.ages[i] = self.ages[i] + K
        keys = torch.stack([self.layers[i].self_attn.key_proj(rms_norm(self.layers[i].input_layernorm, x))
                            for i, x in enumerate(dropped)])  # fmt: skip
        batch = (torch.stack(dropped), keys, np.stack(dropped_ages))
        if self.pending is None:
            self.pending = batch
        else:
            old = self.pending
            self.pending = (torch.cat([old[0], batch[0]], 1), torch.cat([old[1], batch[1]], 1),
                            np.concatenate([old[2] + K, batch[2]], 1))  # fmt: skip
        self.step += K
        if self.step >= self.cfg.update_ltm_frequency * K:
            self.merge()

    def merge(self) -> None:
        slots, keys, ages = self.pending
        for i in range(len(self.layers)):
            self.ltm[i] = torch.cat([self.ltm[i], slots[i]])
            self.keys[i] = torch.cat([self.keys[i], keys[i]])
            self.rf[i] = np.concatenate([self.rf[i], np.ones(slots.shape[1]) * self.cfg.initial_rf_when_moving_stm_to_ltm])
            self.ages[i] = np.concatenate([self.ages[i].astype(int), ages[i]])
            self.rf[i] = self.rf[i] - self.cfg.decay_frequency
            alive = np.where(self.rf[i] > 0.01)[0]
            if len(alive) > R:
                self.ltm[i], self.keys[i] = self.ltm[i][alive], self.keys[i][alive]
                self.rf[i], self.ages[i] = self.rf[i][alive], self.ages[i][alive]
            else:
                self.rf[i] = self.rf[i] + self.cfg.decay_frequency
        self.pending, self.step = None, 0


def retrieved_by(model, state, ids):
    """latentmem's logits for a prompt and the slots each layer retrieved for it."""
    got = {}

    def spy(model_, state_, layer, normed, count):
        out = retrieve(model_, state_, layer, normed, count)
        got[layer] = out[0] if isinstance(out, tuple) else out
        return out

    with torch.no_grad():
        logits = model(ids, memory=state, retrieve_fn=spy).logits
    return logits, [got[i] for i in sorted(got)]


def assert_same_long_term_memory(state, release: Release, atol=1e-5):
    for i in range(state.num_layers):
        size = state.ltm.size(i)
        assert size == len(release.ltm[i]), f"layer {i}"
        merged = state.ltm.get(i, torch.arange(size))
        torch.testing.assert_close(merged["slots"], release.ltm[i], atol=atol, rtol=0)
        torch.testing.assert_close(merged["keys"], release.keys[i].float(), atol=atol, rtol=0)
        assert merged["ages"].tolist() == release.ages[i].astype(np.int64).tolist(), f"layer {i}"
        assert merged["frequencies"].tolist() == release.rf[i].astype(np.float32).tolist(), f"layer {i}"
        pending = state.ltm.get(i, torch.arange(size, size + state.ltm.pending_size(i)))
        if release.pending is None:
            assert state.ltm.pending_size(i) == 0
            continue
        torch.testing.assert_close(pending["slots"], release.pending[0][i], atol=atol, rtol=0)
        torch.testing.assert_close(pending["keys"], release.pending[1][i], atol=atol, rtol=0)
        assert pending["ages"].tolist() == release.pending[2][i].astype(np.int64).tolist(), f"layer {i}"


def assert_same_reads(model, state, release: Release, ids):
    logits, retrieved = retrieved_by(model, state, ids)
    want_logits, want_retrieved = release.read(ids)
    for i, (got, want) in enumerate(zip(retrieved, want_retrieved)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"layer {i}'s retrieved slots")
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)


# --- loading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_release_folder_loads_its_float_ages_and_frequencies(tmp_path, dtype):
    release_model = build_release_folder(tmp_path, dtype=dtype)
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())  # sharded, as saved
    model = latentmem.MPlus.from_pretrained(tmp_path)
    assert model.dtype == dtype and model.config.release_compatible and model.config.promote_on_retrieval == 0
    state = model.initial_memory()
    for i in range(state.num_layers):
        loaded = state.ltm.get(i, torch.arange(state.ltm.size(i)))
        assert torch.equal(loaded["slots"], release_model.ltm[i].detach())
        assert torch.equal(loaded["keys"], release_model.ltm_keys[i].detach().float())
        assert loaded["ages"].tolist() == release_model.ltm_ages[i].detach().int().tolist()
        assert loaded["frequencies"].tolist() == release_model.ltm_recall_frequencies[i].detach().float().tolist()
    assert torch.equal(state.stm, release_model.memory.detach())


def test_bfloat16_ages_load_as_the_whole_numbers_they_round_to(tmp_path):
    ages = torch.tensor([0.0, 8.0, 38401.0, 150_000.0] * 10)  # bfloat16 keeps 38400 and 149504
    build_release_folder(tmp_path, dtype=torch.bfloat16, ages=ages)
    state = latentmem.MPlus.from_pretrained(tmp_path).initial_memory()
    assert state.ltm.get(0, torch.arange(4))["ages"].tolist() == [0, 8, 38400, 149504]


@pytest.mark.parametrize(
    "age, message",
    [(-8.0, "must be >= 0"), (float("nan"), "non-finite"), (float("inf"), "float16 age overflows"), (2.5, "whole numbers")],
)
def test_ages_the_release_cannot_have_written_are_refused_clearly(tmp_path, age, message):
    build_release_folder(tmp_path, ages=torch.tensor([age] + [0.0] * 39))
    with pytest.raises(ValueError, match=message):
        latentmem.MPlus.from_pretrained(tmp_path)


def test_own_presets_keep_latentmem_reads():
    config = latentmem.MPlusConfig(num_tokens=K, num_blocks=BLOCKS, num_ltm_blocks=LTM_BLOCKS)
    assert not config.release_compatible and config.promote_on_retrieval == 1.0
    with pytest.raises(ValueError, match="never promote"):
        latentmem.MPlusConfig(num_tokens=K, num_blocks=BLOCKS, num_ltm_blocks=LTM_BLOCKS, release_compatible=True,
                              promote_on_retrieval=1.0)  # fmt: skip


# --- reading, writing, generating ------------------------------------------------------------------
def test_reads_retrieve_the_release_slots_per_layer_in_its_order(tmp_path):
    release = Release(build_release_folder(tmp_path))
    model = latentmem.MPlus.from_pretrained(tmp_path)
    state = model.initial_memory()
    for seed in range(3):
        assert_same_reads(model, state, release, random_ids(7 + seed, seed=seed))
    assert_same_long_term_memory(state, release)  # reads never change long-term memory (no promotion)


def test_writes_evict_into_pending_merge_and_decay_as_the_release(tmp_path):
    release = Release(build_release_folder(tmp_path))
    model = latentmem.MPlus.from_pretrained(tmp_path)
    state = model.initial_memory(seed=11)
    torch.manual_seed(11)  # the release draws its drops from torch's global generator
    prompt = random_ids(9, seed=1)
    for write in range(5):  # merges after writes 3 (with pruning of frequency-1 slots) and 6
        context = random_ids(40, seed=100 + write)
        model.inject(state, input_ids=context)
        release.write(context)
        torch.testing.assert_close(state.stm, release.memory, atol=1e-5, rtol=0, msg=f"STM after write {write + 1}")
        assert_same_long_term_memory(state, release)
        assert_same_reads(model, state, release, prompt)
    assert state.ltm.size(0) < 40 + 3 * K  # the merge deleted slots whose frequency ran out


def test_greedy_generation_matches_the_release(tmp_path):
    release = Release(build_release_folder(tmp_path))
    model = latentmem.MPlus.from_pretrained(tmp_path)
    state = model.initial_memory(seed=3)
    torch.manual_seed(3)
    context = random_ids(40, seed=5)
    model.inject(state, input_ids=context)
    release.write(context)
    prompt = random_ids(6, seed=4)
    out = model.generate(prompt, memory=state, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, release.greedy(prompt, steps=8))


def test_a_decay_that_would_leave_too_few_slots_deletes_nothing_and_is_undone(tmp_path):
    # a merge after every write; the R shipped slots all at frequency 1, so each merge would delete them
    shipped = build_release_folder(tmp_path, ltm_size=R, frequencies=torch.ones(R), update_ltm_frequency=1)
    release = Release(shipped)
    model = latentmem.MPlus.from_pretrained(tmp_path)
    state = model.initial_memory(seed=2)
    torch.manual_seed(2)
    sizes, frequencies = [], []
    for write in range(3):
        context = random_ids(40, seed=write)
        model.inject(state, input_ids=context)
        release.write(context)
        assert_same_long_term_memory(state, release)
        sizes.append(state.ltm.size(0))
        frequencies.append(state.ltm.layer_stats(0)["frequencies"].tolist())
    # write 1: K survivors <= R, so nothing goes and nothing decays; write 2: 2K = R survivors, still
    # not more than R; write 3: 3K > R survivors, so the R shipped slots (frequency 0) go at last
    assert sizes == [R + K, R + 2 * K, 3 * K]
    assert frequencies[0] == [1.0] * R + [10.0] * K and frequencies[1] == [1.0] * R + [10.0] * 2 * K
    assert frequencies[2] == [9.0] * 2 * K + [9.0] * K


# --- saving ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_folder_round_trips_to_identical_tensors(tmp_path, dtype):
    build_release_folder(tmp_path / "release", dtype=dtype)
    model = latentmem.MPlus.from_pretrained(tmp_path / "release")
    model.save_pretrained(tmp_path / "saved", layout="official", memory=model.initial_memory())
    again = latentmem.MPlus.from_pretrained(tmp_path / "saved")
    again.save_pretrained(tmp_path / "again", layout="official", memory=again.initial_memory())
    original = {}
    for shard in sorted((tmp_path / "release").glob("model-*.safetensors")):
        original.update(load_file(shard))
    for folder in ("saved", "again"):
        written = load_file(tmp_path / folder / "model.safetensors")
        assert original.keys() == written.keys()
        for key in original:
            assert written[key].dtype == original[key].dtype and torch.equal(written[key], original[key]), key
    assert written["ltm_ages.0"].dtype == dtype  # float in the model dtype, as the release stores them


def test_pending_slots_are_saved_after_the_merged_ones(tmp_path):
    build_release_folder(tmp_path / "release")
    model = latentmem.MPlus.from_pretrained(tmp_path / "release")
    state = model.initial_memory()
    model.inject(state, input_ids=random_ids(40))
    assert state.ltm.pending_size(0) == K
    model.save_pretrained(tmp_path / "saved", layout="official", memory=state)
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    everything = state.ltm.get(0, torch.arange(40 + K))
    assert torch.equal(saved["ltm.0"], everything["slots"])
    assert saved["ltm_ages.0"].tolist() == everything["ages"].float().tolist()
    assert saved["ltm_recall_frequencies.0"][40:].tolist() == [10.0] * K


def test_a_state_with_pending_slots_saves_and_loads_them(tmp_path):
    build_release_folder(tmp_path / "release")
    model = latentmem.MPlus.from_pretrained(tmp_path / "release")
    state = model.initial_memory()
    model.inject(state, input_ids=random_ids(40))
    state.save(tmp_path / "state.safetensors")
    loaded = latentmem.MemoryState.load(tmp_path / "state.safetensors", model)
    assert loaded.ltm.pending_size(2) == K and loaded.ltm.release_reads
    assert np.array_equal(loaded.ltm.stm_ages, state.ltm.stm_ages)
    ids = random_ids(6, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids, memory=loaded).logits, model(ids, memory=state).logits)
