"""M+ (SPEC §5): eviction into long-term memory, retrieval per layer, decay, pins, persistence, layout."""

import json

import pytest
import torch
import torch.nn.functional as F

from latentmem import MemoryState
from latentmem.config import MPlusConfig
from latentmem.mplus import MPlus

from conftest import LORA, backbone_config, random_ids, randomize_lora
from reference import layer_forward, rms_norm

K = 8


def make_mplus(seed=0, **overrides) -> MPlus:
    torch.manual_seed(seed)
    fields = dict(num_tokens=K, num_blocks=6, num_ltm_blocks=2, selector_hidden_dim=16, update_ltm_frequency=3)
    config = MPlusConfig(backbone_config=backbone_config(), lora=LORA, **{**fields, **overrides})
    model = MPlus(config).eval()
    randomize_lora(model, seed)
    return model


def filled(model, writes, seed=0, **inject_kwargs):
    state = model.new_memory(seed=seed)
    for i in range(writes):
        model.inject(state, input_ids=random_ids(20, seed=100 + i), source=f"doc{i}", **inject_kwargs)
    return state


def reference_mplus_logits(model, state, ids):
    """Logits with per-layer retrieval, recomputed from raw weights (see tests/reference.py)."""
    cfg = model.backbone.config
    h = F.embedding(ids.view(1, -1), model.backbone.model.embed_tokens.weight)
    count = min(model.config.retrieved_slots, min(state.ltm.size(i) for i in range(cfg.num_hidden_layers)))
    for i, layer in enumerate(model.backbone.model.layers):
        everything = state.ltm.get(i, torch.arange(state.ltm.size(i)))
        keys, ages = torch.as_tensor(everything["keys"]).float(), torch.as_tensor(everything["ages"])
        queries = model.retrievers[i].query_proj(rms_norm(layer.input_layernorm, h)[0])
        scores = torch.sigmoid(queries @ keys.T).mean(0)
        top = scores.topk(count).indices
        top = top[torch.argsort(ages[top], descending=True, stable=True)]
        retrieved = torch.as_tensor(everything["slots"]).float()[top]
        after = {"first": 0, "before_newest_write": state.num_slots - K, "last": state.num_slots}
        split = after[model.config.retrieved_slots_position]
        memory = [state.stm[i][:split], retrieved, state.stm[i][split:]]
        z = torch.cat([model.bos_embedding[i], *memory, h[0]])[None]
        h = layer_forward(layer, z, z.shape[1] - h.shape[1], cfg, "decoder_adapter")
    h = rms_norm(model.backbone.model.norm, h)
    return F.linear(h, model.backbone.lm_head.weight)


def test_stm_is_the_blocks_not_reserved_for_retrieval():
    model = make_mplus()
    assert model.config.memory_size == (6 - 2) * K and model.config.retrieved_slots == 2 * K
    assert model.new_memory().shape == (3, 32, 64)


def test_eviction_moves_exactly_the_dropped_slots_with_their_keys():
    model = make_mplus()
    state = model.new_memory()
    state.stm = torch.randn(state.shape)  # distinct slots (a first write would tile duplicates)
    before, sources_before = state.stm.clone(), state.sources.clone()
    model.inject(state, input_ids=random_ids(20, seed=7))
    for i, layer in enumerate(model.backbone.model.layers):
        stored = state.ltm.get(i, torch.arange(state.ltm.size(i)))
        assert state.ltm.size(i) == K
        slots = torch.as_tensor(stored["slots"]).float()
        for row in slots:  # each evicted slot was in the old pool and is gone from the new one
            assert (before[i] == row).all(-1).any() and not (state.stm[i, :-K] == row).all(-1).any()
        with torch.no_grad():
            want = model.retrievers[i].key_proj(layer.input_layernorm(slots))
        torch.testing.assert_close(torch.as_tensor(stored["keys"]).float(), want, atol=1e-5, rtol=0)
        assert set(torch.as_tensor(stored["sources"]).tolist()) <= set(sources_before[i].tolist())
        assert (torch.as_tensor(stored["frequencies"]) == 10.0).all()


