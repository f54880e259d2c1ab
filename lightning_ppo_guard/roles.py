"""Which tensors of a LightningModule are the actor(s), the critic and a shared trunk.

A role is one or more *parts*, each the attribute path of a submodule (``"agent.actor_mean"``) or of a parameter
(``"agent.actor_logstd"``, a Gaussian's bare ``log_std``). Three kinds:

* ``actor``: one per agent (a ``ModuleList``/``ModuleDict`` path gives ``agent_0``, ``agent_1``, ...); the policy
  term's ``observe`` belongs to one; gradient, update, binding and wiring are measured;
* ``critic``: gradient and binding;
* ``shared``: a trunk feeding both heads (CleanRL's Atari ``network``, SB3's ``features_extractor``), measured like
  an actor (gradient, update, binding, whether the policy term reaches it), plus the share of its gradient that
  each head sends back (see :mod:`lightning_ppo_guard._trunk`).

A role never holds a tensor a more specific role holds: with ``actors="policy"`` and ``critic="policy.value_net"``
the actor is ``policy`` minus the value head. Roles are kept by path and re-read when the guard refreshes, so an
actor re-created after ``configure_optimizers`` is seen as the new module it is.

Auto-detection (:func:`detect`) looks at the module and at its submodules one and two levels down
(``self.agent``, ``self.model``, ``self.policy``, ``self.ac``) for the layouts people write: ``actor``/``critic``
(or ``pi``/``vf``, ``policy``/``value``, ...) with an optional trunk (``network``, ``trunk``, ``torso``, ``encoder``,
``features_extractor``, ...), CleanRL's continuous ``Agent`` (``actor_mean`` + ``actor_logstd``), SB3's
``ActorCriticPolicy`` (``mlp_extractor`` branches, ``action_net`` + ``log_std``, ``value_net``) and a MAPPO
``actors`` list. Two equally good candidates are an error that shows the line to write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["ACTOR_NAMES", "CRITIC_NAMES", "TRUNK_NAMES", "Detected", "PartsSpec", "Role", "RoleSpec", "actor_role",
           "announcement", "causal_lm", "describe", "detect", "resolve_roles", "unassigned"]

Part = str | nn.Module | nn.Parameter
PartsSpec = Part | Sequence[Part] | None
RoleSpec = Part | Sequence[Part] | Mapping[str, Part | Sequence[Part]] | None
RoleKind = Literal["actor", "critic", "shared"]

#: Attribute names of an actor (in order of preference) that auto-detection looks for.
ACTOR_NAMES = ("actors", "actor", "policies", "policy", "policy_net", "pi", "actor_net", "actor_mean",
               "policy_head", "actor_head", "pi_head", "action_head", "policy_module", "actor_module",
               "actor_network", "policy_network")
#: Attribute names of a container of one policy per agent (MAPPO): taken as the actors only when it is a ModuleList /
#: ModuleDict whose entries hold no critic of their own (per-agent actor-critics are left to ``actors=``).
AGENT_NAMES = ("agents", "agent_policies", "agent_actors", "policy_per_agent")
#: Attribute names of a critic.
CRITIC_NAMES = ("critic", "value", "value_net", "value_function", "vf", "v", "critic_net", "value_head",
                "critic_head", "v_head", "value_module", "critic_module", "critic_network", "value_network")
#: Attribute names of a trunk shared by the actor and the critic.
TRUNK_NAMES = ("network", "trunk", "torso", "shared", "shared_net", "body", "backbone", "encoder", "base",
               "features_extractor", "feature_extractor", "features", "core")
#: Bare parameters that belong to a Gaussian actor held next to it (``self.log_std = nn.Parameter(...)``).
LOG_STD_NAMES = ("log_std", "logstd", "actor_logstd", "actor_log_std", "log_stds", "action_log_std",
                 "policy_logstd")


def _tensors_at(root: nn.Module, path: str) -> list[nn.Parameter]:
    """The tensors of the part at ``path``: a submodule's parameters, or one parameter."""
    if path == "":
        return list(root.parameters())
    try:
        return list(root.get_submodule(path).parameters())
    except AttributeError:
        return [root.get_parameter(path)]


def _object_at(root: nn.Module, path: str) -> nn.Module | nn.Parameter:
    if path == "":
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return root.get_parameter(path)


