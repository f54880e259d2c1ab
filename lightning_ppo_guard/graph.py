"""Inspect the live autograd graph of ``new_logp`` without running backward.

The walk follows ``grad_fn.next_functions`` down to the ``AccumulateGrad`` leaves, whose ``variable`` is the
parameter a backward would write. It reads node names and leaf identities only: no tensor data is touched
and no graph is kept.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from torch import Tensor

__all__ = ["logp_by_hand", "reached_leaves"]

_PASS_THROUGH = ("View", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Clone", "ToCopy", "Permute",
                 "Transpose", "Alias", "Unsafe", "Contiguous", "Select", "Slice", "Index", "Gather",
                 "Sum", "Mul", "Cat", "Stack")


def reached_leaves(t: Tensor, targets: frozenset[int], max_nodes: int = 200_000) -> set[int]:
    """Ids of the tensors in ``targets`` that a backward from ``t`` would reach."""
    found: set[int] = set()
    root = t.grad_fn
    if root is None:
        return {id(t)} & targets if t.requires_grad else found
    seen: set[int] = set()
    queue: deque[Any] = deque([root])
    while queue and len(seen) < max_nodes:
        node = queue.popleft()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in targets:
            found.add(id(variable))
            if len(found) == len(targets):
                break
        queue.extend(fn for fn, _ in node.next_functions)
    return found


def _name(node: Any) -> str:
    return type(node).__name__


def _next(node: Any) -> Any:
    children = [fn for fn, _ in node.next_functions if fn is not None]
    return children[0] if children else None


def logp_by_hand(t: Tensor, depth: int = 12) -> str:
    """The graph pattern when ``t`` is ``log`` of gathered/indexed softmax probabilities, else ``""``.

    ``Categorical(logits=...).log_prob`` gathers from ``logits - logsumexp`` (no ``Log`` node on top), and
    ``Categorical(probs=...)`` takes the log before gathering; only the hand-written
    ``torch.log(probs[..., a])`` puts ``Log`` above the gather of a ``Softmax``.
    """
    node = t.grad_fn
    chain: list[str] = []
    # skip the views on top of the result
    while node is not None and _name(node).startswith(("View", "Reshape", "Squeeze", "Unsqueeze", "Clone")):
        chain.append(_name(node))
        node = _next(node)
    if node is None or not _name(node).startswith("LogBackward"):
        return ""
    chain.append(_name(node))
    node = _next(node)
    picked = False
    for _ in range(depth):
        if node is None:
            return ""
        name = _name(node)
        chain.append(name)
        if name.startswith(("Gather", "Index", "Select", "Mul", "Sum")):
            picked = True
        elif name.startswith(("Softmax", "Sigmoid")):
            return " <- ".join(chain) if picked else ""
        elif not name.startswith(_PASS_THROUGH) and not name.startswith("Clamp"):
            return ""
        node = _next(node)
    return ""