def test_ages_advance_by_k_per_write_and_frequencies_decay_on_schedule():
    model = make_mplus(update_ltm_frequency=3)
    state = filled(model, 2)  # write 2 evicts K slots (age 0 after the write's aging)
    assert torch.as_tensor(state.ltm.get(0, torch.arange(K))["ages"]).tolist() == [0] * K
    model.inject(state, input_ids=random_ids(20, seed=9))  # write 3: ages + K, decay by 1
    first = state.ltm.get(0, torch.arange(K))
    assert torch.as_tensor(first["ages"]).tolist() == [K] * K
    assert torch.as_tensor(first["frequencies"]).tolist() == [9.0] * K


@pytest.mark.parametrize("placement", ["first", "before_newest_write", "last"])
def test_reading_retrieves_per_layer_like_the_reference(placement):
    model = make_mplus(retrieved_slots_position=placement)
    state = filled(model, 5)  # 4 evictions: 32 long-term slots per layer, 16 retrieved
    assert state.ltm.size(0) == 4 * K
    ids = random_ids(6, seed=3)
    with torch.no_grad():
        want = reference_mplus_logits(model, state, ids)
        got = model(ids, memory=state).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_fewer_long_term_slots_than_the_budget_are_all_used_once():
    model = make_mplus()
    state = filled(model, 2)  # K long-term slots < 2K retrievable
    assert model.retrieval_count(state) == K
    ids = random_ids(6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, memory=state).logits, reference_mplus_logits(model, state, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("placement", ["first", "before_newest_write"])
def test_greedy_generation_keeps_the_prompts_retrieval(placement):
    model = make_mplus(promote_on_retrieval=0.0, retrieved_slots_position=placement)
    state = filled(model, 5)
    ids = random_ids(6, seed=3)
    out = model.generate(ids, memory=state, max_new_tokens=5, do_sample=False)
    # step by step, with the retrieval of the prompt alone: the cache continues from the prefill
    with torch.no_grad():
        first = model(ids, memory=state, use_cache=True)
        assert out[0, 6].item() == first.logits[0, -1].argmax().item()
        step = model(out[:, 6:7], memory=state, cache=first.cache)
        assert out[0, 7].item() == step.logits[0, -1].argmax().item()


def test_retrieval_promotes_the_retrieved_slots():
    model = make_mplus(promote_on_retrieval=2.0)
    state = filled(model, 5)
    before = torch.as_tensor(state.ltm.get(0, torch.arange(state.ltm.size(0)))["frequencies"]).clone()
    with torch.no_grad():
        model(random_ids(6, seed=3), memory=state)
    after = torch.as_tensor(state.ltm.get(0, torch.arange(state.ltm.size(0)))["frequencies"])
    raised = (after - before)
    assert (raised == 2.0).sum() == model.retrieval_count(state) and ((raised == 0) | (raised == 2.0)).all()


def test_pinned_injections_give_their_long_term_slots_infinite_importance():
    model = make_mplus()
    state = model.new_memory()
    model.inject(state, input_ids=random_ids(20, seed=1), source="vital", pin=True)
    for i in range(3):
        model.inject(state, input_ids=random_ids(20, seed=2 + i))
    stored = state.ltm.get(0, torch.arange(state.ltm.size(0)))
    vital = torch.as_tensor(stored["sources"]) == 0
    assert vital.any() and torch.isinf(torch.as_tensor(stored["importance"])[vital]).all()


def test_pinned_slots_can_be_spared_by_short_term_drops():
    model = make_mplus(protect_pinned_fraction=0.5)
    state = model.new_memory(seed=1)
    model.inject(state, input_ids=random_ids(20, seed=0))
    model.inject(state, input_ids=random_ids(20, seed=1), source="vital", pin=True)
    for i in range(6):
        model.inject(state, input_ids=random_ids(20, seed=2 + i))
    assert (state.sources == 1).sum(dim=1).tolist() == [K, K, K]  # never dropped


def test_forget_removes_short_and_long_term_slots():
    model = make_mplus()
    state = filled(model, 6)
    assert any((torch.as_tensor(state.ltm.get(0, torch.arange(state.ltm.size(0)))["sources"]) == 1).tolist())
    model.forget(state, source="doc1")
    assert 1 not in state.surviving_slots()
    for i in range(3):
        assert 1 not in torch.as_tensor(state.ltm.get(i, torch.arange(state.ltm.size(i)))["sources"]).tolist()


def test_state_with_long_term_memory_round_trips(tmp_path):
    model = make_mplus()
    state = filled(model, 5)
    state.save(tmp_path / "m.safetensors")
    loaded = MemoryState.load(tmp_path / "m.safetensors", model)
    assert loaded.ltm.size(1) == state.ltm.size(1)
    ids = random_ids(6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, memory=loaded).logits, model(ids, memory=state).logits, atol=1e-5, rtol=0)
    state.save(tmp_path / "m.safetensors")  # a second save replaces the long-term generation
    assert len(list(tmp_path.glob("m.safetensors.ltm-*"))) == 1


