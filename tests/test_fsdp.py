"""Issue 15: the guard under FSDP2 (Lightning's ``ModelParallelStrategy`` + ``fully_shard``), 2 CPU processes.

Every actor and the critic of the reference MAPPO are sharded: parameters and gradients are ``DTensor`` shards, so
each rank holds half of every tensor. The guard measures the local shards and sums them over the ranks, so the
logged numbers must be the one-process numbers (both ranks collect the same rollout and train on the two halves of
every even minibatch; FSDP averages their gradients). The fits run in ``tests/fsdp_fit.py`` (Lightning's launcher
starts rank 1 by running the command of rank 0 again, which must not be pytest).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch.distributed as dist

from .conftest import launch_two_ranks, read_csv
from .fsdp_fit import run
from .test_ddp import ABS, LINEAR

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.xdist_group("multiprocess"),  # under pytest -n: one worker runs these 2-process fits one by one
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

SCRIPT = Path(__file__).with_name("fsdp_fit.py")
STEPS = 40  # one MAPPO iteration: 10 epochs x 4 minibatches
#: normalised advantages have mean ~0: their rounding is absolute (~1e-7), as the entropy drift's
TOL = {**ABS, "adv_mean": 2e-6}


def _fsdp(out: Path, fault: str, *extra: str) -> list[dict]:
    return launch_two_ranks(SCRIPT, out, fault, *extra, timeout=300)


def _rows(out: Path) -> list[dict[str, float]]:
    return [r for r in read_csv(out / "run" / "version_0") if "ppo_guard/agent_0/grad_norm" in r]


def test_fsdp2_healthy_logs_the_one_process_numbers_and_finds_nothing(tmp_path):
    single = run(tmp_path / "single", 1, "none")
    ranks = _fsdp(tmp_path / "fsdp", "none")
    assert not single["sharded"] and all(r["sharded"] and r["world_size"] == 2 for r in ranks)
    assert single["findings"] == [] and all(r["findings"] == [] and r["warnings"] == [] for r in ranks)
    one, two = _rows(tmp_path / "single"), _rows(tmp_path / "fsdp")
    assert len(one) == len(two) == 3 * STEPS
    worst, checked = 0.0, 0
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert set(a) == set(b), set(a) ^ set(b)
        for key, x in a.items():
            metric = key.rsplit("/", 1)[-1]
            if metric not in LINEAR or (math.isnan(x) and math.isnan(b[key])):
                continue
            # float sums in another order on two ranks, over 120 Adam steps: a little looser than DDP's 40
            assert b[key] == pytest.approx(x, rel=1e-4, abs=TOL.get(metric, 1e-7)), (i, key, x, b[key])
            checked += 1
            if abs(x) > 1e-4 and metric not in TOL:
                worst = max(worst, abs(b[key] - x) / abs(x))
    assert checked > 1000 and worst < 1e-4
    print(f"FSDP2 max relative difference, 2 ranks vs 1 process (values above 1e-4): {worst:.2e}")
    # the shards really are halves: the logged norms are global, not one rank's shard
    assert all(b["ppo_guard/agent_0/param_norm"] == pytest.approx(a["ppo_guard/agent_0/param_norm"], rel=1e-4)
               for a, b in zip(one, two, strict=True))


@pytest.mark.parametrize(("fault", "expected"), [("agent_unbound", [["PPG001", "agent_2"]]),
                                                 ("detached_logits", [["PPG101", f"agent_{i}"] for i in range(3)])])
def test_fsdp2_faults_are_named_once_on_rank_zero_and_stop_both_ranks(tmp_path, fault, expected):
    ranks = _fsdp(tmp_path, fault, "--stop")
    for r in ranks:
        assert r["findings"] == expected, r
    assert len(ranks[0]["warnings"]) == len(expected) and ranks[1]["warnings"] == []
    assert all(expected[0][0] in w for w in ranks[0]["warnings"])
    assert [r["global_step"] for r in ranks] == [STEPS, STEPS] and all(r["should_stop"] for r in ranks)
