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
    "flat",
    "normalized_entropy",
    "per_sample",
    "policy_stats",
    "policy_vector",
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
    v = flat(t)
    if v.numel() == n:
        return v
    if n > 0 and v.numel() % n == 0:
        return v.reshape(n, -1).sum(-1)
    return v.mean()


def flat(t: Tensor) -> Tensor:
    """``t`` as a flat float32 vector: ``t`` itself when it is one already (the common case: no torch call)."""
    return t if t.dim() == 1 and t.dtype == torch.float32 else t.reshape(-1).float()


#: (the per-sample rows, the ratio given, explained variance given, the entropy scale, device) -> the affine map
#: from the raw vector ``[means, stds, lo, hi, max |r - 1|, residual var / returns var]`` to the named
#: statistics (cached: a handful of input patterns per fit).
_AFFINE: dict[tuple[object, ...], tuple[Tensor, Tensor, Tensor, tuple[str, ...]]] = {}
#: (value, device) -> a 0-d float32 tensor: a Python number in a tensor op costs more than the op on CPU
_CONSTANTS: dict[tuple[float, torch.device], Tensor] = {}


#: the most entries a cache keyed by values may hold before it starts afresh (a clip range on a schedule changes
#: every rollout: a new key each time)
_CACHE_LIMIT = 64


def _constant(value: float, device: torch.device) -> Tensor:
    t = _CONSTANTS.get((value, device))
    if t is None:
        if len(_CONSTANTS) >= _CACHE_LIMIT:
            _CONSTANTS.clear()
        t = _CONSTANTS[value, device] = torch.tensor(value, dtype=torch.float32, device=device)
    return t


def _affine(rows: tuple[str, ...], ratio: bool, ev: bool, entropy_scale: float | None,
            device: torch.device) -> tuple[Tensor, Tensor, Tensor, tuple[str, ...]]:
    """Where each named statistic sits in the raw vector, and its scale and offset (``out = offset + raw *
    scale``): every statistic of :func:`policy_stats` but ``log_std`` and a per-sample ``entropy_norm`` is one
    entry of the raw vector, shifted or scaled, so that all of them together are one gather and one ``addcmul``."""
    key = (rows, ratio, ev, entropy_scale, device)
    hit = _AFFINE.get(key)
    if hit is not None:
        return hit
    r = len(rows)
    mean, std = {name: i for i, name in enumerate(rows)}, {name: r + i for i, name in enumerate(rows)}
    spec: list[tuple[str, int, float, float]] = []  # (name, index in the raw vector, scale, offset)
    if ratio:
        lo, hi, dev = 2 * r, 2 * r + 1, 2 * r + 2
        spec += [("approx_kl", mean["k3"], 1.0, 0.0), ("approx_kl_k1", mean["log_ratio"], -1.0, 0.0)]
        if "clipped" in mean:
            spec.append(("clip_fraction", mean["clipped"], 1.0, 0.0))
        spec += [("ratio_mean", mean["ratio_m1"], 1.0, 1.0), ("ratio_min", lo, 1.0, 1.0),
                 ("ratio_max", hi, 1.0, 1.0), ("ratio_dev", dev, 1.0, 0.0)]
    if "logp" in mean:
        spec.append(("logp_mean", mean["logp"], 1.0, 0.0))
    if "ref_k3" in mean:
        spec.append(("ref_kl", mean["ref_k3"], 1.0, 0.0))
    if "adv" in mean:
        spec += [("adv_mean", mean["adv"], 1.0, 0.0), ("adv_std", std["adv"], 1.0, 0.0),
                 ("adv_zero_frac", mean["adv_zero"], 1.0, 0.0)]
    if ev:  # 1 - Var[returns - values] / Var[returns]
        spec.append(("explained_variance", 2 * r + (3 if ratio else 0), -1.0, 1.0))
    if "entropy" in mean:
        spec.append(("entropy", mean["entropy"], 1.0, 0.0))
        if entropy_scale is not None:  # entropy / (components * log(num_actions)); 0 * mean + 1 with one action
            spec.append(("entropy_norm", mean["entropy"], entropy_scale, 0.0 if entropy_scale else 1.0))
    if len(_AFFINE) >= _CACHE_LIMIT:  # keyed by the entropy's scale too (num_actions may change per call)
        _AFFINE.clear()
    names = tuple(name for name, *_ in spec)
    index = torch.tensor([i for _, i, _, _ in spec], dtype=torch.long, device=device)
    scale = torch.tensor([a for *_, a, _ in spec], dtype=torch.float32, device=device)
    offset = torch.tensor([b for *_, b in spec], dtype=torch.float32, device=device)
    hit = _AFFINE[key] = (index, scale, offset, names)
    return hit


