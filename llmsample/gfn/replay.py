"""A reward-prioritized, deduplicated replay buffer of complete sequences, per prompt.

    buf = ReplayBuffer(capacity=256)
    buf.add(prompt=0, seqs=[(3, 4, 8)], log_rewards=[-2.1])
    buf.seed(prompt=0, seqs=[(5, 6, 8)])   # off-policy (e.g. human) sequences, no reward yet
    seqs = buf.sample(prompt=0, k=4, temperature=1.0, generator=g)

Each prompt keeps at most ``capacity`` distinct sequences, the highest-reward ones. A
draw picks sequences with probability proportional to exp(log R / temperature),
without replacement, so a batch never holds the same replayed sequence twice.
Seeded sequences have no reward until the trainer scores them, so a draw takes them
first (uniformly among them, each once); the trainer then ``add``s them with their
reward like any other row. The state is a plain dict (``state_dict``/``load_state_dict``)
for checkpoints.
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
        self._pending: dict[int, list[tuple[int, ...]]] = {}  # seeded, not yet scored

    def __len__(self) -> int:
        return sum(map(len, self._data.values())) + sum(map(len, self._pending.values()))

    def size(self, prompt: int) -> int:
        """Sequences a draw for ``prompt`` can return (scored and seeded)."""
        return len(self._data.get(prompt, {})) + len(self._pending.get(prompt, []))

    def rewards(self, prompt: int) -> dict[tuple[int, ...], float]:
        """The scored sequences of ``prompt`` with their log R (a copy)."""
        return dict(self._data.get(prompt, {}))

    def seed(self, prompt: int, seqs: list[tuple[int, ...]]) -> None:
        """Queue off-policy sequences without a reward; the next draws return them first."""
        pending = self._pending.setdefault(prompt, [])
        scored = self._data.get(prompt, {})
        for s in map(tuple, seqs):
            if s not in scored and s not in pending:
                pending.append(s)

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
        """Up to ``k`` distinct sequences: seeded ones first (removed from the queue), then
        scored ones prioritized by exp(log R / temperature)."""
        if k <= 0:
            return []
        pending = self._pending.get(prompt, [])
        out = []
        if pending:
            picks = torch.randperm(len(pending), generator=generator)[:k].tolist()
            out = [pending[i] for i in picks]
            taken = set(picks)
            self._pending[prompt] = [s for i, s in enumerate(pending) if i not in taken]
        store = self._data.get(prompt, {})
        if not store or len(out) == k:
            return out
        seqs = list(store)
        logits = torch.tensor([store[s] for s in seqs], dtype=torch.float64) / temperature
        probs = torch.softmax(logits, dim=0)
        n = min(k - len(out), len(seqs))
        picks = torch.multinomial(probs, n, replacement=False, generator=generator)
        return out + [seqs[i] for i in picks.tolist()]

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "data": {p: list(v.items()) for p, v in self._data.items()},
            "pending": {p: list(v) for p, v in self._pending.items() if v},
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self._data = {int(p): {tuple(s): r for s, r in v} for p, v in state["data"].items()}
        pending = state.get("pending", {})  # absent in checkpoints from before seeding
        self._pending = {int(p): [tuple(s) for s in v] for p, v in pending.items()}
