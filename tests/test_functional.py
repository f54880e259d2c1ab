"""The pure math against independent, element-by-element computations."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ppo_guard import functional as F


def _lr(n=257, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


def test_approx_kl_matches_k3_and_k1_by_hand():
    lr = _lr()
    r = [math.exp(x) for x in lr.tolist()]
    k3 = sum((ri - 1) - math.log(ri) for ri in r) / len(r)
    k1 = sum(-math.log(ri) for ri in r) / len(r)
    assert F.approx_kl(lr).item() == pytest.approx(k3, rel=1e-5)
    assert F.approx_kl_k1(lr).item() == pytest.approx(k1, rel=1e-4, abs=1e-7)


def test_kl_is_zero_for_identical_policies_and_detached():
    new = torch.randn(64, requires_grad=True)
    kl = F.approx_kl(new - new.detach())
    assert kl.item() == 0.0 and not kl.requires_grad


def test_policy_stats_names_every_quantity_it_can_and_only_those():
    lr, adv = _lr(), _lr(seed=1)
    assert set(F.policy_stats(lr)) == {"approx_kl", "approx_kl_k1", "ratio_mean", "ratio_min", "ratio_max",
                                       "ratio_dev"}
    full = F.policy_stats(lr, clip_eps=0.2, advantages=adv, values=adv, returns=lr, entropy=adv.abs(),
                          num_actions=4, log_std=adv.reshape(-1, 1).expand(-1, 3), logp=-lr.abs(), ref_logp=-adv.abs())
    assert set(full) == set(F.POLICY_STATS)
    assert full["logp_mean"] == -lr.abs().mean()
    assert set(F.policy_stats(values=adv, returns=lr)) == {"explained_variance"}
    assert full["log_std"].item() == pytest.approx(adv.mean().item(), rel=1e-5, abs=1e-7)


def test_log_std_of_gaussian_policies_and_none_for_others():
    from lightning_ppo_guard._inputs import PolicyTerm

    mean, logp = torch.zeros(8, 3), torch.zeros(8)
    scale = torch.tensor([1.0, 0.1, 0.01]).expand(8, 3)
    expected = torch.log(torch.tensor([1.0, 0.1, 0.01])).mean().item()
    for dist in (torch.distributions.Normal(mean, scale),
                 torch.distributions.Independent(torch.distributions.Normal(mean, scale), 1),
                 torch.distributions.MultivariateNormal(mean, scale_tril=torch.diag_embed(scale))):
        term = PolicyTerm.build(new_logp=logp, old_logp=logp, dist=dist)
        assert term.statistics()["log_std"].item() == pytest.approx(expected, rel=1e-6)
    term = PolicyTerm.build(new_logp=logp, old_logp=logp, dist=torch.distributions.Categorical(logits=mean))
    assert "log_std" not in term.statistics()


def test_entropy_is_per_sample_for_multivariate_and_multi_categorical():
    # a Gaussian over 3 action dimensions: the per-sample entropy is the sum over dimensions
    dist = torch.distributions.Normal(torch.zeros(64, 3), torch.full((64, 3), 2.0))
    stats = F.policy_stats(torch.zeros(64), entropy=dist.entropy())
    assert stats["entropy"].item() == pytest.approx(dist.entropy().sum(-1).mean().item(), rel=1e-6)
    # two categorical heads of 4 actions each, uniform: entropy 2 ln 4, normalised 1
    heads = torch.distributions.Categorical(logits=torch.zeros(64, 2, 4))
    stats = F.policy_stats(torch.zeros(64), entropy=heads.entropy(), num_actions=4)
    assert stats["entropy"].item() == pytest.approx(2 * math.log(4), rel=1e-6)
    assert stats["entropy_norm"].item() == pytest.approx(1.0, rel=1e-6)


def test_clip_fraction_and_ratio_stats():
    lr = torch.log(torch.tensor([1.0, 1.1, 0.7, 1.25, 0.95]))
    assert F.clip_fraction(lr, 0.2).item() == pytest.approx(2 / 5)
    mean, lo, hi, dev = F.ratio_stats(lr).tolist()
    assert mean == pytest.approx(sum([1.0, 1.1, 0.7, 1.25, 0.95]) / 5, rel=1e-6)
    assert (lo, hi) == (pytest.approx(0.7), pytest.approx(1.25))
    assert dev == pytest.approx(0.3, rel=1e-6)


def test_normalized_entropy_uniform_is_one_and_masks():
    ent = torch.full((8,), math.log(4))
    assert F.normalized_entropy(ent, 4).item() == pytest.approx(1.0)
    # per-sample valid-action counts: 4 valid -> ln 4, 2 valid -> ln 2, 1 valid -> 1.0 by convention
    ent = torch.tensor([math.log(4), math.log(2), 0.0])
    assert F.normalized_entropy(ent, torch.tensor([4, 2, 1])).item() == pytest.approx(1.0)


def test_explained_variance():
    ret = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert F.explained_variance(ret, ret).item() == pytest.approx(1.0)
    assert F.explained_variance(torch.zeros(4), ret).item() == pytest.approx(1 - ret.var(unbiased=False) / ret.var(
        unbiased=False))
    assert math.isnan(F.explained_variance(torch.zeros(4), torch.ones(4)).item())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=64))
def test_k3_never_negative_and_matches_definition(values):
    lr = torch.tensor(values, dtype=torch.float64)
    kl = F.approx_kl(lr).item()
    assert kl >= -1e-7
    assert kl == pytest.approx(sum(math.expm1(v) - v for v in values) / len(values), rel=1e-4, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.integers(1, 50)), min_size=1, max_size=64))
def test_normalized_entropy_per_sample_matches_definition_and_stays_in_unit_range(samples):
    # an entropy of fraction f of its maximum log(n): the normalised value is f (1.0 where n == 1)
    ent = torch.tensor([f * math.log(n) for f, n in samples], dtype=torch.float64)
    counts = torch.tensor([n for _, n in samples])
    got = F.normalized_entropy(ent, counts).item()
    want = sum(f if n > 1 else 1.0 for f, n in samples) / len(samples)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6) and -1e-6 <= got <= 1 + 1e-6
    if len({n for _, n in samples}) == 1 and samples[0][1] > 1:  # constant counts: the scalar form agrees
        assert F.normalized_entropy(ent, samples[0][1]).item() == pytest.approx(got, rel=1e-5, abs=1e-6)


def _plan_of(chunks):
    """A StepPlan over one actor role whose parameters' gradients are ``chunks`` (one tensor each)."""
    from lightning_ppo_guard._plan import StepPlan
    from lightning_ppo_guard.metrics import Layout
    from lightning_ppo_guard.roles import Role

    params = [torch.nn.Parameter(torch.ones(len(c))) for c in chunks]
    for p, c in zip(params, chunks, strict=True):
        p.grad = torch.tensor(c)
    role = Role("actor", "actor", "actor", params=params, numel=sum(len(c) for c in chunks),
                ids=frozenset(id(p) for p in params))
    snapshots = {"actor": [torch.empty_like(p) for p in params]}
    return StepPlan([role], snapshots, Layout.build("ppo_guard", [("actor", True)]), torch.device("cpu"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.0, 1.5, -2.0, 1e-3, 7.0, math.nan]), min_size=1, max_size=12),
                min_size=1, max_size=5))
