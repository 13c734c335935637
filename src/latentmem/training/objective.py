"""MemoryLLM's training objective (docs/design.md), one episode per memory state.

An episode is a few contexts and a target. The contexts are written into the episode's memory
state one by one, then the target is predicted while reading the whole memory (LM loss on the
target's labelled tokens):

- one context: the write keeps its gradient, and the target is read from `[bos ; new slots]`
  only, so the loss teaches the write path (the `default` adapter, the new-memory positional
  embedding) what to put into memory;
- several contexts: they are written without gradient (as `inject` does) and the target is read
  from the full pool, which teaches the read path to find the right slots among many, older ones.

Either way the new slots enter the pool detached afterwards (the state lives on across steps),
so later episodes read a pool full of earlier, unrelated writes, as at inference time.

An episode with no contexts is plain language modelling without memory (the document and the
question in one prompt). A model trained from scratch needs it: it must first learn the language
and to answer from context before it can learn to answer from memory, and keeps practising it
alongside. Such episodes run together as one padded batch. Episodes with memory are batched across
their states too: one-context episodes into empty memories (a curriculum's first memory stage) as
one write and one read, episodes written without gradient as one write per round of contexts and
one read of all their pools.
The objective is an `nn.Module` so DDP (through `accelerate`) sees the whole step as its forward.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from ..modeling import MemoryLLM
from ..positions import prompt_start, slot_positions
from ..prefix import prefix_keys_values, rotary_embeddings
from ..state import MemoryState
from ..writing import compute_slots_batch, inject_batch, store_slots

IGNORE = -100


@dataclass
class Episode:
    """Contexts to write (1-D id tensors, in order) and a target whose `labels` are scored.

    `answer_context` is the index of the context the target's answer comes from (None if the
    answer was written in an earlier episode: a retention step).
    """

    contexts: list[torch.Tensor]
    target: torch.Tensor
    labels: torch.Tensor
    answer_context: int | None = 0
    meta: dict = field(default_factory=dict)
    # For distillation: the same question with its answering text in the prompt, then the same
    # labelled tokens as the target's labelled tail (the frozen base reads it; see MemoryObjective).
    teacher: torch.Tensor | None = None

    @property
    def in_context(self) -> bool:
        """No memory involved: the target is plain text (e.g. document + question + answer)."""
        return not self.contexts

    @property
    def write_with_grad(self) -> bool:
        return len(self.contexts) == 1 and self.answer_context == 0

    @property
    def num_tokens(self) -> int:
        return sum(c.numel() for c in self.contexts) + self.target.numel()


@dataclass
class EpisodeResult:
    loss_sum: torch.Tensor  # summed token losses (differentiable)
    num_labels: int
    injection_ids: list[int]  # one per context, in order


class MemoryObjective(nn.Module):
    """Runs episodes against their memory states; `forward` returns the mean token loss.

    `distill` in [0, 1] mixes in distillation for episodes that carry a `teacher` prompt: at every
    labelled position the student (reading from memory) matches the `top_k` next-token
    distribution of the same model without memory and adapters (the frozen base) reading the
    answering text in its prompt: loss = (1 - distill) * cross-entropy + distill * KL(teacher || student).
    """

    def __init__(self, model: MemoryLLM, distill: float = 0.0, top_k: int = 32):
        super().__init__()
        if not 0.0 <= distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], got {distill}")
        self.model, self.distill, self.top_k = model, distill, top_k

    def forward(self, episodes: list[Episode], states: list[MemoryState]) -> tuple[torch.Tensor, list[EpisodeResult]]:
        if len(episodes) != len(states):
            raise ValueError(f"{len(episodes)} episodes for {len(states)} memory states")
        results: list[EpisodeResult | None] = [None] * len(episodes)
        plain = [i for i, e in enumerate(episodes) if e.in_context]
        for i, result in zip(plain, self.in_context_losses([episodes[i] for i in plain])):
            results[i] = result
        # Episodes with memory batch across their states. A state listed twice goes one episode at a
        # time: its second episode must see the first one's writes.
        uses = Counter(id(state) for state in states)
        alone = [not e.in_context and uses[id(s)] == 1 for e, s in zip(episodes, states)]
        with_grad = [i for i, e in enumerate(episodes) if alone[i] and e.write_with_grad]
        batches = [(with_grad, self.write_losses)]
        if self.model.reads_short_term_only:  # written without gradient, then the whole pool is read
            pooled = [i for i, e in enumerate(episodes) if alone[i] and not e.write_with_grad]
            batches.append((pooled, self.pool_read_losses))
        for indices, run_batch in batches:
            for i, result in zip(indices, run_batch([episodes[i] for i in indices], [states[i] for i in indices])):
                results[i] = result
        for i, (episode, state) in enumerate(zip(episodes, states)):
            if results[i] is None:
                results[i] = self.run_episode(episode, state)
        num_labels = max(1, sum(r.num_labels for r in results))
        return torch.stack([r.loss_sum for r in results]).sum() / num_labels, results

    def run_episode(self, episode: Episode, state: MemoryState) -> EpisodeResult:
        """One episode on its own (a state shared by several episodes, or an M+ read of a whole state)."""
        if episode.write_with_grad:
            return self.write_losses([episode], [state])[0]
        ids = [
            self.model.inject(state, input_ids=context, allow_short=True, source="train").injection_id
            for context in episode.contexts
        ]
        loss_sum, count = self.target_loss(episode, memory=state)
        return EpisodeResult(loss_sum, count, ids)

    def write_losses(self, episodes: list[Episode], states: list[MemoryState]) -> list[EpisodeResult]:
        """One-context episodes whose write keeps its gradient, batched: the targets read `[bos ; new slots]`.

        Writes: `compute_slots_batch`. Reads (`read_slots`): row b's memory is left-padded to the
        longest, so every target starts at the same position; RoPE sees only distances, which
        left-padding keeps, and the padded memory positions are masked out.
        """
        if not episodes:
            return []
        model = self.model
        injections = [state.record_injection("train", e.contexts[0].numel()) for e, state in zip(episodes, states)]
        slots = compute_slots_batch(model, states, [e.contexts[0].to(model.device) for e in episodes])  # with grad
        loss_sums, counts = self.read_slots(episodes, slots)
        with torch.no_grad():
            for state, episode, new, injection in zip(states, episodes, slots, injections):
                store_slots(model, state, new.detach(), injection.id, episode.contexts[0])
        return [EpisodeResult(loss, count, [injection.id])
                for loss, count, injection in zip(loss_sums, counts, injections)]  # fmt: skip

    def pool_read_losses(self, episodes: list[Episode], states: list[MemoryState]) -> list[EpisodeResult]:
        """`run_episode` for episodes written without gradient: round r writes every episode's r-th
        context into its state as one batch (`inject_batch`), then all targets read their pools as one."""
        if not episodes:
            return []
        ids: list[list[int]] = [[] for _ in episodes]
        for r in range(max(len(e.contexts) for e in episodes)):
            rows = [b for b, e in enumerate(episodes) if r < len(e.contexts)]
            written = inject_batch(
                self.model, [states[b] for b in rows], [episodes[b].contexts[r] for b in rows], "train"
            )
            for b, injection_id in zip(rows, written):
                ids[b].append(injection_id)
        loss_sums, counts = self.read_slots(
            episodes, [state.stm for state in states], [state.sources for state in states]
        )
        return [EpisodeResult(loss, count, written) for loss, count, written in zip(loss_sums, counts, ids)]

    def read_slots(
        self, episodes: list[Episode], slots: list[torch.Tensor], sources: list[torch.Tensor] | None = None
    ) -> tuple[list, list[int]]:
        """Summed target losses of each episode read from `[bos ; slots_b]` (as `target_loss` does), batched.

        `sources` (the injection id of every slot, per episode; None: each episode's slots are one
        write) place the slots in the model's `memory_positions` layout.
        """
        model, device = self.model, self.model.device
        L, d = len(model.decoder.layers), slots[0].shape[-1]
        bos = model.bos_embedding if model.bos_embedding is not None else slots[0].new_zeros(L, 0, d)
        prefixes = [torch.cat([bos.to(s.dtype), s], dim=1) for s in slots]  # [L, P_b, d]
        longest = max(p.shape[1] for p in prefixes)
        vectors = torch.stack([F.pad(p, (0, 0, longest - p.shape[1], 0)) for p in prefixes], dim=1)  # [L, B, P, d]
        prefix_real = torch.stack([torch.arange(longest, device=device) >= longest - p.shape[1] for p in prefixes])
        if model.config.memory_positions == "pool":  # left-padding keeps every distance to the targets
            rope = rotary_embeddings(model.decoder.rotary_emb, vectors, 0, longest)
            ropes = [rope] * L
            start = longest
        else:
            positions = self.layout_positions(slots, sources, longest)  # [L, B, P]
            ropes = [model.decoder.rotary_emb(vectors[i], position_ids=positions[i].to(device)) for i in range(L)]
            start = prompt_start(model.config.memory_positions, longest, model.config.num_tokens)
        ids, labels, target_real = self.padded_targets(episodes)
        inputs = model.embed(ids, attention_mask=target_real.long())
        positions = torch.arange(start, start + ids.shape[1], device=device).expand(len(episodes), -1)
        mask = torch.cat([prefix_real, target_real], dim=1).long()
        with model.adapters.use("read"):  # this computation's adapter, whatever else runs meanwhile
            cache = DynamicCache(config=model.backbone.config)
            for i, layer in enumerate(model.decoder.layers):
                cache.update(*prefix_keys_values(layer, vectors[i].to(model.dtype), ropes[i]), i)
            logits = model.backbone(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, cache=cache,
                                    use_cache=True).logits  # fmt: skip
        loss_sums, counts = summed_losses(logits, labels)
        return self.with_distillation(loss_sums, logits, labels, episodes), counts

    def with_distillation(self, loss_sums: list, logits: torch.Tensor, labels: torch.Tensor, episodes) -> list:
        """Mix each row's summed cross-entropy with its summed top-k KL to the teacher (rows with one)."""
        rows = [b for b, e in enumerate(episodes) if e.teacher is not None] if self.distill else []
        if not rows:
            return loss_sums
        teacher = self.teacher_top_k([episodes[b] for b in rows])
        mixed = list(loss_sums)
        for b, (top_log_probs, top_ids) in zip(rows, teacher):
            scored = (labels[b, 1:] != IGNORE).nonzero().flatten()  # logits that predict labelled tokens
            if len(scored) != len(top_ids):
                raise ValueError(f"episode {b}: {len(scored)} labelled tokens, its teacher scores {len(top_ids)}")
            student = logits[b, scored].float().log_softmax(-1).gather(-1, top_ids)
            kl = (top_log_probs.exp() * (top_log_probs - student)).sum()
            mixed[b] = (1 - self.distill) * loss_sums[b] + self.distill * kl
        return mixed

    @torch.no_grad()
    def teacher_top_k(self, episodes: list[Episode]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per episode: the frozen base's top-k log-probs (renormalised over the k) and token ids, `[A, k]`
        each, at the positions predicting its teacher's last A tokens (A = the target's labelled count)."""
        device = self.model.device
        ids = pad_sequence([e.teacher for e in episodes], batch_first=True).to(device)
        lengths = torch.tensor([e.teacher.numel() for e in episodes], device=device)
        real = (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()
        logits = self.model(ids, attention_mask=real, memory=None, use_cache=False).logits  # adapters off
        out = []
        for b, episode in enumerate(episodes):
            scored = int((episode.labels[1:] != IGNORE).sum())
            end = int(lengths[b]) - 1
            top = logits[b, end - scored : end].float().log_softmax(-1).topk(self.top_k, dim=-1)
            out.append((top.values - top.values.logsumexp(-1, keepdim=True), top.indices))
        return out

    def layout_positions(self, slots, sources, longest: int) -> torch.Tensor:
        """`[L, B, longest]` RoPE positions of left-padded `[bos ; slots_b]` prefixes (padding at 0)."""
        scheme, K = self.model.config.memory_positions, self.model.config.num_tokens
        rows = []
        for b, pool in enumerate(slots):
            L, M = pool.shape[:2]
            own = sources[b] if sources is not None else torch.zeros(L, M, dtype=torch.long)
            at = slot_positions(scheme, own, K)
            rows.append(F.pad(at, (longest - M, 0)))  # bos and padding at position 0
        return torch.stack(rows, dim=1)

    def in_context_losses(self, episodes: list[Episode]) -> list[EpisodeResult]:
        """Plain LM loss of in-context episodes, as one right-padded batch without memory."""
        if not episodes:
            return []
        ids, labels, real = self.padded_targets(episodes)
        logits = self.model(ids, attention_mask=real.long(), memory=None, use_cache=False).logits
        return [EpisodeResult(loss, count, []) for loss, count in zip(*summed_losses(logits, labels))]

    def padded_targets(self, episodes: list[Episode]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets and labels right-padded into `[B, T]` on the model's device, and where they are real."""
        device = self.model.device
        ids = pad_sequence([e.target for e in episodes], batch_first=True).to(device)
        labels = pad_sequence([e.labels for e in episodes], batch_first=True, padding_value=IGNORE).to(device)
        lengths = torch.tensor([e.target.numel() for e in episodes], device=device)
        return ids, labels, torch.arange(ids.shape[1], device=device) < lengths[:, None]

    def target_loss(self, episode: Episode, memory) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over the target's labelled positions."""
        device = self.model.device
        logits = self.model(episode.target[None].to(device), memory=memory, use_cache=False).logits
        labels = episode.labels[None].to(device)
        loss_sums, counts = summed_losses(logits, labels)
        return self.with_distillation(loss_sums, logits, labels, [episode])[0], counts[0]


def summed_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Per row: summed next-token cross-entropy over the labelled positions, and their count."""
    labels = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return list(losses.sum(dim=1)), (labels != IGNORE).sum(dim=1).tolist()