def test_official_mplus_layout_loads_and_saves_back(tmp_path):
    model = make_mplus()
    state = filled(model, 5)
    model.save_pretrained(tmp_path / "official", layout="official", memory=state)
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert config["architectures"] == ["MPlus"] and config["num_ltm_blocks"] == 2
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "official" / "model.safetensors")
    assert "model.layers.0.self_attn.query_proj.0.weight" in tensors and "ltm_keys.2" in tensors
    assert tensors["ltm.0"].shape == (state.ltm.size(0), 64) and "initialized" not in tensors
    again = MPlus.from_pretrained(tmp_path / "official")
    assert again.config.release_compatible  # an official folder reads as the release does ...
    again.config.release_compatible = False  # ... which orders slots of equal age its own way
    memory = again.initial_memory()
    assert memory.ltm.size(0) == state.ltm.size(0)
    ids = random_ids(6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, memory=memory).logits, model(ids, memory=state).logits, atol=1e-4, rtol=0)


def test_retriever_loss_decreases_and_ranks_positives_first_on_a_toy_case():
    from latentmem.ltm.retriever import LayerRetriever, retrieval_scores, retriever_loss

    torch.manual_seed(0)
    retriever = LayerRetriever(hidden_size=32, key_dim=8)
    slots, prompt = torch.randn(40, 32), torch.randn(5, 32)
    positive = torch.zeros(40, dtype=torch.bool)
    positive[[3, 17, 29]] = True
    slots[positive] += prompt.mean(0)  # relevant slots share content with the prompt
    optimizer = torch.optim.Adam(retriever.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = retriever_loss(retriever.queries(prompt), retriever.keys(slots), positive)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        top = retrieval_scores(retriever.queries(prompt), retriever.keys(slots)).topk(3).indices
    assert set(top.tolist()) == {3, 17, 29}


def test_training_reads_an_mplus_memory_through_its_retrieval_one_state_at_a_time():
    """Batched training reads see the short-term pool only; M+ reads must also retrieve, so they do not batch."""
    from latentmem.training import Episode, MemoryObjective

    model = make_mplus().train()
    states = [filled(model, 12, seed=i) for i in range(2)]  # long-term memory holds evicted slots
    target = random_ids(10, 77)[0]
    episodes = [Episode([random_ids(20, 80 + i)[0], random_ids(20, 90 + i)[0]], target, target.clone()) for i in range(2)]
    objective = MemoryObjective(model)
    calls = []
    objective.run_episode = lambda e, s: calls.append(e) or MemoryObjective.run_episode(objective, e, s)
    loss, _ = objective(episodes, states)
    assert len(calls) == 2 and torch.isfinite(loss)


def test_a_training_write_with_gradient_moves_evicted_slots_to_long_term_memory_as_inject_does():
    """Training's one-context writes keep their gradient, but update the pool exactly as `inject`."""
    from latentmem.training import Episode, MemoryObjective

    model = make_mplus().train()
    context, target = random_ids(20, 55)[0], random_ids(10, 66)[0]
    trained, injected = filled(model, 8, seed=1), filled(model, 8, seed=1)
    before = trained.ltm.size(0)
    loss, _ = MemoryObjective(model)([Episode([context], target, target.clone())], [trained])
    loss.backward()
    model.inject(injected, input_ids=context, allow_short=True, source="train")
    assert trained.ltm.size(0) > before  # the write evicted slots, and they went to long-term memory
    for layer in range(model.backbone.config.num_hidden_layers):
        assert torch.equal(trained.ltm.sources(layer), injected.ltm.sources(layer))
    torch.testing.assert_close(trained.stm, injected.stm, atol=1e-5, rtol=1e-5)


def test_answer_loss_reads_with_the_read_adapter_even_right_after_a_write():
    """Co-training asks fresh questions right after a write, whose adapter is then still active."""
    from latentmem.training.retriever import Question, answer_loss

    model = make_mplus()
    state = filled(model, 5)
    question = Question(state, random_ids(6, seed=3)[0], random_ids(3, seed=4)[0], injection_id=4, in_ltm=True)
    with torch.no_grad():
        model.adapters.activate("read")
        after_read = answer_loss(model, question)
        model.adapters.activate("write")  # as `inject` leaves it
        after_write = answer_loss(model, question)
    torch.testing.assert_close(after_write, after_read)


def test_reads_with_retrieved_slots_among_short_term_ones_reuse_the_cached_prefix(monkeypatch):
    from latentmem import reading
    from latentmem.ltm import recall

    model = make_mplus(retrieved_slots_position="before_newest_write", promote_on_retrieval=0.0)
    state = filled(model, 5)
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("gap"))
        return reading_compute(*args, **kwargs)

    reading_compute = reading.compute_memory_prefix
    monkeypatch.setattr(reading, "compute_memory_prefix", counted)
    monkeypatch.setattr(recall, "compute_memory_prefix", counted)
    with torch.no_grad():
        first = model(random_ids(6, seed=3), memory=state).logits
        again = model(random_ids(6, seed=3), memory=state).logits
    assert len(calls) == 1  # short-term keys/values computed once, gap included, then cached
    torch.testing.assert_close(first, again)