def test_step_plan_gradient_columns_match_their_definitions(chunks):
    """The step block's gradient columns (what the monitor logs) against a per-element loop."""
    from lightning_ppo_guard._plan import COLUMNS

    plan = _plan_of(chunks)
    block, nones = plan.after(plan.before(), None, 1.0)
    row = dict(zip(COLUMNS, block[0].tolist(), strict=True))
    nan_tensors = sum(any(math.isnan(v) for v in c) for c in chunks)
    assert row["grad_nonfinite"] == nan_tensors and nones == [0]
    n = sum(len(c) for c in chunks)
    assert row["grad_nonzero_frac"] == pytest.approx(sum(v != 0 for c in chunks for v in c) / n)  # NaN != 0
    if nan_tensors:
        assert math.isnan(row["grad_norm"])
    else:
        assert row["grad_norm"] == pytest.approx(math.sqrt(sum(v * v for c in chunks for v in c)), rel=1e-5,
                                                 abs=1e-9)
        assert row["clip_coef"] == 1.0 and row["grad_norm_clipped"] == row["grad_norm"]
    assert row["update_norm"] == 0.0 and row["param_norm"] == pytest.approx(math.sqrt(n))  # no optimizer step


_GRAD = st.sampled_from([0.0, 0.0, 1.5, -2.0, 1e-3, 7.0, math.nan, math.inf])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.lists(_GRAD, min_size=1, max_size=6), min_size=0, max_size=3), min_size=3, max_size=3),
       st.sampled_from([None, 0.5, 1.0]), st.sampled_from([1.0, 1 / 1024]), st.booleans(), st.integers(0, 2 ** 31))
