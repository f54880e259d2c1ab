"""What the guard costs: whole-fit wall time and per-update-step time, arms alternated, medians printed.

    python benchmarks/overhead.py [--fit-repeats 5] [--step-repeats 5] [--sizes 10k,1M,25M] [--skip-fit]
                                  [--short-fit 10] [--short-dense default,128] [--long 1] [--shared 1] [--peers 0|1|2]

(a) Whole ``Trainer.fit`` of the reference CartPole PPO (default config, env included, a CSVLogger in both
    arms, as a user has), with and without ``PPOGuard()`` at default settings: wall time, and the time spent
    inside the guard's hooks (in a run of its own, so the timing wrappers stay out of the wall-time arms).
    Then a short fit (``--short-fit`` iterations: 400 optimizer steps by default, where the dense start weighs
    most), once per ``dense_steps`` value given. Then (``--shared 1``) CleanRL's shared-trunk PPO with its roles
    auto-detected (actor, critic and the shared trunk, whose heads' gradients are hooked; the probe's module and
    tensor hooks are timed with the guard's). With ``--peers``, first PPO built with the real TorchRL
    (``ClipPPOLoss`` read by ``watch_loss``) and SB3 (``ActorCriticPolicy``) on CartPole and Pendulum.
(b) Per PPO update step (manual optimization: loss, observe, backward, clip, step) on actor-critic MLPs of
    about 10k, 1M and 25M parameters, for these arms:

    none        no callback
    naive       the seed checklist's loop: per-parameter ``.item()`` grad norms and nonzero counts, a clone
                of the actor and a summed |delta| after the step
    grad_norm   Lightning's ``grad_norm`` utility logged with ``log_dict`` (norms only: no update, no KL)
    floor       the memory traffic any exact measurement needs: read the gradients once, copy the actor
                before the step and diff it after (fused foreach ops, no host sync)
    exact       ``PPOGuard(dense_steps=0, measure_every_n_steps=1)``: every step measured and checked
    default     ``PPOGuard()`` after its dense start: without rollout ids, one step in 64 measured (the cheap tier)

Each arm is reported twice: the difference of whole-step medians against ``none`` (what a user feels, but as
noisy as the machine), and the time spent inside the arm's own hooks per step (median over steps, the same
work timed directly: far less noise) as a share of the ``none`` step.

Peak extra memory is the guard's only persistent allocation: the actor snapshot buffers.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.distributions import Categorical

from lightning_ppo_guard import PPOGuard, PPOGuardWarning, observe

warnings.filterwarnings("ignore", category=PPOGuardWarning)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banner lines between the numbers

SIZES = {"10k": (4, 64, 2, 256), "1M": (64, 512, 3, 1024), "25M": (64, 2500, 3, 256)}  # obs, hidden, layers, batch


def mlp(inp: int, hidden: int, layers: int, out: int) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(inp, hidden), nn.Tanh()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.Tanh()]
    mods.append(nn.Linear(hidden, out))
    return nn.Sequential(*mods)


class SyntheticPPO(L.LightningModule):
    """One PPO minibatch update per training_step on fixed random data (no environment)."""

    def __init__(self, obs: int, hidden: int, layers: int, batch: int, steps: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.actor = mlp(obs, hidden, layers, 6)
        self.critic = mlp(obs, hidden, layers, 1)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("x", torch.randn(batch, obs, generator=g))
        self.register_buffer("a", torch.randint(0, 6, (batch,), generator=g))
        self.register_buffer("adv", torch.randn(batch, generator=g))
        self.register_buffer("ret", torch.randn(batch, generator=g))
        with torch.no_grad():
            self.register_buffer("old", Categorical(logits=self.actor(self.x)).log_prob(self.a))
        self.steps = steps

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(range(self.steps), batch_size=None)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-4, eps=1e-5)

    def ppo_loss(self, batch_idx: int) -> torch.Tensor:
        """The clipped PPO loss of the fixed batch, handed to ``observe`` (16 updates per rollout id)."""
        dist = Categorical(logits=self.actor(self.x))
        new_logp = dist.log_prob(self.a)
        ratio = (new_logp - self.old).exp()
        values = self.critic(self.x).squeeze(-1)
        loss = (-torch.min(ratio * self.adv, ratio.clamp(0.8, 1.2) * self.adv).mean()
                + 0.5 * (values - self.ret).pow(2).mean() - 0.01 * dist.entropy().mean())
        observe(self, new_logp=new_logp, old_logp=self.old, advantages=self.adv, clip_eps=0.2, dist=dist,
                values=values, returns=self.ret, rollout=batch_idx // 16)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        loss = self.ppo_loss(batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt.step()


class NaiveChecklist(Callback):
    """The seed checklist's loop, as people paste it."""

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        total, nz = 0.0, 0
        for p in pl_module.actor.parameters():
            if p.grad is not None:
                total += p.grad.data.norm().item()
                nz += (p.grad.data.abs() > 0).sum().item()
        self.old = [p.detach().clone() for p in pl_module.actor.parameters()]
        pl_module.log_dict({"dbg/grad": total, "dbg/nz": float(nz)})

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        diff = sum((p.detach() - q).abs().sum().item() for p, q in zip(pl_module.actor.parameters(), self.old,
                                                                      strict=True))
        pl_module.log("dbg/diff", diff)


