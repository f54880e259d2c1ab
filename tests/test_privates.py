"""No module of the package uses another module's underscore names (issue 20: thin adapters over public APIs).

Read with ``ast`` (no import): a *private use* is ``from m import _name``, ``obj._name`` or
``getattr(obj, "_name")`` where ``obj`` is not ``self``/``cls`` and ``_name`` is not defined in the module that
uses it. Private *modules* (``_plan``, ``_binding``, ...) are the package's own internals: importing their public
names is allowed. Third-party privates are listed below, each with its reason, so a new one is a visible choice.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ppo_guard"

#: Third-party underscore names the package relies on, and why.
THIRD_PARTY = {
    "_foreach_norm": "torch's fused multi-tensor norm (one kernel for all of a role's tensors)",
    "_foreach_copy_": "torch's fused multi-tensor copy (the actor snapshot before a step)",
    "_foreach_sub_": "torch's fused multi-tensor subtract (the update after a step)",
    "_version": "a tensor's in-place version counter (has the gradient been written since the last read)",
    "_base": "a view's base tensor (a slice handed to observe is read at the tensor the loss uses)",
    "_DropoutNd": "torch's base class of every dropout layer (train-mode layers make the ratio noisy)",
    "_BatchNorm": "torch's base class of every batch-norm layer (same)",
    "_saved_indices": "the indices an autograd IndexBackward0 node saved (observe(new_logp[mask]) is read at the "
                      "tensor the loss uses, and its part is the same selection of that gradient)",
    "_saved_mask": "the mask a MaskedSelectBackward0 node saved (same, for masked_select)",
    "_saved_self": "the input a MaskedSelectBackward0 node saved (its shape only)",
    "_saved_self_sym_sizes": "the input shape an index or reshape node saved (same)",
    "_num_events": "set by torch's Categorical alone: is the Distribution a categorical over param_shape[-1]",
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _defined(tree: ast.AST) -> set[str]:
    """Every name a module defines: functions, classes, assigned names and attributes, arguments, imports."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(source: str) -> list[tuple[int, str, str]]:
    """``(line, name, expression)`` of each use of an underscore name the module does not define itself."""
    tree = ast.parse(source)
    own = _defined(tree)
    uses: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            uses += [(node.lineno, a.name, f"from {node.module} import {a.name}") for a in node.names
                     if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                uses.append((node.lineno, node.attr, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value) and node.args[1].value not in own):
            uses.append((node.lineno, node.args[1].value, ast.unparse(node)))
    return uses


def test_the_checker_finds_each_kind_of_private_use():
    source = (
        "from lightning_ppo_guard.monitor import _warn\n"
        "class A:\n"
        "    def f(self, other):\n"
        "        self._mine = other._fit\n"
        "        return getattr(other, '_flight'), self._mine, other._mine\n"
    )
    assert [name for _, name, _ in private_uses(source)] == ["_warn", "_fit", "_flight"]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_uses_another_modules_private_names(path):
    uses = private_uses(path.read_text())
    ours = [(line, expr) for line, name, expr in uses if name not in THIRD_PARTY]
    assert ours == [], f"{path.name} uses underscore names it does not define: {ours}"


def test_every_listed_third_party_private_is_still_used():
    """The allowlist stays exact: a name no longer used leaves it."""
    used = {name for path in _modules() for _, name, _ in private_uses(path.read_text())}
    assert set(THIRD_PARTY) <= used, set(THIRD_PARTY) - used
    assert used <= set(THIRD_PARTY), used - set(THIRD_PARTY)
