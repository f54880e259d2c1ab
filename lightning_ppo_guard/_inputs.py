"""What ``observe()`` is handed, checked once where it enters, with the messages users read.

:class:`PolicyTerm` is the one record of a minibatch's policy term: built and validated by
:func:`~lightning_ppo_guard.observe` (or :meth:`PPOMonitor.observe`), then passed unchanged to every attached
monitor, to the statistics and to the rules. Its fields are the accepted inputs, declared in one place
(as TorchRL's loss modules declare their input keys).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, TransformedDistribution

from lightning_ppo_guard.functional import flat, policy_vector, sequence_stats

__all__ = ["PolicyTerm", "as_number"]


def as_number(name: str, value: Any, *, positive: bool = True, where: str = "observe()") -> float:
    """``value`` as a float: any real number type (int, float, numpy scalar, 0-d or one-element tensor)."""
    if type(value) is float or type(value) is int:  # the common case, without the ABC check below
        number = float(value)
    elif isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"{where}: {name} must be a number, got a tensor of shape {tuple(value.shape)}.")
        number = float(value.item())
    elif not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} ({value!r}).")
    else:
        number = float(value)
    if positive and not (math.isfinite(number) and number > 0):
        raise ValueError(f"{where}: {name} must be a positive number, got {value!r}.")
    return number


def _logp(name: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"observe(): {name} must be a torch.Tensor of log-probabilities, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(
            f"observe(): {name} has dtype {t.dtype}; log-probabilities are floating point. "
            "Pass dist.log_prob(actions), not the actions or their indices."
        )
    return t


def _per_sample(name: str, t: Any, like: Tensor, *, components: bool = False) -> Tensor | None:
    """An optional per-sample tensor (``components``: or per sample and component, as a Gaussian's entropy)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"observe(): {name} must be a torch.Tensor or None, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"observe(): {name} has dtype {t.dtype}; pass floating-point values (e.g. .float()).")
    if t.device != like.device:
        raise ValueError(f"observe(): {name} is on {t.device} but new_logp is on {like.device}; move it first.")
    n = like.numel()
    if t.numel() != n and not (components and n and t.numel() % n == 0):
        raise ValueError(
            f"observe(): {name} has shape {tuple(t.shape)} ({t.numel()} values) but new_logp has shape "
            f"{tuple(like.shape)}; pass one value per sample of the minibatch."
        )
    return t


def _valid_actions(mask: Any, new_logp: Tensor) -> Tensor:
    """Per-sample number of valid actions of an action mask (one row per log-prob), on the device, no sync."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"observe(): action_mask must be a torch.Tensor of booleans, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(f"observe(): action_mask has dtype {mask.dtype}; pass booleans (True = valid action), "
                        "e.g. mask.bool().")
    if mask.dim() < 1 or mask.shape[:-1].numel() != new_logp.numel():
        raise ValueError(
            f"observe(): action_mask has shape {tuple(mask.shape)}; pass one row of num_actions booleans per "
            f"log-prob (new_logp has shape {tuple(new_logp.shape)})."
        )
    return mask.reshape(-1, mask.shape[-1]).sum(-1)


def _token_mask(mask: Any, like: Tensor) -> Tensor:
    """A response mask: booleans (or 0/1 numbers) of ``like``'s shape, True on the tokens the loss trains on."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"observe(): mask must be a torch.Tensor of booleans (True on response tokens), got "
                        f"{type(mask).__name__}.")
    if mask.dtype != torch.bool:
        if (mask.is_floating_point() or mask.is_complex()) and mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("observe(): mask holds values other than 0 and 1; pass the response mask itself "
                             "(True/1 on the tokens the loss averages over), not per-token weights.")
        mask = mask != 0
    if mask.shape != like.shape:
        raise ValueError(
            f"observe(): mask has shape {tuple(mask.shape)} but new_logp has shape {tuple(like.shape)}; pass the "
            "per-token log-probs (batch, tokens) and the response mask of the same shape (True on response tokens)."
        )
    if mask.device != like.device:
        raise ValueError(f"observe(): mask is on {mask.device} but new_logp is on {like.device}; move it first.")
    return mask


class _Valid:
    """The mask's valid tokens as flat indices, found once per ``observe`` and shared by every tensor read there
    (a boolean index finds them again for each tensor)."""

    __slots__ = ("_index", "_rows", "mask")

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask
        self._index: Tensor | None = None
        self._rows: Tensor | None = None

    @property
    def index(self) -> Tensor:
        if self._index is None:
            self._index = self.mask.reshape(-1).nonzero().squeeze(1)
        return self._index

    @property
    def rows(self) -> Tensor:
        """The sequence of each valid token."""
        if self._rows is None:
            self._rows = torch.div(self.index, max(self.mask[0].numel(), 1), rounding_mode="floor")
        return self._rows


