"""Issue 2: what the monitor logs from real fits of the reference PPO, checked against independent math."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_ppo_guard import PPOGuard, PPOGuardWarning, PPOMonitor
from lightning_ppo_guard.reference import CartPolePPO, CartPolePPOAuto, PPOConfig

from .conftest import fit, guard_rows, read_csv


def _cfg(iterations, **kw):
    cfg = PPOConfig(**kw)
    cfg.total_timesteps = iterations * cfg.batch_size
    return cfg


def dense(log_every):
    """A monitor that measures every step and logs every ``log_every`` steps."""
    return PPOMonitor(log_every_n_steps=log_every, measure_every_n_steps=1)


PER = PPOConfig().update_epochs * PPOConfig().num_minibatches  # minibatch updates per rollout


class Recorded(CartPolePPO):
    """The reference PPO, recording the seed checklist's naive numbers itself: its own per-minibatch KL and
    entropy, a per-parameter loop for the actor's gradient norm after backward, and a clone-and-diff of the
    actor's parameters around each optimizer step."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.rec_kl, self.rec_entropy, self.rec_grad, self.rec_update, self.rec_ratio = [], [], [], [], []
        self._before = None

    def ppo_losses(self, mb, rollout):
        terms = super().ppo_losses(mb, rollout)
        self.rec_kl.append(terms.approx_kl.item())
        self.rec_entropy.append(terms.entropy.item())
        return terms

    def on_after_backward(self):
        self._close_step()
        total = sum(float(p.grad.pow(2).sum()) for p in self.actor.parameters() if p.grad is not None)
        self.rec_grad.append(math.sqrt(total))

    def on_before_optimizer_step(self, optimizer):
        self._before = [p.detach().clone() for p in self.actor.parameters()]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._close_step()

    def _close_step(self):
        if self._before is None:
            return
        pairs = zip(self.actor.parameters(), self._before, strict=True)
        diff = math.sqrt(sum(float((p.detach() - q).pow(2).sum()) for p, q in pairs))
        norm = math.sqrt(sum(float(q.pow(2).sum()) for q in self._before))
        self.rec_update.append(diff)
        self.rec_ratio.append(diff / norm)
        self._before = None


def test_logged_actor_metrics_match_an_independent_computation(tmp_path):
    module = Recorded(_cfg(3, seed=0))
    logger = CSVLogger(tmp_path, name="run")
    fit(module, [dense(1)], logger=logger)
    rows = guard_rows(read_csv(logger.log_dir))
    steps = 3 * PER
    assert len(rows) == steps == len(module.rec_grad) == len(module.rec_update)
    assert [int(r["step"]) for r in rows] == list(range(steps))
    for i, row in enumerate(rows):
        for key in ("grad_norm", "update_ratio", "approx_kl", "entropy", "update_norm"):
            assert math.isfinite(row[f"ppo_guard/actor/{key}"]), (i, key)
        assert row["ppo_guard/actor/grad_norm"] == pytest.approx(module.rec_grad[i], rel=1e-4)
        assert row["ppo_guard/actor/update_norm"] == pytest.approx(module.rec_update[i], rel=1e-3, abs=1e-9)
        assert row["ppo_guard/actor/update_ratio"] == pytest.approx(module.rec_ratio[i], rel=1e-3, abs=1e-12)
        assert row["ppo_guard/actor/approx_kl"] == pytest.approx(module.rec_kl[i], rel=1e-3, abs=1e-7)
        assert row["ppo_guard/actor/entropy"] == pytest.approx(module.rec_entropy[i], rel=1e-5)
        assert row["ppo_guard/actor/binding"] == 1.0 and row["ppo_guard/critic/binding"] == 1.0
        assert row["ppo_guard/actor/lr"] == module.cfg.lr
        # the shared clip: actor and critic are scaled by the same coefficient, never above 1
        assert row["ppo_guard/actor/clip_coef"] == pytest.approx(row["ppo_guard/critic/clip_coef"], rel=1e-4)
        assert row["ppo_guard/actor/clip_coef"] <= 1.0 + 1e-6
        assert row["ppo_guard/actor/grad_norm_clipped"] == pytest.approx(
            row["ppo_guard/actor/grad_norm"] * row["ppo_guard/actor/clip_coef"], rel=1e-4)
    # PER minibatch updates per rollout, logged once the next rollout starts
    assert {r["ppo_guard/actor/updates_per_rollout"] for r in rows[PER:]} == {float(PER)}
    # the first minibatch of each rollout has ratio exactly 1
    assert abs(rows[0]["ppo_guard/actor/approx_kl"]) < 1e-9 and rows[PER]["ppo_guard/actor/ratio_dev"] < 1e-6


