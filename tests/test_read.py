"""Reading (SPEC §3): logits and generation match the reference; memory K/V caching is exact."""

import pytest
import torch
from conftest import LORA, backbone_config, make_model, random_ids, randomize_lora
from reference import reference_greedy, reference_logits
from transformers import AutoModelForCausalLM

from latentmem import MemoryLLM, MemoryLLMConfig, reading
from latentmem.reading import PrefixedLayer, compute_memory_prefix

FAMILIES = ["llama", "llama-linear-rope", "mistral", "qwen2"]
ATOL = 1e-5


def filled_state(model, writes=3, seed=0):
    state = model.new_memory(seed=seed)
    for i in range(writes):
        model.inject(state, input_ids=random_ids(24, seed=100 + i))
    return state


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(family):
    model = make_model(family)
    state = filled_state(model)
    ids = random_ids(7, seed=5)
    got = model(ids, memory=state).logits
    torch.testing.assert_close(got, reference_logits(model, state.stm, ids), atol=ATOL, rtol=0)


def test_read_uses_decoder_adapter():
    model = make_model()
    state = filled_state(model)
    ids = random_ids(7, seed=5)
    got = model(ids, memory=state).logits
    assert (got - reference_logits(model, state.stm, ids, adapter="default")).abs().max() > 1e-3


def test_assigned_pool_is_read():
    model = make_model()
    state = model.new_memory()
    state.stm = torch.randn(state.shape)
    ids = random_ids(6)
    torch.testing.assert_close(model(ids, memory=state).logits, reference_logits(model, state.stm, ids), atol=ATOL, rtol=0)


def test_empty_memory_reads_without_prefix_with_decoder_adapter():
    model = make_model()
    ids = random_ids(6)
    got = model(ids, memory=model.new_memory()).logits
    torch.testing.assert_close(got, reference_logits(model, None, ids), atol=ATOL, rtol=0)