@dataclass
class Role:
    """One measured part of the model: an actor (one per agent for MAPPO), the critic, or a shared trunk."""

    name: str
    kind: RoleKind
    parts: tuple[str, ...]
    params: list[nn.Parameter] = field(default_factory=list)
    frozen: list[nn.Parameter] = field(default_factory=list)
    numel: int = 0
    ids: frozenset[int] = frozenset()
    lazy: int = 0  # parameters of lazy modules not materialised yet (measured once their first forward ran)
    exclude: tuple[str, ...] = ()  # parts of more specific roles nested inside this one's: their tensors are theirs
    frozen_parts: tuple[str, ...] = ()  # parts whose every tensor has requires_grad=False

    @property
    def path(self) -> str:
        """The part, or the parts as a list (``"['a', 'b']"``)."""
        return self.parts[0] if len(self.parts) == 1 else repr(list(self.parts))

    @property
    def moves(self) -> bool:
        """Whether the role's update is measured (actors and a shared trunk; the critic only by its gradient)."""
        return self.kind != "critic"

    def targets(self, root: nn.Module) -> tuple[int, ...]:
        """Identity of the objects the parts name: a re-created module or parameter changes it."""
        return tuple(id(_object_at(root, part)) for part in self.parts)

    def modules(self, root: nn.Module) -> list[nn.Module]:
        """The parts that are modules (a parameter part has no forward to hook)."""
        return [m for m in (_object_at(root, part) for part in self.parts) if isinstance(m, nn.Module)]

    def refresh(self, root: nn.Module) -> bool:
        """Re-read the parts; return True when the role's trainable tensors changed."""
        theirs = {id(p) for path in self.exclude for p in _tensors_at(root, path)}
        params: list[nn.Parameter] = []
        frozen: list[nn.Parameter] = []
        frozen_parts: list[str] = []
        seen: set[int] = set()
        lazy = 0
        for part in self.parts:
            mine = [p for p in _tensors_at(root, part) if id(p) not in theirs]
            if mine and not any(p.requires_grad or is_lazy(p) for p in mine):
                frozen_parts.append(part)
            for p in mine:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if is_lazy(p):
                    lazy += 1
                else:
                    (params if p.requires_grad else frozen).append(p)
        ids = frozenset(id(p) for p in params)
        changed = ids != self.ids or lazy != self.lazy
        self.params, self.frozen, self.ids, self.lazy = params, frozen, ids, lazy
        self.frozen_parts = tuple(frozen_parts)
        self.numel = sum(p.numel() for p in params)
        return changed


# ---------------------------------------------------------------------------------------------- naming parts
def _children_listing(root: nn.Module) -> str:
    rows = [f"  {name}: {type(child).__name__}" for name, child in root.named_children()]
    rows += [f"  {name}: Parameter{tuple(p.shape)}" for name, p in root.named_parameters(recurse=False)]
    return "\n".join(rows) if rows else "  (no child modules)"


_ACTOR_HINTS = ("policy", "actor", "pi")
_CRITIC_HINTS = ("value", "critic", "vf", "q_net", "qf")


def _suggested_line(root: nn.Module) -> str:
    """The ``PPOGuard(...)`` line for ``root``'s own submodules (down to two levels), from names that say policy /
    actor and value / critic, when exactly one of each (with parameters) does: else the generic line."""
    found: dict[str, list[str]] = {"actor": [], "critic": []}
    for path, module in root.named_modules():
        if not path or path.count(".") > 1 or not _has_params(module):
            continue
        leaf = path.rsplit(".", 1)[-1].lower()
        for kind, hints in (("actor", _ACTOR_HINTS), ("critic", _CRITIC_HINTS)):
            if any(h in leaf for h in hints) and not any(p != path and path.startswith(p + ".") for p in found[kind]):
                found[kind].append(path)
    actors, critics = found["actor"], found["critic"]
    if not actors:  # one network per agent in a ModuleList / ModuleDict (MAPPO), whatever it is called
        actors = [n for n, c in root.named_children() if _agent_policies(c) and n not in critics]
    if len(actors) == 1 and len(critics) <= 1 and not (critics and critics[0] == actors[0]):
        critic = f", critic={critics[0]!r}" if critics else ""
        return f"PPOGuard(actors={actors[0]!r}{critic})   # read from its submodules' names: check them"
    return "PPOGuard(actors='my_policy', critic='my_value', shared='my_trunk')"


