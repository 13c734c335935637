"""Inference copies of weights (oneDNN-packed, transposed), the decoding-step attention, fast vs exact reads."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, random_ids
from reference import reference_logits

from latentmem import attention, inference_weights, modeling
from latentmem.attention import one_query_attention
from latentmem.inference_weights import InferenceWeight, use_inference_copies

ATOL, RTOL = 1e-5, 1e-5  # float32 rounding of sums in another order
cpu_layouts = pytest.mark.skipif(not inference_weights.packing_available(), reason="no oneDNN packing here")


def weight_and_bias(n=640, k=512, seed=0):  # at least MIN_LAYOUT_ELEMENTS
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * k**-0.5, torch.randn(n, generator=g)  # outputs of order 1


@cpu_layouts
def test_each_row_count_gets_its_layout_and_the_same_result():
    torch.manual_seed(0)
    w, b = weight_and_bias()
    copies = InferenceWeight(lambda: w, lambda: (w,))
    assert copies.layouts == ()  # nothing before a call needs it
    one, rows = torch.randn(1, 1, 512), torch.randn(2, 17, 512)
    with torch.no_grad():
        torch.testing.assert_close(copies.linear(one, b), F.linear(one, w, b), atol=ATOL, rtol=RTOL)
        assert copies.layouts == ("transposed",)
        torch.testing.assert_close(copies.linear(rows, None), F.linear(rows, w), atol=ATOL, rtol=RTOL)
        assert set(copies.layouts) == {"transposed", "packed"}
    copies.drop()
    assert copies.layouts == ()


def test_small_weights_compute_as_they_are():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    copies = InferenceWeight(lambda: w, lambda: (w,))
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert torch.equal(copies.linear(x, None), F.linear(x, w))
    assert copies.layouts == ("plain",)


def test_copies_follow_in_place_writes_and_replaced_storage():
    torch.manual_seed(0)
    w, _ = weight_and_bias()
    param = torch.nn.Parameter(w.clone(), requires_grad=False)
    copies = InferenceWeight(lambda: param, lambda: (param,))
    x = torch.randn(3, 512)
    with torch.no_grad():
        copies.linear(x, None)
        param.mul_(2.0)  # in place: the version counter moves
        torch.testing.assert_close(copies.linear(x, None), F.linear(x, 2 * w), atol=ATOL, rtol=RTOL)
        param.data = w * 3.0  # new storage, no in-place write
        torch.testing.assert_close(copies.linear(x, None), F.linear(x, 3 * w), atol=ATOL, rtol=RTOL)


def test_a_module_with_copies_computes_gradients_with_its_own_forward():
    w, b = weight_and_bias()
    module = torch.nn.Linear(512, 640)
    with torch.no_grad():
        module.weight.copy_(w), module.bias.copy_(b)
    want = F.linear(torch.ones(2, 512), w, b)
    use_inference_copies(module)
    x = torch.ones(2, 512, requires_grad=True)
    out = module(x)  # with gradients: the module's own forward, bit for bit
    assert torch.equal(out, want) and out.requires_grad
    out.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(module(x), want, atol=ATOL, rtol=RTOL)
    assert module.inference_copies.layouts == (("packed",) if inference_weights.packing_available() else ())
    inference_weights.stop_inference_copies(module)
    assert "forward" not in vars(module) and not hasattr(module, "inference_copies")


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_one_query_attention_equals_sdpa(heads, kv_heads, mask_kind):
    g = torch.Generator().manual_seed(1)
    batch, length, hd = 2, 37, 8
    q = torch.randn(batch, heads, 1, hd, generator=g)
    k, v = torch.randn(2, batch, kv_heads, length + 5, hd, generator=g)[:, :, :, :length]  # a view, as a cache
    mask = None
    if mask_kind is not None:
        visible = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        visible[0, ..., :9] = False  # row 0 is left-padded
        mask = visible if mask_kind == "bool" else torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    groups = heads // kv_heads
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(one_query_attention(q, k, v, mask, 0.3), want, atol=1e-6, rtol=0)


def filled(model, writes=2):
    state = model.new_memory(seed=0)
    for i in range(writes):
        model.inject(state, input_ids=random_ids(24, seed=100 + i))
    return state


def test_fast_inference_agrees_with_the_release_arithmetic(monkeypatch):
    # the test model is small: let every fast path apply to it
    monkeypatch.setattr(inference_weights, "MIN_LAYOUT_ELEMENTS", 1)
    monkeypatch.setattr(attention, "ONE_QUERY_MIN_KEYS", 1)
    model = make_model()
    assert model.fast_inference  # the default
    state = filled(model)
    ids = random_ids(7, seed=3)
    with torch.no_grad():
        fast = model(ids, memory=state).logits
    fast_tokens = model.generate(ids, memory=state, max_new_tokens=6, do_sample=False)
    assert model.adapters.merged == ("decoder_adapter",)  # reads merge their adapter
    model.set_fast_inference(False)
    assert not model.fast_inference and not model.adapters.merged
    with torch.no_grad():
        exact = model(ids, memory=state).logits
    torch.testing.assert_close(fast, exact, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(exact, reference_logits(model, state.stm, ids), atol=ATOL, rtol=RTOL)
    assert torch.equal(model.generate(ids, memory=state, max_new_tokens=6, do_sample=False), fast_tokens)


def test_switching_to_exact_recomputes_cached_memory():
    exact_model = make_model()
    exact_model.set_fast_inference(False)
    state = filled(exact_model)
    ids = random_ids(7, seed=3)
    with torch.no_grad():
        want = exact_model(ids, memory=state).logits
    model = make_model()  # the same weights (make_model seeds them), fast inference first
    with torch.no_grad():
        model(ids, memory=state)  # caches the memory's keys/values, projected with merged weights
        model.set_fast_inference(False)
        assert torch.equal(model(ids, memory=state).logits, want)


def test_reads_merge_only_below_the_size_limit(monkeypatch):
    monkeypatch.setattr(modeling, "AUTO_MERGE_BYTES", 0)
    model = make_model()
    assert model.fast_inference and not model.adapters.merged
