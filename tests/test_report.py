"""Issue 5: ``ppo-guard report`` turns a run's logs and findings into a PNG dashboard and an HTML page."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
import re
import shutil

import pytest

from lightning_ppo_guard.cli import main
from lightning_ppo_guard.diagnoses import get
from lightning_ppo_guard.report import ReportError, find_run, make_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``ppo-guard demo`` with a planted fault: 2 PPO iterations into a CSVLogger folder."""
    logdir = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo", "--fault", "detached_logits", "--iterations", "2", "--logdir", str(logdir)]) == 0
    return logdir, out.getvalue()


def test_demo_prints_the_report_command_and_the_report_names_the_fault(demo_run, capsys):
    demo_run, out = demo_run
    command = re.search(r"(\S*ppo-guard) report (\S+)", out)
    assert command, out
    # the printed command runs as printed: the script in this Python's bin/ (the venv the README sets up)
    assert os.path.exists(command.group(1)) or shutil.which(command.group(1)), command.group(0)
    run_dir = command.group(2)
    assert run_dir.startswith(str(demo_run)) and run_dir.endswith("version_0")

    assert main(["report", run_dir]) == 0
    out = capsys.readouterr().out
    assert "PPG101[actor]" in out
    html_path = demo_run / "manual_detached_logits" / "version_0" / "ppo_guard_report.html"
    png_path = html_path.with_suffix(".png")
    png = png_path.read_bytes()
    assert png.startswith(PNG) and len(png) > 20_000  # a drawn dashboard, not an empty canvas
    page = html_path.read_text()
    assert base64.b64encode(png).decode() in page  # embedded, so the page travels alone
    assert "<td>PPG101</td>" in page and "<td>logp-no-grad</td>" in page and "<td>actor</td>" in page
    assert html.escape(get("PPG101").fix) in page


def test_report_of_the_parent_folder_picks_the_run_and_out_moves_the_files(demo_run, tmp_path):
    demo_run, _ = demo_run
    html_path, png_path, run = make_report(demo_run, tmp_path / "sub" / "r.html")
    assert run.run_dir == demo_run / "manual_detached_logits" / "version_0"
    assert html_path == tmp_path / "sub" / "r.html" and png_path == tmp_path / "sub" / "r.png"
    assert png_path.read_bytes().startswith(PNG)
    assert run.roles() == ["actor", "critic"]
    assert [f["code"] for f in run.findings] == ["PPG101"]
    # the detached actor never moved: what the dashboard shows
    assert {v for _, v in run.series("actor", "approx_kl")} == {0.0}
    assert all(v > 0 for _, v in run.series("critic", "grad_norm"))
    assert run.metrics["train/episode_return"]


def test_report_errors_exit_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ppo-guard report: no such folder: {missing}"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no logs under" in err and str(empty) in err

    foreign = tmp_path / "foreign" / "version_0"
    foreign.mkdir(parents=True)
    (foreign / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.2\n")
    assert main(["report", str(tmp_path / "foreign")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no 'ppo_guard/' metrics" in err and "PPOGuard" in err
    with pytest.raises(ReportError, match="no 'ppo_guard/' metrics"):
        find_run(foreign)
    assert not list(foreign.glob("*.png"))


def test_report_without_findings_file_still_draws(tmp_path):
    run_dir = tmp_path / "version_0"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text(
        "epoch,step,ppo_guard/actor/approx_kl,ppo_guard/actor/grad_norm,ppo_guard/critic/grad_norm\n"
        ",0,0.001,0.5,2.0\n,4,0.002,0.4,1.0\n")
    html_path, png_path, run = make_report(tmp_path)
    assert run.findings == [] and run.findings_path is None
    assert png_path.read_bytes().startswith(PNG)
    assert "ppo_guard_findings.json" in html_path.read_text()
