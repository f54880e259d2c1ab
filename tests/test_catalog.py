"""The diagnosis catalog: stable, unique, complete in README, every message renders."""

import re
from pathlib import Path

import pytest

from lightning_ppo_guard import CATALOG, OBSERVE_METRICS, STEP_METRICS, Finding
from lightning_ppo_guard.diagnoses import get
from lightning_ppo_guard.metrics import BINDING_METRICS, ROLLOUT_METRICS

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_codes_and_symbols_unique_and_well_formed():
    codes = [d.code for d in CATALOG.values()]
    symbols = [d.symbol for d in CATALOG.values()]
    assert len(set(codes)) == len(codes) and len(set(symbols)) == len(symbols)
    for d in CATALOG.values():
        assert re.fullmatch(r"PPG\d{3}", d.code)
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", d.symbol)
        assert d.severity in ("error", "warning")
        assert d.explanation and d.fix and d.message


def test_every_code_and_metric_is_documented_in_readme():
    for d in CATALOG.values():
        assert re.search(rf"\|\s*`?{d.code}`?\s*\|\s*`?{d.symbol}`?", README), f"{d.code} missing from README"
    for spec in (*STEP_METRICS, *OBSERVE_METRICS, *ROLLOUT_METRICS, *BINDING_METRICS):
        assert f"`{spec.name}`" in README, f"metric {spec.name} missing from README"


def test_readme_diagnoses_table_is_the_catalog():
    """README's table is ``ppo-guard rules --markdown``: severities, explanations and fixes cannot drift."""
    from lightning_ppo_guard.cli import catalog_markdown

    assert catalog_markdown() in README


def test_lookup_by_code_or_symbol():
    assert get("ppg001").symbol == "actor-not-in-optimizer"
    assert get("logp-no-grad").code == "PPG101"
    with pytest.raises(KeyError, match="Unknown diagnosis"):
        get("PPG999")


def test_finding_renders_with_evidence():
    f = Finding("PPG001", "agent_2", 0, {"binding": 0.0})
    assert "0% of agent_2" in f.message and "fix:" in str(f)
    # a template whose evidence is missing falls back to the raw template, never raises
    assert Finding("PPG204", "actor", 3, {}).message == CATALOG["PPG204"].message