def _path_of(root: nn.Module, obj: nn.Module | nn.Parameter) -> str:
    named = root.named_parameters(remove_duplicate=False) if isinstance(obj, nn.Parameter) else root.named_modules()
    for name, candidate in named:
        if candidate is obj:
            return name
    raise ValueError(
        f"The {type(obj).__name__} given as a role is not part of {type(root).__name__}. Its children are:\n"
        f"{_children_listing(root)}"
    )


def _lookup(root: nn.Module, spec: Part, what: str) -> str:
    if isinstance(spec, (nn.Module, nn.Parameter)):
        return _path_of(root, spec)
    if not isinstance(spec, str):
        raise TypeError(f"{what} must be an attribute path (str), an nn.Module or an nn.Parameter, "
                        f"got {type(spec).__name__}.")
    try:
        _object_at(root, spec)
    except AttributeError:
        raise ValueError(
            f"{type(root).__name__} has no submodule or parameter {spec!r} (the {what}). Its children are:\n"
            f"{_children_listing(root)}\nName each role by its attribute path, e.g. "
            "PPOGuard(actors='model.policy', critic='model.value', shared='model.trunk'), or a list of paths "
            "for one role of several parts (actors={'actor': ['agent.actor_mean', 'agent.actor_logstd']})."
        ) from None
    return spec


def _parts(root: nn.Module, spec: Part | Sequence[Part], what: str) -> tuple[str, ...]:
    if isinstance(spec, (str, nn.Module, nn.Parameter)):
        return (_lookup(root, spec, what),)
    if isinstance(spec, Sequence):
        parts = tuple(_lookup(root, s, f"{what} part #{i}") for i, s in enumerate(spec))
        if parts:
            return parts
    raise TypeError(f"{what} must be a path, a module, a parameter or a non-empty list of them; got {spec!r}.")


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
    """Whether the module or parameter at ``path`` is strictly inside the module at ``parent`` ("" is the root)."""
    return path != parent and (parent == "" or path.startswith(parent + "."))


def _expand_actor(root: nn.Module, path: str) -> list[tuple[str, tuple[str, ...]]]:
    """A ModuleList / ModuleDict of actors gives one role per agent."""
    module = _object_at(root, path)
    if isinstance(module, nn.ModuleList):
        if _layers_not_agents(module):
            kinds = ", ".join(type(c).__name__ for c in module)
            raise ValueError(
                f"{path!r} is an nn.ModuleList of layers ({kinds}), not one actor per agent, so it cannot be read "
                f"as MAPPO agents. Name it as one role: PPOGuard(actors={{'actor': {path!r}}}), or hold the layers "
                f"in an nn.Sequential. (For one actor per agent, each entry is a whole network.)"
            )
        return [(f"agent_{i}", (f"{path}.{i}",)) for i in range(len(module))]
    if isinstance(module, nn.ModuleDict):
        return [(str(key), (f"{path}.{key}",)) for key in module]
    return [("actor", (path,))]


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


# ---------------------------------------------------------------------------------------------- auto-detection
@dataclass(frozen=True)
class Detected:
    """Roles found by :func:`detect`: parts by path, and the layout that matched (for the message)."""

    actor: tuple[str, ...]
    critic: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    layout: str = ""

    def line(self) -> str:
        """The ``PPOGuard(...)`` call that names these roles explicitly."""
        return describe([Role("actor", "actor", self.actor), *([Role("critic", "critic", self.critic)] * bool(
            self.critic)), *([Role("shared", "shared", self.shared)] * bool(self.shared))])


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _sb3(path: str, module: nn.Module) -> Detected:
    """SB3's ``ActorCriticPolicy``: ``mlp_extractor.policy_net`` / ``value_net`` branches (older versions: a
    ``shared_net`` too), ``action_net`` (+ ``log_std``), ``value_net``, and a features extractor shared unless
    ``share_features_extractor=False`` gave the critic its own."""
    children = dict(module.named_children())
    own = dict(module.named_parameters(recurse=False))
    actor: list[str] = []
    critic: list[str] = []
    shared: list[str] = []
    mlp = children.get("mlp_extractor")
    if mlp is not None:
        branches = dict(mlp.named_children())
        for name, to in (("policy_net", actor), ("value_net", critic), ("shared_net", shared)):
            if name in branches and _has_params(branches[name]):
                to.append(_join(path, f"mlp_extractor.{name}"))
        if not {"policy_net", "value_net"} & set(branches) and _has_params(mlp):
            shared.append(_join(path, "mlp_extractor"))
    actor.append(_join(path, "action_net"))
    actor += [_join(path, n) for n in LOG_STD_NAMES if n in own]
    critic.append(_join(path, "value_net"))
    features = children.get("features_extractor") or children.get("pi_features_extractor")
    vf_features = children.get("vf_features_extractor")
    if vf_features is not None and features is not None and vf_features is not features:
        if _has_params(features):
            actor.insert(0, _join(path, "pi_features_extractor" if "pi_features_extractor" in children
                                  else "features_extractor"))
        if _has_params(vf_features):
            critic.insert(0, _join(path, "vf_features_extractor"))
    elif features is not None and _has_params(features):
        shared.append(_join(path, "features_extractor" if "features_extractor" in children
                            else "pi_features_extractor"))
    return Detected(tuple(actor), tuple(critic), tuple(shared), f"SB3 ActorCriticPolicy at {path or 'the module'!r}")


