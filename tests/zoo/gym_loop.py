"""What the library-built PPO modules share: a gymnasium vector env stepped by hand, episode returns, one
training batch per PPO iteration (:mod:`tests.zoo.torchrl_ppo`, :mod:`tests.zoo.sb3_ppo`)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader


class GymLoopPPO(L.LightningModule):
    """Manual optimization, ``iterations`` training batches (one per rollout), ``num_envs`` copies of ``env`` with
    same-step auto-reset (a finished episode's last observation is in ``info["final_obs"]``)."""

    def __init__(self, env: str, num_envs: int, iterations: int, seed: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.env_id, self.num_envs, self.iterations, self.seed = env, num_envs, iterations, seed
        self.recent_returns: list[float] = []
        self._env: Any = None
        self._obs: np.ndarray | None = None
        self._ep_return = np.zeros(num_envs)
        self._rng = np.random.default_rng(seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.iterations), batch_size=None)  # type: ignore[arg-type]

    def env_obs(self) -> np.ndarray:
        """The current observations (the envs are made and reset at the first call)."""
        if self._env is None:
            import gymnasium as gym

            self._env = gym.make_vec(self.env_id, num_envs=self.num_envs, vectorization_mode="sync",
                                     vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
            self._obs, _ = self._env.reset(seed=self.seed)
        assert self._obs is not None
        return self._obs

    def env_step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step every env: (next obs, reward, terminated, truncated, each env's last obs of the step: the final
        observation of an episode that ended, else the next one). Finished returns go to ``recent_returns``."""
        next_obs, reward, terminated, truncated, info = self._env.step(action)
        self._ep_return += reward
        final = next_obs.copy()
        for i in np.nonzero(terminated | truncated)[0]:
            final[i] = info["final_obs"][i]
            self.recent_returns = [*self.recent_returns, float(self._ep_return[i])][-100:]
            self._ep_return[i] = 0.0
        self._obs = next_obs
        return next_obs, reward, terminated, truncated, final

    def log_returns(self) -> None:
        if self.recent_returns:
            self.log("train/episode_return", float(np.mean(self.recent_returns[-20:])))

    def on_fit_end(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
