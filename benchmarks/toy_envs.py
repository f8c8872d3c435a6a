"""The toy problems of Declan Oller's IQL blog post (https://declanoller.github.io/iql_1) as Gymnasium
environments with a continuous action whose sign is the choice (positive = up / the good arm, negative = down / the bad
arm)."""

import gymnasium as gym
import numpy as np


class TwoStepEnv(gym.Env):
    """s0 -up-> s1, s0 -down-> s2 (reward 0); at s1 up gives +10 and down -10; at s2 either gives +1.
    The best return is 10 (up, up); SARSA-style values (expectile 0.5) on 50/50 data prefer down at s0."""

    observation_space = gym.spaces.Box(0.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _obs(self):
        return np.eye(3, dtype=np.float32)[self.state]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = 0
        return self._obs(), {}

    def step(self, action):
        up = float(np.asarray(action).reshape(-1)[0]) > 0.0
        if self.state == 0:
            self.state = 1 if up else 2
            return self._obs(), 0.0, False, False, {}
        reward = (10.0 if up else -10.0) if self.state == 1 else 1.0
        return self._obs(), reward, True, False, {}


class BanditEnv(gym.Env):
    """One state, one step: the up arm pays 1, the down arm 0."""

    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.ones(1, np.float32), {}

    def step(self, action):
        up = float(np.asarray(action).reshape(-1)[0]) > 0.0
        return np.ones(1, np.float32), 1.0 if up else 0.0, True, False, {}


gym.register("ToyTwoStep-v0", entry_point="benchmarks.toy_envs:TwoStepEnv")
gym.register("ToyBandit-v0", entry_point="benchmarks.toy_envs:BanditEnv")
