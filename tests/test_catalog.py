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
    # the finding's step fills {step} (PPG901 once reached users as the raw template "... at step {step}")
    assert Finding("PPG901", "actor", 7, {"tensors": 2}).message.endswith("NaN/Inf gradient at step 7")
    # a missing field reads "?" (the rest of the line survives) and the strict render names what is missing
    partial = Finding("PPG204", "actor", 3, {"lr": 1e-4}).message
    assert "{" not in partial and "?" in partial and "0.0001" in partial
    with pytest.raises(KeyError, match=r"PPG204.*steps.*update_ratio"):
        CATALOG["PPG204"].render("actor", 3, {"lr": 1e-4})
    # a value its format spec does not fit is written plainly, never raises
    assert "n/a" in Finding("PPG001", "actor", 0, {"binding": "n/a"}).message


def _emit_sites() -> list[tuple[str, int, set[str]]]:
    """``(code, line, evidence names)`` of every place the rules name a code: ``_emit(role, "PPG...", step, k=v)``
    and the sign-streak helper ``_positive(role, step, "PPG...", counter, value, "name", needed)``."""
    import ast

    import lightning_ppo_guard.rules as rules

    sites = []
    for node in ast.walk(ast.parse(Path(rules.__file__).read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr == "_emit" and isinstance(node.args[1], ast.Constant):
            names = {k.arg for k in node.keywords if k.arg is not None}
            for k in node.keywords:
                if k.arg is None and isinstance(k.value, ast.Dict):  # **{name: value, ...}
                    names |= {key.value for key in k.value.keys if isinstance(key, ast.Constant)}
                # any other **mapping adds optional evidence (e.g. the suspects of PPG105): never a template field
            sites.append((node.args[1].value, node.lineno, names))
        elif node.func.attr == "_positive":
            code, name = node.args[2], node.args[5]
            assert isinstance(code, ast.Constant) and isinstance(name, ast.Constant), ast.unparse(node)
            sites.append((code.value, node.lineno, {name.value, "observes"}))
    return sites


def test_every_code_renders_with_the_evidence_its_rules_emit():
    """Each catalog template's fields are what each of its emit sites passes: rendered strictly with exactly that
    evidence, every message is complete (no KeyError, no raw ``{field}`` left, no ``?``)."""
    sites = _emit_sites()
    emitted = {code for code, _, _ in sites}
    live = {code for code, d in CATALOG.items() if not d.retired}
    assert live <= emitted, f"codes no rule emits: {sorted(live - emitted)}"
    assert emitted <= set(CATALOG), f"emitted codes missing from the catalog: {sorted(emitted - set(CATALOG))}"
    for code, line, names in sites:
        diagnosis = CATALOG[code]
        assert diagnosis.fields <= names, f"rules.py:{line} emits {code} without {sorted(diagnosis.fields - names)}"
        text = diagnosis.render("actor", 12, dict.fromkeys(names, 0.25))
        assert "{" not in text and "?" not in text, (code, text)
        assert ("actor" in text) == ("{role" in diagnosis.message), (code, text)
        assert Finding(code, "actor", 12, dict.fromkeys(names, 0.25)).message == text