def test_interval_logging_reduces_without_losing_values(tmp_path):
    module = Recorded(_cfg(2, seed=1))
    logger = CSVLogger(tmp_path, name="run")
    fit(module, [dense(8)], logger=logger)
    rows = guard_rows(read_csv(logger.log_dir))
    assert len(rows) == 2 * PER // 8
    for j, row in enumerate(rows):
        window = module.rec_grad[8 * j: 8 * j + 8]
        assert row["ppo_guard/actor/grad_norm"] == pytest.approx(sum(window) / 8, rel=1e-4)
        kls = module.rec_kl[8 * j: 8 * j + 8]
        assert row["ppo_guard/actor/approx_kl"] == pytest.approx(sum(kls) / 8, rel=1e-3, abs=1e-7)


def test_actor_left_out_of_the_optimizer_logs_binding_0_and_update_0(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    fit(CartPolePPO(_cfg(2, fault="actor_not_in_optimizer")), [dense(1)], logger=logger)
    rows = guard_rows(read_csv(logger.log_dir))
    assert len(rows) == 2 * PER
    assert all(r["ppo_guard/actor/binding"] == 0.0 for r in rows)
    assert all(r["ppo_guard/actor/update_norm"] == 0.0 for r in rows)
    assert "ppo_guard/actor/lr" not in rows[0]
    # its gradient is real (and keeps accumulating: zero_grad never clears tensors the optimizer lacks)
    grads = [r["ppo_guard/actor/grad_norm"] for r in rows]
    assert grads[0] > 0 and grads[-1] > grads[0]
    assert all(r["ppo_guard/critic/binding"] == 1.0 for r in rows)


def test_detached_logits_log_actor_policy_grad_0(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    fit(CartPolePPO(_cfg(1, fault="detached_logits")), [dense(1)], logger=logger)
    rows = guard_rows(read_csv(logger.log_dir))
    assert len(rows) == PER
    assert all(r["ppo_guard/actor/grad_norm"] == 0.0 for r in rows)
    assert all(r["ppo_guard/actor/grad_none"] == 6 for r in rows)  # 3 Linear layers: no .grad at all
    assert all(r["ppo_guard/actor/update_norm"] == 0.0 for r in rows)
    assert all(r["ppo_guard/critic/grad_norm"] > 0 for r in rows)


class RecordedAuto(CartPolePPOAuto):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.rec_grad = []

    def on_before_optimizer_step(self, optimizer):
        # automatic optimization: this hook sees the accumulated, unclipped gradient (Lightning clips after it)
        total = sum(float(p.grad.pow(2).sum()) for p in self.actor.parameters() if p.grad is not None)
        self.rec_grad.append(math.sqrt(total))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_automatic_optimization_and_accumulation_do_not_double_count(tmp_path, accumulate):
    module = RecordedAuto(_cfg(2, seed=0))
    logger = CSVLogger(tmp_path, name="run")
    trainer = fit(module, [dense(1)], logger=logger, accumulate_grad_batches=accumulate)
    rows = guard_rows(read_csv(logger.log_dir))
    assert trainer.global_step == 2 * PER // accumulate
    assert len(rows) == trainer.global_step == len(module.rec_grad)
    for row, naive in zip(rows, module.rec_grad, strict=True):
        assert row["ppo_guard/actor/grad_norm"] == pytest.approx(naive, rel=1e-4)
        assert row["ppo_guard/actor/update_norm"] > 0
    # Lightning's gradient_clip_val acts after on_before_optimizer_step; the step hook sees the clipped grad
    assert any(r["ppo_guard/actor/clip_coef"] < 1.0 for r in rows)


def test_auto_detached_logits_and_unbound_actor_are_found():
    for fault, code in (("detached_logits", "PPG101"), ("actor_not_in_optimizer", "PPG001"), ("lr_zero", "PPG003")):
        guard = PPOGuard()
        fit(CartPolePPOAuto(_cfg(2, fault=fault)), [guard])  # lr 0 is named once it held for two rollouts
        assert code in guard.codes("actor"), (fault, guard.codes())


def test_observe_without_a_guard_is_a_noop():
    module = CartPolePPO(_cfg(1))
    trainer = fit(module, [])
    assert trainer.global_step == PER


def test_monitor_arguments_are_validated():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        PPOMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="prefix"):
        PPOMonitor(prefix="a/b")
    with pytest.raises(ValueError, match="on_stall"):
        PPOGuard(on_stall="explode")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="Unknown diagnosis"):
        PPOGuard(ignore=["PPG999"])


