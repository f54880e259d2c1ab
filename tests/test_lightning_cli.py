"""Issue 5: PPOGuard is configurable from a LightningCLI YAML (``trainer.callbacks``), with typed arguments."""

from __future__ import annotations

import pytest

pytest.importorskip("jsonargparse")  # LightningCLI needs jsonargparse[signatures] (the dev extra has it)

from lightning.pytorch.cli import LightningCLI

from lightning_ppo_guard import PPOGuard
from lightning_ppo_guard.reference import CartPolePPO

pytestmark = [
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),  # pytest's own argv is not ours
    pytest.mark.filterwarnings("ignore::lightning_ppo_guard.PPOGuardWarning"),  # the test reads guard.codes()
]

# What trainer_kwargs(CartPolePPO) gives, written as YAML, plus the guard and a planted fault.
CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  callbacks:
    - class_path: lightning_ppo_guard.PPOGuard
      init_args:
        on_stall: {on_stall}
        ignore: [logp-by-hand]
        dense_steps: 64
        log_every_n_steps: 4
        config:
          frozen_rollouts: 4
model:
  cfg:
    fault: actor_not_in_optimizer
    total_timesteps: 5120
"""


def _write(tmp_path, on_stall):
    path = tmp_path / "ppo.yaml"
    path.write_text(CONFIG.format(on_stall=on_stall))
    return str(path)


def test_guard_from_yaml_is_built_with_its_values_and_stops_the_faulty_run(tmp_path):
    cli = LightningCLI(CartPolePPO, args=["fit", "--config", _write(tmp_path, "stop")], save_config_callback=None)
    guards = [c for c in cli.trainer.callbacks if isinstance(c, PPOGuard)]
    assert len(guards) == 1
    guard = guards[0]
    assert guard.on_stall == "stop" and guard.ignore == frozenset({"PPG106"})
    assert guard.dense_steps == 64 and guard.config.frozen_rollouts == 4
    assert cli.model.cfg.fault == "actor_not_in_optimizer" and cli.model.cfg.num_iterations == 10
    assert guard.codes() == {"PPG001"}
    # on_stall: stop ended the fit after the first rollout (10 epochs x 4 minibatches), not after 10 rollouts
    assert cli.trainer.global_step == 40 and cli.trainer.should_stop


def test_invalid_on_stall_in_yaml_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        LightningCLI(CartPolePPO, args=["fit", "--config", _write(tmp_path, "explode")], save_config_callback=None)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert 'key "on_stall"' in err and "explode" in err and "'warn', 'raise', 'stop'" in err, err
