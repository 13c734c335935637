"""The training objective of SPEC §7, one episode per memory state.

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
alongside. Such episodes run together as one padded batch.
The objective is an `nn.Module` so DDP (through `accelerate`) sees the whole step as its forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..modeling import MemoryLLM
from ..pool import write_slots
from ..state import MemoryState
from ..writing import compute_new_slots

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
    """Runs episodes against their memory states; `forward` returns the mean token loss."""

    def __init__(self, model: MemoryLLM):
        super().__init__()
        self.model = model

    def forward(self, episodes: list[Episode], states: list[MemoryState]) -> tuple[torch.Tensor, list[EpisodeResult]]:
        plain = iter(self.in_context_losses([e for e in episodes if e.in_context]))
        results = [next(plain) if episode.in_context else self.run_episode(episode, state)
                   for episode, state in zip(episodes, states, strict=True)]  # fmt: skip
        num_labels = max(1, sum(r.num_labels for r in results))
        return torch.stack([r.loss_sum for r in results]).sum() / num_labels, results

    def run_episode(self, episode: Episode, state: MemoryState) -> EpisodeResult:
        model, device = self.model, self.model.device
        if episode.write_with_grad:
            (context,) = episode.contexts
            injection = state.record_injection("train", context.numel())
            model.adapters.activate("write")
            new_slots = compute_new_slots(model, state, context.to(device))  # [L, K, d], with grad
            loss_sum, count = self.target_loss(episode, memory=new_slots)  # read [bos ; new slots]
            write_slots(state, new_slots.detach(), injection.id, per_layer=model.config.drop_memory_per_layer)
            return EpisodeResult(loss_sum, count, [injection.id])
        ids = [
            model.inject(state, input_ids=context, allow_short=True, source="train").injection_id
            for context in episode.contexts
        ]
        loss_sum, count = self.target_loss(episode, memory=state)
        return EpisodeResult(loss_sum, count, ids)

    def in_context_losses(self, episodes: list[Episode]) -> list[EpisodeResult]:
        """Plain LM loss of in-context episodes, as one right-padded batch without memory."""
        if not episodes:
            return []
        device = self.model.device
        ids = pad_sequence([e.target for e in episodes], batch_first=True).to(device)
        labels = pad_sequence([e.labels for e in episodes], batch_first=True, padding_value=IGNORE).to(device)
        lengths = torch.tensor([e.target.numel() for e in episodes], device=device)
        mask = (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()
        logits = self.model(ids, attention_mask=mask, memory=None, use_cache=False).logits[:, :-1]
        labels = labels[:, 1:]
        losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        counts = (labels != IGNORE).sum(dim=1).tolist()
        return [EpisodeResult(losses[row].sum(), counts[row], []) for row in range(len(episodes))]

    def target_loss(self, episode: Episode, memory) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over the target's labelled positions."""
        device = self.model.device
        logits = self.model(episode.target[None].to(device), memory=memory, use_cache=False).logits[0, :-1]
        labels = episode.labels[1:].to(device)
        loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
        return loss_sum, int((labels != IGNORE).sum())