class LightningGradNorm(Callback):
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


class Floor(Callback):
    """Read the grads once, snapshot the actor before the step and diff after: fused, no sync."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.params = list(pl_module.actor.parameters())
        self.buf = [torch.empty_like(p) for p in self.params]
        opt = trainer.optimizers[0]
        opt.register_step_pre_hook(self._pre)
        opt.register_step_post_hook(self._post)

    def _pre(self, *_: Any) -> None:
        self.gn = torch._foreach_norm([p.grad for p in self.params])
        torch._foreach_copy_(self.buf, self.params)

    def _post(self, *_: Any) -> None:
        torch._foreach_sub_(self.buf, self.params)
        self.dn = torch._foreach_norm(self.buf)


#: The methods of each arm that run per step (timed in place; optimizer hooks are registered from these).
HOOKS = {
    "naive": ("on_before_optimizer_step", "on_train_batch_end"),
    "grad_norm": ("on_before_optimizer_step",),
    "floor": ("_pre", "_post"),
    "exact": ("on_train_batch_start", "on_train_batch_end", "on_after_backward", "on_before_optimizer_step"),
}
#: The optimizer step pre/post hooks: the guard's engine registers its own ``pre_step``/``post_step`` at train
#: start (wrapped on the engine before the fit), the no-op arm its namesakes.
STEP_HOOKS = ("pre_step", "post_step")


def wrap_arm(clock: HookClock, cb: Any, arm: str) -> None:
    """Time the per-step methods of one arm's callback (its Lightning hooks, and its optimizer hooks)."""
    clock.wrap(cb, HOOKS[arm])
    if isinstance(cb, PPOGuard):
        clock.wrap(cb.engine, STEP_HOOKS)
    elif isinstance(cb, NoopHooks):
        clock.wrap(cb, STEP_HOOKS)
#: The guard arms also pay for ``observe()`` itself (finding the guards, checking the inputs, the statistics):
#: the module-level function is timed where the training code calls it.
OBSERVES = {"exact", "default"}
HOOKS["default"] = HOOKS["exact"]


