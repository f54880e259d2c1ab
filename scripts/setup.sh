#!/usr/bin/env bash
# Create .venv (once) with the CPU torch build this machine already has, then the package and its extras.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
# Pin the local CPU build first: nothing later may pull a CUDA torch.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0"
fi
if ! .venv/bin/python -c "import lightning_ppo_guard, gymnasium, pytest, xdist, mypy, hypothesis, matplotlib, tensorboard, nbclient, nbformat, ipykernel, jsonargparse, docstring_parser, typeshed_client, rich, mlflow, wandb, mkdocs, material, mkdocstrings, mkdocstrings_handlers.python, setuptools, torchrl, tensordict, stable_baselines3, transformers" 2>/dev/null; then
  "${PIP[@]}" -e ".[dev]" "torch==2.13.0"
fi
