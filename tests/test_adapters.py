"""Adapters are chosen per call: concurrent reads and writes never see each other's adapter."""

import threading

import torch
from conftest import make_model, random_ids
from reference import reference_logits, reference_new_slots

from latentmem.writing import compute_new_slots

ATOL = 1e-5


def filled(model, writes=2, seed=0):
    state = model.new_memory(seed=seed)
    for i in range(writes):
        model.inject(state, input_ids=random_ids(24, seed=100 + i))
    return state


def test_the_default_role_does_not_reach_reads_and_writes():
    model = make_model()
    state = filled(model)
    ids = random_ids(6, seed=1)
    before = state.stm.clone()
    for role in ("write", "base", "read"):
        model.adapters.activate(role)  # only calls outside any `use` block follow it
        torch.testing.assert_close(
            model(ids, memory=state).logits, reference_logits(model, state.stm, ids), atol=ATOL, rtol=0
        )
        got = compute_new_slots(model, state, random_ids(12, seed=4)[0])
        torch.testing.assert_close(got, reference_new_slots(model, before, random_ids(12, seed=4)), atol=ATOL, rtol=0)


def test_use_picks_the_adapter_for_its_block_only():
    model = make_model()
    ids = random_ids(5, seed=1)
    with torch.no_grad():
        logits = {}
        for role in ("read", "write", "base"):
            with model.adapters.use(role):
                logits[role] = model.backbone(input_ids=ids).logits
        with model.adapters.use("write"):
            with model.adapters.use("read"):
                inner = model.backbone(input_ids=ids).logits
            outer = model.backbone(input_ids=ids).logits
        outside = model.backbone(input_ids=ids).logits  # the default role: read
    assert torch.equal(inner, logits["read"]) and torch.equal(outer, logits["write"])
    assert torch.equal(outside, logits["read"])
    assert (logits["write"] - logits["base"]).abs().max() > 1e-3
    assert (logits["write"] - logits["read"]).abs().max() > 1e-3


def test_concurrent_reads_and_writes_equal_sequential_ones():
    check_concurrent_reads_and_writes(make_model())


def check_concurrent_reads_and_writes(model):
    reader_state, writer_state = filled(model, seed=1), filled(model, seed=2)
    prompts = [random_ids(6, seed=10 + i) for i in range(6)]
    contexts = [random_ids(24, seed=30 + i) for i in range(6)]

    def reads(state):
        with torch.no_grad():
            return [model(ids, memory=state).logits for ids in prompts] + [
                model.generate(prompts[0], memory=state, max_new_tokens=4, do_sample=False)
            ]

    def writes(state):
        for ctx in contexts:
            model.inject(state, input_ids=ctx)
        return state.stm.clone()

    # sequentially, on copies of the two states
    seq_reader, seq_writer = filled(model, seed=1), filled(model, seed=2)
    want_reads, want_pool = reads(seq_reader), writes(seq_writer)

    results, errors, start = {}, [], threading.Barrier(2)

    def run(name, fn, state):
        try:
            start.wait()
            results[name] = fn(state)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [
        threading.Thread(target=run, args=("read", reads, reader_state)),
        threading.Thread(target=run, args=("write", writes, writer_state)),
    ]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for got, want in zip(results["read"], want_reads):
        if got.dtype == torch.long:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(results["write"], want_pool, atol=ATOL, rtol=0)


# --- merged weights (serving) ------------------------------------------------------------------
def test_merged_adapters_compute_each_role_as_peft_does():
    model = make_model()
    model.set_fast_inference(False)  # the wanted values come from PEFT's own forward
    state = filled(model)
    ids, context = random_ids(6, seed=1), random_ids(12, seed=4)[0]
    with torch.no_grad():
        want = {role: _backbone_logits(model, role, ids) for role in ("read", "write", "base")}
        want_read, want_slots = model(ids, memory=state).logits, compute_new_slots(model, state, context)
        model.adapters.merge()
        assert model.adapters.merged
        for role, logits in want.items():
            torch.testing.assert_close(_backbone_logits(model, role, ids), logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(model(ids, memory=state).logits, want_read, atol=ATOL, rtol=0)
        torch.testing.assert_close(compute_new_slots(model, state, context), want_slots, atol=ATOL, rtol=0)


def test_merged_copies_follow_the_weights_and_serve_inference_only():
    model = make_model()
    model.set_fast_inference(False)
    ids = random_ids(5, seed=2)
    model.adapters.merge()
    with torch.no_grad():
        merged = _backbone_logits(model, "read", ids)
        for layer in model.adapters.layers:  # change the adapter after the merge, in place
            layer.lora_B["decoder_adapter"].weight.mul_(3.0)
        changed = _backbone_logits(model, "read", ids)  # the copies are rebuilt from the new weights
        assert (changed - merged).abs().max() > 1e-3
    model.adapters.unmerge()
    with torch.no_grad():  # PEFT's own forward agrees with the rebuilt copies
        torch.testing.assert_close(_backbone_logits(model, "read", ids), changed, atol=ATOL, rtol=0)
    model.adapters.merge()
    model.adapters.set_trainable(True)  # training computes through PEFT and frees the copies
    copies = [layer._latentmem_merged["decoder_adapter"] for layer in model.adapters.layers]
    assert copies and not any(c.layouts for c in copies)
    with torch.no_grad():
        _backbone_logits(model, "read", ids)
    assert not any(c.layouts for c in copies)  # not even without gradients while trainable
    model.adapters.set_trainable(False)
    with torch.no_grad():
        torch.testing.assert_close(_backbone_logits(model, "read", ids), changed, atol=ATOL, rtol=0)
    assert all(c.layouts for c in copies)


def test_a_replaced_weight_is_picked_up_too():
    model = make_model()
    ids = random_ids(5, seed=2)
    with torch.no_grad():
        before = _backbone_logits(model, "read", ids)
        layer = model.adapters.layers[0]
        base = layer.get_base_layer()
        base.weight.data = base.weight.data * 2  # new storage, no in-place write
        after = _backbone_logits(model, "read", ids)
    model.set_fast_inference(False)
    with torch.no_grad():
        torch.testing.assert_close(_backbone_logits(model, "read", ids), after, atol=ATOL, rtol=0)
    assert (after - before).abs().max() > 1e-4


def test_merged_adapters_keep_concurrent_reads_and_writes_apart():
    model = make_model()
    model.adapters.merge()
    check_concurrent_reads_and_writes(model)


def test_merged_bytes_count_one_copy_per_adapter():
    model = make_model()
    weights = sum(layer.get_base_layer().weight.nbytes for layer in model.adapters.layers)
    assert model.adapters.merged_bytes() == 2 * weights > 0
    assert model.adapters.merged_bytes(["decoder_adapter"]) == weights


def _backbone_logits(model, role, ids):
    with model.adapters.use(role):
        return model.backbone(input_ids=ids).logits