class HookClock:
    """Accumulates wall time spent inside the wrapped methods."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, obj: Any, names: tuple[str, ...]) -> None:
        for name in names:
            method = getattr(obj, name)

            def timed(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.total += time.perf_counter() - t0

            setattr(obj, name, timed)

    def wrap_function(self, namespace: Any, name: str) -> Any:
        """Time ``namespace.name`` (a module-level function); returns a callable that restores it."""
        original = getattr(namespace, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0

        setattr(namespace, name, timed)
        return lambda: setattr(namespace, name, original)


ARMS = {
    "none": lambda: [],
    "naive": lambda: [NaiveChecklist()],
    "grad_norm": lambda: [LightningGradNorm()],
    "floor": lambda: [Floor()],
    "exact": lambda: [PPOGuard(dense_steps=0, measure_every_n_steps=1, verbose=False)],
    "default": lambda: [PPOGuard(dense_steps=0, verbose=False)],
}


def time_steps(size: str, arm: str, steps: int) -> tuple[float, float, int]:
    """Median step time, median time inside the arm's hooks per step, and the arm's extra memory."""
    obs, hidden, layers, batch = SIZES[size]
    torch.manual_seed(0)
    module = SyntheticPPO(obs, hidden, layers, batch, steps)
    callbacks = ARMS[arm]()
    clock = HookClock()
    for cb in callbacks:
        wrap_arm(clock, cb, arm)
    restore = clock.wrap_function(sys.modules[__name__], "observe") if arm in OBSERVES else lambda: None
    timer = _StepTimer(warmup=3, clock=clock)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50,
                        callbacks=[timer, *callbacks, _StepEnd(timer)])
    try:
        trainer.fit(module)
    finally:
        restore()
    extra = max((cb.snapshot_bytes for cb in callbacks if isinstance(cb, PPOGuard)), default=0)
    return timer.per_step(), timer.in_hooks(), extra


class _StepTimer(Callback):
    """Step wall time (batch start to batch end), and hook time between consecutive batch starts. First in the
    callbacks list; ``_StepEnd`` is last, so a step includes every callback's batch-end work (the guard's row)."""

    def __init__(self, warmup: int, clock: HookClock) -> None:
        self.warmup, self.clock, self.times, self.t0 = warmup, clock, [], 0.0
        self.marks: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.marks.append(self.clock.total)
        self.t0 = time.perf_counter()

    def on_train_end(self, *args: Any) -> None:
        self.marks.append(self.clock.total)

    def per_step(self) -> float:
        return statistics.median(self.times[self.warmup:])

    def in_hooks(self) -> float:
        deltas = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return statistics.median(deltas[self.warmup:])


class _StepEnd(Callback):
    def __init__(self, timer: _StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, *args: Any) -> None:
        self.timer.times.append(time.perf_counter() - self.timer.t0)


def bench_steps(sizes: list[str], repeats: int) -> None:
    print("\n(b) per PPO update step: median ms; overhead vs none as [whole-step difference | time in the arm's "
          "hooks]")
    print(f"{'size':>5} {'params':>8} " + " ".join(f"{a:>22}" for a in ARMS) + f" {'extra mem':>10}")
    for size in sizes:
        obs, hidden, layers, _ = SIZES[size]
        nets = (mlp(obs, hidden, layers, 6), mlp(obs, hidden, layers, 1))
        n = sum(p.numel() for net in nets for p in net.parameters())
        steps = 60 if size != "25M" else 14
        samples: dict[str, list[float]] = {a: [] for a in ARMS}
        hooks: dict[str, list[float]] = {a: [] for a in ARMS}
        extra = 0
        for _ in range(repeats):
            for arm in ARMS:  # arms alternated within each repeat
                t, h, e = time_steps(size, arm, steps)
                samples[arm].append(t)
                hooks[arm].append(h)
                extra = max(extra, e)
        base = statistics.median(samples["none"])
        cells = [f"{base * 1e3:8.2f} ms"]
        for arm in list(ARMS)[1:]:
            med, hook = statistics.median(samples[arm]), statistics.median(hooks[arm])
            cells.append(f"{100 * (med / base - 1):+6.1f}% |{100 * hook / base:6.2f}%")
        print(f"{size:>5} {n / 1e6:7.2f}M " + " ".join(f"{c:>22}" for c in cells) + f" {extra / 2**20:8.1f}MB")


class NoopHooks(Callback):
    """The guard's hooks doing nothing: timed with the same wrappers, it gives the timing floor (the wrappers'
    own cost, Lightning's dispatch of one more callback, and ``observe()`` with nothing to reach)."""

    def on_train_start(self, trainer: Any, *args: Any) -> None:
        for opt in trainer.optimizers:
            opt.register_step_pre_hook(lambda *a: self.pre_step(*a))
            opt.register_step_post_hook(lambda *a: self.post_step(*a))

    def on_train_batch_start(self, *args: Any) -> None: ...

    def on_train_batch_end(self, *args: Any) -> None: ...

    def on_after_backward(self, *args: Any) -> None: ...

    def on_before_optimizer_step(self, *args: Any) -> None: ...

    def pre_step(self, *args: Any) -> None: ...

    def post_step(self, *args: Any) -> None: ...


def _reference(iterations: int | None) -> tuple[str, Callable[[], tuple[Any, dict[str, Any]]], Any]:
    """The reference CartPole PPO (actor and critic networks): its label, a maker, and where it calls observe."""
    from lightning_ppo_guard.reference import CartPolePPO, PPOConfig, cartpole, trainer_kwargs

    def make() -> tuple[Any, dict[str, Any]]:
        cfg = PPOConfig(seed=0)
        if iterations is not None:
            cfg.total_timesteps = iterations * cfg.batch_size
        module = CartPolePPO(cfg)
        return module, trainer_kwargs(module)

    return "the reference CartPole PPO", make, cartpole


