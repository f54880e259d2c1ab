"""Bad input to observe(): a clear error or warning naming the fix, or a finding; never a crash of a healthy run."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import lightning_ppo_guard.reference.cartpole as cartpole
from lightning_ppo_guard import PPOGuard, PPOGuardWarning, observe
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

from .conftest import fit

PER = PPOConfig().update_epochs * PPOConfig().num_minibatches


def _run(monkeypatch, change, guard=None, quiet=True):
    """Fit one rollout of the reference PPO with its observe() arguments changed by ``change``."""

    def patched(pl_module, **kwargs):
        observe(pl_module, **change(dict(kwargs)))

    monkeypatch.setattr(cartpole, "observe", patched)
    cfg = PPOConfig(seed=0)
    cfg.total_timesteps = cfg.batch_size
    guard = guard or PPOGuard()
    fit(CartPolePPO(cfg), [guard], quiet=quiet)
    return guard


def test_integer_logp_is_a_type_error_naming_the_fix(monkeypatch):
    with pytest.raises(TypeError, match=r"dtype torch.int64.*Pass dist.log_prob\(actions\)"):
        _run(monkeypatch, lambda kw: {**kw, "new_logp": torch.zeros(kw["new_logp"].shape, dtype=torch.long)})


def test_not_a_tensor(monkeypatch):
    with pytest.raises(TypeError, match=r"old_logp must be a torch\.Tensor"):
        _run(monkeypatch, lambda kw: {**kw, "old_logp": kw["old_logp"].tolist()})


def test_mismatched_lengths_are_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match=r"advantages has shape \(\d+,\) .* one value per sample"):
        _run(monkeypatch, lambda kw: {**kw, "advantages": kw["advantages"][:-1]})


def _broadcasting_loss(monkeypatch, which):
    """The reference loss with ``which`` ("advantages" or "values") made (B, 1) inside it: a real broadcast."""
    original = cartpole.ppo_objective

    def objective(cfg, logratio, advantages, values, old_values, returns, entropy, **kw):
        if which == "advantages":
            advantages = advantages.unsqueeze(-1)  # (B, 1) * (B,) ratio: the surrogate is (B, B)
        else:
            values, old_values = values.unsqueeze(-1), old_values.unsqueeze(-1)  # (B, 1) - (B,) returns
        return original(cfg, logratio, advantages, values, old_values, returns, entropy, **kw)

    monkeypatch.setattr(cartpole, "ppo_objective", objective)


def test_a_policy_loss_that_broadcasts_is_named_from_its_gradient(monkeypatch):
    _broadcasting_loss(monkeypatch, "advantages")
    guard = _run(monkeypatch, lambda kw: kw)  # observe gets the (B, 1) advantages the loss used
    found = [f for f in guard.findings if f.code == "PPG104"]
    assert found, guard.findings
    evidence = found[0].evidence
    (b,) = evidence["other_shape"]
    assert evidence["broadcast"] == (b, b) and evidence["shape"] == (b, 1)
    assert (evidence["name"], evidence["other"]) == ("advantages", "new_logp")
    assert evidence["shared"] > 0.9 > evidence["own"], evidence  # each sample's gradient: the mean advantage's


def test_shapes_that_could_broadcast_are_no_finding_when_the_loss_does_not(monkeypatch):
    """TorchRL's convention: advantages (B, 1) beside (B,) log-probs, the loss unsqueezing its log-ratio. Shapes alone
    are no evidence: the gradient follows each sample's own advantage, so nothing is named (and nothing is blind)."""
    guard = _run(monkeypatch, lambda kw: {**kw, "advantages": kw["advantages"].unsqueeze(-1)})
    assert guard.findings == [] and guard.notices == [], guard.summary()


def test_shapes_that_could_broadcast_without_advantages_say_they_cannot_tell(monkeypatch):
    with pytest.warns(PPOGuardWarning, match=r"cannot tell \[PPG104, actor"):
        guard = _run(monkeypatch, lambda kw: {**kw, "advantages": None, "old_logp": kw["old_logp"].unsqueeze(-1)},
                     quiet=False)
    assert guard.findings == [] and [n["rule"] for n in guard.notices] == ["PPG104"], guard.summary()
    assert "advantages=" in guard.notices[0]["message"] and "cannot tell [PPG104" in guard.summary()


def test_value_shapes_that_never_meet_the_log_probs_are_no_finding(monkeypatch):
    """values and returns both (B, 1) with log-probs (B,): the value loss pairs them with each other only."""
    guard = _run(monkeypatch, lambda kw: {**kw, "values": kw["values"].unsqueeze(-1),
                                          "returns": kw["returns"].unsqueeze(-1)})
    assert guard.findings == [], guard.summary()