def test_wrong_role_path_fails_at_fit_start_listing_children():
    with pytest.raises(ValueError, match=r"(?s)no submodule or parameter 'policy_net'.*actor: Actor.*critic: Critic"):
        fit(CartPolePPO(_cfg(1)), [PPOMonitor(actors="policy_net")])


def test_memory_is_not_retained_by_the_guard():
    guard = PPOGuard()
    fit(CartPolePPO(_cfg(2)), [guard])
    # nothing of the fit is held once it ended: no pending records, no step in flight, no buffers or hooks
    assert guard.diagnostics.pending == [] and guard.engine.fit is None  # (the steps in flight are the fit's)
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in vars(guard).values())


@pytest.mark.parametrize("callback", [PPOGuard, PPOMonitor])
def test_default_cadence_logs_one_row_per_lightning_log_interval(tmp_path, callback):
    """``log_every_n_steps=None``: a row whenever Lightning logs (here every batch = one rollout of 40 steps),
    holding the interval's reduction, for the guard as for the monitor."""
    logger = CSVLogger(tmp_path, name="run")
    cb = callback()
    fit(CartPolePPO(_cfg(4)), [cb], logger=logger, log_every_n_steps=1)
    rows = guard_rows(read_csv(logger.log_dir))
    assert [int(r["step"]) for r in rows] == [40, 80, 120, 160]
    assert rows[0]["ppo_guard/actor/grad_nonzero_frac"] > 0.5  # counted on every dense step, then 1 in 8
    for r in rows:
        assert r["ppo_guard/actor/grad_norm"] > 0 and r["ppo_guard/actor/clip_coef"] > 0


@pytest.mark.parametrize("clip", [0.5, None])
def test_unclipped_step_reuses_the_norms_taken_after_backward(monkeypatch, tmp_path, clip):
    """Automatic optimization: with no gradient clipping nothing writes the gradients between
    on_before_optimizer_step and the step, so the step reuses the per-tensor norms (one pass fewer) and
    clip_coef is exactly 1; with clipping both passes run. Nonzero counts: every 8th measured step."""
    from lightning_ppo_guard import _plan

    calls = {"n": 0}
    norms = _plan._norms

    def counting(tensors, ord, low_precision):
        calls["n"] += 1
        return norms(tensors, ord, low_precision)

    monkeypatch.setattr(_plan, "_norms", counting)
    logger = CSVLogger(tmp_path, name="run")
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1, log_every_n_steps=1)
    fit(CartPolePPOAuto(_cfg(1)), [guard], logger=logger, gradient_clip_val=clip)
    steps = guard.optimizer_steps
    counted = len(range(0, steps, 8))
    # per step: after backward (1), at the step unless reused (1), actor params (1), update (1); + nonzero
    assert calls["n"] == (4 if clip else 3) * steps + counted
    rows = guard_rows(read_csv(logger.log_dir))
    assert len(rows) == steps
    assert sum("ppo_guard/actor/grad_nonzero_frac" in r for r in rows) == counted
    if clip is None:
        assert all(r["ppo_guard/actor/clip_coef"] == 1.0 for r in rows)
    else:  # the gradient the optimizer stepped with is this step's, clipped over all parameters together
        for r in rows:
            pre = math.hypot(r["ppo_guard/actor/grad_norm"], r["ppo_guard/critic/grad_norm"])
            post = math.hypot(r["ppo_guard/actor/grad_norm_clipped"], r["ppo_guard/critic/grad_norm_clipped"])
            assert post == pytest.approx(min(pre, clip), rel=1e-4)