@torch.no_grad()
def policy_vector(
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
) -> tuple[Tensor, tuple[str, ...]]:
    """:func:`policy_stats` as one float32 vector and the name of each entry (what the monitor logs: one vector
    per minibatch, built in ~20 torch calls whatever is given). Same arguments as :func:`policy_stats`."""
    anchor = next((t for t in (log_ratio, advantages, values) if t is not None), None)
    n = anchor.numel() if anchor is not None else (entropy.numel() if entropy is not None else 0)
    names: list[str] = []  # per-sample series, each of n values: one row of the var_mean
    rows: list[Tensor] = []
    ratio_m1 = None
    if log_ratio is not None:
        log_ratio = flat(log_ratio)
        ratio_m1 = torch.expm1(log_ratio)  # r - 1 without cancellation
        names += ["k3", "log_ratio"]
        rows += [ratio_m1 - log_ratio, log_ratio]
        abs_m1 = ratio_m1.abs()
        if clip_eps is not None:
            names.append("clipped")
            rows.append(abs_m1.gt(_constant(clip_eps, abs_m1.device)).float())
        names.append("ratio_m1")
        rows.append(ratio_m1)
    if logp is not None and logp.numel() == n:
        logp = flat(logp)
        names.append("logp")
        rows.append(logp)
        if ref_logp is not None and ref_logp.numel() == n:
            ref_diff = flat(ref_logp) - logp
            names.append("ref_k3")
            rows.append(torch.expm1(ref_diff) - ref_diff)
    if advantages is not None:
        adv = flat(advantages)
        names += ["adv", "adv_zero"]  # GRPO: a group whose samples got one reward has exactly 0
        rows += [adv, torch.logical_not(adv).float()]
    ev = values is not None and returns is not None
    if ev:
        ret = flat(returns)  # type: ignore[arg-type]
        names += ["residual", "ret"]
        rows += [ret - flat(values), ret]  # type: ignore[arg-type]
    ent, components = None, 1
    if entropy is not None:
        ent = per_sample(entropy, n)
        if ent.dim() == 1:  # aligned with the samples: a row of its own
            names.append("entropy")
            rows.append(ent)
            components = max(entropy.numel() // max(n, 1), 1)
    source = anchor if anchor is not None else entropy
    device = source.device if source is not None else torch.device("cpu")
    extra: list[tuple[str, Tensor]] = []  # statistics outside the affine map (0-d)
    entropy_scale = None
    if ent is not None and num_actions is not None:
        if isinstance(num_actions, Tensor):
            extra.append(("entropy_norm", normalized_entropy(ent, num_actions)))
        else:
            entropy_scale = 1.0 / (components * math.log(num_actions)) if num_actions > 1 else 0.0
    if ent is not None and "entropy" not in names:  # not one per sample: its mean
        extra.append(("entropy", ent.mean()))
        if entropy_scale is not None:
            extra.append(("entropy_norm", extra[-1][1] * entropy_scale if entropy_scale else
                          ent.new_ones(())))
        entropy_scale = None
    if log_std is not None and log_std.numel():
        extra.append(("log_std", log_std.detach().float().mean()))
    parts: list[Tensor] = []
    order: tuple[str, ...] = ()
    if rows:
        var, mean = torch.var_mean(torch.stack(rows), dim=1, correction=0)
        parts += [mean, var.sqrt()]
        if ratio_m1 is not None:
            parts += [torch.stack(torch.aminmax(ratio_m1)), abs_m1.amax(0, keepdim=True)]
        if ev:  # [res, ret] / ret = [res / ret, 1 (NaN where Var[returns] is 0)]: its product is NaN there too
            at = names.index("residual")
            res_ret = var[at:at + 2]  # adjacent rows
            parts.append((res_ret / res_ret[1:]).prod(0, keepdim=True))
        index, scale, offset, order = _affine(tuple(names), ratio_m1 is not None, ev, entropy_scale, device)
        vector = torch.addcmul(offset, torch.cat(parts).index_select(0, index), scale)
    else:
        vector = torch.zeros(0, device=device)
    if extra:
        vector = torch.cat([vector, torch.stack([t.float() for _, t in extra])])
        order += tuple(name for name, _ in extra)
    return vector, order


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
    call, and every statistic is an entry of that (shifted or scaled: one gather and one ``addcmul``), so the
    whole minibatch costs a fixed handful of ops whatever is given (:func:`policy_vector` is the same as one
    vector). Names whose inputs are missing are absent from the result (never NaN-filled here).
    """
    vector, names = policy_vector(log_ratio, clip_eps=clip_eps, advantages=advantages, values=values,
                                  returns=returns, entropy=entropy, num_actions=num_actions, log_std=log_std,
                                  logp=logp, ref_logp=ref_logp)
    return dict(zip(names, vector.unbind(), strict=True))


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
    with the rewards give a positive one, +1 exactly for GRPO's. Group ids are made dense with ``torch.unique`` (which
    sizes its output on the host: one device sync per call on a GPU).
    """
    out: dict[str, Tensor] = {}
    r = None if rewards is None else rewards.detach().reshape(-1).float()
    a = None if advantages is None else advantages.detach().reshape(-1).float()
    if r is not None and r.numel():
        out["reward_mean"], (out["reward_min"], out["reward_max"]) = r.mean(), torch.aminmax(r)
    spread_of = r if r is not None else a
    inverse, count = None, None
    if group is not None and spread_of is not None and group.numel() == spread_of.numel() and group.numel():
        ids, inverse = torch.unique(group.reshape(-1), return_inverse=True)
        k = ids.numel()
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