def _shared_trunk() -> tuple[str, Callable[[], tuple[Any, dict[str, Any]]], Any]:
    """CleanRL's shared-trunk layout on CartPole (auto-detected roles: actor, critic and the shared trunk, whose
    heads' gradients are hooked): its label, a maker, and where it calls observe."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test zoo: tests/zoo (not installed)
    from tests.zoo import cleanrl

    def make() -> tuple[Any, dict[str, Any]]:
        module = cleanrl.CleanRLTrunkPPO(replace(cleanrl.TRUNK, seed=0))
        return module, {**cleanrl.trainer_kwargs(), "enable_progress_bar": False, "enable_model_summary": False}

    return "CleanRL's shared-trunk PPO (roles actor, critic, shared)", make, cleanrl


def _peer(library: str, env: str) -> tuple[str, Callable[[], tuple[Any, dict[str, Any]]], Any]:
    """PPO built with the real TorchRL (ClipPPOLoss read by watch_loss) or SB3 (ActorCriticPolicy), 40 rollouts of
    8 envs x 64 steps, 4 epochs x 4 minibatches: its label, a maker, and where it calls observe."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test zoo: tests/zoo (not installed)
    from tests.zoo import sb3_ppo, torchrl_ppo

    def make() -> tuple[Any, dict[str, Any]]:
        if library == "torchrl":
            module: Any = torchrl_ppo.TorchRLPPO(torchrl_ppo.TorchRLArgs(env=env, iterations=40))
        else:
            module = sb3_ppo.SB3PPO(sb3_ppo.SB3Args(env=env, iterations=40))
        return module, torchrl_ppo.trainer_kwargs(module)

    if library == "torchrl":
        from lightning_ppo_guard.integrations import torchrl as namespace
    else:
        namespace = sb3_ppo  # type: ignore[assignment]
    return f"{library} PPO on {env}", make, namespace