def _tokens(name: str, t: Any, valid: _Valid) -> Tensor | None:
    """A per-token tensor (or one value per sequence, spread over its tokens) at the mask's valid tokens. A tensor
    the loss trains through is indexed by the mask itself (its gradient is read there: ``graph.watch_gradient``
    knows that selection); a detached one is gathered at the shared indices."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"observe(): {name} must be a torch.Tensor or None, got {type(t).__name__}.")
    mask = valid.mask
    if t.shape == mask.shape:
        return t[mask] if t.requires_grad else t.reshape(-1).index_select(0, valid.index)
    if mask.dim() >= 2 and t.numel() == mask.shape[0]:  # one value per sequence (GRPO's advantages): every token
        if not t.requires_grad:
            return t.reshape(-1).index_select(0, valid.rows)
        return t.reshape(mask.shape[0], *([1] * (mask.dim() - 1))).expand(mask.shape)[mask]
    raise ValueError(
        f"observe(): {name} has shape {tuple(t.shape)} but mask has shape {tuple(mask.shape)}; with mask= pass "
        f"{name} per token (the mask's shape) or one value per sequence ({mask.shape[0]} values)."
    )


def _sequence_mean(t: Tensor, mask: Tensor) -> Tensor | None:
    """One value per sequence: a per-token tensor's mean over each sequence's valid tokens (a per-sequence one as
    is)."""
    if t.numel() == mask.shape[0]:
        return t.detach().reshape(-1)
    if t.shape != mask.shape:
        return None
    m = mask.reshape(mask.shape[0], -1).float()
    return (t.detach().reshape(mask.shape[0], -1).float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def _per_sequence(name: str, t: Any, like: Tensor) -> Tensor | None:
    """``rewards`` / ``group``: one value per sequence (per sample without a mask), on new_logp's device."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"observe(): {name} must be a torch.Tensor (one value per sequence) or None, got "
                        f"{type(t).__name__}.")
    if t.device != like.device:
        raise ValueError(f"observe(): {name} is on {t.device} but new_logp is on {like.device}; move it first.")
    if t.dim() > 1 and t.shape[1:].numel() != 1:
        raise ValueError(f"observe(): {name} has shape {tuple(t.shape)}; pass one value per sequence (B,).")
    return t.reshape(-1)


