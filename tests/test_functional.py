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


def test_grad_stats_norm_nonzero_nonfinite():
    a = torch.tensor([3.0, 0.0, 0.0])
    b = torch.tensor([[0.0, 4.0]])
    norm, nz, nf = F.grad_stats([a, b]).tolist()
    assert (norm, nz, nf) == (pytest.approx(5.0), 2.0, 0.0)
    norm, nz, nf = F.grad_stats([a, torch.tensor([float("nan"), 1.0])]).tolist()
    assert math.isnan(norm) and nf == 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=64))
def test_k3_never_negative_and_matches_definition(values):
    lr = torch.tensor(values, dtype=torch.float64)
    kl = F.approx_kl(lr).item()
    assert kl >= -1e-7
    assert kl == pytest.approx(sum(math.expm1(v) - v for v in values) / len(values), rel=1e-4, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=16), min_size=1, max_size=6))
def test_flat_norm_equals_norm_of_concatenation(chunks):
    tensors = [torch.tensor(c, dtype=torch.float64) for c in chunks]
    expected = math.sqrt(sum(v * v for c in chunks for v in c))
    assert F.flat_norm(tensors).item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