def _seed_mappo(iterations: int) -> tuple[str, Callable[[], tuple[Any, dict[str, Any]]], Any]:
    """The seed's MAPPO (tests/zoo/seed_mappo.py: 3 agents, 40 masked actions, automatic optimization, the minimal
    observe per agent, no rollout ids): its label, a maker, and where it calls observe."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test zoo: tests/zoo (not installed)
    from tests.zoo import seed_mappo

    def make() -> tuple[Any, dict[str, Any]]:
        return seed_mappo.SeedMAPPO(seed_mappo.SeedMAPPOConfig(iterations=iterations)), seed_mappo.trainer_kwargs()

    return f"the seed-like MAPPO, {iterations} rollouts (automatic, no rollout ids)", make, seed_mappo


def bench_fit(repeats: int, workload: tuple[str, Callable[[], tuple[Any, dict[str, Any]]], Any],
              hooks_only: bool = False, **guard_kwargs: Any) -> None:
    from lightning_ppo_guard import diagnostics
    from lightning_ppo_guard._trunk import TrunkProbe

    label, make, namespace = workload

    def run(with_guard: bool, timed_hooks: bool = False, noop: bool = False) -> tuple[float, int, float]:
        L.seed_everything(0, verbose=False)
        module, kwargs = make()
        guard: Callback = NoopHooks() if noop else PPOGuard(verbose=False, **guard_kwargs)
        clock = HookClock()
        restores: list[Callable[[], Any]] = []
        if timed_hooks:  # a run of its own: the wrappers' own cost stays out of the wall-time arms
            wrap_arm(clock, guard, "default")
            restores.append(clock.wrap_function(namespace, "observe"))
            # the trunk probe's module and tensor hooks run inside the model's forward and backward
            restores += [clock.wrap_function(TrunkProbe, name) for name in ("_trunk_out", "_head_in", "_grad")]
            # the tensor hooks that read the policy and entropy terms' signs run inside the backward
            restores.append(clock.wrap_function(diagnostics.GradientSign, "read"))
        logger = CSVLogger(tempfile.mkdtemp(prefix="ppo_guard_bench_"), name="fit")
        trainer = L.Trainer(**kwargs, logger=logger, enable_checkpointing=False,
                            callbacks=[guard] if with_guard else [])
        t0 = time.perf_counter()
        try:
            trainer.fit(module)
        finally:
            for restore in restores:
                restore()
        return time.perf_counter() - t0, trainer.global_step, clock.total

    samples: dict[bool, list[float]] = {False: [], True: []}
    in_hooks: list[float] = []
    floor: list[float] = []
    steps = 0
    own: list[float] = []  # the hooks' time over the rest of the same (timed) fit: no run-to-run noise
    for _ in range(repeats):
        for arm in (False, True) if not hooks_only else ():
            t, steps, _ = run(arm)
            samples[arm].append(t)
        t, steps, total = run(True, timed_hooks=True)
        in_hooks.append(total)
        floor.append(run(True, timed_hooks=True, noop=True)[2])
        own.append(total / (t - total))
    if hooks_only:
        samples = {False: [t - statistics.median(in_hooks)], True: [t]}
    base, guarded = statistics.median(samples[False]), statistics.median(samples[True])
    print(f"(a) whole Trainer.fit of {label} ({steps} optimizer steps, env included, CSVLogger), "
          f"PPOGuard({', '.join(f'{k}={v}' for k, v in guard_kwargs.items())}), median of {repeats} alternated runs:")
    print(f"    without guard {base:7.2f} s   with PPOGuard() {guarded:7.2f} s   overhead "
          f"{100 * (guarded / base - 1):+.2f}%   (runs: {[round(x, 2) for x in samples[False]]} vs "
          f"{[round(x, 2) for x in samples[True]]})")
    hooks, zero = statistics.median(in_hooks), statistics.median(floor)
    print(f"    time inside the guard's hooks: {hooks:.3f} s per fit, {100 * hooks / base:.2f}% of the fit without it; "
          f"the same wrappers around no-op hooks: {zero:.3f} s; net of that floor {hooks - zero:.3f} s, "
          f"{100 * (hooks - zero) / base:.2f}%")
    share = statistics.median(own)
    print(f"    the same, against the rest of the timed fit itself (no run-to-run noise): {100 * share:.2f}% gross, "
          f"{100 * share * (1 - zero / hooks):.2f}% net of the floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-repeats", type=int, default=5)
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--sizes", default="10k,1M,25M")
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--short-fit", type=int, default=10, help="PPO iterations of the short fit (40 optimizer "
                        "steps each; 0 skips it)")
    parser.add_argument("--short-dense", default="default,128", help="dense_steps values to time the short fit with "
                        "('default': the guard's own)")
    parser.add_argument("--long", type=int, default=1, help="time the long reference fit (0 skips it)")
    parser.add_argument("--shared", type=int, default=1, help="also time the shared-trunk fit (0 skips it)")
    parser.add_argument("--peers", type=int, default=0, help="also time the TorchRL and SB3 fits (1), or only them (2)")
    parser.add_argument("--libraries", default="torchrl,sb3", help="which peer libraries --peers times")
    parser.add_argument("--seed-mappo", type=int, default=0, help="time the seed-like MAPPO fit of this many "
                        "rollouts first (0 skips it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for the small MLPs)")
    parser.add_argument("--hooks-only", action="store_true", help="time the guard's hooks only (no wall-time arms)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")
    if args.seed_mappo:
        bench_fit(args.fit_repeats, _seed_mappo(args.seed_mappo), args.hooks_only)
    if args.peers:
        for library in args.libraries.split(","):
            for env in ("CartPole-v1", "Pendulum-v1"):
                bench_fit(args.fit_repeats, _peer(library, env), args.hooks_only)
        if args.peers == 2:
            return
    if not args.skip_fit:
        only = args.hooks_only
        if args.long:
            bench_fit(args.fit_repeats, _reference(None), only)
        for dense in (d for d in args.short_dense.split(",") if args.short_fit):
            kwargs = {} if dense == "default" else {"dense_steps": int(dense)}
            bench_fit(2 * args.fit_repeats + 1, _reference(args.short_fit), only, **kwargs)
        if args.shared:
            bench_fit(args.fit_repeats, _shared_trunk(), only)
    bench_steps([s for s in args.sizes.split(",") if s], args.step_repeats)


if __name__ == "__main__":
    main()