@dataclass(frozen=True, slots=True)
class PolicyTerm:
    """One minibatch of the PPO policy term, as ``observe`` received it (see :func:`~lightning_ppo_guard.observe`
    for the meaning of each field). Construct it with :meth:`build`, which checks every field once.

    Only ``new_logp`` and ``old_logp`` are required. The tensors are the caller's live ones: a monitor reads
    them under ``torch.no_grad()`` during the call and keeps nothing but detached statistics.
    """

    new_logp: Tensor
    old_logp: Tensor
    advantages: Tensor | None = None
    clip_eps: float | None = None
    dist: Distribution | None = None
    entropy: Tensor | None = None
    num_actions: int | Tensor | None = None
    values: Tensor | None = None
    returns: Tensor | None = None
    rollout: int | None = None
    target_kl: float | None = None
    role: str = "actor"
    log_ratio: Tensor | None = None  # the loss's own new_logp - old_logp (then new_logp is that tensor, if not given)
    ref_logp: Tensor | None = None  # a frozen reference model's log-probs of the same tokens (LM RL)
    rewards: Tensor | None = None  # one per sequence
    group: Tensor | None = None  # one group id per sequence (GRPO: the prompt's samples share one)
    seq_adv: Tensor | None = None  # one advantage per sequence (the mean over its tokens), aligned with rewards
    token_mask: Tensor | None = None  # mask= as handed over (the tensors above are its valid tokens already)

    @classmethod
    def build(
        cls,
        *,
        new_logp: Tensor | None,
        old_logp: Tensor,
        log_ratio: Tensor | None = None,
        advantages: Tensor | None = None,
        clip_eps: Any = None,
        dist: Distribution | None = None,
        entropy: Tensor | None = None,
        num_actions: int | Tensor | None = None,
        values: Tensor | None = None,
        returns: Tensor | None = None,
        rollout: Any = None,
        target_kl: Any = None,
        role: str = "actor",
        action_mask: Tensor | None = None,
        mask: Tensor | None = None,
        ref_logp: Tensor | None = None,
        rewards: Tensor | None = None,
        group: Tensor | None = None,
    ) -> PolicyTerm:
        """Check every input and normalise numbers (numpy scalars and 0-d tensors become floats/ints).

        Raises:
            TypeError, ValueError: with the argument's name and the fix.
        """
        if log_ratio is not None:
            log_ratio = _logp("log_ratio", log_ratio)
            new_logp = log_ratio if new_logp is None else new_logp  # the tensor the loss uses: hooks, graph
        elif new_logp is None:
            raise TypeError("observe(): pass new_logp (the update's log-probs), or log_ratio (the loss's own "
                            "new_logp - old_logp) where the loss computes the log-probs itself.")
        new_logp, old_logp = _logp("new_logp", new_logp), _logp("old_logp", old_logp)
        if log_ratio is not None and log_ratio.numel() != old_logp.numel():
            raise ValueError(f"observe(): log_ratio has shape {tuple(log_ratio.shape)} but old_logp has shape "
                             f"{tuple(old_logp.shape)}; pass one value per sample of the same minibatch.")
        if new_logp.device != old_logp.device:
            raise ValueError(f"observe(): old_logp is on {old_logp.device} but new_logp on {new_logp.device}.")
        rewards, group = _per_sequence("rewards", rewards, new_logp), _per_sequence("group", group, new_logp)
        if rewards is not None and not rewards.is_floating_point():
            rewards = rewards.float()
        if group is not None and (group.is_floating_point() or group.dtype == torch.bool):
            raise TypeError(f"observe(): group has dtype {group.dtype}; pass integer group ids (one per sequence: "
                            "the index of its prompt).")
        if rewards is not None and group is not None and rewards.numel() != group.numel():
            raise ValueError(f"observe(): rewards has {rewards.numel()} values but group {group.numel()}; pass one "
                             "of each per sequence.")
        token_mask, seq_adv = None, None
        if mask is not None:  # per-token tensors: every statistic and hook at the valid tokens
            token_mask = _token_mask(mask, new_logp)
            if rewards is not None and isinstance(advantages, Tensor) and token_mask.dim() >= 2:
                seq_adv = _sequence_mean(advantages, token_mask)  # one per sequence, beside its reward
            new_logp = new_logp[token_mask]  # the hooks read it at the tensor the loss uses (graph.watch_gradient)
            valid = _Valid(token_mask)
            old_logp = cast(Tensor, _tokens("old_logp", old_logp, valid))
            log_ratio = _tokens("log_ratio", log_ratio, valid)
            advantages, entropy = _tokens("advantages", advantages, valid), _tokens("entropy", entropy, valid)
            values, returns = _tokens("values", values, valid), _tokens("returns", returns, valid)
            ref_logp = _tokens("ref_logp", ref_logp, valid)
            if action_mask is not None:
                action_mask = action_mask[token_mask]
            if isinstance(num_actions, Tensor) and num_actions.shape == token_mask.shape:
                num_actions = num_actions[token_mask]
        elif rewards is not None and isinstance(advantages, Tensor):
            seq_adv = advantages
        if new_logp.numel() != old_logp.numel():
            raise ValueError(
                f"observe(): new_logp has shape {tuple(new_logp.shape)} but old_logp has shape "
                f"{tuple(old_logp.shape)}; they must hold one log-prob per sample of the same minibatch."
            )
        if dist is not None and not isinstance(dist, Distribution):
            inner = getattr(dist, "distribution", None)  # a library's wrapper (SB3's CategoricalDistribution ...)
            if isinstance(inner, Distribution):
                dist = inner
            elif isinstance(inner, (list, tuple)) and inner and all(isinstance(d, Distribution) for d in inner):
                dist = None  # SB3's MultiCategorical: one torch distribution per head; pass entropy= instead
            else:
                raise TypeError(f"observe(): dist must be a torch.distributions.Distribution (or a wrapper holding "
                                f"one as .distribution, as SB3's do), got {type(dist).__name__}.")
        if not isinstance(role, str) or not role:
            raise TypeError(f"observe(): role must be a role name such as 'actor' or 'agent_2', got {role!r}.")
        if action_mask is not None:
            num_actions = _valid_actions(action_mask, new_logp)
        elif num_actions is not None and not isinstance(num_actions, Tensor):
            num_actions = int(as_number("num_actions", num_actions))
        return cls(
            new_logp=new_logp,
            old_logp=old_logp,
            advantages=_per_sample("advantages", advantages, new_logp),
            clip_eps=None if clip_eps is None else as_number("clip_eps", clip_eps),
            dist=dist,
            entropy=_per_sample("entropy", entropy, new_logp, components=True),
            num_actions=num_actions,
            values=_per_sample("values", values, new_logp),
            returns=_per_sample("returns", returns, new_logp),
            rollout=cls.rollout_id(rollout),
            target_kl=None if target_kl is None else as_number("target_kl", target_kl),
            role=role,
            log_ratio=log_ratio,
            ref_logp=None if ref_logp is None else _per_sample("ref_logp", _logp("ref_logp", ref_logp), new_logp),
            rewards=rewards,
            group=group,
            seq_adv=seq_adv if seq_adv is not None and rewards is not None and seq_adv.numel() == rewards.numel()
            else None,
            token_mask=token_mask,
        )

    @staticmethod
    def rollout_id(rollout: Any) -> int | None:
        """``rollout`` as an int (a 0-d integer tensor or numpy integer too); checked on every observe."""
        if rollout is None or type(rollout) is int:
            return rollout
        if isinstance(rollout, Tensor) and rollout.numel() == 1 and not rollout.is_floating_point():
            return int(rollout.item())
        if isinstance(rollout, numbers.Integral) and not isinstance(rollout, bool):
            return int(rollout)
        raise TypeError(f"observe(): rollout must be an int (the PPO iteration number), got {rollout!r}.")

    @property
    def empty(self) -> bool:
        return self.new_logp.numel() == 0

    @torch.no_grad()
    def statistics(self, full: bool = True) -> dict[str, Tensor]:
        """The minibatch's statistics by name (:func:`~lightning_ppo_guard.functional.policy_stats`): every one
        the inputs allow, or with ``full=False`` those of the ratio alone (KL, ratio range)."""
        vector, names = self.vector(full)
        return dict(zip(names, vector.unbind(), strict=True))

    @torch.no_grad()
    def vector(self, full: bool = True) -> tuple[Tensor, tuple[str, ...]]:
        """:meth:`statistics` as one vector and the name of each entry
        (:func:`~lightning_ppo_guard.functional.policy_vector`, with the per-sequence statistics after it)."""
        given = self.log_ratio
        log_ratio = flat(given) if given is not None else flat(self.new_logp) - flat(self.old_logp)
        if not full:
            return policy_vector(log_ratio)
        entropy, num_actions = self.entropy_and_actions()
        vector, names = policy_vector(
            log_ratio, clip_eps=self.clip_eps, advantages=self.advantages, values=self.values, returns=self.returns,
            entropy=entropy, num_actions=num_actions, log_std=self.log_std(),
            logp=None if given is self.new_logp else self.new_logp,  # a log-ratio is no log-prob
            ref_logp=self.ref_logp)
        if self.rewards is not None or self.group is not None:
            seq = sequence_stats(self.seq_adv, self.rewards, self.group)
            if seq:
                vector = torch.cat([vector, torch.stack(list(seq.values()))])
                names += tuple(seq)
        return vector, names

    def log_std(self) -> Tensor | None:
        """log of a Gaussian policy's std per sample and dimension, squashed (tanh) or not (None for other
        distributions)."""
        dist = self.dist
        while isinstance(dist, (Independent, TransformedDistribution)):  # TorchRL's TanhNormal, a squashed Gaussian
            dist = dist.base_dist
        if isinstance(dist, Normal):
            return self._at_tokens(dist.scale.detach().log())
        if isinstance(dist, MultivariateNormal):
            return self._at_tokens(dist.scale_tril.detach().diagonal(dim1=-2, dim2=-1).log())
        return None

    def _at_tokens(self, t: Tensor) -> Tensor:
        """A distribution's per-token tensor at the mask's valid tokens (with ``mask=``; else as it is)."""
        m = self.token_mask
        if m is None or t.shape[:m.dim()] != m.shape:
            return t
        return t[m]

    def precision_eps(self) -> float:
        """Machine epsilon of the lowest precision the ratio's log-probs were computed in: new_logp's dtype, the
        autocast dtype when autocast is on where it was computed (read during the ``observe`` call, inside that
        context), or old_logp's dtype (a sampler in bf16 that handed its log-probs over as they are)."""
        device = self.new_logp.device.type
        dtypes = [self.new_logp.dtype, self.old_logp.dtype]
        if torch.is_autocast_enabled(device):
            dtypes.append(torch.get_autocast_dtype(device))
        return max(float(torch.finfo(d).eps) for d in dtypes if d.is_floating_point)

    def entropy_and_actions(self) -> tuple[Tensor | None, int | Tensor | None]:
        """The per-sample entropy (given, else the distribution's) and the number of actions (given, else a
        categorical distribution's), for ``entropy`` and ``entropy_norm``."""
        entropy, n_actions = self.entropy, self.num_actions
        if entropy is None and self.dist is not None:
            try:
                entropy = self._at_tokens(self.dist.entropy())
            except NotImplementedError:
                entropy = None
        if n_actions is None and self.dist is not None and getattr(self.dist, "_num_events", None) is not None:
            n_actions = int(self.dist.param_shape[-1])  # type: ignore[attr-defined]  # a Categorical
        return entropy, n_actions
