"""The training loop: episodes -> MemoryObjective -> optimizer, with curriculum, resume and logging.

Reads top to bottom like a script: `Trainer.train()` builds the optimizer and schedule, restores a
checkpoint if asked, then repeats: draw one episode per memory state, run the objective (under
`accelerate`, so the same loop runs on one CPU, one GPU or many processes with DDP), step, log,
evaluate, save. Each process keeps its own `batch_size` memory states, which live on across steps
and are part of the checkpoint, so a resumed run continues exactly.

Curriculum (`Stage`s): training memories start as small as one write (`num_blocks=1`: the pool
holds only the newest context) with single-context episodes, then grow in pool size, contexts per
episode and retention steps (re-asking an earlier target after unrelated writes). A model trained
from scratch first learns the language and in-context answering (`in_context=1.0`) and keeps a
share of such episodes later.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from ..modeling import MemoryLLM
from ..state import MemoryState
from .objective import Episode, MemoryObjective


@dataclass
class Stage:
    """A curriculum stage: its length, the training memories' size and the episodes' difficulty."""

    steps: int
    num_blocks: int  # training pools hold num_blocks * K slots per layer
    max_contexts: int = 1  # episodes write 1..max_contexts contexts before the target
    retention: float = 0.0  # probability that an episode re-asks an earlier target
    # (min, max) writes between a re-asked target's write and its question: reads of older memory
    retention_depth: tuple[int, int] = (1, 8)
    in_context: float = 0.0  # probability that an episode is plain LM without memory (from-scratch models)
    reset_memory: float | None = None  # per-step chance a memory starts empty (None: the config's); 1.0 =
    # every episode writes into an empty memory, so the target reads its context's slots alone
    copy_fraction: float | None = None  # for tasks with copy targets (FactTask): their share (None: the task's)
    # probability that an episode's write does not answer its target (FactTask.unrelated_episode): a
    # general prompt answered as the base model answers it, or English text, read through memory
    unrelated: float = 0.0
    # for tasks that wrap documents (FactTask): the share of fact documents written inside a chat
    # exchange or prose, as real writes hold them (None: the task's)
    wrapped: float | None = None


@dataclass
class TrainingConfig:
    stages: list[Stage] = field(default_factory=lambda: [Stage(steps=100, num_blocks=1)])
    batch_size: int = 8  # episodes per micro-batch and process (one memory state each)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    train_all: bool = False  # train every weight (from scratch) instead of only the memory path
    reset_memory: float = 0.02  # per step, chance that a training memory starts empty again
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end (and when max_minutes runs out)
    eval_every: int = 0
    final_eval: bool = True  # evaluate once more at the end of training
    max_minutes: float | None = None  # stop (with a checkpoint) after this much training time
    max_steps: int | None = None  # stop (with a checkpoint) at this step; the schedule stays as planned
    mixed_precision: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU; or "no" / "bf16"
    progress: bool = True
    history: int = 64  # earlier targets kept per training memory for retention steps
    distill: float = 0.0  # weight of top-k distillation from the base reading the text in its prompt
    distill_top_k: int = 32

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> Stage:
        for stage in self.stages:
            if step < stage.steps:
                return stage
            step -= stage.steps
        return self.stages[-1]


def trainable_parameters(model: MemoryLLM, train_all: bool) -> list[torch.nn.Parameter]:
    """Mark what trains: everything, or the memory path (LoRA adapters, bos, new-memory embedding)."""
    model.requires_grad_(train_all)
    model.adapters.set_trainable(True)
    for p in (model.bos_embedding, model.new_memory_positional_emb):
        if p is not None:
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lr_lambda(config: TrainingConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Trains `model` on episodes from `task` (a `FactTask`, `CorpusTask` or anything alike).

    Args:
        model: the MemoryLLM to train (in place).
        task: gives `episode(max_contexts)`, `in_context_episode()` (both also take `copy_fraction=`
            if a stage sets it), `distractor()`, `state_dict()`, `load_state_dict()`;
            made per process by `make_task(rank)` so processes draw different data.
        out_dir: checkpoints (`checkpoint/`), `metrics.jsonl` and the final model (`final/`).
        evaluate: optional `fn(model) -> dict` run on the main process every `eval_every` steps
            and at the end; its numbers go to the metrics file.
        tokenizer: saved with the final model, if given.
    """

    def __init__(self, model: MemoryLLM, make_task: Callable[[int], object], config: TrainingConfig,
                 out_dir: str | Path, evaluate: Callable | None = None, tokenizer=None):  # fmt: skip
        self.config, self.out_dir = config, Path(out_dir)
        precision = config.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "no"
        # Episodes differ in which parameters they use (e.g. no gradient through writes when several
        # contexts are written), so DDP must look for unused parameters every step.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        # cpu=True on GPU-less machines: accelerate then runs torchrun's processes as CPU DDP (gloo).
        self.accelerator = Accelerator(
            mixed_precision=precision, kwargs_handlers=[ddp], cpu=not torch.cuda.is_available()
        )
        self.model = model.to(self.accelerator.device).train()
        self.task = make_task(self.accelerator.process_index)
        self.evaluate, self.tokenizer = evaluate, tokenizer
        self.rng = random.Random(config.seed * 1000 + self.accelerator.process_index)
        self.states: list[MemoryState] = []
        self.history: list[deque] = [deque(maxlen=config.history) for _ in range(config.batch_size)]
        self.step, self.elapsed, self.cpu_seconds, self.tokens = 0, 0.0, 0.0, 0

    # --- memory states --------------------------------------------------------------------
    def new_state(self, num_blocks: int, index: int) -> MemoryState:
        """A training memory of `num_blocks * K` slots (the curriculum's size, not the model's)."""
        m, b = self.model, self.model.backbone.config
        seed = self.rng.randrange(2**31)
        return MemoryState(b.num_hidden_layers, num_blocks * m.config.num_tokens, b.hidden_size,
                           dtype=m.dtype, device=m.device, seed=seed, fingerprint=m.fingerprint)  # fmt: skip

    def prepare_states(self, stage: Stage) -> None:
        size = stage.num_blocks * self.model.config.num_tokens
        reset = self.config.reset_memory if stage.reset_memory is None else stage.reset_memory
        for i in range(self.config.batch_size):
            if (
                i >= len(self.states)
                or self.states[i].num_slots != size
                or self.rng.random() < reset
            ):
                if i < len(self.states):
                    self.states[i] = self.new_state(stage.num_blocks, i)
                else:
                    self.states.append(self.new_state(stage.num_blocks, i))
                self.history[i].clear()

    def next_episode(self, i: int, stage: Stage) -> Episode:
        """A fresh episode from the task, an in-context one, or (retention) an earlier target after unrelated writes."""
        # Only stages that set copy_fraction pass it on, so tasks without copy targets need not take it.
        options = {} if stage.copy_fraction is None else {"copy_fraction": stage.copy_fraction}
        wrapping = {} if stage.wrapped is None else {"wrap_fraction": stage.wrapped}
        if stage.in_context and self.rng.random() < stage.in_context:
            return self.task.in_context_episode(**options)
        if stage.unrelated and self.rng.random() < stage.unrelated:
            return self.task.unrelated_episode()
        if self.history[i] and self.rng.random() < stage.retention:
            episode = self.retention_episode(i, stage)
            if episode is not None:
                return episode
        return self.task.episode(stage.max_contexts, **options, **wrapping)

    def retention_episode(self, i: int, stage: Stage) -> Episode | None:
        """Re-ask a target written `stage.retention_depth` writes back (counting this episode's
        distractors), among those with at least half their slots left; None if there is none."""
        state, (shallowest, deepest) = self.states[i], stage.retention_depth
        distractors = self.rng.randint(1, stage.max_contexts)
        surviving = state.surviving_slots()
        candidates = [
            asked
            for injection_id, written, asked, write_index in self.history[i]
            if shallowest <= state.write_count + distractors - write_index <= deepest
            and surviving.get(injection_id, 0) / state.num_layers >= written / 2  # still answerable
        ]
        if not candidates:
            return None
        asked = self.rng.choice(candidates)
        return Episode([self.task.distractor() for _ in range(distractors)], asked.target, asked.labels,
                       answer_context=None, meta=asked.meta, teacher=asked.teacher)  # fmt: skip

    # --- the loop -------------------------------------------------------------------------
    def train(self, resume: bool = False) -> Path:
        """Train to the end of the curriculum (or `max_minutes`); returns the final model folder."""
        cfg, acc = self.config, self.accelerator
        params = trainable_parameters(self.model, cfg.train_all)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        objective = MemoryObjective(self.model, distill=cfg.distill, top_k=cfg.distill_top_k)
        objective, optimizer = acc.prepare(objective, optimizer)
        if resume and (self.out_dir / "checkpoint").exists():
            self.load_checkpoint(self.out_dir / "checkpoint", optimizer, scheduler)
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not (cfg.progress and acc.is_main_process),
                   desc="train", dynamic_ncols=True)  # fmt: skip
        loss_ema, window_tokens, window_start = None, 0, time.perf_counter()
        while self.step < cfg.total_steps:
            step_start, cpu_start = time.perf_counter(), time.process_time()
            stage = cfg.stage_at(self.step)
            self.prepare_states(stage)
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                episodes = [self.next_episode(i, stage) for i in range(cfg.batch_size)]
                sync = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else acc.no_sync(objective):
                    loss, results = objective(episodes, self.states)
                    acc.backward(loss / cfg.grad_accum)
                step_loss += loss.item() / cfg.grad_accum
                self.remember(episodes, results)
                window_tokens += sum(e.num_tokens for e in episodes) * acc.num_processes
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.elapsed += time.perf_counter() - step_start
            self.cpu_seconds += time.process_time() - cpu_start
            loss_ema = step_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * step_loss
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                rate = window_tokens / (time.perf_counter() - window_start)
                self.tokens += window_tokens
                self.log({"step": self.step, "loss": step_loss, "loss_ema": round(loss_ema, 4),
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(rate, 1), "tokens": self.tokens,
                          "num_blocks": stage.num_blocks, "max_contexts": stage.max_contexts,
                          "elapsed_s": round(self.elapsed, 1), "cpu_s": round(self.cpu_seconds, 1)})  # fmt: skip
                bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{rate:.0f}", N=stage.num_blocks)
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.total_steps:
                self.run_evaluation()
            out_of_time = (cfg.max_minutes is not None and self.elapsed >= cfg.max_minutes * 60) or (
                cfg.max_steps is not None and self.step >= cfg.max_steps
            )
            stop = acc.reduce(torch.tensor(float(out_of_time), device=acc.device), reduction="sum").item() > 0
            if (cfg.save_every and self.step % cfg.save_every == 0) or stop:
                self.save_checkpoint(optimizer, scheduler)
            if stop:
                break
        bar.close()
        self.save_checkpoint(optimizer, scheduler)
        if cfg.final_eval:
            self.run_evaluation()
        return self.save_final()

    def remember(self, episodes: list[Episode], results) -> None:
        """Keep each episode's target with the injection that holds its answer, for retention steps."""
        for i, (episode, result) in enumerate(zip(episodes, results)):
            if episode.answer_context is not None and not episode.meta.get("unrelated"):
                context = episode.contexts[episode.answer_context]
                written = min(context.numel(), self.model.config.num_tokens)
                # the write count right after the answer's write: later writes make it older
                write_index = self.states[i].write_count - (len(episode.contexts) - 1 - episode.answer_context)
                asked = replace(episode, contexts=[])  # the question alone: its contexts are in memory
                self.history[i].append((result.injection_ids[episode.answer_context], written, asked, write_index))

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with (self.out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def run_evaluation(self) -> None:
        if self.evaluate is not None and self.accelerator.is_main_process:
            start = time.perf_counter()
            metrics = self.evaluate(self.model)
            self.log({"step": self.step, "eval": metrics, "eval_s": round(time.perf_counter() - start, 1)})
            tqdm.write(f"step {self.step}: {metrics}")
            self.model.train()
        self.accelerator.wait_for_everyone()

    # --- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, optimizer, scheduler) -> None:
        """Everything needed to continue exactly: weights, optimizer, schedule, RNGs, memories, data."""
        acc = self.accelerator
        final, tmp = self.out_dir / "checkpoint", self.out_dir / "checkpoint.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rank = acc.process_index
        if acc.is_main_process:
            save_model(self.model, str(tmp / "weights.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "step": self.step, "elapsed": self.elapsed, "cpu_seconds": self.cpu_seconds, "tokens": self.tokens,
                        "config": asdict(self.config)}, tmp / "trainer.pt")  # fmt: skip
        (tmp / f"rank{rank}").mkdir()
        for i, state in enumerate(self.states):
            state.save(tmp / f"rank{rank}" / f"memory{i}.safetensors")
        torch.save({
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rng": self.rng.getstate(), "task": self.task.state_dict(), "history": list(map(list, self.history)),
        }, tmp / f"rank{rank}" / "process.pt")  # fmt: skip
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        acc.wait_for_everyone()

    def load_checkpoint(self, folder: Path, optimizer, scheduler) -> None:
        rank = self.accelerator.process_index
        load_model(self.model, str(folder / "weights.safetensors"), device=str(self.model.device))
        trainer = torch.load(folder / "trainer.pt", weights_only=False)
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        self.step, self.elapsed, self.tokens = trainer["step"], trainer["elapsed"], trainer["tokens"]
        self.cpu_seconds = trainer["cpu_seconds"]
        process = torch.load(folder / f"rank{rank}" / "process.pt", weights_only=False)
        torch.set_rng_state(process["torch_rng"])
        if process["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(process["cuda_rng"])
        self.rng.setstate(process["rng"])
        self.task.load_state_dict(process["task"])
        self.history = [deque(map(tuple, h), maxlen=self.config.history) for h in process["history"]]
        self.states = [MemoryState.load(folder / f"rank{rank}" / f"memory{i}.safetensors").to(self.model.device)
                       for i in range(self.config.batch_size)]  # fmt: skip

    def save_final(self) -> Path:
        """The trained model as an ordinary latentmem folder (plus the tokenizer, if any)."""
        folder = self.out_dir / "final"
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.model).save_pretrained(folder)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(folder)
        self.accelerator.wait_for_everyone()
        return folder
