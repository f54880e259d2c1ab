"""Role resolution: paths, modules, ModuleList per agent, auto-detection and the errors."""

import pytest
import torch
from torch import nn

from lightning_ppo_guard.roles import describe, detect, resolve_roles


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
    with pytest.raises(ValueError, match=r"(?s)no submodule or parameter 'pi_net'.*actor: Linear"):
        resolve_roles(Net(), actors="pi_net")


def test_frozen_actor_is_a_role_without_trainable_params():
    net = Net()
    net.actor.requires_grad_(False)
    actor = resolve_roles(net)[0]
    assert actor.params == [] and len(actor.frozen) == 2


def test_a_role_never_holds_the_tensors_of_a_role_nested_in_it():
    """``actors="policy"`` with ``critic="policy.value_net"``: the actor is ``policy`` minus the value head."""
    outer = nn.Module()
    outer.policy = nn.Module()
    outer.policy.body = nn.Linear(4, 8)
    outer.policy.head = nn.Linear(8, 2)
    outer.policy.value_net = nn.Linear(8, 1)
    actor, critic = resolve_roles(outer, actors="policy", critic="policy.value_net")
    assert (actor.path, critic.path) == ("policy", "policy.value_net")
    assert actor.ids.isdisjoint(critic.ids) and actor.numel == 4 * 8 + 8 + 8 * 2 + 2 and critic.numel == 9


# ------------------------------------------------------------------------------------ layouts people write
class CleanRLAgent(nn.Module):
    """CleanRL ppo.py's Agent."""

    def __init__(self):
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 1))
        self.actor = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2))


class CleanRLContinuousAgent(nn.Module):
    """CleanRL ppo_continuous_action.py's Agent: a bare ``actor_logstd`` parameter."""

    def __init__(self):
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1))
        self.actor_mean = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1))
        self.actor_logstd = nn.Parameter(torch.zeros(1, 1))


class CleanRLAtariAgent(nn.Module):
    """CleanRL ppo_atari.py's Agent: ``network`` is the trunk both heads read."""

    def __init__(self):
        super().__init__()
        self.network = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten())
        self.actor = nn.Linear(8, 6)
        self.critic = nn.Linear(8, 1)


class MlpExtractor(nn.Module):
    def __init__(self):
        super().__init__()
        self.policy_net = nn.Sequential(nn.Linear(4, 64), nn.Tanh())
        self.value_net = nn.Sequential(nn.Linear(4, 64), nn.Tanh())


class SB3Policy(nn.Module):
    """SB3's ActorCriticPolicy (Gaussian: ``log_std``); ``cnn`` gives a features extractor with weights."""

    def __init__(self, cnn=False, share=True):
        super().__init__()
        self.features_extractor = nn.Sequential(nn.Linear(4, 4), nn.ReLU()) if cnn else nn.Flatten()
        self.pi_features_extractor = self.features_extractor
        self.vf_features_extractor = self.features_extractor if share else nn.Sequential(nn.Linear(4, 4))
        self.mlp_extractor = MlpExtractor()
        self.action_net = nn.Linear(64, 2)
        self.log_std = nn.Parameter(torch.zeros(2))
        self.value_net = nn.Linear(64, 1)


def _holder(name, module):
    root = nn.Module()
    setattr(root, name, module)
    return root


def _layout(roles):
    return [(r.name, r.kind, r.parts) for r in roles]


def test_detects_cleanrl_agents_one_level_down():
    assert _layout(resolve_roles(_holder("agent", CleanRLAgent()))) == [
        ("actor", "actor", ("agent.actor",)), ("critic", "critic", ("agent.critic",))]
    roles = resolve_roles(_holder("agent", CleanRLContinuousAgent()))
    assert _layout(roles) == [("actor", "actor", ("agent.actor_mean", "agent.actor_logstd")),
                              ("critic", "critic", ("agent.critic",))]
    assert roles[0].numel == 3 * 64 + 64 + 64 + 1 + 1  # the mean network and the log-std parameter
    assert _layout(resolve_roles(_holder("agent", CleanRLAtariAgent()))) == [
        ("actor", "actor", ("agent.actor",)), ("critic", "critic", ("agent.critic",)),
        ("shared", "shared", ("agent.network",))]


