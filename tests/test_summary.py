"""Issue 5: the end-of-fit summary is a readable table (rich when importable, else aligned plain text)."""

from __future__ import annotations

import logging
import sys

import pytest

from lightning_ppo_guard import PPOGuard
from lightning_ppo_guard.diagnoses import Finding, get
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

from .conftest import fit

WIDTH = 100


@pytest.fixture(scope="module")
def guard():
    cfg = PPOConfig(seed=0, fault="lr_zero")
    cfg.total_timesteps = 2 * cfg.batch_size
    guard = PPOGuard(verbose=False)
    fit(CartPolePPO(cfg), [guard])
    assert guard.codes() == {"PPG003"}
    # a second role with a long name, a late step and no rollout: the columns must make room for it
    guard.findings.append(Finding("PPG001", "agent_12", 12345, {"binding": 0.0}, rollout=None))
    return guard


def _without_rich(monkeypatch):
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")] + ["rich"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_rich_table_has_every_column_and_fits_the_width(guard):
    pytest.importorskip("rich")
    text = guard.summary("rich", width=WIDTH)
    lines = text.splitlines()
    assert lines[0] == "PPOGuard: 2 finding(s) in 80 optimizer steps"
    assert all(len(line) <= WIDTH for line in lines) and "\x1b" not in text  # no colour codes in logs
    header = next(line for line in lines if "code" in line)
    for name in ("code", "severity", "role", "step", "rollout", "symbol: message / fix"):
        assert name in header
    assert "┃" in header and "│ PPG003 │ error    │ actor    │    79 │       2 │ actor-lr-zero:" in text
    assert "│ PPG001 │ error    │ agent_12 │ 12345 │       - │" in text
    # markup-like brackets in the fix are printed as they are, not eaten by rich
    assert "check with [len(g['params']) for g in optimizer.param_groups]." in guard.summary("rich", width=400)
    assert "fix: Give the actor's param group" in text


def test_plain_table_aligns_its_columns(guard):
    text = guard.summary("plain", width=WIDTH)
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    header = lines[1]
    assert header.split() == ["code", "severity", "role", "step", "rollout", "symbol:", "message", "/", "fix"]
    row3 = next(line for line in lines if line.lstrip().startswith("PPG003"))
    row1 = next(line for line in lines if line.lstrip().startswith("PPG001"))
    for row in (row3, row1):
        assert row.index("PPG") == header.index("code")
        assert row.index("error") == header.index("severity")
    # step and rollout right-aligned under their headers
    assert row1.index("12345") + len("12345") == header.index("step") + len("step")
    assert row3.index("actor-lr-zero") == header.index("symbol") == row1.index("actor-not-in-optimizer")
    fix_lines = [line for line in lines if line.strip().startswith("fix: ")]
    assert len(fix_lines) == 2 and all(line.index("fix:") == header.index("symbol") for line in fix_lines)
    words = " ".join(line.strip() for line in lines)
    assert " ".join(get("PPG003").fix.split()) in words


def test_without_rich_auto_falls_back_to_plain(guard, monkeypatch):
    _without_rich(monkeypatch)
    assert guard.summary(width=WIDTH) == guard.summary("plain", width=WIDTH)
    with pytest.raises(ImportError):
        guard.summary("rich")
    with pytest.raises(ValueError, match="style"):
        guard.summary("fancy")


def test_verbose_guard_logs_the_table_at_the_end_of_fit_and_a_clean_run_says_so(caplog):
    caplog.set_level(logging.INFO)
    cfg = PPOConfig(seed=0, fault="detached_logits")
    cfg.total_timesteps = 1 * cfg.batch_size
    guard = PPOGuard()
    fit(CartPolePPO(cfg), [guard])
    logged = [r.getMessage() for r in caplog.records if "PPOGuard: 1 finding(s)" in r.getMessage()]
    assert len(logged) == 1 and "PPG101" in logged[0] and "logp-no-grad" in logged[0] and "fix:" in logged[0]
    guard.findings.clear()
    assert guard.summary() == f"PPOGuard: no finding in 40 optimizer steps ({guard.observes} observes)."