def test_step_plan_block_matches_its_definitions_for_every_role(chunks, clip, inv_scale, counted, seed):
    """Every column of every role's row (actor, critic, shared trunk; a role may hold no tensor) against its
    element-by-element definition, float64: the pre-clip norms taken after backward (AMP-scaled), a clip that
    scales the gradients after them, an optimizer step between the snapshot and the read, the nonzero count
    skipped, a parameterless role."""
    from lightning_ppo_guard._plan import COLUMNS, PreClip, StepPlan
    from lightning_ppo_guard.metrics import Layout
    from lightning_ppo_guard.roles import Role

    gen = torch.Generator().manual_seed(seed)
    roles, grads = [], {}
    for name, kind, role_chunks in zip(("actor", "critic", "trunk"), ("actor", "critic", "shared"), chunks,
                                       strict=True):
        params = [torch.nn.Parameter(torch.randn(len(c), generator=gen)) for c in role_chunks]
        for p, c in zip(params, role_chunks, strict=True):
            p.grad = torch.tensor(c, dtype=torch.float32)
            grads[id(p)] = list(c)
        roles.append(Role(name, kind, (name,), params=params, numel=sum(len(c) for c in role_chunks),
                          ids=frozenset(id(p) for p in params)))
    layout = Layout.build("ppo_guard", [(r.name, r.kind != "critic") for r in roles])
    snapshots = {r.name: [torch.empty_like(p) for p in r.params] for r in roles if r.moves}
    plan = StepPlan(roles, snapshots, layout, torch.device("cpu"))
    before = {id(p): p.detach().double().clone() for r in roles for p in r.params}
    params_before = plan.before()
    pre = PreClip(plan, inv_scale)
    if clip is not None:  # a clip that rewrites the gradients after the pre-clip norms were taken
        for r in roles:
            for p in r.params:
                p.grad.mul_(clip)
    with torch.no_grad():  # an optimizer step
        for r in roles:
            for p in r.params:
                p.add_(torch.randn(p.shape, generator=gen))
    block, nones = plan.after(params_before, pre.take(plan), pre.inv_scale if pre.per_tensor is not None else 1.0,
                              counted)
    assert nones == [0] * len(roles) and tuple(block.shape) == (len(roles), len(COLUMNS))

    def norm(values):
        return math.sqrt(sum(v * v for v in values))

    def close(got, want):
        if math.isnan(want):
            return math.isnan(got)
        return got == pytest.approx(want, rel=1e-5, abs=1e-30)

    for i, role in enumerate(plan.roles):
        row = dict(zip(COLUMNS, block[i].tolist(), strict=True))
        g = [v for p in role.params for v in grads[id(p)]]
        post = [v * (clip if clip is not None else 1.0) for v in g]
        nonfinite = sum(not all(math.isfinite(v) for v in grads[id(p)]) for p in role.params)
        assert row["grad_nonfinite"] == nonfinite, (role.name, row)
        assert close(row["grad_norm_clipped"], norm(post)), (role.name, row)
        grad_norm = norm(g) * inv_scale
        assert close(row["grad_norm"], grad_norm), (role.name, row)
        if grad_norm > 0:
            assert close(row["clip_coef"], norm(post) / grad_norm), (role.name, row)
        else:  # no gradient to clip (NaN included: NaN > 0 is false)
            assert row["clip_coef"] == 1.0, (role.name, row)
        actor_columns = ("grad_nonzero_frac", "update_norm", "update_ratio", "param_norm")
        if not role.moves:
            assert all(math.isnan(row[c]) for c in actor_columns), (role.name, row)
        else:
            theta = [float(v) for p in role.params for v in before[id(p)]]
            delta = [float(v) for p in role.params for v in (before[id(p)] - p.detach().double())]
            assert close(row["param_norm"], norm(theta)) and close(row["update_norm"], norm(delta)), (role.name, row)
            assert close(row["update_ratio"], norm(delta) / max(norm(theta), 1e-12)), (role.name, row)
            if counted and plan.actor_params:
                assert close(row["grad_nonzero_frac"], sum(v != 0 for v in post) / max(role.numel, 1)), row
            else:
                assert math.isnan(row["grad_nonzero_frac"]), (role.name, row)
        assert all(math.isnan(row[c]) for c in ("head_grad_policy", "head_grad_value", "value_grad_share"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=64),
       st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=64))
