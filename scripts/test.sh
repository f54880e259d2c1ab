#!/usr/bin/env bash
# Set up, lint, type-check, then run the whole test suite (real Trainer fits of the reference PPO on CPU), on 2 workers.
# Extra arguments go to pytest: `bash scripts/test.sh -m "not slow"` skips the full-training runs (~6 of ~10 min).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check lightning_ppo_guard tests benchmarks notebooks scripts docs
.venv/bin/python -m mypy  # the package, as configured in pyproject.toml [tool.mypy]
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadgroup "$@"