def test_values_and_returns_that_broadcast_together_are_a_finding(monkeypatch):
    _broadcasting_loss(monkeypatch, "values")
    guard = _run(monkeypatch, lambda kw: {**kw, "values": kw["values"].unsqueeze(-1)})  # (B, 1) as the loss's
    found = [f for f in guard.findings if f.code == "PPG104"]
    assert found and (found[0].evidence["name"], found[0].evidence["other"]) == ("values", "returns"), guard.findings


def test_values_of_another_shape_than_returns_in_observe_only_are_no_finding(monkeypatch):
    guard = _run(monkeypatch, lambda kw: {**kw, "values": kw["values"].unsqueeze(-1)})
    assert guard.findings == [] and guard.notices == [], guard.summary()


def test_empty_tensors_warn_and_are_skipped(monkeypatch):
    with pytest.warns(PPOGuardWarning, match="empty"):
        guard = _run(monkeypatch, lambda kw: {**kw, "new_logp": kw["new_logp"][:0], "old_logp": kw["old_logp"][:0],
                                              "advantages": None, "values": None, "returns": None, "entropy": None},
                     quiet=False)
    assert guard.observes == 0 and guard.optimizer_steps == PER


def test_nan_logp_is_a_finding_not_a_crash(monkeypatch):
    def nan(kw):
        old = kw["old_logp"].clone()
        old[0] = float("nan")
        return {**kw, "old_logp": old}

    guard = _run(monkeypatch, nan)
    assert "PPG902" in guard.codes() and guard.optimizer_steps == PER


def test_unknown_role_lists_the_roles(monkeypatch):
    with pytest.raises(ValueError, match=r"no actor role has that name; the actor roles are \['actor'\]"):
        _run(monkeypatch, lambda kw: {**kw, "role": "agent_7"})


def test_bad_clip_eps_and_dist(monkeypatch):
    with pytest.raises(ValueError, match="clip_eps must be a positive number"):
        _run(monkeypatch, lambda kw: {**kw, "clip_eps": -0.2})
    with pytest.raises(TypeError, match=r"dist must be a torch\.distributions\.Distribution"):
        _run(monkeypatch, lambda kw: {**kw, "dist": "categorical"})


def test_frozen_actor_is_a_finding_not_a_crash():
    cfg = PPOConfig(seed=0)
    cfg.total_timesteps = cfg.batch_size
    module = CartPolePPO(cfg)
    module.actor.requires_grad_(False)
    guard = PPOGuard()
    fit(module, [guard])
    assert guard.codes() == {"PPG005"}


# ----------------------------------------------------------------------------- issue 4: hard inputs


def _one_rollout(module_cls=CartPolePPO, **cfg_kw):
    cfg = PPOConfig(seed=0, **cfg_kw)
    cfg.total_timesteps = cfg.batch_size
    return module_cls(cfg)


def test_partly_frozen_actor_is_no_finding():
    module = _one_rollout()
    module.actor.net[0].requires_grad_(False)  # a frozen input layer (transfer learning): the rest learns
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1)
    fit(module, [guard])
    assert guard.findings == [], guard.summary()
    assert len(guard.roles[0].frozen) == 2 and guard.bindings["actor"].fraction == 1.0


def test_empty_or_parameterless_roles_fail_at_fit_start():
    with pytest.raises(ValueError, match="No actor role was given"):
        fit(_one_rollout(), [PPOGuard(actors=[])])
    with pytest.raises(ValueError, match=r"'actor\.net\.1' has no parameters at all"):
        fit(_one_rollout(), [PPOGuard(actors="actor.net.1")])  # a Tanh


def test_half_precision_logp_is_measured_in_float32(monkeypatch):
    guard = _run(monkeypatch, lambda kw: {**kw, "new_logp": kw["new_logp"].half(), "old_logp": kw["old_logp"].half()},
                 guard=PPOGuard(dense_steps=PER))
    assert guard.findings == [] and guard.observes == PER


def test_integer_advantages_are_a_type_error(monkeypatch):
    with pytest.raises(TypeError, match=r"advantages has dtype torch.int64; pass floating-point values"):
        _run(monkeypatch, lambda kw: {**kw, "advantages": kw["advantages"].long()})


def test_inf_logp_is_a_finding_not_a_crash(monkeypatch):
    def inf(kw):
        old = kw["old_logp"].clone()
        old[-1] = -float("inf")  # log of a zero probability
        return {**kw, "old_logp": old}

    guard = _run(monkeypatch, inf)
    assert guard.codes() == {"PPG902"} and guard.optimizer_steps == PER


