"""The docs: the site builds with warnings as errors, one generated page per code (linked from its warning and
from ``ppo-guard explain``), the API reference, the metrics page held to metrics.py, README as the front door, and
the token-level example fitted."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ppo_guard import CATALOG, OBSERVE_METRICS, STEP_METRICS, Diagnosis, Finding, PPOGuard, PPOGuardWarning
from lightning_ppo_guard.cli import catalog_markdown, main
from lightning_ppo_guard.diagnoses import DOCS_URL
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

from .conftest import fit


def test_every_code_has_a_stable_page_url():
    assert DOCS_URL.startswith("https://") and DOCS_URL.endswith("/")
    urls = {d.code: d.url for d in CATALOG.values()}
    assert all(url == f"{DOCS_URL}codes/{code}/" for code, url in urls.items())
    assert len(set(urls.values())) == len(urls)


def test_explain_prints_the_codes_page(capsys):
    for code in ("PPG001", "ppg101", "logp-by-hand"):
        assert main(["explain", code]) == 0
        out = capsys.readouterr().out
        d = next(d for d in CATALOG.values() if code.upper() == d.code or code == d.symbol)
        assert out.rstrip().endswith(f"Docs:\n  {d.url}"), out


def test_finding_text_ends_with_its_page():
    text = str(Finding("PPG001", "agent_2", 0, {"binding": 0.0}))
    assert text.splitlines()[-1] == f"  docs: {DOCS_URL}codes/PPG001/"
    assert "fix:" in text.splitlines()[-2]


def test_the_warning_of_a_real_fit_links_its_page():
    cfg = PPOConfig(seed=0, fault="detached_logits")
    cfg.total_timesteps = cfg.batch_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(CartPolePPO(cfg), [PPOGuard(verbose=False)], quiet=False)
    ours = [str(w.message) for w in caught if issubclass(w.category, PPOGuardWarning)]
    assert len(ours) == 1 and ours[0].startswith("PPG101 logp-no-grad [actor]"), ours
    assert ours[0].endswith(f"docs: {DOCS_URL}codes/PPG101/"), ours[0]


# ------------------------------------------------------------------------------------------- the docs site
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs_hooks  # noqa: E402  (the MkDocs hook that generates the diagnoses pages)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The docs built with warnings as errors (``mkdocs build --strict``) into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "WARNING" not in log, log[-5000:]
    return out


def _text(page: Path) -> str:
    """The visible text of a built page's article."""
    raw = page.read_text()
    body = raw[raw.index("<article"):raw.index("</article>")]
    return html.unescape(re.sub(r"<[^>]+>", "", body))


@pytest.mark.xdist_group("docs")
def test_the_docs_build_strict_with_one_page_per_code(site):
    index = (site / "codes" / "index.html").read_text()
    for d in CATALOG.values():
        page = site / "codes" / d.code / "index.html"
        assert page.exists(), f"no page for {d.code}"
        text = _text(page)
        for part in (d.code, d.symbol, d.severity, d.message, d.explanation, d.fix, d.checklist, d.url):
            assert part in text, (d.code, part)
        assert "Example" in text and f'ignore=["{d.code}"]' in text
        assert f'href="{d.code}/"' in index, f"{d.code} not linked from the index"
    pages = {p.parent.name for p in (site / "codes").glob("PPG*/index.html")}
    assert pages == set(CATALOG)


@pytest.mark.xdist_group("docs")
def test_api_reference_is_built_from_the_docstrings(site):
    api = {p: (site / "api" / p / "index.html").read_text() for p in ("package", "functional", "config",
                                                                          "diagnoses", "metrics", "roles")}
    import lightning_ppo_guard

    for name in lightning_ppo_guard.__all__:
        if name == "observe":  # the function shares its module's name: documented by its full path
            assert 'id="lightning_ppo_guard.observe.observe"' in api["package"]
        elif name != "functional":  # a page of its own
            assert f'id="lightning_ppo_guard.{name}"' in api["package"], name
    assert 'id="lightning_ppo_guard.functional.policy_stats"' in api["functional"]
    assert 'id="lightning_ppo_guard.config.GuardConfig.frozen_rollouts"' in api["config"]
    assert 'id="lightning_ppo_guard.diagnoses.DOCS_URL"' in api["diagnoses"]
    assert 'id="lightning_ppo_guard.roles.resolve_roles"' in api["roles"]
    assert "Hand one minibatch of the PPO policy term" in _text(site / "api" / "package" / "index.html")


