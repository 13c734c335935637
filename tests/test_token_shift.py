"""Token shift (config `token_shift`): every token also sees a learned map of the previous token's embedding.

Writes are checked against the reference in test_write.py; here: reads, generation with a cache
(each step's first token needs the token before it), padding and M+.
"""

import pytest
import torch
from conftest import LORA, backbone_config, make_model, random_ids, randomize_lora

from latentmem.config import MPlusConfig
from latentmem.mplus import MPlus


def with_shift(model):
    with torch.no_grad():
        model.token_shift.weight.copy_(torch.randn(model.token_shift.weight.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    return model


def shifted_model():
    return with_shift(make_model(token_shift=True))


def shifted_mplus():
    torch.manual_seed(0)
    config = MPlusConfig(backbone_config=backbone_config(), lora=LORA, num_tokens=8, num_blocks=6, num_ltm_blocks=2,
                         selector_hidden_dim=16, update_ltm_frequency=3, token_shift=True, promote_on_retrieval=0.0)  # fmt: skip
    model = MPlus(config).eval()
    randomize_lora(model)
    return with_shift(model)


def filled(model, writes):
    state = model.new_memory(seed=0)
    for i in range(writes):
        model.inject(state, input_ids=random_ids(20, seed=100 + i))
    return state


def greedy_without_cache(model, ids, memory, steps):
    """Greedy decoding that re-reads the whole sequence every step: no cache, no previous-token bookkeeping."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, memory=memory, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_a_read_without_memory_is_the_backbone_on_shifted_embeddings():
    model = shifted_model()
    ids = random_ids(9, seed=1)
    embed = model.backbone.model.embed_tokens(ids)
    previous = torch.nn.functional.pad(embed, (0, 0, 1, 0))[:, :-1]
    model.adapters.activate("base")
    with torch.no_grad():
        want = model.backbone(inputs_embeds=embed + model.token_shift(previous)).logits
        got = model(ids).logits
        unshifted = model.backbone(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - unshifted).abs().max() > 1e-3  # the shift is really applied


@pytest.mark.parametrize("make", [shifted_model, shifted_mplus], ids=["memoryllm", "mplus"])
def test_cached_generation_matches_rereading_the_whole_sequence(make):
    model = make()
    state = filled(model, 5)
    ids = random_ids(6, seed=3)
    got = model.generate(ids, memory=state, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, greedy_without_cache(model, ids, state, 6))


def test_a_continued_cache_needs_the_previous_token():
    model = shifted_model()
    state = filled(model, 3)
    ids = random_ids(8, seed=4)
    with torch.no_grad():
        whole = model(ids, memory=state).logits
        head = model(ids[:, :5], memory=state, use_cache=True)
        tail = model(ids[:, 5:], memory=state, cache=head.cache, previous_token_ids=ids[:, 4])
    torch.testing.assert_close(tail.logits, whole[:, 5:], atol=1e-5, rtol=0)


def test_left_padding_is_not_seen_as_a_previous_token():
    model = shifted_model()
    state = filled(model, 3)
    prompts = [random_ids(6, seed=1)[0], random_ids(3, seed=2)[0]]
    batch, mask = torch.full((2, 6), 5), torch.zeros(2, 6, dtype=torch.long)  # pad id 5: a real embedding
    for i, p in enumerate(prompts):
        batch[i, 6 - len(p) :], mask[i, 6 - len(p) :] = p, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=positions, memory=state).logits
        for i, p in enumerate(prompts):
            torch.testing.assert_close(padded[i, 6 - len(p) :], model(p[None], memory=state).logits[0], atol=1e-5, rtol=0)
    out = model.generate(batch, attention_mask=mask, memory=state, max_new_tokens=5, do_sample=False, pad_token_id=5)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], memory=state, max_new_tokens=5, do_sample=False)
        assert out[i, 6:].tolist() == single[0, len(p) :].tolist()
