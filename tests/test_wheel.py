"""The package as a user gets it: the wheel is built from the source, holds the package and nothing else, installs
with its extras into a fresh virtual environment, and the quickstart fits from there, outside the source tree.

The fresh environment downloads nothing: it is a ``venv`` without pip whose site-packages has one ``.pth`` line
naming this interpreter's site-packages, so torch, lightning and the extras' packages resolve from there, and pip
(run with ``--python``) installs the wheel with ``--no-index``: an extra whose packages were missing would fail the
install instead of being fetched. A ``.pth`` *line* adds a directory to ``sys.path`` without running the ``.pth``
files inside it, so the editable install of the checkout is not visible there; the wheel's copy is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from lightning_ppo_guard.diagnoses import DOCS_URL

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "site", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                                 ".ruff_cache", ".pytest_cache", "lightning_logs", "ppo_guard_logs", "*.ckpt",
                                 "ppo_guard_tour_out", ".ipynb_checkpoints")


def _run(cmd: list[str], *, cwd: Path, timeout: int = 180, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd}\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the source (the build writes its build/ and egg-info there, not into the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
          "--no-build-isolation", "--no-index", "--wheel-dir", str(tmp / "dist"), str(src)], cwd=tmp)
    (built,) = (tmp / "dist").glob("lightning_ppo_guard-*.whl")
    return built


@pytest.mark.xdist_group("wheel")
def test_the_wheel_holds_the_package_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_ppo_guard/py.typed" in names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_ppo_guard").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
    tops = {n.split("/")[0] for n in names}
    assert tops == {"lightning_ppo_guard", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/", "scripts/")) for n in names)
    # the test fixtures (the variant zoo, the fault zoo's expectations) live in tests/zoo, not in the package
    assert not any("variants" in n or n.endswith("/expected.py") or "/zoo/" in n for n in names), names
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    for extra in ("demo", "report", "mlflow", "wandb", "docs", "torchrl", "sb3", "dev"):
        assert f"Provides-Extra: {extra}" in metadata, extra
    entry = zipfile.ZipFile(wheel).read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert "ppo-guard = lightning_ppo_guard.cli:main" in entry


@pytest.mark.xdist_group("wheel")
def test_the_wheel_installs_into_a_fresh_venv_and_the_quickstart_fits(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).strip())
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_deps_from_the_test_interpreter.pth").write_text("\n".join(sorted(here)) + "\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # not importable before the install: the checkout's editable install does not leak in
    probe = subprocess.run([str(python), "-c", "import lightning_ppo_guard"], cwd=tmp_path, env=clean,
                           capture_output=True, text=True)
    assert probe.returncode != 0, probe.stdout

    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check",
          "--no-index", f"lightning_ppo_guard[demo,report] @ {wheel.as_uri()}"], cwd=tmp_path, env=clean)
    where = _run([str(python), "-c", "import lightning_ppo_guard, gymnasium, matplotlib; "
                  "print(lightning_ppo_guard.__file__)"], cwd=tmp_path, env=clean).strip().splitlines()[-1]
    assert Path(where).is_relative_to(env_dir), where  # the wheel's copy, not the source tree
    assert not Path(where).is_relative_to(ROOT)

    # the console script, from the venv
    explain = _run([str(env_dir / "bin" / "ppo-guard"), "explain", "PPG101"], cwd=tmp_path, env=clean)
    assert f"{DOCS_URL}codes/PPG101/" in explain

    # the README's quickstart module, run from a folder outside the source tree
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(ROOT / "docs" / "examples" / "quickstart.py", run_dir)
    healthy = _run([str(python), "quickstart.py"], cwd=run_dir, env=clean, timeout=300)
    assert "findings: none" in healthy, healthy[-3000:]
    faulty = _run([str(python), "quickstart.py", "--fault", "detached"], cwd=run_dir, env=clean, timeout=300)
    assert "findings: ['PPG101']" in faulty, faulty[-3000:]
    assert f"docs: {DOCS_URL}codes/PPG101/" in faulty  # the warning links the code's page
    assert str(env_dir) in faulty  # the warning comes from the installed guard.py