def _agent_policies(module: nn.Module) -> bool:
    """A ModuleList / ModuleDict of per-agent networks, none of which holds a critic-named child."""
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or len(module) == 0 or not _has_params(module):
        return False
    return not any(name.rsplit(".", 1)[-1] in CRITIC_NAMES for name, _ in module.named_modules() if name)


def _trainable(module: nn.Module) -> bool:
    """Some parameter requires grad (a frozen reference model has none: never a role)."""
    return any(p.requires_grad or is_lazy(p) for p in module.parameters())


def causal_lm(module: nn.Module) -> bool:
    """A language model with an output head over the vocabulary: a Hugging Face ``PreTrainedModel`` whose
    ``get_output_embeddings()`` is a module (GPT-2's ``lm_head``), or any module with an ``lm_head`` child."""
    if isinstance(getattr(module, "lm_head", None), nn.Module):
        return True
    getter = getattr(module, "get_output_embeddings", None)
    if not callable(getter):
        return False
    try:
        return isinstance(getter(), nn.Module)
    except (NotImplementedError, AttributeError, TypeError):
        return False


def _match(path: str, module: nn.Module) -> Detected | str | None:
    """The roles of the layout ``module`` (at ``path``) has, a message when its own children are ambiguous, or None."""
    children = dict(module.named_children())
    if "action_net" in children and "value_net" in children:
        return _sb3(path, module)
    actors = [n for n in ACTOR_NAMES if n in children]
    if not actors:  # MAPPO: ``self.agents = nn.ModuleDict(...)`` of policies, next to a centralised critic
        actors = [n for n in AGENT_NAMES if n in children and _agent_policies(children[n])]
    if not actors:  # LM RL: the trainable language model (TRL's pretrained_model next to its v_head); a frozen
        # reference copy (every parameter requires_grad=False) is never the actor
        actors = [n for n, c in children.items() if causal_lm(c) and _trainable(c)]
        if len(actors) != 1:
            return None
    critics = [n for n in CRITIC_NAMES if n in children]
    if len(actors) > 1 or len(critics) > 1:
        return (f"{path or type(module).__name__!r} has several actor or critic candidates "
                f"({', '.join(_join(path, n) for n in actors + critics)})")
    own = dict(module.named_parameters(recurse=False))
    actor = (_join(path, actors[0]), *(_join(path, n) for n in LOG_STD_NAMES if n in own))
    critic = (_join(path, critics[0]),) if critics else ()
    shared = tuple(_join(path, n) for n in TRUNK_NAMES if n in children and _has_params(children[n]))
    kind = "MAPPO actors" if isinstance(children[actors[0]], (nn.ModuleList, nn.ModuleDict)) else "actor"
    layout = f"{kind} {actor[0]!r}" + (f", critic {critic[0]!r}" if critic else "") + (
        f", shared trunk {', '.join(repr(s) for s in shared)}" if shared else "")
    return Detected(actor, critic, shared, layout)


