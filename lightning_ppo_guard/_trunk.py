"""How much gradient each head sends into a shared trunk, measured from hooks (no extra backward).

A trunk's output ``h`` feeds the actor's head and the critic's head; its gradient is the sum of what each head's
loss term sends back. To tell the two apart, the head's forward pre-hook replaces its input ``h`` by a view of it
(``h.view_as(h)``, a new autograd node that costs no copy) and hooks the view's gradient: that gradient is the
head's contribution alone. Only on measured steps (the monitor's cadence arms the probe), only in training forwards
with grad enabled.

A head input counts as the trunk's output when it is that very tensor, or one op away from it (an activation or a
flatten applied between trunk and head). Anything else is not measured: the logged numbers are then absent, never 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["TrunkProbe"]

POLICY, VALUE = 0, 1


class TrunkProbe:
    """Per head kind (policy, value), the squared L2 norm of the gradient its input got from the trunk.

    Args:
        trunk: the shared role's modules (their outputs are the trunk's output).
        heads: ``(POLICY | VALUE, module)`` for every module of the actor and critic roles.
        armed: whether the coming optimizer step is measured (read at each forward).
        device: where the sums live.
    """

    def __init__(self, trunk: Sequence[nn.Module], heads: Sequence[tuple[int, nn.Module]],
                 armed: Callable[[], bool], device: torch.device) -> None:
        self.armed = armed
        self.sq = torch.zeros(2, device=device)
        self.hits = [0, 0]  # host counts of hooked head gradients since the last read
        self._outs: deque[Any] = deque(maxlen=8)  # the autograd nodes of the trunk's last outputs
        self._trunk, self._heads = list(trunk), list(heads)
        self._handles: list[RemovableHandle] = []
        self.hook(True)

    def hook(self, on: bool) -> None:
        """Register the module hooks (``on``) or remove them. The monitor keeps them only around measured steps,
        so the many forwards of rollout collection call nothing."""
        if on and not self._handles:
            self._handles = [m.register_forward_hook(self._trunk_out) for m in self._trunk]
            self._handles += [m.register_forward_pre_hook(partial(self._head_in, kind)) for kind, m in self._heads]
        elif not on and self._handles:
            self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _trunk_out(self, module: nn.Module, args: Any, out: Any) -> None:
        # The node, not the tensor: the output tensor itself may be gone once an op between trunk and head ran.
        out = _hidden(out)
        if isinstance(out, Tensor) and out.grad_fn is not None and torch.is_grad_enabled() and self.armed():
            self._outs.append(out.grad_fn)

    def _from_trunk(self, x: Tensor) -> bool:
        fn = x.grad_fn
        if fn is None:
            return False
        if any(node is fn for node in self._outs):
            return True
        return any(nxt is node for nxt, _ in fn.next_functions for node in self._outs)

    def _head_in(self, kind: int, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self._outs or not args or not isinstance(args[0], Tensor) or not args[0].requires_grad:
            return None
        x = args[0]
        if not self._from_trunk(x):
            return None
        alias = x.view_as(x)
        alias.register_hook(partial(self._grad, kind))
        return (alias, *args[1:])

    def _grad(self, kind: int, grad: Tensor) -> None:
        with torch.no_grad():
            self.sq[kind] += torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        self.hits[kind] += 1

    def read(self) -> tuple[Tensor, bool]:
        """The (policy, value) gradient norms since the last read (on the device), and whether both heads were
        measured; then start afresh."""
        both = self.hits[POLICY] > 0 and self.hits[VALUE] > 0
        norms = self.sq.sqrt()
        self.sq.zero_()
        self.hits = [0, 0]
        self._outs.clear()
        return norms, both


def _hidden(out: Any) -> Any:
    """A trunk's output tensor: the tensor itself, or the hidden states of a structured output (a Hugging Face
    ``ModelOutput``'s ``last_hidden_state``, else its first tensor; a tuple's first tensor)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        first = out.get("last_hidden_state")
        return first if isinstance(first, Tensor) else next((v for v in out.values() if isinstance(v, Tensor)), None)
    if isinstance(out, (tuple, list)):
        return next((v for v in out if isinstance(v, Tensor)), None)
    return None
