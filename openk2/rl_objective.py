"""The RL objective of Kimi K1.5 / K2 and the pieces around it: log-probabilities of trajectories under
the training forward, the loss, the PTX loss, and the rollout temperature schedule.

For a prompt x with K sampled responses y_1..y_K and rewards r_1..r_K (K1.5, section 2.3):

    L = mean_i ( r_i - mean(r) - tau * (log pi(y_i|x) - log pi_old(y_i|x)) )^2

one term per response, log pi(y|x) the sum of the log-probabilities of the response's own generated
tokens. Its gradient, -2 tau (r_i - mean r - tau * log-ratio_i) grad log pi(y_i|x) / N, is a policy
gradient with the group mean as baseline, held near pi_old by the squared log-ratio: the
relative-entropy regularised objective K1.5 derives, in the form it optimises. tau (`--kl-tau`) is
not QK-Clip's tau.

An agent trajectory is several model calls: the response y is every token the model generated, each
conditioned on the view it had (the context manager may have hidden old outputs between calls), and
the tool outputs and headers in between were forced, not generated. So a trajectory arrives as its
views (`Trace.sequences()`: ids + mask, mask 1 exactly on generated tokens), and log pi(y|x) sums
over the masked tokens of all its views. Forced tokens condition later ones but are never targets.

pi_old is the policy that sampled, recomputed with the training forward (INT4 fake-quant on when the
rollouts ran on INT4 weights), not taken from the engine's logprobs (bf16 kernels, batched decode):
in the first (usually only) update of a batch it is the detached value of the same forward, so the
log-ratio starts at exactly 0.

Batching: a trajectory's term needs its whole log pi, so micro-batches hold whole trajectories (all
their views). Rows are right-padded to the longest in the micro-batch; with causal attention padding
at the end changes nothing before it. Views are sorted by length first, so little is padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
SCHEDULES = ("constant", "linear", "cosine", "exp")


# ---- temperature ------------------------------------------------------------------------------

def temperature_at(step: int, total: int, start: float, end: float | None = None, schedule: str = "linear") -> float:
    """Rollout temperature of step `step` (0-based) of `total`: `start` at the first step, `end` at
    the last, following `schedule` (constant | linear | cosine | exp). K1.5 samples hot early
    (exploration) and cooler late (exploitation)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"temperature schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if start < 0 or (end is not None and end < 0):
        raise ValueError(f"temperatures must be >= 0, got start {start}, end {end}")
    if end is None or schedule == "constant" or total <= 1:
        return float(start)
    x = min(max(step / (total - 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * x
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * x))
    if start <= 0 or end <= 0:
        raise ValueError("the exp temperature schedule needs start and end > 0")
    return start * (end / start) ** x


# ---- rewards -> advantages ------------------------------------------------------------------------

def advantages(rewards, groups) -> torch.Tensor:
    """r_i - mean of r over i's group (the K responses to the same prompt)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    g = torch.as_tensor(groups, dtype=torch.long)
    if r.shape != g.shape:
        raise ValueError(f"{r.numel()} rewards but {g.numel()} group labels")
    _, inv = torch.unique(g, return_inverse=True)
    n = torch.zeros(int(inv.max()) + 1 if len(inv) else 0, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    s = torch.zeros_like(n).index_add_(0, inv, r)
    return (r - (s / n)[inv]).float()


def k15_terms(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, kl_tau: float) -> torch.Tensor:
    """Per trajectory: (r - mean r - tau * (log pi - log pi_old))^2."""
    return (adv - kl_tau * (logp - logp_old)) ** 2


def k15_loss(logp, logp_old, rewards, groups, kl_tau: float) -> torch.Tensor:
    """The whole objective on one batch (mean over trajectories); the trainer sums `k15_terms` over
    micro-batches and divides by the batch's trajectory count, which is the same number."""
    adv = advantages(rewards, groups).to(logp)
    return k15_terms(logp, logp_old, adv, kl_tau).mean()


# ---- sequences -> batches -------------------------------------------------------------------------

@dataclass
class Rows:
    """Views of some trajectories as padded rows for one forward."""
    inputs: torch.Tensor    # [R, T] ids (padding: pad_id)
    targets: torch.Tensor   # [R, T] the next id where it was generated, else IGNORE
    owner: torch.Tensor     # [R] which trajectory (0..n-1, local to these rows) a row belongs to
    n: int                  # trajectories

    @property
    def tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device) -> "Rows":
        return Rows(self.inputs.to(device), self.targets.to(device), self.owner.to(device), self.n)


def make_rows(trajectories: list[list[tuple[list, list]]], pad_id: int = 0) -> Rows:
    """trajectories[i] = its views, each (ids, mask) with mask 1 on generated tokens -> Rows.
    Position t's target is ids[t+1] when mask[t+1] == 1 (the model generated it), else IGNORE."""
    rows, owner = [], []
    for i, views in enumerate(trajectories):
        for ids, mask in views:
            if len(ids) != len(mask):
                raise ValueError(f"trajectory {i}: a view has {len(ids)} ids but {len(mask)} mask values")
            if len(ids) < 2:
                continue
            rows.append((ids, mask))
            owner.append(i)
    if not rows:
        raise ValueError("no view with a generated token to train on")
    T = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        x = torch.tensor(ids, dtype=torch.long)
        m = torch.tensor(mask[1:], dtype=torch.bool)
        L = len(ids) - 1
        inputs[r, :L] = x[:-1]
        targets[r, :L] = torch.where(m, x[1:], torch.full_like(x[1:], IGNORE))
    return Rows(inputs, targets, torch.tensor(owner, dtype=torch.long), len(trajectories))


def micro_batches(lengths: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Group trajectories (given the lengths of their views) into micro-batches of whole
    trajectories whose padded size (rows x longest row) stays within max_tokens where it can
    (a trajectory bigger than that goes alone). Returns lists of trajectory indices."""
    order = sorted(range(len(lengths)), key=lambda i: max(lengths[i], default=0))
    out, cur, rows, longest = [], [], 0, 0
    for i in order:
        n, m = len(lengths[i]), max(lengths[i], default=0)
        if cur and (rows + n) * max(longest, m) > max_tokens:
            out.append(cur)
            cur, rows, longest = [], 0, 0
        cur.append(i)
        rows, longest = rows + n, max(longest, m)
    if cur:
        out.append(cur)
    return out


# ---- log-probabilities ----------------------------------------------------------------------------

def token_logprobs(model, rows: Rows) -> torch.Tensor:
    """log pi(target | prefix) at every trained position, in row-major order ([N] fp32). Only those
    positions go through the output head (most of a trajectory is prompt and tool output)."""
    keep = rows.targets != IGNORE
    logits = model(rows.inputs, logits_at=keep)
    return -F.cross_entropy(logits.float(), rows.targets[keep], reduction="none")


def trajectory_logprobs(model, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_i|x_i) per trajectory [n], the token log-probs [N]): token log-probs summed over
    all views of each trajectory."""
    lp = token_logprobs(model, rows)
    keep = rows.targets != IGNORE
    owner = rows.owner[:, None].expand_as(keep)[keep]
    return torch.zeros(rows.n, dtype=lp.dtype, device=lp.device).index_add(0, owner, lp), lp


def ptx_loss(model, rows: Rows) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the trained tokens of gold conversations, their count): the PTX
    term is its mean times the PTX weight."""
    lp = token_logprobs(model, rows)
    return -lp.sum(), lp.numel()