def detect(root: nn.Module) -> Detected:
    """Find the roles of ``root`` among the layouts people write (see the module docstring).

    The module itself is looked at first, then its submodules one level down, then two. The first level where
    a layout with a critic matches wins; without any, the first level with an actor alone. Two candidates at the
    winning level (or one whose own children hold two actors or two critics) are an error.

    Raises:
        ValueError: no layout matches, or two do equally well; the message lists what was found and the
            ``PPOGuard(...)`` line to write.
    """
    levels: list[list[Detected | str]] = [[], [], []]
    for path, module in root.named_modules():
        depth = path.count(".") + 1 if path else 0
        if depth < 3:
            found = _match(path, module)
            if found is not None:
                levels[depth].append(found)
    for with_critic in (True, False):
        for depth, level in enumerate(levels):
            matches = [r for r in level if isinstance(r, Detected) and (bool(r.critic) or not with_critic)]
            ambiguous = [r for r in level if isinstance(r, str)]
            if not matches and not (ambiguous and with_critic):
                continue
            if len(matches) == 1 and not ambiguous:
                return matches[0]
            where = "in it" if depth == 0 else "one level down" if depth == 1 else "two levels down"
            candidates = "\n".join([f"  {r.line()}   # {r.layout}" for r in matches] + [f"  {a}" for a in ambiguous])
            raise ValueError(
                f"Cannot tell which parts of {type(root).__name__} are the actor and the critic: several "
                f"candidates {where}:\n{candidates}\nName the roles, e.g. with one of these lines (a list is one "
                "role of several parts; shared= is a trunk both heads use)."
            )
    raise ValueError(
        f"Could not find the actor of {type(root).__name__}: no submodule (down to two levels) is called one of "
        f"{', '.join(ACTOR_NAMES)}, nor is it an SB3 ActorCriticPolicy. Its children are:\n"
        f"{_children_listing(root)}\nName the roles (a ModuleList gives one role per agent, a list/dict of paths "
        f"names MAPPO agents), e.g.:\n  {_suggested_line(root)}"
    )


# ---------------------------------------------------------------------------------------------- resolution
def resolve_roles(root: nn.Module, actors: RoleSpec = None, critic: PartsSpec = None,
                  shared: PartsSpec = None) -> list[Role]:
    """Resolve the actor, critic and shared roles of ``root``.

    ``actors=None`` auto-detects every role (:func:`detect`); a ``critic`` or ``shared`` given next to it
    replaces the detected one. With ``actors`` named, ``critic=None`` looks for a submodule called one of
    :data:`CRITIC_NAMES` and no shared role is guessed. ``shared=[]`` (or ``critic=[]``) means none.

    Raises:
        ValueError: a named part does not exist, no actor can be found, roles of different kinds hold the same
            tensors, or a role holds no parameter at all; the message says what to write.
    """
    actor_parts: list[tuple[str, tuple[str, ...]]] = []
    critic_parts: tuple[str, ...] = ()
    shared_parts: tuple[str, ...] = ()
    if actors is None:
        found = detect(root)
        actor_parts = _expand_actor(root, found.actor[0]) if len(found.actor) == 1 else [("actor", found.actor)]
        critic_parts, shared_parts = found.critic, found.shared
        if not critic_parts:  # a critic held elsewhere than next to the actor
            path = _auto(root, CRITIC_NAMES)
            critic_parts = (path,) if path is not None and not any(_inside(path, a) for a in found.actor) else ()
    elif isinstance(actors, Mapping):
        actor_parts = [(str(name), _parts(root, spec, f"actor {name!r}")) for name, spec in actors.items()]
    elif isinstance(actors, (str, nn.Module, nn.Parameter)):
        actor_parts = _expand_actor(root, _lookup(root, actors, "actor"))
    elif isinstance(actors, Sequence):
        actor_parts = [(f"agent_{i}", _parts(root, spec, f"actor #{i}")) for i, spec in enumerate(actors)]
    else:
        raise TypeError(f"actors must be a path, a module, a list or a dict of them; got {type(actors).__name__}.")
    if critic is not None:
        critic_parts = () if _none(critic) else _parts(root, critic, "critic")
    elif actors is not None:  # a value head next to the actor, never a layer inside it (T5's attention "v")
        path = _auto(root, CRITIC_NAMES)
        inside = path is not None and any(_inside(path, a) for _, parts in actor_parts for a in parts)
        critic_parts = (path,) if path is not None and not inside else ()
    if shared is not None:
        shared_parts = () if _none(shared) else _parts(root, shared, "shared trunk")

    if not actor_parts:
        raise ValueError("No actor role was given: pass at least one actor path or module.")
    roles = [Role(name=name, kind="actor", parts=parts) for name, parts in actor_parts]
    if critic_parts:
        roles.append(Role(name="critic", kind="critic", parts=critic_parts))
    if shared_parts:
        roles.append(Role(name="shared", kind="shared", parts=shared_parts))
    names = [r.name for r in roles]
    if len(set(names)) != len(names):
        raise ValueError(f"Role names must be unique, got {names}.")
    for role in roles:  # a role never holds a tensor a more specific role holds (SB3: the value head in policy)
        role.exclude = tuple(q for other in roles if other is not role for q in other.parts
                             if any(_inside(q, p) for p in role.parts))
    for role in roles:
        role.refresh(root)
        if not role.params and not role.frozen and not role.lazy:
            raise ValueError(
                f"The {role.kind} role {role.name!r} at {role.path!r} has no parameters at all; "
                f"point the role at the module or parameter that holds the {role.kind}'s weights."
            )
    _check_disjoint(roles)
    return roles


