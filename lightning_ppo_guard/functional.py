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
    "sequence_stats",
]

#: Every name :func:`policy_stats` can return, each computed only from the inputs it needs.
POLICY_STATS = ("approx_kl", "approx_kl_k1", "clip_fraction", "ratio_mean", "ratio_min", "ratio_max",
                "ratio_dev", "logp_mean", "entropy", "entropy_norm", "adv_mean", "adv_std", "explained_variance",
                "log_std", "ref_kl", "adv_zero_frac")
#: Every name :func:`sequence_stats` can return (per-sequence inputs: LM RL's rewards and groups).
SEQUENCE_STATS = ("reward_mean", "reward_min", "reward_max", "groups", "zero_adv_groups", "zero_adv_groups_top",
                  "zero_group_reward", "adv_reward_corr")


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
    ref_logp: Tensor | None = None,
) -> dict[str, Tensor]:
    """Every statistic of one minibatch of the policy term that its inputs allow, by name (0-d tensors).

    ``log_ratio = new_logp - old_logp`` (one per sample) gives the KL estimators and the ratio statistics;
    with ``clip_eps`` also ``clip_fraction``; ``advantages`` give ``adv_mean``/``adv_std``/``adv_zero_frac``
    (the share exactly 0); ``values`` and ``returns`` give ``explained_variance``; ``entropy`` (per sample, or per
    sample and component) gives
    ``entropy`` and, with ``num_actions`` (an int, or per-sample valid-action counts), ``entropy_norm``; a
    Gaussian's ``log_std`` (per sample and dimension) gives its mean, ``log_std``; the update's log-probs ``logp``
    (new_logp) give ``logp_mean`` (exactly 0: every taken action has probability 1 in float32, a deterministic
    policy whose ratio is 1 by saturation); a frozen reference model's log-probs of the same actions ``ref_logp``
    (with ``logp``) give ``ref_kl``, the k3 estimate of KL(pi_new || pi_ref) that LM RL's KL penalty holds down.

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
        if ref_logp is not None and ref_logp.numel() == n:
            ref_diff = ref_logp.detach().reshape(-1).float() - rows["logp"]
            rows["ref_k3"] = torch.expm1(ref_diff) - ref_diff
    if advantages is not None:
        rows["adv"] = advantages.reshape(-1).float()
        rows["adv_zero"] = (rows["adv"] == 0).float()  # GRPO: a group whose samples got one reward has exactly 0
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
        if "ref_k3" in at:
            out["ref_kl"] = m[at["ref_k3"]]
        if "adv" in at:
            out["adv_mean"], out["adv_std"] = m[at["adv"]], v[at["adv"]].sqrt()
            out["adv_zero_frac"] = m[at["adv_zero"]]
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


@torch.no_grad()
def sequence_stats(advantages: Tensor | None, rewards: Tensor | None, group: Tensor | None) -> dict[str, Tensor]:
    """Per-sequence statistics of LM RL (GRPO's groups), by name (0-d tensors).

    ``rewards`` (one per sequence) give ``reward_mean``/``reward_min``/``reward_max``. With ``group`` (one id per
    sequence: the samples of one prompt share it): ``groups``, their number; ``zero_adv_groups``, the share of
    groups whose rewards (else advantages) have no spread, so that group-relative advantages teach nothing there;
    ``zero_adv_groups_top``, the share of those at the minibatch's best reward (solved, where the best is the
    task's); ``zero_group_reward``, the mean reward of the groups without spread (NaN when there are none).
    ``advantages`` (one per sequence, e.g. each sequence's mean over its tokens) with ``rewards`` give
    ``adv_reward_corr``: their correlation within groups (over the minibatch without groups); advantages that rise
    with the rewards give a positive one, +1 exactly for GRPO's. Group ids are made dense with ``torch.unique`` (a
    host read of the number of groups, once per call).
    """
    out: dict[str, Tensor] = {}
    r = None if rewards is None else rewards.detach().reshape(-1).float()
    a = None if advantages is None else advantages.detach().reshape(-1).float()
    if r is not None and r.numel():
        out["reward_mean"], (out["reward_min"], out["reward_max"]) = r.mean(), torch.aminmax(r)
    spread_of = r if r is not None else a
    inverse, count = None, None
    if group is not None and spread_of is not None and group.numel() == spread_of.numel() and group.numel():
        _, inverse = torch.unique(group.reshape(-1), return_inverse=True)
        k = int(inverse.max()) + 1
        count = spread_of.new_zeros(k).index_add_(0, inverse, torch.ones_like(spread_of))
        hi = spread_of.new_full((k,), -math.inf).scatter_reduce(0, inverse, spread_of, "amax")
        lo = spread_of.new_full((k,), math.inf).scatter_reduce(0, inverse, spread_of, "amin")
        zero = (hi - lo) <= 1e-6 * (1.0 + hi.abs())
        out["groups"] = zero.new_full((), float(k), dtype=torch.float32)
        out["zero_adv_groups"] = zero.float().mean()
        if r is not None:
            mean_r = r.new_zeros(k).index_add_(0, inverse, r) / count
            out["zero_group_reward"] = torch.where(zero.any(), (mean_r * zero).sum() / zero.sum().clamp(min=1),
                                                   r.new_full((), math.nan))
            out["zero_adv_groups_top"] = (zero & (hi >= out["reward_max"])).float().mean()
    if a is not None and r is not None and a.numel() == r.numel() and r.numel() > 1:
        if inverse is not None and count is not None:  # centred within groups: each group's mean taken out
            a = a - (a.new_zeros(count.numel()).index_add_(0, inverse, a) / count)[inverse]
            r = r - mean_r[inverse]
        else:
            a, r = a - a.mean(), r - r.mean()
        den = a.norm() * r.norm()
        out["adv_reward_corr"] = torch.where(den > 0, torch.dot(a, r) / den, den.new_full((), math.nan))
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
