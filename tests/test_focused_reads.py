"""Focused reads (`focused_writes`, focus.py): a prompt reads its best-ranked writes, K slots each, once."""

import pytest
import torch
from conftest import make_model
from test_mplus import make_mplus, random_ids

from latentmem.config import MPlusConfig
from latentmem.focus import focused_pool, rank_pool_writes, write_slots
from latentmem.modeling import MemoryLLM


def _written(writes: int = 10, **overrides):
    """A focused M+ and a memory of `writes` random contexts (enough that early writes reach long-term memory)."""
    options = dict(retrieval_unit="write", write_ranking="tokens", focused_writes=1, update_ltm_frequency=100)
    model = make_mplus(**{**options, **overrides})
    state = model.new_memory(seed=0)
    contexts = [random_ids(20, seed=100 + i) for i in range(writes)]
    for context in contexts:
        model.inject(state, input_ids=context)
    return model, state, dict(zip(sorted(state.injections), contexts))


def _rare_tokens(contexts: dict, write: int) -> torch.Tensor:
    others = torch.cat([c for w, c in contexts.items() if w != write])
    rare = contexts[write][~torch.isin(contexts[write], others)][:4]
    assert len(rare), "random contexts share every token: pick another seed"
    return rare


def _expected(own: torch.Tensor, k: int) -> torch.Tensor:
    """A write's K slots as a focused read sees them: its first K, or the ones left repeated up to K."""
    return own[:k] if len(own) >= k else own.repeat(-(-k // len(own)), 1)[-k:]


def test_the_pool_is_the_prompts_write_alone_once_whether_its_slots_are_short_or_long_term():
    model, state, contexts = _written()
    k = model.config.num_tokens
    target = min(contexts)  # the oldest write: most of its slots were evicted to long-term memory
    assert target in state.ltm.sources(0).tolist()
    pool, sources = focused_pool(model, state, _rare_tokens(contexts, target))
    assert pool.shape == (state.num_layers, k, state.stm.shape[-1]) and (sources == target).all()
    for layer in range(state.num_layers):
        own = write_slots(state, layer, target)
        assert 0 < len(own)
        assert torch.equal(pool[layer], _expected(own, k))
    assert model.read_prefix_length(state) == 1 + k  # [bos ; K slots], not the N-slot pool


def test_two_focused_writes_read_the_best_nearest_the_prompt():
    model, state, contexts = _written(focused_writes=2)
    k = model.config.num_tokens
    best, second = min(contexts), max(contexts)
    prompt = torch.cat([_rare_tokens(contexts, best), _rare_tokens(contexts, best), _rare_tokens(contexts, second)])
    ranked = [int(w) for w in model.rank_writes_for(state, prompt)[:2]]
    assert ranked == [best, second]
    pool, sources = focused_pool(model, state, prompt)
    assert pool.shape[1] == 2 * k and (sources[:, :k] == second).all() and (sources[:, k:] == best).all()
    assert model.read_prefix_length(state) == 1 + 2 * k


def test_a_write_that_lost_slots_repeats_the_ones_left_up_to_k():
    model, state, contexts = _written()
    k = model.config.num_tokens
    target = max(contexts)
    keep = (state.sources[0] == target).nonzero()[:3, 0]  # drop all but 3 of its slots in layer 0
    lost = (state.sources[0] == target).clone()
    lost[keep] = False
    state.sources[0][lost] = -7  # now another (unknown) write's
    pool, _ = focused_pool(model, state, _rare_tokens(contexts, target))
    left = state.stm[0][keep]
    assert torch.equal(pool[0], left.repeat(-(-k // 3), 1)[-k:])

def test_a_focused_read_equals_a_read_of_that_pool_in_the_first_pass_and_in_generation():
    model, state, contexts = _written()
    prompt = _rare_tokens(contexts, min(contexts))[None]
    pool, _ = focused_pool(model, state, prompt[0])
    focused = model(prompt, memory=state).logits
    reference = MemoryLLM.forward(model, prompt, memory=pool).logits  # a raw pool reads in pool order
    torch.testing.assert_close(focused, reference)
    generated = model.generate(prompt, memory=state, max_new_tokens=5, do_sample=False)
    expected = MemoryLLM.generate(model, prompt, memory=pool, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, expected)


def test_each_prompt_of_a_batch_reads_its_own_writes():
    model, state, contexts = _written()
    first, last = min(contexts), max(contexts)
    rows = [_rare_tokens(contexts, first)[:3], _rare_tokens(contexts, last)[:3]]
    batch = model(torch.stack(rows), memory=state).logits
    for i, row in enumerate(rows):
        torch.testing.assert_close(batch[i], model(row[None], memory=state).logits[0])
    assert not torch.allclose(batch[0], batch[1])


def test_a_prompt_sharing_no_token_with_any_write_reads_as_the_base_model_and_generates_so():
    model, state, contexts = _written()
    k = model.config.num_tokens
    used = torch.unique(torch.cat(list(contexts.values())))
    unseen = torch.tensor([t for t in range(model.backbone.config.vocab_size) if t not in used.tolist()][:3])
    assert model.reads_without_memory(state, unseen) and not model.reads_without_memory(state)
    torch.testing.assert_close(model(unseen[None], memory=state).logits, model(unseen[None], memory=None).logits)
    greedy = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(unseen[None], memory=state, **greedy), model.generate(unseen[None], **greedy))
    # in a batch with a prompt that does share a rare token, it reads the newest write instead
    pool, sources = focused_pool(model, state, unseen)
    assert torch.equal(pool, state.stm[:, -k:]) and torch.equal(sources, state.sources[:, -k:])
    shared = _rare_tokens(contexts, max(contexts))[:3]
    assert len(shared) == 3, "pick another seed: the newest write needs 3 rare tokens"
    batch = model(torch.stack([unseen, shared]), memory=state).logits
    torch.testing.assert_close(batch[:1], MemoryLLM.forward(model, unseen[None], memory=pool).logits)


def test_a_generation_ranks_each_prompt_once_and_its_decode_steps_not_again(monkeypatch):
    model, state, contexts = _written()
    prompts = torch.stack([_rare_tokens(contexts, w)[:2] for w in sorted(contexts)[-2:]])
    ranked = []
    rank = model.rank_writes_for
    monkeypatch.setattr(model, "rank_writes_for", lambda memory, ids: ranked.append(ids) or rank(memory, ids))
    model.generate(prompts, memory=state, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert [ids.tolist() for ids in ranked] == prompts.tolist()


def test_a_prompt_sharing_only_skipped_tokens_reads_as_the_base_model():
    model, state, contexts = _written()
    rare = _rare_tokens(contexts, max(contexts))
    assert not model.reads_without_memory(state, rare)
    model.skip_in_ranking(rare.tolist())
    assert model.reads_without_memory(state, rare)
    torch.testing.assert_close(model(rare[None], memory=state).logits, model(rare[None], memory=None).logits)


def test_focused_reads_need_the_token_ranking():
    with pytest.raises(ValueError, match="write_ranking='tokens'"):  # M+ ranks by its token index
        MPlusConfig(retrieval_unit="write", write_ranking="first_layer", focused_writes=1)
    with pytest.raises(ValueError, match=">= 0"):
        MPlusConfig(retrieval_unit="write", write_ranking="tokens", focused_writes=-1)


# --- MemoryLLM: the writes still in the short-term pool, ranked by the token ids each one recorded


def _memoryllm(writes: int, **overrides):
    model = make_model(focused_writes=1, **overrides)
    state = model.new_memory(seed=0)
    contexts = [random_ids(20, seed=200 + i) for i in range(writes)]
    for context in contexts:
        model.inject(state, input_ids=context)
    return model, state, dict(zip(sorted(state.injections), contexts))


def test_memoryllm_writes_record_their_distinct_tokens_and_a_rare_shared_token_ranks_a_write_first():
    model, state, contexts = _memoryllm(6)
    for write, context in contexts.items():
        assert state.injections[write].distinct_tokens == list(dict.fromkeys(context.reshape(-1).tolist()))
    in_pool = set(torch.unique(state.sources).tolist())
    for write in contexts:
        if write in in_pool:
            assert rank_pool_writes(state, _rare_tokens(contexts, write))[0] == write
    everywhere = set.intersection(*(set(c.reshape(-1).tolist()) for c in contexts.values()))
    assert rank_pool_writes(state, torch.tensor(sorted(everywhere) or [10**6])) == []  # common tokens weigh nothing


def test_a_memoryllm_focused_read_attends_to_the_writes_surviving_slots_once():
    model, state, contexts = _memoryllm(6)
    k = model.config.num_tokens
    target = sorted(set(torch.unique(state.sources).tolist()) & set(contexts))[0]  # the oldest still in the pool
    prompt = _rare_tokens(contexts, target)
    pool, sources = focused_pool(model, state, prompt)
    assert (sources == target).all() and pool.shape[1] == k
    for layer in range(state.num_layers):
        own = state.stm[layer][state.sources[layer] == target]
        torch.testing.assert_close(pool[layer], _expected(own, k))
    torch.testing.assert_close(model(prompt[None], memory=state).logits,
                               MemoryLLM.forward(model, prompt[None], memory=pool).logits)  # fmt: skip
    unfocused = model(prompt[None], memory=state, focused=False).logits
    assert not torch.allclose(unfocused, model(prompt[None], memory=state).logits)


def test_recorded_tokens_survive_save_and_load_and_models_without_focus_record_none(tmp_path):
    from latentmem.state import MemoryState

    model, state, contexts = _memoryllm(3)
    state.save(tmp_path / "memory")
    loaded = MemoryState.load(tmp_path / "memory", model)
    assert {w: i.distinct_tokens for w, i in loaded.injections.items()} == {
        w: i.distinct_tokens for w, i in state.injections.items()
    }
    # a model without focused reads records no token ids; its file has none and loads
    model = make_model()
    state = model.new_memory(seed=0)
    model.inject(state, input_ids=random_ids(20, seed=1))
    state.save(tmp_path / "plain")
    assert MemoryState.load(tmp_path / "plain", model).injections[0].distinct_tokens is None


def test_an_mplus_built_from_a_focused_memoryllm_chooses_its_own_focus():
    from latentmem.presets.retrievers import mplus_from

    model = make_model(focused_writes=1)
    assert mplus_from(model, num_ltm_blocks=1, selector_hidden_dim=16).config.focused_writes == 0  # per-layer ranking
    ranked = mplus_from(model, num_ltm_blocks=1, selector_hidden_dim=16, retrieval_unit="write", write_ranking="tokens",
                        focused_writes=1)  # fmt: skip
    assert ranked.config.focused_writes == 1


def test_a_focused_model_reads_an_empty_memory_as_its_base_model():
    prompt = random_ids(12, seed=5)
    for model in (make_model(focused_writes=1), _written()[0]):
        empty = model.new_memory(seed=0)
        assert model.reads_without_memory(empty)
        torch.testing.assert_close(model(prompt, memory=empty).logits, model(prompt, memory=None).logits)
        assert torch.equal(model.generate(prompt, memory=empty, max_new_tokens=4, do_sample=False),
                           model.generate(prompt, memory=None, max_new_tokens=4, do_sample=False))  # fmt: skip
    release = make_model()  # without focus an empty memory is read through the read adapter, as the release does
    assert not release.reads_without_memory(release.new_memory(seed=0))
    assert not torch.allclose(release(prompt, memory=release.new_memory(seed=0)).logits, release(prompt).logits)


def test_one_or_two_writes_are_ranked_by_the_tokens_they_share():
    for model, state, contexts in (_memoryllm(1), _memoryllm(2), _written(2)):
        for write in contexts:
            rare = _rare_tokens(contexts, write) if len(contexts) > 1 else contexts[write][0, :3]
            assert int(model.rank_writes_for(state, rare)[0]) == write


def test_ranking_ids_choose_the_write_read_instead_of_the_prompt():
    model, state, contexts = _written()
    first, last = min(contexts), max(contexts)
    prompt, asked = _rare_tokens(contexts, first), _rare_tokens(contexts, last)
    pool, _ = focused_pool(model, state, asked)
    reading_last = MemoryLLM.forward(model, prompt[None], memory=pool).logits
    ranked = model(prompt[None], memory=state, ranking_ids=asked[None]).logits
    torch.testing.assert_close(ranked, reading_last)
    assert not torch.allclose(model(prompt[None], memory=state).logits, reading_last)
    padded = torch.cat([asked, torch.full((3,), -1)])[None]  # -1 pads are not tokens
    torch.testing.assert_close(model(prompt[None], memory=state, ranking_ids=padded).logits, reading_last)
    greedy = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = MemoryLLM.generate(model, prompt[None], memory=state, ranking_ids=asked[None], **greedy)
    assert expected.shape[1] == len(prompt) + 4
