"""MkDocs hook: the diagnoses pages, generated from ``lightning_ppo_guard.diagnoses.CATALOG`` at build time.

``mkdocs.yml`` names this file under ``hooks:``. On every build it adds ``codes/index.md`` (the catalog's table,
as ``ppo-guard rules --markdown`` prints it, plus an index with one link per code) and one ``codes/PPG###.md``
page per diagnosis (code, symbol, severity, family, checklist step, message template, explanation, fix, an
example and how to silence it; a retired code gets a page that says so). Nothing here is a hand-written copy of
the catalog: only the examples (which planted fault or test shows the code, and a short snippet of the bug) live
in this file, and ``tests/test_docs.py`` holds them to the reference faults and the variant zoo.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # document this checkout's package, whatever is installed
    sys.path.insert(0, str(ROOT))

from lightning_ppo_guard.cli import catalog_markdown  # noqa: E402
from lightning_ppo_guard.diagnoses import CATALOG, DOCS_URL, Diagnosis  # noqa: E402

FAMILIES = {
    "0": "set-up and optimizer binding",
    "1": "autograd wiring of the policy term",
    "2": "gradient and update",
    "3": "policy movement",
    "4": "learning signal (advantages, critic, shared trunk)",
    "5": "entropy",
    "9": "numerics",
}

# code -> how to see it: ``demo`` lists reference faults (``ppo-guard demo --fault NAME``) that are named with
# this code; ``variants`` names fits of the variant zoo (tests/zoo) that are;
# ``tests`` names the test files that plant it otherwise; ``snippet`` is the bug, as a user writes it.
EXAMPLES: dict[str, dict[str, Any]] = {
    "PPG001": dict(demo=["actor_not_in_optimizer"],
                   variants=["cleanrl-continuous-logstd-unbound", "cleanrl-trunk-unbound", "sb3-value-head-unbound"],
                   snippet="""
                   def configure_optimizers(self):
                       return torch.optim.Adam(self.critic.parameters(), lr=1e-3)  # the actor is left out
                   """),
    "PPG002": dict(demo=["actor_replaced"], snippet="""
                   def on_fit_start(self):
                       self.actor = make_actor()  # after configure_optimizers: the optimizer holds the old tensors
                   """),
    "PPG003": dict(demo=["lr_zero"], variants=["cleanrl-4x4-late-lr-zero", "styles-lr-zero"], snippet="""
                   torch.optim.Adam([{"params": self.actor.parameters(), "lr": 0.0},
                                     {"params": self.critic.parameters(), "lr": 1e-3}])
                   """),
    "PPG004": dict(tests=["tests/test_rules.py"], snippet="""
                   self.manual_backward(loss)
                   torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm=0.0)  # clips every gradient to 0
                   opt.step()
                   """),
    "PPG005": dict(tests=["tests/test_bad_input.py"], snippet="""
                   self.actor = load_pretrained_actor()
                   self.actor.requires_grad_(False)  # a freeze left over from pre-training
                   """),
    "PPG006": dict(variants=["cleanrl-continuous-logstd-frozen", "cleanrl-trunk-frozen"], snippet="""
                   self.actor_logstd = nn.Parameter(torch.zeros(1, act_dim), requires_grad=False)
                   """),
    "PPG101": dict(demo=["detached_logits", "no_grad_forward"],
                   variants=["cleanrl-4x4-detached", "cleanrl-4x4-late-detached", "sb3-layout-detached-logits"],
                   snippet="""
                   logits = self.actor(obs).detach()  # no policy gradient
                   new_logp = Categorical(logits=logits).log_prob(actions)
                   """),
    "PPG102": dict(variants=["cleanrl-continuous-detached-mean"], snippet="""
                   mean = self.actor_mean(obs).detach()  # log_std still learns, the mean never does
                   dist = Normal(mean, self.actor_logstd.exp())
                   new_logp = dist.log_prob(actions).sum(-1)
                   """),
    "PPG103": dict(demo=["old_logp_not_detached"], variants=["cleanrl-4x4-old-logp-not-detached"], snippet="""
                   old_logp = Categorical(logits=self.actor(obs)).log_prob(actions)  # recomputed, with grad
                   ratio = (new_logp - old_logp).exp()  # identically 1
                   """),
    "PPG108": dict(demo=["old_logp_recomputed"], variants=["cleanrl-4x4-old-logp-recomputed"], snippet="""
                   with torch.no_grad():  # "the old policy's log-probs", from the current actor
                       old_logp = Categorical(logits=self.actor(obs)).log_prob(actions)
                   ratio = (new_logp - old_logp).exp()  # exactly 1 on every minibatch: clipping never acts
                   """),
    "PPG109": dict(tests=["tests/test_lm_rl.py"], snippet="""
                   g = rewards.view(n_prompts, group_size)
                   adv = (g.mean(1, keepdim=True) - g) / (g.std(1, keepdim=True) + 1e-4)  # baseline - reward
                   observe(self, new_logp=logp, old_logp=old_logp, advantages=adv.flatten(), mask=response_mask,
                           rewards=rewards, group=prompt_ids)
                   """),
    "PPG104": dict(tests=["tests/test_bad_input.py"], snippet="""
                   values = self.critic(obs)                   # (B, 1)
                   v_loss = ((values - returns) ** 2).mean()   # (B, 1) - (B,) broadcasts to (B, B)
                   observe(self, new_logp=new_logp, old_logp=old_logp, advantages=adv, values=values, returns=returns)
                   """),
    "PPG105": dict(demo=["dropout_policy"], variants=["cleanrl-4x4-dropout"], snippet="""
                   self.actor = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Dropout(0.1), nn.Linear(64, n))
                   # the rollout samples with one dropout mask, the update recomputes with another
                   """),
    "PPG106": dict(demo=["logp_by_hand"], snippet="""
                   probs = torch.softmax(self.actor(obs), -1)
                   new_logp = torch.log(probs.gather(1, actions[:, None])).squeeze(1)
                   """),
    "PPG107": dict(variants=["cleanrl-4x4-ratio-inverted"], snippet="""
                   ratio = (old_logp - new_logp).exp()  # upside down: the policy learns backwards
                   """),
    "PPG201": dict(tests=["tests/test_rules.py", "tests/test_monitor_fit.py"], snippet="""
                   loss = vf_coef * v_loss  # the policy term (and the entropy bonus) left out of the loss
                   self.manual_backward(loss)
                   """),
    "PPG202": dict(demo=["zero_grad_before_step"], snippet="""
                   self.manual_backward(loss)
                   opt.zero_grad()  # clears the gradient the step was meant to use
                   opt.step()
                   """),
    "PPG203": dict(tests=["tests/test_amp.py", "tests/test_rules.py"], snippet="""
                   opt.step()
                   self.actor.load_state_dict(snapshot)  # the step's change undone
                   """),
    "PPG204": dict(demo=["lr_tiny"], variants=["cleanrl-4x4-late-lr-tiny", "two-optimizers-actor-lr-1e-9"],
                   snippet="""
                   torch.optim.Adam(self.actor.parameters(), lr=1e-9)  # meant 1e-4
                   """),
    "PPG301": dict(tests=["tests/test_fault_zoo.py (entropy_frozen with the minimal observe)", "tests/test_rules.py"],
                   snippet="""
                   dist = Categorical(logits=self.actor(obs) / 1e4)  # logits scaled towards 0: the policy cannot move
                   observe(self, new_logp=dist.log_prob(actions), old_logp=old_logp, advantages=adv)
                   """),
    "PPG302": dict(demo=["target_kl_tiny"], variants=["cleanrl-4x4-target-kl-tiny"], snippet="""
                   if approx_kl > 1e-6:  # target_kl far too small: every update phase ends at its first check
                       break
                   """),
    "PPG303": dict(demo=["lr_huge"], variants=["styles-sb3-lr-huge"], snippet="""
                   torch.optim.Adam(self.actor.parameters(), lr=0.05)  # with 10 epochs per rollout
                   """),
    "PPG304": dict(tests=["tests/test_lm_rl.py"], snippet="""
                   kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1   # k3, per token
                   loss = masked_mean(pg_loss + 50.0 * kl, response_mask)   # beta 50: every step is pulled back
                   observe(self, new_logp=logp, old_logp=old_logp, advantages=adv, mask=response_mask,
                           ref_logp=ref_logp)
                   """),
    "PPG401": dict(variants=["nan-adv-one-sample-std", "nan-adv-planted"], snippet="""
                   mb_adv = (mb_adv - mb_adv.mean()) / mb_adv.std()  # a minibatch of one sample: 0 / 0 = NaN
                   """),
    "PPG402": dict(demo=["tiny_advantages"], variants=["cleanrl-4x4-adv-scale-1e-6"], snippet="""
                   rewards = rewards * 1e-5  # and the advantages are not normalised
                   """),
    "PPG403": dict(demo=["critic_eats_clip"], snippet="""
                   rewards = rewards * 1e3  # unscaled returns: the value loss dominates
                   torch.nn.utils.clip_grad_norm_(self.parameters(), 0.5)  # one clip shared by actor and critic
                   """),
    "PPG404": dict(variants=["cleanrl-trunk-unscaled-rewards"], snippet="""
                   hidden = self.network(obs)  # a trunk both heads use
                   logits, value = self.actor(hidden), self.critic(hidden)
                   v_loss = ((value.squeeze(-1) - returns) ** 2).mean()  # returns in the hundreds, never scaled
                   """),
    "PPG405": dict(variants=["cleanrl-4x4-adv-scale-1e-6"], snippet="""
                   pg_loss = -(mb_adv * 1e-6 * ratio).mean()  # a stray factor: the gradient falls below Adam's eps
                   """),
    "PPG406": dict(demo=["critic_clip_unscaled"], variants=["cleanrl-4x4-value-clip-unscaled"], snippet="""
                   v_clipped = b_values + (new_value - b_values).clamp(-0.2, 0.2)  # 0.2 in unscaled return units
                   v_loss = 0.5 * torch.max((new_value - b_returns) ** 2, (v_clipped - b_returns) ** 2).mean()
                   """),
    "PPG407": dict(tests=["tests/test_lm_rl.py"], snippet="""
                   reward = (response == target).all(-1).float()  # all-or-nothing: every sample of a prompt fails
                   observe(self, new_logp=logp, old_logp=old_logp, advantages=adv, mask=response_mask,
                           rewards=reward, group=prompt_ids)
                   """),
    "PPG501": dict(demo=["entropy_frozen"], snippet="""
                   dist = Categorical(logits=self.actor(obs) / 1e4)  # a huge temperature: entropy pinned at its max
                   """),
    "PPG502": dict(demo=["entropy_sign"], variants=["cleanrl-4x4-entropy-sign"], snippet="""
                   loss = pg_loss + ent_coef * entropy.mean() + vf_coef * v_loss  # a penalty, not a bonus
                   """),
    "PPG503": dict(tests=["tests/test_rules.py"], snippet="""
                   torch.optim.Adam(self.actor.parameters(), lr=0.05)  # steps so large the policy turns deterministic
                   loss = pg_loss + vf_coef * v_loss  # and no entropy bonus to hold it back
                   """),
    "PPG504": dict(tests=["tests/test_diagnosis_v2.py", "tests/test_rules.py"], snippet="""
                   log_std = self.log_std_head(hidden)  # state-dependent, never clamped, at a large lr
                   loss = pg_loss + ent_coef * entropy.mean() + vf_coef * v_loss  # an entropy penalty on top
                   """),
    "PPG901": dict(tests=["tests/test_bad_input.py"], snippet="""
                   v_loss = ((values - returns) / returns.std()) ** 2  # std 0 in a constant-reward batch: NaN/Inf
                   """),
    "PPG902": dict(tests=["tests/test_bad_input.py"], snippet="""
                   new_logp = torch.log(probs.gather(1, actions[:, None]))  # a probability of exactly 0: -inf
                   """),
}


def _faults() -> dict[str, str]:
    try:
        from lightning_ppo_guard.reference.faults import FAULTS
    except ImportError:  # pragma: no cover - the reference needs gymnasium (the demo extra)
        return {}
    return dict(FAULTS)


def page_path(code: str) -> str:
    """The page of one code, relative to the docs folder (its URL is ``Diagnosis.url``)."""
    return f"codes/{code}.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _plain(text: str) -> str:
    """Catalog prose as literal text: ``__init__``, ``*`` and ``[...]`` are not Markdown here."""
    for ch in "\\`*_[]#":
        text = text.replace(ch, "\\" + ch)
    return text


def code_page(d: Diagnosis) -> str:
    """The Markdown page of one diagnosis."""
    ex = EXAMPLES.get(d.code, {})
    faults = _faults()
    lines = [f"# {d.code} `{d.symbol}`", ""]
    if d.retired:
        lines += ['!!! warning "Retired"',
                  f"    {d.code} is retired: the guard no longer names it. The code keeps its number and is never "
                  "reused.", ""]
    lines += [
        "| | |", "|---|---|",
        f"| code | `{d.code}` |",
        f"| symbol | `{d.symbol}` |",
        f"| severity | {d.severity}{' (retired)' if d.retired else ''} |",
        f"| family | {d.code[3]}xx: {FAMILIES.get(d.code[3], '')} |",
        f"| checklist step | {_cell(_plain(d.checklist)) if d.checklist else '-'} |",
        "",
        "## Message", "",
        "The warning's first line; the fields in braces are filled from the finding's evidence:", "",
        "```text", d.message, "```", "",
        "## What it means", "", _plain(d.explanation), "",
        "## Fix", "", _plain(d.fix), "",
        "## Example", "",
    ]
    snippet = textwrap.dedent(ex.get("snippet", "")).strip("\n")
    if snippet:
        lines += ["A bug that gets this code:", "", "```python", snippet, "```", ""]
    demo = ex.get("demo", [])
    if demo:
        lines += ["The reference PPO with a planted fault that is named with this code (from a clone: "
                  "`bash scripts/demo.sh --fault NAME`; installed with the `demo` extra: `ppo-guard demo --fault "
                  "NAME`):", ""]
        for name in demo:
            what = faults.get(name, "")
            lines += ["```bash", f"ppo-guard demo --fault {name}", "```", ""]
            if what:
                lines += [f"`{name}`: {what}.", ""]
        lines += ["When each fault is named: [the fault zoo](../evidence.md#fault-zoo-first-detection).", ""]
    variants = ex.get("variants", [])
    if variants:
        lines += ["Fits of the [variant zoo](../evidence.md#realistic-variants-code-the-guard-was-not-tuned-on) "
                  "that are named with it: " + ", ".join(f"`{v}`" for v in variants) + ".", ""]
    tests = ex.get("tests", [])
    if tests:
        lines += ["Planted in: " + ", ".join(f"`{t}`" for t in tests) + ".", ""]
    lines += [
        "## Silence it", "",
        "Only if the finding is expected in your run (for instance a part frozen on purpose):", "",
        "```python", f'PPOGuard(ignore=["{d.code}"])  # or ignore=["{d.symbol}"]', "```", "",
        f"On the command line: `ppo-guard explain {d.code}`. This page: <{d.url}>.", "",
    ]
    return "\n".join(lines)


def catalog_index() -> str:
    """``codes/index.md``: one line per code with a link to its page, then the catalog's full table."""
    lines = [
        "# Diagnoses", "",
        "Every finding has a stable code (`PPG###`, never reused; families by hundreds), a kebab-case symbol, a "
        "severity, a message, an explanation and the fix. `ppo-guard rules` lists them, `ppo-guard explain CODE` "
        "prints one, and every warning ends with a link to its page here. These pages are generated from "
        "`lightning_ppo_guard.diagnoses.CATALOG` when the docs are built.", "",
        "| code | symbol | severity | message |", "|---|---|---|---|",
    ]
    for d in CATALOG.values():
        sev = f"{d.severity} (retired)" if d.retired else d.severity
        lines.append(f"| [{d.code}]({d.code}.md) | `{d.symbol}` | {sev} | {_cell(d.message)} |")
    lines += ["", "Families: " + "; ".join(f"{k}xx {v}" for k, v in FAMILIES.items()) + ".", "",
              "## The catalog in one table", "",
              "As `ppo-guard rules --markdown` prints it:", "", catalog_markdown(), ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """Every generated page: path relative to the docs folder -> Markdown."""
    out = {"codes/index.md": catalog_index()}
    out.update({page_path(d.code): code_page(d) for d in CATALOG.values()})
    return out


def on_config(config: Any, **kwargs: Any) -> Any:
    """The site's URL is the one the warnings link to (``diagnoses.DOCS_URL``)."""
    if config.get("site_url") != DOCS_URL:
        raise ValueError(f"mkdocs.yml site_url {config.get('site_url')!r} must be diagnoses.DOCS_URL {DOCS_URL!r}")
    return config


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    for path, content in pages().items():
        if files.get_file_from_path(path) is not None:
            raise ValueError(f"docs/{path} is generated from the catalog; remove the hand-written file")
        files.append(File.generated(config, path, content=content))
    return files
