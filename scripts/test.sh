#!/usr/bin/env bash
# Set up, lint, then run the whole test suite (real Trainer fits of the reference PPO on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check lightning_ppo_guard tests benchmarks notebooks
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