def test_explained_variance_matches_definition(values, returns):
    n = min(len(values), len(returns))
    v, r = torch.tensor(values[:n], dtype=torch.float64), torch.tensor(returns[:n], dtype=torch.float64)
    got = F.explained_variance(v, r).item()
    var_r = float(r.float().var(unbiased=False))
    if var_r <= 1e-6:  # float32 variance of (near-)constant returns: NaN or ill-conditioned, not checked
        return
    want = 1 - float((r - v).var(unbiased=False)) / float(r.var(unbiased=False))
    assert got == pytest.approx(want, rel=1e-3, abs=1e-3 * max(1.0, abs(want)))


@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([0.5, -3.0, 2.25, 0.0, math.nan, math.inf]),
                          st.booleans()), min_size=1, max_size=40), st.integers(1, 4))
def test_vector_stats_accumulates_repeated_slots_as_separate_updates(entries, chunks):
    """One update with repeated slots (the monitor's fold) equals the statistics taken entry by entry."""
    from lightning_ppo_guard.metrics import VectorStats

    stats = VectorStats(6)
    size = -(-len(entries) // chunks)
    for k in range(0, len(entries), size):  # a few folds of several measurements each
        part = entries[k:k + size]
        stats.update(torch.tensor([v for _, v, _ in part]), torch.tensor([m for _, _, m in part]),
                     torch.tensor([s for s, _, _ in part]))
    mean, low, high, total, count = stats.compute().tolist()
    for slot in range(6):
        seen = [v for s, v, m in entries if s == slot and m]
        assert count[slot] == len(seen)
        if not seen:
            assert math.isnan(mean[slot]) and math.isnan(low[slot]) and math.isnan(total[slot])
            continue
        finite_or_inf = [v for v in seen if not math.isnan(v)]
        if any(math.isnan(v) for v in seen):  # a NaN measurement is never lost: it reaches the mean
            assert math.isnan(total[slot]) and math.isnan(mean[slot])
        elif math.inf not in seen:
            assert total[slot] == pytest.approx(sum(seen)) and mean[slot] == pytest.approx(sum(seen) / len(seen))
        # min and max skip NaN (nothing but NaN leaves them at +-inf)
        assert low[slot] == (min(finite_or_inf) if finite_or_inf else math.inf)
        assert high[slot] == (max(finite_or_inf) if finite_or_inf else -math.inf)


def test_sequence_stats_groups_and_the_advantages_order():
    """GRPO: 3 groups of 4; one solved (all 1), one failed (all 0), one mixed. Group-normalised advantages rise with
    the rewards (+1); negated ones fall (-1)."""
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1])
    group = torch.arange(3).repeat_interleave(4) * 7  # any integer ids
    g = rewards.view(3, 4)
    adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).flatten()
    out = F.sequence_stats(adv, rewards, group)
    assert set(out) == set(F.SEQUENCE_STATS)
    assert out["zero_adv_groups"].item() == pytest.approx(2 / 3)
    assert out["zero_group_reward"].item() == pytest.approx(0.5)
    assert out["zero_adv_groups_top"].item() == pytest.approx(1 / 3)  # the solved one
    assert out["adv_reward_corr"].item() == pytest.approx(1.0)
    assert F.sequence_stats(-adv, rewards, group)["adv_reward_corr"].item() == pytest.approx(-1.0)
    assert F.sequence_stats(None, rewards, None).keys() == {"reward_mean", "reward_min", "reward_max"}
    # no rewards: the spread of each group's advantages
    assert F.sequence_stats(adv, None, group)["zero_adv_groups"].item() == pytest.approx(2 / 3)


@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([0.5, -3.0, 2.25, 0.0, math.nan, math.inf, -math.inf,
                                                               1e-7, 123.25]),
                          st.booleans()), min_size=1, max_size=60))