class _NaNGradAtLastStep(CartPolePPO):
    def on_after_backward(self):
        if self.trainer.global_step == PER - 1:  # the last step: no forward pass follows the NaN weights
            self.actor.net[0].weight.grad[0, 0] = float("nan")


def test_nan_gradient_is_a_finding_not_a_crash():
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1)
    fit(_one_rollout(_NaNGradAtLastStep), [guard])
    assert guard.codes() == {"PPG901"}
    # the NaN reaches every actor tensor through the shared clip coefficient
    assert guard.findings[0].step == PER - 1 and guard.findings[0].evidence["tensors"] >= 1


class _Tracked(CartPolePPO):
    """Keeps weak references to every tensor handed to observe(), and checks at each batch end that those of
    earlier batches are gone: the guard keeps neither the graph nor the minibatch."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.refs, self.leaks, self.live, self.queued = [], [], [], []

    def ppo_losses(self, mb, rollout):
        self.refs += [weakref.ref(t) for t in mb.values()]
        return super().ppo_losses(mb, rollout)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        gc.collect()
        self.leaks.append(sum(r() is not None for r in self.refs))
        self.refs = []
        self.live.append(sum(isinstance(o, torch.Tensor) for o in gc.get_objects()))
        guard = next(cb for cb in self.trainer.callbacks if isinstance(cb, PPOGuard))
        self.queued.append(len(guard.engine.fit.rows.queued))


def test_memory_stays_flat_no_batch_or_graph_is_retained():
    cfg = PPOConfig(seed=0)
    cfg.total_timesteps = 12 * cfg.batch_size
    module = _Tracked(cfg)
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1)
    fit(module, [guard])
    assert module.leaks == [0] * 12  # every minibatch tensor of the batch is freed by its end
    # The number of live tensors does not grow with the run: the guard's only per-step state is its bounded
    # queue of measurement vectors (folded into the statistics at each row, or at 256 entries), so the peak
    # of the second half is the peak of the first.
    assert max(module.live[6:]) <= max(module.live[1:6]) + 4, module.live
    assert max(module.queued) <= 256


def test_numbers_of_any_numeric_type_are_taken(monkeypatch):
    """clip_eps and target_kl as numpy scalars or 0-d tensors (what a config or a tensor op hands over)."""
    import numpy as np

    guard = _run(monkeypatch, lambda kw: {**kw, "clip_eps": np.float32(0.2), "target_kl": torch.tensor(0.5),
                                          "rollout": torch.tensor(kw["rollout"])})
    assert guard.findings == [] and guard.observes > 0
    with pytest.raises(TypeError, match=r"clip_eps must be a number, got str"):
        _run(monkeypatch, lambda kw: {**kw, "clip_eps": "0.2"})
    with pytest.raises(TypeError, match=r"rollout must be an int"):
        _run(monkeypatch, lambda kw: {**kw, "rollout": 1.5})


def test_ignore_holds_codes_or_symbols_only():
    with pytest.raises(TypeError, match=r"ignore must hold codes or symbols"):
        PPOGuard(ignore=[None])  # type: ignore[list-item]
    assert PPOGuard(ignore="logp-by-hand").ignore == {"PPG106"}


def test_observe_outside_training_or_under_no_grad_is_ignored(monkeypatch):
    """A loss helper reached from validation, or a no-grad evaluation pass: never trained on, so never read."""

    calls = {"n": 0}

    def patched(pl_module, **kwargs):
        calls["n"] += 1
        with torch.no_grad():
            observe(pl_module, **kwargs)  # ignored: counted by no monitor
        observe(pl_module, **kwargs)

    monkeypatch.setattr(cartpole, "observe", patched)
    cfg = PPOConfig(seed=0)
    cfg.total_timesteps = cfg.batch_size
    guard = PPOGuard(dense_steps=PER)  # every observe kept, to count them
    fit(CartPolePPO(cfg), [guard])
    assert calls["n"] == PER and guard.observes == PER and guard.findings == []


def test_without_gymnasium_the_package_imports_and_the_demo_names_its_extra():
    """gymnasium is the ``demo`` extra: the package and its reference modules import without it, and building
    the environment says which extra to install (a fresh interpreter with the import blocked)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['gymnasium'] = None\n"
        "import lightning_ppo_guard, lightning_ppo_guard.reference as r\n"
        "try:\n"
        "    r.CartPolePPO(r.PPOConfig(num_envs=2)).setup('fit')\n"
        "    r._common.VecCartPole(2, 0)\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
        "else:\n"
        "    print('NO ERROR')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and 'pip install "lightning_ppo_guard[demo]"' in out.stdout, out.stdout