def test_a_row_is_written_only_when_something_new_was_measured(tmp_path, monkeypatch):
    """Automatic optimization without rollout ids (one step per batch, a row per batch asked): after the dense
    start one step in 16 is measured (one in 64 from step 256), so the batches between measured steps measure
    nothing and change no host value, and write no row."""
    import lightning_ppo_guard.reference.cartpole as cartpole
    from lightning_ppo_guard import observe

    monkeypatch.setattr(cartpole, "observe", lambda m, rollout=None, **kw: observe(m, **kw))
    logger = CSVLogger(tmp_path, name="run")
    guard = PPOGuard(dense_steps=8, measure_every_n_steps=64)
    fit(CartPolePPOAuto(_cfg(5)), [guard], logger=logger, log_every_n_steps=1)
    steps = [int(r["step"]) for r in read_csv(logger.log_dir) if any(k.startswith("ppo_guard/") for k in r)]
    # a row after each of the 8 dense steps, then after the measured ones: n + n // 16 divisible by 16 (n < 256)
    measured = [n + 1 for n in range(8, 200) if (n + n // 16) % 16 == 0]
    assert steps == list(range(1, 9)) + measured and measured[:3] == [32, 47, 62] and len(measured) == 12


def test_sparse_cadence_measures_each_rollout_late_whatever_its_length(tmp_path):
    """Manual optimization, 40 steps per rollout, nothing dense: every rollout gets one measured step, its last
    (predicted from the one before), so every row holds a minibatch after the first and a moving policy logs a
    KL above 0; the rollout counts stay exact."""
    logger = CSVLogger(tmp_path, name="run")
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=64)
    fit(CartPolePPO(_cfg(4)), [guard], logger=logger, log_every_n_steps=1)
    rows = guard_rows(read_csv(logger.log_dir), metric="approx_kl")
    assert [int(r["step"]) for r in rows] == [40, 80, 120, 160]
    assert all(r["ppo_guard/actor/approx_kl"] > 1e-6 for r in rows[1:]), rows
    assert all(r["ppo_guard/actor/updates_per_rollout"] == 40 for r in rows[1:])


def test_mappo_parameter_sharing_is_one_role_fed_by_every_agent(tmp_path):
    """One actor for all agents: one role, ``actor``, whose observes come from every agent (3 per step)."""
    from lightning_ppo_guard.reference import MAPPOConfig, MultiCartPoleMAPPO

    cfg = MAPPOConfig(seed=0, share_actor=True)
    cfg.total_timesteps = 2 * cfg.num_envs * cfg.num_steps
    module = MultiCartPoleMAPPO(cfg)
    logger = CSVLogger(tmp_path, name="run")
    guard = PPOGuard(actors="actor", dense_steps=10**6)  # every observe kept, to count them
    fit(module, [guard], logger=logger, log_every_n_steps=1)
    assert [r.name for r in guard.roles] == ["actor", "critic"] and guard.findings == []
    assert guard.observes == cfg.n_agents * guard.optimizer_steps
    assert guard.updates_per_rollout["actor"] == cfg.update_epochs * cfg.num_minibatches
    rows = guard_rows(read_csv(logger.log_dir))
    assert rows and all(r["ppo_guard/actor/update_norm"] > 0 and r["ppo_guard/actor/approx_kl"] >= 0 for r in rows)


def test_every_attached_monitor_and_guard_receives_the_observes(tmp_path):
    """A monitor, a guard and a second guard (own prefix) in one Trainer: each gets every observe and names the
    fault with the right code (not PPG201 for the one that would have seen no observe)."""
    monitor = PPOMonitor(prefix="m", measure_every_n_steps=1)
    guard, second = PPOGuard(dense_steps=10**6), PPOGuard(prefix="guard2", dense_steps=10**6)
    logger = CSVLogger(tmp_path, name="run")
    fit(CartPolePPO(_cfg(2, fault="detached_logits")), [monitor, guard, second], logger=logger)
    assert monitor.observes == guard.observes == second.observes == 2 * PER
    assert guard.codes() == second.codes() == {"PPG101"}
    rows = read_csv(logger.log_dir)
    ours = {r["step"]: r["ppo_guard/actor/grad_norm"] for r in rows if "ppo_guard/actor/grad_norm" in r}
    theirs = {r["step"]: r["guard2/actor/grad_norm"] for r in rows if "guard2/actor/grad_norm" in r}
    assert ours and ours == theirs
    assert len({cb.state_key for cb in (monitor, guard, second)}) == 3


def test_two_monitors_sharing_a_prefix_are_told_to_take_their_own():
    with pytest.warns(PPOGuardWarning, match=r"2 PPOMonitor/PPOGuard callbacks log under the same prefix"):
        fit(CartPolePPO(_cfg(1)), [PPOMonitor(), PPOGuard()], quiet=False)


def test_one_update_per_rollout_without_rollout_ids_is_no_frozen_policy():
    """PPO with 1 epoch x 1 minibatch (each rollout's only update sees a ratio of exactly 1), automatic optimization,
    the minimal observe (no rollout ids: windows of observes): a healthy run that learns, once named PPG301 ("take
    larger steps") at step ~150. A denser cadence (1 step in 4) makes the windows close within the fit."""
    guard = PPOGuard(measure_every_n_steps=4)
    module = CartPolePPOAuto(_cfg(200, observe="minimal", update_epochs=1, num_minibatches=1))
    fit(module, [guard])
    assert guard.findings == [], guard.summary()
    assert [n["rule"] for n in guard.notices] == ["rollout="]
    recent = module.recent_returns[-20:]
    assert sum(recent) / len(recent) > 60  # it learns (from ~20)


@pytest.mark.parametrize("raw", [False, True])
def test_a_step_lightning_does_not_announce_is_measured_through_the_optimizer_pre_hook(raw, tmp_path):
    """The snapshot before a measured step is taken in ``on_before_optimizer_step`` where Lightning announces the
    step; each optimizer's step pre-hook is removed at its first announcement. Optimizers taken unwrapped
    (``self.optimizers(use_pl_optimizer=False)``) and stepped by hand are never announced: their pre-hooks stay and
    snapshot there. Either way every step is counted and the actor's exact update is measured (and logged)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from tests.zoo import styles

    module, kwargs = (styles.raw_optimizers if raw else styles.two_optimizers)(0)
    guard = PPOGuard(actors="policy_model", critic="value_model", verbose=False)
    hooked: list[bool] = []

    class PreHooks(Callback):  # listed before the guard: its on_train_end runs while the fit is still attached
        def on_train_end(self, trainer, pl_module):
            fit_state = guard.engine.fit
            assert fit_state is not None
            hooked.extend(fit_state.steppings[id(opt)].pre_hook is not None for opt in trainer.optimizers)

    trainer = L.Trainer(**kwargs, enable_checkpointing=False, logger=CSVLogger(tmp_path),
                        callbacks=[PreHooks(), guard])
    trainer.fit(module)
    assert hooked == [raw, raw]
    assert guard.findings == [] and guard.optimizer_steps == 2 * module.cfg.iterations * module.cfg.steps_per_rollout
    updates = [r["ppo_guard/actor/update_ratio"] for r in guard_rows(read_csv(trainer.log_dir), metric="update_ratio")]
    assert len(updates) >= module.cfg.iterations - 1 and all(1e-5 < u < 1e-1 for u in updates), updates
