"""Pure tensor math used by the guard. No Lightning import, no host synchronisation.

Every function takes tensors and returns 0-d tensors on the same device, detached from autograd, so the
caller decides when (and whether) to move numbers to the host.

Estimators, with their sources:

* ``approx_kl`` is the k3 estimator of KL(pi_old || pi_new), ``E_old[(r - 1) - log r]`` with
  ``r = pi_new / pi_old`` (J. Schulman, "Approximating KL Divergence", 2020; the estimator used by
  CleanRL ``ppo.py`` and TorchRL ``ClipPPOLoss``). It is unbiased and never negative.
* ``approx_kl_k1`` is the naive ``E_old[-log r]``: unbiased, but noisy and can be negative.
* ``clip_fraction`` is the fraction of samples with ``|r - 1| > clip_eps`` (CleanRL, SB3).
* ``explained_variance`` is ``1 - Var[returns - values] / Var[returns]`` (SB3, CleanRL, TorchRL).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "approx_kl",
    "approx_kl_k1",
    "clip_fraction",
    "explained_variance",
    "flat_norm",
    "grad_stats",
    "normalized_entropy",
    "ratio_stats",
]


@torch.no_grad()
def approx_kl(log_ratio: Tensor) -> Tensor:
    """k3 estimator of KL(pi_old || pi_new) from ``log_ratio = new_logp - old_logp``: ``mean((r - 1) - log r)``."""
    log_ratio = log_ratio.detach().float()
    return (torch.expm1(log_ratio) - log_ratio).mean()


@torch.no_grad()
def approx_kl_k1(log_ratio: Tensor) -> Tensor:
    """k1 estimator of KL(pi_old || pi_new): ``mean(-log r)``. Unbiased but noisy; may be negative."""
    return (-log_ratio.detach().float()).mean()


@torch.no_grad()
def clip_fraction(log_ratio: Tensor, clip_eps: float) -> Tensor:
    """Fraction of samples whose ratio lies outside ``[1 - clip_eps, 1 + clip_eps]``."""
    ratio = log_ratio.detach().float().exp()
    return ((ratio - 1.0).abs() > clip_eps).float().mean()


@torch.no_grad()
def ratio_stats(log_ratio: Tensor) -> Tensor:
    """``[mean, min, max, max |r - 1|]`` of the importance ratio ``r = exp(log_ratio)``, as one tensor."""
    ratio = log_ratio.detach().float().exp()
    lo, hi = torch.aminmax(ratio)
    return torch.stack([ratio.mean(), lo, hi, torch.maximum(hi - 1.0, 1.0 - lo)])


@torch.no_grad()
def normalized_entropy(entropy: Tensor, num_actions: int | Tensor) -> Tensor:
    """Mean entropy divided by its maximum ``log(num_actions)`` (1.0 = uniform policy).

    ``num_actions`` may be a per-sample tensor of valid-action counts (action masks); samples with a
    single valid action have no entropy to lose and are given 1.0.
    """
    entropy = entropy.detach().float()
    if isinstance(num_actions, Tensor):
        log_n = num_actions.to(entropy.device, torch.float32).log()
        per_sample = torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), torch.ones_like(entropy))
        return per_sample.mean()
    if num_actions < 2:
        return torch.ones((), device=entropy.device)
    return entropy.mean() / math.log(num_actions)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor) -> Tensor:
    """``1 - Var[returns - values] / Var[returns]``; NaN when the returns have no variance."""
    values = values.detach().float().reshape(-1)
    returns = returns.detach().float().reshape(-1)
    var_returns = returns.var(unbiased=False)
    ev = 1.0 - (returns - values).var(unbiased=False) / var_returns
    return torch.where(var_returns > 0, ev, torch.full_like(ev, float("nan")))


@torch.no_grad()
def flat_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm of the concatenation of ``tensors``, with one fused ``_foreach_norm`` call."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float())


@torch.no_grad()
def grad_stats(grads: list[Tensor], count_nonzero: bool = True) -> Tensor:
    """``[l2_norm, nonzero_count, nonfinite_tensors]`` of a list of gradient tensors, as one tensor.

    The norm is one fused ``_foreach_norm``; a tensor holding a NaN or an Inf has a non-finite norm, which
    counts it. The nonzero count is a full pass over the data (``count_nonzero`` per tensor: on CPU twice as
    fast as ``_foreach_norm(ord=0)``); ``count_nonzero=False`` skips it and returns NaN there.
    """
    if not grads:
        return torch.zeros(3)
    norms = torch.stack(torch._foreach_norm(grads)).float()
    if count_nonzero:
        nonzero = torch.stack([g.count_nonzero() for g in grads]).sum().float()
    else:
        nonzero = norms.new_full((), float("nan"))
    nonfinite = (~torch.isfinite(norms)).sum().float()
    return torch.stack([torch.linalg.vector_norm(norms), nonzero, nonfinite])
