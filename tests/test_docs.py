"""The docs: every code's page is linked from its warning and from ``ppo-guard explain``."""

from __future__ import annotations

import warnings

from lightning_ppo_guard import CATALOG, Finding, PPOGuard, PPOGuardWarning
from lightning_ppo_guard.cli import main
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