def test_no_memory_is_exactly_the_base_model():
    model = make_model()
    model.set_fast_inference(False)  # bit for bit; the default output head agrees to rounding (below)
    plain = AutoModelForCausalLM.from_config(model.backbone.config).eval()
    base_weights = {k.replace(".base_layer", ""): v for k, v in model.backbone.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(base_weights)
    ids = random_ids(9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
        # ... also right after a read switched the adapters on
        model(ids, memory=filled_state(model, writes=1))
        assert torch.equal(model(ids).logits, plain(ids).logits)
        model.set_fast_inference(True)
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_from_backbone_keeps_the_loaded_model_causal(family):
    """Wrapping a loaded model keeps its attention backend: a reset one read future tokens."""
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(backbone_config(family)).eval()
    ids = random_ids(8)
    with torch.no_grad():
        expected = backbone(ids).logits
    MemoryLLMConfig(backbone_config=backbone.config)  # building a config leaves the model's own alone
    assert backbone.config._attn_implementation == "sdpa"
    model = MemoryLLM.from_backbone(backbone, num_tokens=4, num_blocks=2, lora=LORA).eval()
    randomize_lora(model)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % backbone.config.vocab_size
    memory = filled_state(model, writes=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=ATOL, rtol=0)
        for read in (None, memory):  # earlier positions never see a later token
            before, after = model(ids, memory=read).logits, model(changed, memory=read).logits
            torch.testing.assert_close(after[:, :-1], before[:, :-1], atol=ATOL, rtol=0)


def test_cached_memory_kv_equals_recomputation():
    model = make_model()
    state = filled_state(model)
    ids = random_ids(5)
    first = model(ids, memory=state).logits
    cached = model.prefix_cache.get(model, state)
    again = model(ids, memory=state).logits
    assert model.prefix_cache.get(model, state) is cached  # reused, not recomputed
    with torch.no_grad():  # as the cache computed it
        fresh = compute_memory_prefix(model, state.stm)
    for (k1, v1), (k2, v2) in zip(cached.keys_values, fresh.keys_values):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert torch.equal(first, again)


def test_write_invalidates_cached_memory_kv():
    model = make_model()
    state = filled_state(model)
    ids = random_ids(5)
    model(ids, memory=state)
    stale = model.prefix_cache.get(model, state)
    model.inject(state, input_ids=random_ids(20, seed=9))
    after = model(ids, memory=state).logits
    assert model.prefix_cache.get(model, state) is not stale
    torch.testing.assert_close(after, reference_logits(model, state.stm, ids), atol=ATOL, rtol=0)


def test_assigning_stm_invalidates_cached_memory_kv():
    model = make_model()
    state = filled_state(model)
    ids = random_ids(5)
    model(ids, memory=state)
    state.stm = torch.randn(state.shape)
    torch.testing.assert_close(model(ids, memory=state).logits, reference_logits(model, state.stm, ids), atol=ATOL, rtol=0)


def test_two_states_on_one_model_do_not_mix():
    model = make_model()
    a, b = filled_state(model, seed=0), model.new_memory(seed=1)
    model.inject(b, input_ids=random_ids(30, seed=77))
    ids = random_ids(5)
    la, lb = model(ids, memory=a).logits, model(ids, memory=b).logits
    torch.testing.assert_close(la, reference_logits(model, a.stm, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(lb, reference_logits(model, b.stm, ids), atol=ATOL, rtol=0)


def test_state_of_another_model_is_refused():
    model, other = make_model(), make_model(num_blocks=2)
    with pytest.raises(ValueError, match="another model"):
        model(random_ids(3), memory=other.new_memory())
    with pytest.raises(TypeError, match="MemoryState"):
        model(random_ids(3), memory=[[0.0]])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_generate_matches_reference(family):
    model = make_model(family)
    state = filled_state(model)
    ids = random_ids(6, seed=11)
    got = model.generate(ids, memory=state, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, reference_greedy(model, state.stm, ids, steps=8))


def test_generate_without_memory_matches_backbone_generate():
    model = make_model()
    ids = random_ids(6, seed=11)
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.adapters.activate("base")
    want = model.backbone.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_sampling_is_reproducible_with_a_seed():
    model = make_model()
    state = filled_state(model)
    ids = random_ids(6)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(model.generate(ids, memory=state, max_new_tokens=10, do_sample=True, top_k=20, temperature=1.3))
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (1, 16)


def test_eos_stops_generation():
    model = make_model()
    state = filled_state(model)
    ids = random_ids(6, seed=11)
    greedy = model.generate(ids, memory=state, max_new_tokens=8, do_sample=False)
    stop = int(greedy[0, 6 + 2])  # make the 3rd generated token the eos
    out = model.generate(ids, memory=state, max_new_tokens=8, do_sample=False, eos_token_id=stop, pad_token_id=0)
    first_stop = (out[0, 6:] == stop).nonzero()[0].item()
    assert first_stop <= 2 and out.shape[1] == 6 + first_stop + 1
    assert torch.equal(out[0, : 6 + first_stop + 1], greedy[0, : 6 + first_stop + 1])


def test_streamer_yields_the_generated_tokens():
    class CollectIds:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.view(-1).tolist())

        def end(self):
            self.ended = True

    model = make_model()
    state = filled_state(model)
    ids = random_ids(6, seed=11)
    streamer = CollectIds()
    out = model.generate(ids, memory=state, max_new_tokens=5, do_sample=False, streamer=streamer)
    streamed = [t for chunk in streamer.chunks[1:] for t in chunk]  # first put() is the prompt
    assert streamed == out[0, 6:].tolist() and streamer.ended


def test_batch_of_left_padded_prompts_shares_one_state():
    model = make_model()
    state = filled_state(model)
    prompts = [random_ids(6, seed=1)[0], random_ids(3, seed=2)[0]]
    pad = 0
    batch = torch.full((2, 6), pad)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 6 - len(p) :], mask[i, 6 - len(p) :] = p, 1
    out = model.generate(batch, attention_mask=mask, memory=state, max_new_tokens=5, do_sample=False, pad_token_id=pad)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], memory=state, max_new_tokens=5, do_sample=False)
        assert out[i, 6:].tolist() == single[0, len(p) :].tolist()