def test_write_ranking_loss_scores_writes_by_their_best_slot_and_lifts_the_answering_write_to_first():
    from latentmem.ltm.retriever import LayerRetriever, retrieval_scores, write_ranking_loss, write_scores

    writes, scores = write_scores(torch.tensor([0.1, 0.7, 0.3, 0.2]), torch.tensor([5, 9, 5, 9]))
    assert writes.tolist() == [5, 9] and scores.tolist() == pytest.approx([0.3, 0.7])

    torch.manual_seed(0)
    retriever = LayerRetriever(hidden_size=32, key_dim=8)
    slots, prompt = torch.randn(60, 32), torch.randn(5, 32)
    sources = torch.arange(60) // 6  # ten writes of six slots
    slots[sources == 4] += 0.5 * prompt.mean(0)  # the answering write shares some content with the prompt
    slots[sources == 7] += 0.4 * prompt.mean(0)  # a hard negative shares almost as much

    def best_write():
        with torch.no_grad():
            ids, per_write = write_scores(retrieval_scores(retriever.queries(prompt), retriever.keys(slots)), sources)
        return ids[per_write.argmax()].item()

    optimizer = torch.optim.Adam(retriever.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = write_ranking_loss(retriever.queries(prompt), retriever.keys(slots), sources, target=4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert best_write() == 4
    with pytest.raises(ValueError, match="not among"):
        write_ranking_loss(retriever.queries(prompt), retriever.keys(slots), sources, target=99)