def test_detects_sb3_actor_critic_policy():
    roles = resolve_roles(_holder("policy", SB3Policy()))
    assert _layout(roles) == [
        ("actor", "actor", ("policy.mlp_extractor.policy_net", "policy.action_net", "policy.log_std")),
        ("critic", "critic", ("policy.mlp_extractor.value_net", "policy.value_net"))]
    roles = resolve_roles(_holder("model", _holder("policy", SB3Policy(cnn=True))))  # two levels down
    assert roles[2].kind == "shared" and roles[2].parts == ("model.policy.features_extractor",)
    roles = resolve_roles(_holder("policy", SB3Policy(cnn=True, share=False)))
    assert roles[0].parts[0] == "policy.features_extractor" and roles[1].parts[0] == "policy.vf_features_extractor"
    assert [r.kind for r in roles] == ["actor", "critic"]
    ids = [r.ids for r in roles]
    assert ids[0].isdisjoint(ids[1])


def test_detects_a_top_level_trunk_and_mappo_lists():
    m = nn.Module()
    m.torso = nn.Linear(4, 8)
    m.pi = nn.Linear(8, 2)
    m.vf = nn.Linear(8, 1)
    assert _layout(resolve_roles(m)) == [("actor", "actor", ("pi",)), ("critic", "critic", ("vf",)),
                                         ("shared", "shared", ("torso",))]
    assert [r.name for r in resolve_roles(MultiNet())] == ["agent_0", "agent_1", "agent_2", "critic"]


def test_two_candidates_are_an_error_that_shows_the_lines_to_write():
    m = nn.Module()
    m.agent = CleanRLAgent()
    m.target_agent = CleanRLAgent()
    with pytest.raises(ValueError, match=r"(?s)several candidates one level down.*"
                                         r"PPOGuard\(actors='agent.actor', critic='agent.critic'\).*"
                                         r"PPOGuard\(actors='target_agent.actor', critic='target_agent.critic'\)"):
        resolve_roles(m)
    m = Net()
    m.policy = nn.Linear(4, 2)  # two actor candidates side by side
    with pytest.raises(ValueError, match=r"several actor or critic candidates \(actor, policy, critic\)"):
        resolve_roles(m)
    resolve_roles(m, actors="actor")  # named: no guess needed


def test_roles_name_parameters_and_lists_of_parts():
    root = _holder("agent", CleanRLContinuousAgent())
    roles = resolve_roles(root, actors={"actor": ["agent.actor_mean", root.agent.actor_logstd]},
                          critic="agent.critic", shared=[])
    assert roles[0].parts == ("agent.actor_mean", "agent.actor_logstd")
    (logstd,) = resolve_roles(root, actors="agent.actor_logstd", critic=[])
    assert logstd.numel == 1 and logstd.path == "agent.actor_logstd"
    assert describe(roles) == ("PPOGuard(actors={'actor': ['agent.actor_mean', 'agent.actor_logstd']}, "
                               "critic='agent.critic')")


def test_a_role_frozen_in_part_and_roles_of_two_kinds_sharing_tensors():
    root = _holder("agent", CleanRLContinuousAgent())
    root.agent.actor_logstd.requires_grad_(False)
    actor = resolve_roles(root)[0]
    assert actor.frozen_parts == ("agent.actor_logstd",) and len(actor.params) == 4
    m = Net()
    with pytest.raises(ValueError, match=r"hold the same 2 tensor\(s\).*shared="):
        resolve_roles(m, actors="actor", critic="actor")


def test_an_undetected_layout_error_prints_the_line_for_its_own_submodules():
    """Issue 23: the error's suggestion was a generic line; where the submodules' names say policy and value (a
    layout auto-detection does not know: 'baseline_value_fn'), it is the line for this module."""
    own = nn.Module()
    own.encoder = nn.Linear(4, 8)
    own.my_policy_head, own.baseline_value_fn = nn.Linear(8, 2), nn.Linear(8, 1)
    with pytest.raises(ValueError, match=r"PPOGuard\(actors='my_policy_head', critic='baseline_value_fn'\)"):
        detect(own)
    blank = nn.Module()
    blank.a, blank.b = nn.Linear(4, 2), nn.Linear(4, 1)
    with pytest.raises(ValueError, match=r"PPOGuard\(actors='my_policy', critic='my_value', shared='my_trunk'\)"):
        detect(blank)
