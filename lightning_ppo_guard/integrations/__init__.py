"""Integrations with PPO libraries: hand the guard what a library's loss computed, with no extra forward.

* :mod:`lightning_ppo_guard.integrations.torchrl`: TorchRL's PPO loss modules (``ClipPPOLoss``, ``PPOLoss``,
  ``KLPENPPOLoss``) read from inside their own forward (extra ``torchrl``).
* :mod:`lightning_ppo_guard.integrations.sb3`: Stable-Baselines3 policies (``ActorCriticPolicy.evaluate_actions``
  and its ``Distribution`` wrappers) (extra ``sb3``).

Each is imported on its own; nothing here imports a library until it is used.
"""
