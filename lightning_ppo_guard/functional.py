"""Pure tensor math used by the guard. No Lightning import, no host synchronisation.

One implementation, two faces (as in torchmetrics): :func:`policy_stats` computes every per-minibatch
statistic of the policy term in a few fused ops and returns them **by name**; the public estimators
(:func:`approx_kl`, :func:`clip_fraction`, :func:`ratio_stats`, :func:`explained_variance`, ...) are views of it,
so what a user computes with them is what the monitor logs. Every function takes tensors and returns 0-d
tensors on the same device, detached from autograd, so the caller decides when (and whether) to move numbers
to the host.

Estimators, with their sources:

* ``approx_kl`` is the k3 estimator of KL(pi_old || pi_new), ``E_old[(r - 1) - log r]`` with
  ``r = pi_new / pi_old`` (J. Schulman, "Approximating KL Divergence", 2020; the estimator used by
  CleanRL ``ppo.py`` and TorchRL ``ClipPPOLoss``). It is unbiased and never negative. ``r - 1`` is taken as
  ``expm1(log r)``, so k3 stays >= 0 for tiny log-ratios.
* ``approx_kl_k1`` is the naive ``E_old[-log r]``: unbiased, but noisy and can be negative.
* ``clip_fraction`` is the fraction of samples with ``|r - 1| > clip_eps`` (CleanRL, SB3).
* ``explained_variance`` is ``1 - Var[returns - values] / Var[returns]`` (SB3, CleanRL, TorchRL).
* ``entropy`` is per sample: a distribution whose entropy has more entries than there are log-probs (a
  Gaussian over ``act_dim`` dimensions, a multi-categorical) is summed over the extra ones, as its log-prob is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "POLICY_STATS",
    "approx_kl",
    "approx_kl_k1",
    "clip_fraction",
    "explained_variance",
    "normalized_entropy",
    "per_sample",
    "policy_stats",
    "ratio_stats",
]

#: Every name :func:`policy_stats` can return, each computed only from the inputs it needs.
POLICY_STATS = ("approx_kl", "approx_kl_k1", "clip_fraction", "ratio_mean", "ratio_min", "ratio_max",
                "ratio_dev", "logp_mean", "entropy", "entropy_norm", "adv_mean", "adv_std", "explained_variance",
                "log_std")


def per_sample(t: Tensor, n: int) -> Tensor:
    """``t`` as one value per sample of an ``n``-sample minibatch: flattened, and summed over any extra
    per-sample entries (``(B, act_dim)`` -> ``(B,)``); a tensor that cannot be split that way is averaged
    (returned 0-d)."""
    flat = t.reshape(-1).float()
    if flat.numel() == n:
        return flat
    if n > 0 and flat.numel() % n == 0:
        return flat.reshape(n, -1).sum(-1)
    return flat.mean()


@torch.no_grad()
def policy_stats(
    log_ratio: Tensor | None = None,
    *,
    clip_eps: float | None = None,
    advantages: Tensor | None = None,
    values: Tensor | None = None,
    returns: Tensor | None = None,
    entropy: Tensor | None = None,
    num_actions: int | Tensor | None = None,
    log_std: Tensor | None = None,
    logp: Tensor | None = None,
) -> dict[str, Tensor]:
    """Every statistic of one minibatch of the policy term that its inputs allow, by name (0-d tensors).

    ``log_ratio = new_logp - old_logp`` (one per sample) gives the KL estimators and the ratio statistics;
    with ``clip_eps`` also ``clip_fraction``; ``advantages`` give ``adv_mean``/``adv_std``; ``values`` and
    ``returns`` give ``explained_variance``; ``entropy`` (per sample, or per sample and component) gives
    ``entropy`` and, with ``num_actions`` (an int, or per-sample valid-action counts), ``entropy_norm``; a
    Gaussian's ``log_std`` (per sample and dimension) gives its mean, ``log_std``; the update's log-probs ``logp``
    (new_logp) give ``logp_mean`` (exactly 0: every taken action has probability 1 in float32, a deterministic
    policy whose ratio is 1 by saturation).

    Every per-sample series is one row of a stacked tensor whose means and variances are one ``var_mean``
    call, so the whole minibatch costs a fixed handful of ops whatever is given. Names whose inputs are
    missing are absent from the result (never NaN-filled here).
    """
    anchor = next((t for t in (log_ratio, advantages, values) if t is not None), None)
    n = anchor.numel() if anchor is not None else (entropy.numel() if entropy is not None else 0)
    rows: dict[str, Tensor] = {}  # per-sample series, each of n values: one row of the var_mean
    ratio_m1 = None
    if log_ratio is not None:
        log_ratio = log_ratio.reshape(-1).float()
        ratio_m1 = torch.expm1(log_ratio)  # r - 1 without cancellation
        rows["k3"], rows["log_ratio"] = ratio_m1 - log_ratio, log_ratio
        if clip_eps is not None:
            rows["clipped"] = (ratio_m1.abs() > clip_eps).float()
        rows["ratio_m1"] = ratio_m1
    if logp is not None and logp.numel() == n:
        rows["logp"] = logp.detach().reshape(-1).float()
    if advantages is not None:
        rows["adv"] = advantages.reshape(-1).float()
    if values is not None and returns is not None:
        ret = returns.reshape(-1).float()
        rows["residual"], rows["ret"] = ret - values.reshape(-1).float(), ret
    ent, components = None, 1
    if entropy is not None:
        ent = per_sample(entropy, n)
        if ent.dim() == 1:  # aligned with the samples: a row of its own
            rows["entropy"] = ent
            components = max(entropy.numel() // max(n, 1), 1)
    out: dict[str, Tensor] = {}
    if rows:
        var, mean = torch.var_mean(torch.stack(list(rows.values())), dim=1, correction=0)
        at = {name: i for i, name in enumerate(rows)}
        m, v = mean.unbind(), var.unbind()
        if ratio_m1 is not None:
            lo, hi = torch.aminmax(ratio_m1)
            out["approx_kl"], out["approx_kl_k1"] = m[at["k3"]], -m[at["log_ratio"]]
            if "clipped" in at:
                out["clip_fraction"] = m[at["clipped"]]
            out["ratio_mean"] = m[at["ratio_m1"]] + 1.0
            out["ratio_min"], out["ratio_max"] = lo + 1.0, hi + 1.0
            out["ratio_dev"] = torch.maximum(-lo, hi)
        if "logp" in at:
            out["logp_mean"] = m[at["logp"]]
        if "adv" in at:
            out["adv_mean"], out["adv_std"] = m[at["adv"]], v[at["adv"]].sqrt()
        if "residual" in at:
            var_ret = v[at["ret"]]
            out["explained_variance"] = torch.where(var_ret > 0, 1.0 - v[at["residual"]] / var_ret,
                                                    var_ret.new_full((), math.nan))
        if "entropy" in at:
            out["entropy"] = m[at["entropy"]]
    if ent is not None and "entropy" not in out:
        out["entropy"] = ent.mean()
    if log_std is not None and log_std.numel():
        out["log_std"] = log_std.detach().float().mean()
    if ent is not None and num_actions is not None:
        if isinstance(num_actions, Tensor):
            out["entropy_norm"] = normalized_entropy(ent, num_actions)
        elif num_actions > 1:
            out["entropy_norm"] = out["entropy"] / (components * math.log(num_actions))
        else:
            out["entropy_norm"] = out["entropy"].new_ones(())
    return out


def approx_kl(log_ratio: Tensor) -> Tensor:
    """k3 estimator of KL(pi_old || pi_new) from ``log_ratio = new_logp - old_logp``: ``mean((r - 1) - log r)``."""
    return policy_stats(log_ratio)["approx_kl"]


def approx_kl_k1(log_ratio: Tensor) -> Tensor:
    """k1 estimator of KL(pi_old || pi_new): ``mean(-log r)``. Unbiased but noisy; may be negative."""
    return policy_stats(log_ratio)["approx_kl_k1"]


def clip_fraction(log_ratio: Tensor, clip_eps: float) -> Tensor:
    """Fraction of samples whose ratio lies outside ``[1 - clip_eps, 1 + clip_eps]``."""
    return policy_stats(log_ratio, clip_eps=clip_eps)["clip_fraction"]


def ratio_stats(log_ratio: Tensor) -> Tensor:
    """``[mean, min, max, max |r - 1|]`` of the importance ratio ``r = exp(log_ratio)``, as one tensor."""
    stats = policy_stats(log_ratio)
    return torch.stack([stats["ratio_mean"], stats["ratio_min"], stats["ratio_max"], stats["ratio_dev"]])


def explained_variance(values: Tensor, returns: Tensor) -> Tensor:
    """``1 - Var[returns - values] / Var[returns]``; NaN when the returns have no variance."""
    return policy_stats(values=values, returns=returns)["explained_variance"]


@torch.no_grad()
def normalized_entropy(entropy: Tensor, num_actions: int | Tensor) -> Tensor:
    """Mean entropy divided by its maximum ``log(num_actions)`` (1.0 = uniform policy).

    ``num_actions`` may be a per-sample tensor of valid-action counts (action masks); samples with a
    single valid action have no entropy to lose and are given 1.0.
    """
    entropy = entropy.detach().float()
    if isinstance(num_actions, Tensor):
        log_n = num_actions.to(entropy.device, torch.float32).log()
        per = torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), torch.ones_like(entropy))
        return per.mean()
    if num_actions < 2:
        return torch.ones((), device=entropy.device)
    return entropy.mean() / math.log(num_actions)
