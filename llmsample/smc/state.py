"""RunState: the tensors one SMC run carries from step to step.

B prompts x N particles, rows prompt-major (row r = b * N + i), R = B * N. In the token
engine every running row has drawn the same number of tokens ``t``; in block SMC each
prompt's running rows share theirs (``lengths``) and ``t`` is the widest row. A finished
row keeps its tokens (padded after its end) and its weight. The engine's steps
(:mod:`llmsample.smc.steps`) read and update it; ``view`` hands potentials, twists and
proposals a read-only :class:`~llmsample.particles.Particles` snapshot.

    state = RunState.new(prompts, tokenizer, eos, N, T, V)
    state.append(block, counts, done_now)         # rows take up to k new tokens each
    state.append_ragged(block, counts, done_now)  # the same, each after its own length
    state.reorder(index)                          # row r becomes old row index[r]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmsample.hf.prompts import PromptBatch
from llmsample.particles import Particles

__all__ = ["RunState"]


@dataclass
class RunState:
    prompts: PromptBatch
    tokenizer: object
    eos: Tensor  # [E] EOS ids
    N: int
    T: int
    V: int
    B: int  # prompts
    device: torch.device  # where every tensor of the run lives
    buf: Tensor  # [R, T] token ids, pad after each row's end
    t: int = 0  # width of the tokens so far: the longest row's length
    lengths: Tensor | None = None  # [R] real tokens of each row, EOS included
    finished: Tensor | None = None  # [R] bool
    log_w: Tensor | None = None  # [B, N] float64 unnormalized log weights
    log_psi: Tensor | None = None  # [R] twist value of each row's prefix (psi_0 = 1)
    log_phi: Tensor | None = None  # [R] log phi of each completed row
    # a twist or the potential returned NaN/+inf; a clamped weight went invalid
    invalid: Tensor | None = None  # [3] bool, read at the step's host sync
    prompt_index: Tensor | None = None  # [R] each row's prompt
    rows: Tensor | None = None  # [R] row numbers 0..R-1, for stateful twists
    ess_trace: list[Tensor] = field(default_factory=list)  # [B] per resampling check
    resampled_trace: list[Tensor] = field(default_factory=list)  # [B] bool

    @classmethod
    def new(cls, prompts: PromptBatch, tokenizer, eos: Tensor, N: int, T: int, V: int):
        B = prompts.input_ids.shape[0]
        R, device = B * N, prompts.input_ids.device
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            prompts=prompts,
            tokenizer=tokenizer,
            eos=eos.to(device),
            N=N,
            T=T,
            V=V,
            B=B,
            device=device,
            buf=torch.full((R, T), prompts.pad_token_id, dtype=torch.long, device=device),
            lengths=torch.zeros(R, dtype=torch.long, device=device),
            finished=torch.zeros(R, dtype=torch.bool, device=device),
            log_w=torch.zeros(B, N, **f64),
            log_psi=torch.zeros(R, **f64),
            log_phi=torch.zeros(R, **f64),
            invalid=torch.zeros(3, dtype=torch.bool, device=device),
            prompt_index=torch.arange(B, device=device).repeat_interleave(N),
            rows=torch.arange(R, device=device),
        )

    @property
    def R(self) -> int:
        """Rows: B * N."""
        return self.B * self.N

    @property
    def tokens(self) -> Tensor:
        """[R, t] the tokens so far (a view of ``buf``: no copy per step)."""
        return self.buf[:, : self.t]

    def view(self, rows_numbered: bool = True) -> Particles:
        """The particles as they stand; ``rows`` numbers them for stateful twists."""
        return Particles(
            self.tokens,
            self.lengths,
            self.prompt_index,
            self.prompts,
            self.tokenizer,
            self.eos,
            self.T,
            self.V,
            self.rows if rows_numbered else None,
        )

    def append(self, block: Tensor, counts: Tensor, done_now: Tensor) -> None:
        """Rows take ``block`` [R, k] (``counts`` [R] of them real: 0 for finished rows,
        fewer than k for a row that ended inside the block, padded after its end);
        ``done_now`` [R] marks the rows that completed in this block."""
        k = block.shape[1]
        self.buf[:, self.t : self.t + k] = block
        self.t += k
        self.lengths = self.lengths + counts
        self.finished = self.finished | done_now

    def append_ragged(self, block: Tensor, counts: Tensor, done_now: Tensor) -> None:
        """As :meth:`append`, but row r writes its ``counts[r]`` tokens right after its own
        ``lengths[r]`` (rows at different lengths, as in aligned block SMC)."""
        k, device = block.shape[1], self.device
        pos = torch.arange(k, device=device)[None, :]  # [1, k]
        real = pos < counts[:, None]  # [R, k]
        rows = torch.arange(self.R, device=device)[:, None].expand(-1, k)  # [R, k]
        cols = self.lengths[:, None] + pos  # [R, k]
        self.buf[rows[real], cols[real]] = block[real]
        self.lengths = self.lengths + counts
        self.t = int(self.lengths.max())
        self.finished = self.finished | done_now

    def reorder(self, index: Tensor) -> None:
        """Row r becomes a copy of old row ``index[r]`` (weights are set by the caller)."""
        self.buf, self.lengths = self.buf[index], self.lengths[index]
        self.finished = self.finished[index]
        self.log_psi, self.log_phi = self.log_psi[index], self.log_phi[index]