def _none(spec: PartsSpec) -> bool:
    """``[]`` / ``()``: the role is explicitly absent."""
    return isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 0


def _check_disjoint(roles: list[Role]) -> None:
    """Roles of different kinds must not share tensors (agents of one kind may: parameter-sharing MAPPO)."""
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            if a.kind == b.kind:
                continue
            common = {id(p) for p in a.params + a.frozen} & {id(p) for p in b.params + b.frozen}
            if common and not (set(a.parts) & set(b.parts)) and not any(
                    _inside(p, q) or _inside(q, p) for p in a.parts for q in b.parts):
                tied = ", ".join(a.parts + b.parts)
                raise ValueError(
                    f"The {a.kind} role {a.name!r} ({a.path!r}) and the {b.kind} role {b.name!r} ({b.path!r}) hold the "
                    f"same {len(common)} tensor(s) although neither part is inside the other: tied weights ({tied}; a "
                    "language model's output head tied to its input embeddings). Name the module that holds both as "
                    "one role, e.g. the whole language model as the actor: PPOGuard(actors='policy', "
                    "critic='policy.v_head')."
                )
            if common:
                raise ValueError(
                    f"The {a.kind} role {a.name!r} ({a.path!r}) and the {b.kind} role {b.name!r} ({b.path!r}) hold the "
                    f"same {len(common)} tensor(s). A trunk both heads use is its own role: "
                    "PPOGuard(actors='ac.pi', critic='ac.v', shared='ac.trunk')."
                )


def _auto(root: nn.Module, names: Sequence[str]) -> str | None:
    """Shallowest trainable submodule whose own attribute name is one of ``names`` (earlier names win ties)."""
    best: tuple[int, int, str] | None = None
    for path, module in root.named_modules():
        if not path or not _trainable(module):
            continue
        leaf = path.rsplit(".", 1)[-1]
        if leaf in names:
            key = (path.count("."), names.index(leaf), path)
            if best is None or key < best:
                best = key
    return None if best is None else best[2]


def unassigned(root: nn.Module, roles: Sequence[Role]) -> tuple[int, list[str]]:
    """Trainable elements of ``root`` that no role holds, and the paths of the parameters holding them (first 4)."""
    held = {id(p) for r in roles for p in r.params}
    rest = [(name, p) for name, p in root.named_parameters()
            if p.requires_grad and id(p) not in held and not is_lazy(p)]
    return sum(p.numel() for _, p in rest), [name for name, _ in rest[:4]]


def announcement(root: nn.Module, roles: Sequence[Role], callback: str) -> str:
    """What a callback logs once about the roles it detected: the line that names them, and what no role holds."""
    count, where = unassigned(root, roles)
    rest = (f"; {count:,} trainable elements belong to no role ({', '.join(where)}{', ...' if len(where) == 4 else ''}"
            "): name them (shared=...) to measure them" if count else "")
    if not any(r.kind == "critic" for r in roles):
        rest += ("; no critic found (fine for critic-less GRPO/RLOO/REINFORCE; with a value model, name it: "
                 "critic='...')")
    return f"{callback} roles, auto-detected: {describe(roles, callback)}{rest}"


def describe(roles: Sequence[Role], callback: str = "PPOGuard") -> str:
    """The ``PPOGuard(...)`` call (or ``callback``'s) that names ``roles`` explicitly."""
    def spec(parts: tuple[str, ...]) -> str:
        return repr(parts[0]) if len(parts) == 1 else repr(list(parts))
    actors = [r for r in roles if r.kind == "actor"]
    if len(actors) == 1 and actors[0].name == "actor" and len(actors[0].parts) == 1:
        args = [f"actors={spec(actors[0].parts)}"]
    else:
        args = ["actors={" + ", ".join(f"{r.name!r}: {spec(r.parts)}" for r in actors) + "}"]
    args += [f"{r.kind}={spec(r.parts)}" for r in roles if r.kind != "actor"]
    return f"{callback}({', '.join(args)})"