def test_generated_pages_come_from_the_catalog():
    pages = docs_hooks.pages()
    assert set(pages) == {"codes/index.md"} | {f"codes/{code}.md" for code in CATALOG}
    assert catalog_markdown() in pages["codes/index.md"]  # severities, explanations and fixes cannot drift
    retired = Diagnosis("PPG999", "old-rule", "warning", "m", "e", "f", retired=True)
    assert "is retired" in docs_hooks.code_page(retired) and "(retired)" in docs_hooks.code_page(retired)
    with pytest.raises(ValueError, match="site_url"):
        docs_hooks.on_config({"site_url": "https://example.invalid/"})
    mkdocs_yml = (ROOT / "mkdocs.yml").read_text()
    assert f"site_url: {DOCS_URL}" in mkdocs_yml


def test_every_code_has_an_example_and_its_faults_and_variants_name_it():
    from lightning_ppo_guard.reference.faults import MANUAL_FAULTS
    from tests.zoo import all_variants
    from tests.zoo.expected import EXPECTED

    names = {v.name: {code for code, _ in v.expect} | set(v.allowed) for v in all_variants()}
    assert set(docs_hooks.EXAMPLES) == set(CATALOG)
    for code, ex in docs_hooks.EXAMPLES.items():
        assert ex.get("snippet", "").strip(), code
        for fault in ex.get("demo", []):
            assert fault in MANUAL_FAULTS and EXPECTED[fault][1] == code, (code, fault)  # `ppo-guard demo` runs it
        for name in ex.get("variants", []):
            assert code in names[name], (code, name)  # expected, or allowed after the expected code
        for test in ex.get("tests", []):
            assert (ROOT / test.split(" ")[0]).exists(), test
    # every reference fault the demo can plant is shown on its code's page
    shown = {f for ex in docs_hooks.EXAMPLES.values() for f in ex.get("demo", [])}
    assert shown == {f for f in EXPECTED if f in MANUAL_FAULTS}


def test_logged_metrics_page_is_the_metrics_table():
    """Every logged metric has its row on the metrics page, with the reduction metrics.py declares."""
    from lightning_ppo_guard.metrics import BINDING_METRICS, ROLLOUT_METRICS

    page = (ROOT / "docs" / "metrics.md").read_text()
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`")] = cells
    for spec in (*STEP_METRICS, *OBSERVE_METRICS, *ROLLOUT_METRICS, *BINDING_METRICS):
        assert f"`{spec.name}`" in page, f"metric {spec.name} missing from docs/metrics.md"
        assert spec.name in rows, spec.name
    for spec in (*STEP_METRICS, *OBSERVE_METRICS):
        assert rows[spec.name][3] == spec.reduce, (spec.name, rows[spec.name][3], spec.reduce)
    assert set(rows) == {s.name for s in (*STEP_METRICS, *OBSERVE_METRICS, *ROLLOUT_METRICS, *BINDING_METRICS)}


def test_readme_is_the_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for must in ("bash scripts/demo.sh", "bash scripts/test.sh", '-m "not slow"', "pip install", "PPOGuard()",
                 "observe(", "docs: https://", "mkdocs build --strict"):
        assert must in readme, must
    for target in re.findall(r"\]\((?!https?://|#)([^)#]+)", readme):  # relative links point at files
        assert (ROOT / target).exists(), target
    for page in ("integrations/cleanrl", "integrations/sb3", "integrations/torchrl", "integrations/mappo",
                 "integrations/token-level", "codes/index", "findings"):
        assert f"docs/{page}.md" in readme or f"{DOCS_URL}{page.removesuffix('/index')}/" in readme, page


@pytest.mark.parametrize("layout", ["heads", "tied"])
def test_token_level_example_fits_healthy_and_names_detached_logits(layout):
    spec = importlib.util.spec_from_file_location("token_level", ROOT / "docs" / "examples" / "token_level.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for fault, want in ((None, set()), ("detached", {("PPG101", "actor")})):
        torch.manual_seed(0)
        module = example.TokenPPO(fault=fault)
        if layout == "tied":
            module.policy.lm_head.weight = module.policy.embed.weight
            guard = PPOGuard(actors="policy", critic="policy.v_head", verbose=False)
        else:
            guard = example.make_guard(verbose=False)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PPOGuardWarning)
            trainer.fit(module)
        assert {(f.code, f.role) for f in guard.findings} == want, guard.summary()
        assert guard.optimizer_steps == module.iterations * module.epochs * module.minibatches
