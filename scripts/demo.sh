#!/usr/bin/env bash
# The main job: set up, then train the reference PPO with PPOGuard and show what it logged and found.
# Extra arguments go to `ppo-guard demo` (e.g. --fault detached_logits, --seed 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/ppo-guard demo "$@"
