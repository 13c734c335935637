"""Isolated writes (`isolated_writes`): every text is written from itself alone, as into an empty pool."""

import torch
from conftest import make_model
from test_mplus import random_ids

from latentmem.pool import tile_to_fill
from latentmem.writing import compute_first_write_slots, compute_new_slots


def test_a_write_into_a_used_pool_equals_the_text_written_alone_and_owns_all_its_k_slots():
    model = make_model(isolated_writes=True)  # K = 8
    state = model.new_memory(seed=0)
    for i in range(3):
        model.inject(state, input_ids=random_ids(20, seed=i))
    short = random_ids(5, seed=9).reshape(-1)  # shorter than K: its 5 slots repeat to 8
    with torch.no_grad(), model.adapters.use("write"):
        alone = compute_first_write_slots(model, [short])[0]
        assert torch.equal(compute_new_slots(model, state, short), tile_to_fill(alone, 8))
    result = model.inject(state, input_ids=short, allow_short=True)
    assert (state.sources[:, -8:] == result.injection_id).all()  # no slot is a re-run of an older write
    torch.testing.assert_close(state.stm[:, -8:], tile_to_fill(alone, 8).to(state.stm))


def test_chained_writes_depend_on_the_pool_and_isolated_ones_do_not():
    chained, isolated = make_model(), make_model(isolated_writes=True)
    text = random_ids(20, seed=7).reshape(-1)
    for model in (chained, isolated):
        a, b = model.new_memory(seed=0), model.new_memory(seed=0)
        model.inject(a, input_ids=random_ids(20, seed=1))
        model.inject(b, input_ids=random_ids(20, seed=2))
        with torch.no_grad():
            same = torch.equal(compute_new_slots(model, a, text), compute_new_slots(model, b, text))
        assert same == (model is isolated)