def test_reduce_rows_on_the_host_gives_vector_stats_numbers(entries):
    """A row read in one piece is reduced on the host (``reduce_rows``): the numbers of ``VectorStats``' update and
    compute for the same measurements (NaN reaches the mean and the sum, min/max skip it, NaN where nothing came)."""
    import numpy as np

    from lightning_ppo_guard.metrics import VectorStats, reduce_rows

    slots, values, mask = ([e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])
    stats = VectorStats(6)
    stats.update(torch.tensor(values), torch.tensor(mask), torch.tensor(slots))
    device = stats.compute().reshape(-1).tolist()
    host = reduce_rows(np.array(values, dtype=np.float32), np.array(mask), np.array(slots), 6)
    assert len(host) == len(device)
    for a, b in zip(device, host, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-30)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 80), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([None, 1, 2, 7, "per-sample"]),
       st.integers(0, 10_000))
def test_policy_vector_is_policy_stats_in_one_vector(n, clip, adv, ev, actions, seed):
    """The two faces of one implementation: ``policy_stats`` is ``policy_vector`` by name, and each statistic
    equals its own definition (computed here entry by entry, independently of the fused path)."""
    g = torch.Generator().manual_seed(seed)
    lr = torch.randn(n, generator=g) * 0.2
    a = torch.randn(n, generator=g) if adv else None
    if a is not None:
        a[: n // 3] = 0.0
    values, returns = (torch.randn(n, generator=g), torch.randn(n, generator=g)) if ev else (None, None)
    ent = torch.rand(n, generator=g)
    num = torch.randint(1, 5, (n,), generator=g) if actions == "per-sample" else actions
    kw = dict(clip_eps=0.2 if clip else None, advantages=a, values=values, returns=returns, entropy=ent,
              num_actions=num)
    vector, names = F.policy_vector(lr, **kw)
    stats = F.policy_stats(lr, **kw)
    assert tuple(stats) == names and vector.shape == (len(names),)
    assert all(torch.equal(stats[k], vector[i]) or bool(stats[k].isnan() & vector[i].isnan())
               for i, k in enumerate(names))
    r = lr.double().exp()
    expect = {"approx_kl": ((r - 1) - lr.double()).mean(), "approx_kl_k1": -lr.double().mean(),
              "ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(), "ratio_dev": (r - 1).abs().max(),
              "entropy": ent.double().mean()}
    if clip:
        expect["clip_fraction"] = ((r - 1).abs() > 0.2).double().mean()
    if adv:
        expect.update(adv_mean=a.double().mean(), adv_std=a.double().std(correction=0),
                      adv_zero_frac=(a == 0).double().mean())
    if ev:
        expect["explained_variance"] = 1 - (returns - values).double().var(correction=0) / returns.double().var(
            correction=0)
    if actions == "per-sample":
        log_n = num.double().log()
        expect["entropy_norm"] = torch.where(log_n > 0, ent.double() / log_n.clamp_min(1e-12), 1.0).mean()
    elif actions is not None:
        expect["entropy_norm"] = ent.double().mean() / math.log(actions) if actions > 1 else torch.tensor(1.0)
    assert set(names) == set(expect)
    for name, value in expect.items():
        got, want = stats[name].item(), float(value)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=2e-5, abs=2e-6), name


def test_explained_variance_is_nan_without_spread_in_the_returns():
    stats = F.policy_stats(values=torch.randn(16), returns=torch.full((16,), 3.0))
    assert math.isnan(stats["explained_variance"].item())


def test_arrange_lays_a_named_vector_out_by_name():
    from lightning_ppo_guard.metrics import arrange

    values, present = arrange(torch.tensor([1.0, 2.0, 3.0]), ("b", "a", "c"), ("a", "x", "c", "b"))
    assert present == (True, False, True, True)
    assert values[0].item() == 2.0 and math.isnan(values[1].item()) and values[2].item() == 3.0
    assert values[3].item() == 1.0


def test_a_clip_range_on_a_schedule_does_not_grow_the_caches():
    """The constants and affine maps are cached by value; a clip range that changes every rollout (SB3's
    ``clip_range`` schedules) must not make that a leak."""
    lr = _lr(32)
    for k in range(500):
        eps = 0.2 * (1 - k / 500)
        assert F.policy_stats(lr, clip_eps=eps)["clip_fraction"].item() == pytest.approx(
            ((lr.exp() - 1).abs() > eps).float().mean().item())
    assert len(F._CONSTANTS) <= F._CACHE_LIMIT and len(F._AFFINE) <= F._CACHE_LIMIT
