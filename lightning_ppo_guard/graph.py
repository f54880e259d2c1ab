"""Inspect the live autograd graph of ``new_logp`` without running backward.

The walk follows ``grad_fn.next_functions`` down to the ``AccumulateGrad`` leaves, whose ``variable`` is the
parameter a backward would write. It reads node names and leaf identities only: no tensor data is touched
and no graph is kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["logp_by_hand", "reached_leaves", "watch_gradient"]

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


# ---------------------------------------------------------------------------------------------- gradient reads
Part = Callable[[Tensor], Tensor]

#: Ops whose output is a selection or a copy of their input's elements: a hook reads the gradient of the input (the
#: tensor the loss uses) and takes the selected elements. Indexing (``t[mask]``, ``t[idx]``), ``masked_select``,
#: copies (``clone``, ``.to(dtype)``, ``contiguous``) and reshapes (``flatten``, ``view``) on the way to them.
_COPY_OPS = ("CloneBackward0", "ToCopyBackward0", "AliasBackward0")
_RESHAPE_OPS = ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0")
_MAX_CHAIN = 8


def _same(grad: Tensor) -> Tensor:
    return grad


def _view_part(tensor: Tensor) -> tuple[Tensor, Part] | None:
    """A view (``t[:, i]``, a reshape, a transpose) gets no gradient of its own when the loss uses the whole tensor,
    so it is read at its base, whose gradient always comes; its part is the same view of that gradient."""
    base = tensor._base
    if base is None or not base.requires_grad:
        return None
    size, stride, offset = tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset() - base.storage_offset()
    base_shape, base_stride = tuple(base.shape), tuple(base.stride())

    def part(grad: Tensor) -> Tensor:
        if tuple(grad.stride()) != base_stride:  # lay the gradient out as the base is, so the view's strides apply
            grad = torch.empty_strided(base_shape, base_stride, dtype=grad.dtype, device=grad.device).copy_(grad)
        return grad.as_strided(size, stride, grad.storage_offset() + offset)

    return base, part


def _step(node: Any, out_shape: tuple[int, ...]) -> tuple[Part, tuple[int, ...]] | None:
    """For a selection/copy node: the same selection applied to its input's gradient, and its input's shape."""
    name = type(node).__name__
    if name == "IndexBackward0":
        index = tuple(slice(None) if i is None else i.detach() for i in node._saved_indices)
        return (lambda g: g[index]), tuple(node._saved_self_sym_sizes)
    if name == "MaskedSelectBackward0":
        mask = node._saved_mask.detach()
        return (lambda g: g.masked_select(mask)), tuple(node._saved_self.shape)
    if name in _COPY_OPS:
        return _same, out_shape
    if name in _RESHAPE_OPS:
        return (lambda g: g.reshape(out_shape)), tuple(node._saved_self_sym_sizes)
    return None


def _compose(parts: list[Part]) -> Part:
    def part(grad: Tensor) -> Tensor:
        for f in reversed(parts):  # the op nearest the source first
            grad = f(grad)
        return grad
    return part


def _at_node(node: Any, slot: int, read: Callable[[Tensor], None]) -> None:
    """Call ``read`` with the gradient ``node`` receives for its output ``slot`` in the coming backward (when any)."""

    def pre(grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = grad_outputs[slot] if slot < len(grad_outputs) else None
        if grad is not None:
            read(grad)

    node.register_prehook(pre)


def _on_gradient(tensor: Tensor, read: Callable[[Tensor], None]) -> None:
    """Call ``read`` with d loss / d ``tensor`` in the coming backward: a pre-hook on the node that made it (what a
    tensor hook on a non-leaf is, without ``Tensor.register_hook``'s Python bookkeeping), or a tensor hook on a leaf."""
    if tensor.grad_fn is None:
        tensor.register_hook(read)
    else:
        _at_node(tensor.grad_fn, tensor.output_nr, read)


def watch_gradient(tensor: Tensor, read: Callable[[Tensor], None]) -> None:
    """Call ``read`` in the coming backward with d loss / d ``tensor``, read where the loss's gradient arrives.

    The tensor handed to ``observe`` is often not the one the loss uses but a view of it (``new_logp[:, i]``) or a
    selection or copy (``new_logp[mask]``, ``masked_select``, ``.clone()``, ``.flatten()[mask.flatten()]``): no
    gradient ever reaches such a tensor. A view is read at its base; a selection or copy at the node that made its
    input, whose incoming gradient is that of the tensor the loss uses, and the same selection taken from it. The
    saved indices of the selection are read now (they are freed by the backward). When the loss uses none of
    them, ``read`` is never called (the caller says it cannot tell)."""
    view = _view_part(tensor)
    if view is not None:
        base, part = view
        _on_gradient(base, lambda g: read(part(g)))
        return
    parts: list[Part] = []
    node, slot, shape = tensor.grad_fn, 0, tuple(tensor.shape)
    try:
        while node is not None and len(parts) < _MAX_CHAIN and node.next_functions:
            step = _step(node, shape)
            if step is None:
                break
            parts.append(step[0])
            shape = step[1]
            node, slot = node.next_functions[0]
    except (RuntimeError, AttributeError):  # saved tensors freed (observe after backward), or another torch's nodes
        parts = []
    if not parts or node is None:
        _on_gradient(tensor, read)
        return
    part = _compose(parts)
    _at_node(node, slot, lambda g: read(part(g)))
