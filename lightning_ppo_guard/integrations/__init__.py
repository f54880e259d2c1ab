"""Integrations with PPO libraries: hand the guard what a library's loss computed, with no extra forward.

* :mod:`lightning_ppo_guard.integrations.torchrl`: TorchRL's PPO loss modules (``ClipPPOLoss``, ``PPOLoss``,
  ``KLPENPPOLoss``) read from inside their own forward (extra ``torchrl``).
Stable-Baselines3 needs no module here: ``observe`` takes ``evaluate_actions``' outputs as they are and SB3's
``Distribution`` wrappers as ``dist=`` (extra ``sb3`` for the tests' real policy).

Each is imported on its own; nothing here imports a library until it is used.
"""