def test_forward_with_returned_cache_continues_exactly():
    model = make_model()
    state = filled_state(model)
    ids = random_ids(8, seed=4)
    whole = model(ids, memory=state).logits
    head = model(ids[:, :5], memory=state, use_cache=True)
    tail = model(ids[:, 5:], memory=state, cache=head.cache)
    torch.testing.assert_close(tail.logits, whole[:, 5:], atol=ATOL, rtol=0)


def test_labels_give_a_loss_with_gradients_into_adapters_in_training():
    model = make_model()
    state = filled_state(model)
    model.train()
    model.adapters.set_trainable(True)
    ids = random_ids(8)
    loss = model(ids, memory=state, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "decoder_adapter" in n]
    assert loss.item() > 0 and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_read_borrows_the_prefix_buffers_instead_of_copying_them():
    model = make_model()
    state = filled_state(model)
    out = model(random_ids(5), memory=state, use_cache=True)
    prefix = model.prefix_cache.get(model, state)
    layer = out.cache.layers[0]
    assert isinstance(layer, PrefixedLayer) and layer.keys.data_ptr() == prefix.buffers[0][0].data_ptr()
    assert layer.keys.shape[2] == prefix.length + 5


def test_reads_while_another_cache_holds_the_buffers_are_still_exact():
    model = make_model()
    state = filled_state(model)
    ids, other = random_ids(6, seed=1), random_ids(6, seed=2)
    held = model(ids, memory=state, use_cache=True)  # keeps the buffers borrowed
    second = model(other, memory=state, use_cache=True)
    assert not isinstance(second.cache.layers[0], PrefixedLayer)
    torch.testing.assert_close(second.logits, reference_logits(model, state.stm, other), atol=ATOL, rtol=0)
    more = random_ids(2, seed=3)
    cont = model(more, memory=state, cache=held.cache)  # the first cache is intact
    torch.testing.assert_close(
        cont.logits, reference_logits(model, state.stm, torch.cat([ids, more], 1))[:, -2:], atol=ATOL, rtol=0
    )


def test_generation_past_the_spare_room_falls_back_to_copying(monkeypatch):
    monkeypatch.setattr(reading, "SPARE_POSITIONS", 9)
    model = make_model()
    state = filled_state(model)
    ids = random_ids(6, seed=11)
    got = model.generate(ids, memory=state, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, reference_greedy(model, state.stm, ids, steps=8))


def test_inference_mode_read_then_plain_generate_works():
    model = make_model()
    state = filled_state(model)
    ids = random_ids(6, seed=11)
    with torch.inference_mode():
        model(ids, memory=state)  # buffers created as inference tensors
    got = model.generate(ids, memory=state, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, reference_greedy(model, state.stm, ids, steps=4))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_other_attention_backends_read_and_write_the_same(attn):
    model = make_model()
    model.backbone.set_attn_implementation(attn)
    state = filled_state(model)
    before = state.stm.clone()
    ctx = random_ids(12, seed=8)
    model.inject(state, input_ids=ctx, allow_short=True)
    from reference import reference_new_slots

    torch.testing.assert_close(state.stm[:, -8:], reference_new_slots(model, before, ctx), atol=ATOL, rtol=0)
    ids = random_ids(7, seed=5)
    torch.testing.assert_close(model(ids, memory=state).logits, reference_logits(model, state.stm, ids), atol=ATOL, rtol=0)


def test_a_raw_slot_tensor_is_read_like_a_state_and_passes_gradients():
    model = make_model()
    slots = torch.randn(3, 5, 64, requires_grad=True)  # e.g. freshly written slots, any count
    ids = random_ids(6)
    logits = model(ids, memory=slots).logits
    torch.testing.assert_close(logits, reference_logits(model, slots.detach(), ids), atol=ATOL, rtol=0)
    logits.sum().backward()
    assert slots.grad is not None and slots.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="layers=3"):
        model(ids, memory=torch.randn(2, 5, 64))
