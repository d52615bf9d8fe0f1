"""A reward-prioritized, deduplicated replay buffer of complete sequences, per prompt.

    buf = ReplayBuffer(capacity=256)
    buf.add(prompt=0, seqs=[(3, 4, 8)], log_rewards=[-2.1])
    seqs = buf.sample(prompt=0, k=4, temperature=1.0, generator=g)

Each prompt keeps at most ``capacity`` distinct sequences, the highest-reward ones. A
draw picks sequences with probability proportional to exp(log R / temperature),
without replacement, so a batch never holds the same replayed sequence twice.
The state is a plain dict (``state_dict``/``load_state_dict``) for checkpoints.
"""

from __future__ import annotations

import torch

__all__ = ["ReplayBuffer"]


class ReplayBuffer:
    def __init__(self, capacity: int = 256):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._data: dict[int, dict[tuple[int, ...], float]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._data.values())

    def size(self, prompt: int) -> int:
        return len(self._data.get(prompt, {}))

    def add(self, prompt: int, seqs: list[tuple[int, ...]], log_rewards: list[float]) -> None:
        """Insert sequences (a duplicate keeps one entry), then keep the top ``capacity``."""
        store = self._data.setdefault(prompt, {})
        for s, r in zip(seqs, log_rewards):
            if r == float("-inf"):
                continue  # zero reward: nothing to learn from replaying it
            store[tuple(s)] = float(r)
        if len(store) > self.capacity:
            keep = sorted(store.items(), key=lambda kv: kv[1], reverse=True)[: self.capacity]
            self._data[prompt] = dict(keep)

    def sample(
        self,
        prompt: int,
        k: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[tuple[int, ...]]:
        """Up to ``k`` distinct sequences, prioritized by exp(log R / temperature)."""
        store = self._data.get(prompt, {})
        if not store or k <= 0:
            return []
        seqs = list(store)
        logits = torch.tensor([store[s] for s in seqs], dtype=torch.float64) / temperature
        probs = torch.softmax(logits, dim=0)
        picks = torch.multinomial(probs, min(k, len(seqs)), replacement=False, generator=generator)
        return [seqs[i] for i in picks.tolist()]

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "data": {p: list(v.items()) for p, v in self._data.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self._data = {int(p): {tuple(s): r for s, r in v} for p, v in state["data"].items()}
