"""Role resolution: paths, modules, ModuleList per agent, auto-detection and the errors."""

import pytest
from torch import nn

from lightning_ppo_guard.roles import resolve_roles


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.actor = nn.Linear(4, 2)
        self.critic = nn.Linear(4, 1)


class MultiNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.actors = nn.ModuleList([nn.Linear(4, 2) for _ in range(3)])
        self.value = nn.Linear(12, 3)


def test_auto_detects_actor_and_critic():
    roles = resolve_roles(Net())
    assert [(r.name, r.kind, r.path) for r in roles] == [("actor", "actor", "actor"), ("critic", "critic", "critic")]
    assert roles[0].numel == 10


def test_modulelist_gives_one_role_per_agent():
    roles = resolve_roles(MultiNet())
    assert [r.name for r in roles] == ["agent_0", "agent_1", "agent_2", "critic"]
    assert roles[2].path == "actors.2"


def test_roles_by_module_by_dict_and_nested_path():
    outer = nn.Module()
    outer.model = Net()
    roles = resolve_roles(outer, actors="model.actor", critic=outer.model.critic)
    assert [r.path for r in roles] == ["model.actor", "model.critic"]
    roles = resolve_roles(outer, actors={"red": "model.actor"}, critic="model.critic")
    assert roles[0].name == "red"


def test_missing_actor_error_lists_children():
    m = nn.Module()
    m.encoder = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"(?s)Could not find the actor.*encoder: Linear"):
        resolve_roles(m)
    with pytest.raises(ValueError, match=r"(?s)no submodule 'pi_net'.*actor: Linear"):
        resolve_roles(Net(), actors="pi_net")


def test_frozen_actor_is_a_role_without_trainable_params():
    net = Net()
    net.actor.requires_grad_(False)
    actor = resolve_roles(net)[0]
    assert actor.params == [] and len(actor.frozen) == 2


def test_a_role_never_holds_the_tensors_of_a_role_nested_in_it():
    """SB3's layout: ``policy`` holds the value head; auto-detection takes ``policy`` as the actor and
    ``policy.value_net`` as the critic, so the actor is ``policy`` minus the value head."""
    outer = nn.Module()
    outer.policy = nn.Module()
    outer.policy.mlp_extractor = nn.Linear(4, 8)
    outer.policy.action_net = nn.Linear(8, 2)
    outer.policy.value_net = nn.Linear(8, 1)
    actor, critic = resolve_roles(outer)
    assert (actor.path, critic.path) == ("policy", "policy.value_net")
    assert actor.ids.isdisjoint(critic.ids) and actor.numel == 4 * 8 + 8 + 8 * 2 + 2 and critic.numel == 9
