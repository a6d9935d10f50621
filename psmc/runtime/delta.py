"""The delta rule (DeltaNet) and the gated delta rule without materialising the transition.

    S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * q_t @ S_t

with g_t = exp(log_decay_t) (1 when log_decay is None). The transition E_t = g_t (I - beta_t
k_t k_t^T) is never built: applying it to S costs O(K*V) (S - beta k (k^T S)), so a stream
state is S alone (K*V floats).

This is the core branch's REFERENCE implementation (a per-token loop, exact, differentiable
by autograd) with the signatures agreed with the "delta" branch, which replaces it with the
chunked WY/UT form on merge.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _update(S: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None) -> Tensor:
    """One token: S [*lead, K, V]; k [*lead, K]; v [*lead, V]; beta, log_decay [*lead]."""
    b = beta[..., None, None]
    kS = (k.unsqueeze(-2) @ S)  # [*lead, 1, V]: k^T S
    S = S - b * k.unsqueeze(-1) * kS
    if log_decay is not None:
        S = torch.exp(log_decay)[..., None, None] * S
    return S + b * k.unsqueeze(-1) * v.unsqueeze(-2)


def delta_rule_step(state_S: Tensor | None, q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
                    log_decay: Tensor | None = None, *, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """One token in O(K*V): q, k [B, *lanes, K]; v [B, *lanes, V]; beta, log_decay [B, *lanes];
    state_S [B, *lanes, K, V] (None: zeros). Returns (o [B, *lanes, V], new S)."""
    if state_S is None:
        state_S = q.new_zeros(*q.shape, v.shape[-1])
    S = _update(state_S.to(q.dtype), k, v, beta, log_decay)
    o = (q.unsqueeze(-2) @ S).squeeze(-2) * scale
    return o, S


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None = None, *,
                     scale: float = 1.0, initial_state: Tensor | None = None,
                     chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """The whole sequence: q, k [B, T, *lanes, K]; v [B, T, *lanes, V]; beta, log_decay
    [B, T, *lanes]; initial_state [B, *lanes, K, V] or None. Returns (o [B, T, *lanes, V],
    final S [B, *lanes, K, V]). `chunk_size` is accepted for the agreed signature (this
    reference walks token by token)."""
    B, T = q.shape[:2]
    S = initial_state
    if S is None:
        S = q.new_zeros(B, *q.shape[2:], v.shape[-1])
    S = S.to(q.dtype)
    outs = []
    for t in range(T):
        o, S = delta_rule_step(S, q[:, t], k[:, t], v[:, t], beta[:, t],
                               None if log_decay is None else log_decay[:, t], scale=scale)
        outs.append(o)
    return torch.stack(outs, dim=1), S
