"""Which submodules of a LightningModule are actors and which is the critic.

Roles are named by attribute path (``"actor"``, ``"model.policy"``, ``"actors"`` for a ``ModuleList``
giving one role per agent), given as modules, or auto-detected from common names. They are kept by
path and resolved again when the guard refreshes, so an actor re-created after ``configure_optimizers``
is seen as the new module it is (whose tensors the optimizer does not hold).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["ACTOR_NAMES", "CRITIC_NAMES", "Role", "RoleSpec", "actor_role", "resolve_roles"]

RoleSpec = str | nn.Module | Sequence[str | nn.Module] | Mapping[str, str | nn.Module] | None

#: Attribute names tried, in order, when no actor is named.
ACTOR_NAMES = ("actors", "actor", "policies", "policy", "policy_net", "pi")
#: Attribute names tried, in order, when no critic is named.
CRITIC_NAMES = ("critic", "value", "value_net", "value_function", "vf")


@dataclass
class Role:
    """One measured part of the model: an actor (one per agent for MAPPO) or the critic."""

    name: str
    kind: Literal["actor", "critic"]
    path: str
    params: list[nn.Parameter] = field(default_factory=list)
    frozen: list[nn.Parameter] = field(default_factory=list)
    numel: int = 0
    ids: frozenset[int] = frozenset()
    lazy: int = 0  # parameters of lazy modules not materialised yet (measured once their first forward ran)
    exclude: tuple[str, ...] = ()  # paths of more specific roles nested inside this one: their tensors are theirs

    def refresh(self, root: nn.Module) -> bool:
        """Re-read the module at ``path``; return True when its trainable tensors changed."""
        module = root.get_submodule(self.path) if self.path else root
        params: list[nn.Parameter] = []
        frozen: list[nn.Parameter] = []
        lazy = 0
        theirs = {id(p) for path in self.exclude for p in root.get_submodule(path).parameters()}
        for p in module.parameters():
            if id(p) in theirs:
                continue
            if is_lazy(p):
                lazy += 1
            else:
                (params if p.requires_grad else frozen).append(p)
        ids = frozenset(id(p) for p in params)
        changed = ids != self.ids or lazy != self.lazy
        self.params, self.frozen, self.ids, self.lazy = params, frozen, ids, lazy
        self.numel = sum(p.numel() for p in params)
        return changed


def _children_listing(root: nn.Module) -> str:
    rows = [f"  {name}: {type(child).__name__}" for name, child in root.named_children()]
    return "\n".join(rows) if rows else "  (no child modules)"


def _path_of(root: nn.Module, module: nn.Module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError(
        f"The module {type(module).__name__} given as a role is not a submodule of {type(root).__name__}. "
        f"Its children are:\n{_children_listing(root)}"
    )


def _lookup(root: nn.Module, spec: str | nn.Module, what: str) -> tuple[str, nn.Module]:
    if isinstance(spec, nn.Module):
        path = _path_of(root, spec)
        return path, spec
    if not isinstance(spec, str):
        raise TypeError(f"{what} must be an attribute path (str) or an nn.Module, got {type(spec).__name__}.")
    try:
        return spec, root.get_submodule(spec)
    except AttributeError:
        raise ValueError(
            f"{type(root).__name__} has no submodule {spec!r} (the {what}). Its children are:\n"
            f"{_children_listing(root)}\nName the {what} by its attribute path, e.g. "
            f"PPOGuard(actors='model.policy', critic='model.value')."
        ) from None


def _auto(root: nn.Module, names: Sequence[str]) -> str | None:
    """Shallowest submodule whose own attribute name is one of ``names`` (earlier names win ties)."""
    best: tuple[int, int, str] | None = None
    for path, _ in root.named_modules():
        if not path:
            continue
        leaf = path.rsplit(".", 1)[-1]
        if leaf in names:
            key = (path.count("."), names.index(leaf), path)
            if best is None or key < best:
                best = key
    return None if best is None else best[2]


def _layers_not_agents(module: nn.ModuleList) -> bool:
    """A ModuleList that holds one network's layers rather than one network per agent: some entry has no
    parameters (an activation), or every entry is a single layer and they are not all alike (shapes chain)."""
    children = list(module)
    if any(not any(True for _ in c.parameters()) for c in children):
        return True
    if all(not any(True for _ in c.children()) for c in children):
        shapes = {(type(c), tuple(tuple(p.shape) for p in c.parameters())) for c in children}
        return len(shapes) > 1
    return False


def _inside(path: str, parent: str) -> bool:
    """Whether the module at ``path`` is strictly inside the one at ``parent`` ("" is the root)."""
    return path != parent and (parent == "" or path.startswith(parent + "."))


def _expand_actor(path: str, module: nn.Module, name: str | None) -> list[tuple[str, str]]:
    """A ModuleList / ModuleDict of actors gives one role per agent."""
    if isinstance(module, nn.ModuleList):
        if _layers_not_agents(module):
            kinds = ", ".join(type(c).__name__ for c in module)
            raise ValueError(
                f"{path!r} is an nn.ModuleList of layers ({kinds}), not one actor per agent, so it cannot be read "
                f"as MAPPO agents. Name it as one role: PPOGuard(actors={{'actor': {path!r}}}), or hold the layers "
                f"in an nn.Sequential. (For one actor per agent, each entry is a whole network.)"
            )
        return [(f"agent_{i}", f"{path}.{i}") for i in range(len(module))]
    if isinstance(module, nn.ModuleDict):
        return [(str(key), f"{path}.{key}") for key in module]
    return [(name or "actor", path)]


def actor_role(actors: Mapping[str, Role], name: str) -> Role:
    """The actor role ``observe(role=name)`` means ("actor" also names the only actor, whatever it is called)."""
    role = actors.get(name)
    if role is not None:
        return role
    if name == "actor" and len(actors) == 1:
        return next(iter(actors.values()))
    raise ValueError(
        f"observe(role={name!r}): no actor role has that name; the actor roles are {list(actors)}. Pass role= one "
        "of them (MAPPO: one observe per agent)."
    )


def resolve_roles(root: nn.Module, actors: RoleSpec = None, critic: str | nn.Module | None = None) -> list[Role]:
    """Resolve the actor and critic roles of ``root``.

    Raises:
        ValueError: a named role does not exist, or no actor can be found; the message lists the
            module's children and how to name the roles.
    """
    pairs: list[tuple[str, str]] = []
    if actors is None:
        path = _auto(root, ACTOR_NAMES)
        if path is None:
            raise ValueError(
                f"Could not find the actor of {type(root).__name__}: no submodule is called one of "
                f"{', '.join(ACTOR_NAMES)}. Its children are:\n{_children_listing(root)}\n"
                "Name it: PPOGuard(actors='my_policy') (a ModuleList gives one role per agent), or a list/dict "
                "of paths for MAPPO agents."
            )
        pairs = _expand_actor(path, root.get_submodule(path), None)
    elif isinstance(actors, Mapping):
        for name, spec in actors.items():
            path, _ = _lookup(root, spec, f"actor {name!r}")
            pairs.append((str(name), path))
    elif isinstance(actors, (str, nn.Module)):
        path, module = _lookup(root, actors, "actor")
        pairs = _expand_actor(path, module, None)
    elif isinstance(actors, Sequence):
        for i, spec in enumerate(actors):
            path, _ = _lookup(root, spec, f"actor #{i}")
            pairs.append((f"agent_{i}", path))
    else:
        raise TypeError(f"actors must be a path, a module, a list or a dict of them; got {type(actors).__name__}.")

    if critic is None:
        critic_path = _auto(root, CRITIC_NAMES)
    else:
        critic_path, _ = _lookup(root, critic, "critic")
    roles = [Role(name=name, kind="actor", path=path) for name, path in pairs]
    if critic_path is not None:
        roles.append(Role(name="critic", kind="critic", path=critic_path))
    for role in roles:  # a role never holds a tensor a more specific role holds (SB3: the value head in policy)
        role.exclude = tuple(other.path for other in roles
                             if other is not role and _inside(other.path, role.path))

    names = [r.name for r in roles]
    if len(set(names)) != len(names):
        raise ValueError(f"Role names must be unique, got {names}.")
    if not pairs:
        raise ValueError("No actor role was given: pass at least one actor path or module.")
    for role in roles:
        role.refresh(root)
        if not role.params and not role.frozen and not role.lazy:
            raise ValueError(
                f"The {role.kind} role {role.name!r} at {role.path!r} has no parameters at all; "
                f"point the role at the module that holds the {role.kind}'s weights."
            )
    return roles
