"""A straightforward IQL update, written the way CORL's iql.py writes it, as a speed and correctness yardstick.

CORL: https://github.com/tinkoff-ai/CORL/blob/main/algorithms/offline/iql.py

Same structure as CORL (two separate Q nn.Sequential nets, a V net, one Adam per module,
`torch.distributions.Normal` for the policy, a Python loop for the Polyak update), but the *math*
of iql.py, so the two can be compared number for number:
  * V is updated first, and the actor weights and the Q target use the *updated* V
    (CORL computes both with the V from before its update);
  * the Q loss is the sum of the two MSEs (CORL averages them);
  * the actor weight uses the min of the target twins, as in CORL.
Only iql.py's default actor is mirrored: no dropout, a state-independent log-std.
Losses are returned as tensors, not `.item()`s as CORL logs them, so that the speed comparison
measures the update and not one host sync per step.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Normal

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # as iql.py (and CORL)


def mlp(dims, output_activation=None) -> nn.Sequential:
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    if output_activation is not None:
        layers.append(output_activation)
    return nn.Sequential(*layers)


class TwinQ(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden_dims):
        super().__init__()
        dims = [obs_dim + act_dim, *hidden_dims, 1]
        self.q1, self.q2 = mlp(dims), mlp(dims)

    def both(self, obs, actions):
        sa = torch.cat([obs, actions], 1)
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)

    def forward(self, obs, actions):
        return torch.min(*self.both(obs, actions))


class GaussianPolicy(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden_dims):
        super().__init__()
        self.net = mlp([obs_dim, *hidden_dims, act_dim], nn.Tanh())  # the mean is squashed, the distribution is not
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs) -> Normal:
        std = torch.exp(self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX))
        return Normal(self.net(obs), std)


def asymmetric_l2_loss(u, tau):
    return torch.mean(torch.abs(tau - (u < 0).float()) * u**2)


class ReferenceIQL:
    def __init__(self, obs_dim, act_dim, hidden_dims=(256, 256), total_steps=1_000_000, lr=3e-4, discount=0.99,
                 tau=0.005, expectile=0.7, temperature=3.0, exp_adv_max=100.0, device="cpu"):
        self.qf = TwinQ(obs_dim, act_dim, hidden_dims).to(device)
        self.q_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.vf = mlp([obs_dim, *hidden_dims, 1]).to(device)
        self.actor = GaussianPolicy(obs_dim, act_dim, hidden_dims).to(device)
        # Plain Adam: PyTorch picks its default implementation (per-tensor loop on CPU, foreach on CUDA).
        self.v_optimizer = torch.optim.Adam(self.vf.parameters(), lr=lr)
        self.q_optimizer = torch.optim.Adam(self.qf.parameters(), lr=lr)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.actor_lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_optimizer, total_steps)
        self.discount, self.tau, self.expectile = discount, tau, expectile
        self.temperature, self.exp_adv_max = temperature, exp_adv_max

    def to(self, dtype):
        """Cast every network (e.g. to float64 for an exact comparison); call before the first update."""
        for m in (self.qf, self.q_target, self.vf, self.actor):
            m.to(dtype)
        return self

    def update(self, batch) -> dict:
        """One gradient step on a `iql.Batch` (obs, actions, rewards, next_obs, masks = 1 - terminal)."""
        # V: expectile regression towards the min of the *target* twins.
        with torch.no_grad():
            target_q = self.q_target(batch.obs, batch.actions)
        v = self.vf(batch.obs).squeeze(-1)
        value_loss = asymmetric_l2_loss(target_q - v, self.expectile)
        self.v_optimizer.zero_grad()
        value_loss.backward()
        self.v_optimizer.step()

        # The Q target and the actor's advantage both use the V just updated (iql.py's order).
        with torch.no_grad():
            v_new = self.vf(batch.obs).squeeze(-1)
            next_v = self.vf(batch.next_obs).squeeze(-1)
        adv = target_q - v_new

        # Q: regression to r + gamma * mask * V(s'); the two critics' losses are summed.
        targets = batch.rewards + batch.masks * self.discount * next_v
        q1, q2 = self.qf.both(batch.obs, batch.actions)
        critic_loss = F.mse_loss(q1, targets) + F.mse_loss(q2, targets)
        self.q_optimizer.zero_grad()
        critic_loss.backward()
        self.q_optimizer.step()
        # Polyak averaging, one parameter at a time.
        with torch.no_grad():
            for p_t, p in zip(self.q_target.parameters(), self.qf.parameters()):
                p_t.data.mul_(1 - self.tau).add_(self.tau * p.data)

        # Actor: advantage-weighted regression; the weight carries no gradient.
        exp_adv = torch.exp(self.temperature * adv.detach()).clamp(max=self.exp_adv_max)
        bc_losses = -self.actor(batch.obs).log_prob(batch.actions).sum(-1)
        actor_loss = torch.mean(exp_adv * bc_losses)
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()
        self.actor_lr_schedule.step()
        return {"value_loss": value_loss.detach(), "critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach()}


@torch.no_grad()
def copy_from_iql(ref: ReferenceIQL, value: nn.Sequential, critic, target_critic, actor) -> ReferenceIQL:
    """Load iql.py's networks into `ref` (call before its first update, so the Adam states are fresh)."""

    def linears(module):
        return [m for m in module if isinstance(m, nn.Linear)]

    for dst, src in zip(linears(ref.vf), linears(value)):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
    # iql.TwinQ stores layer i of both critics as weights[i]: (2, in, out) and biases[i]: (2, 1, out).
    for twin, twin_src in ((ref.qf, critic), (ref.q_target, target_critic)):
        for k, q in enumerate((twin.q1, twin.q2)):
            for dst, w, b in zip(linears(q), twin_src.weights, twin_src.biases):
                dst.weight.copy_(w[k].T)
                dst.bias.copy_(b[k, 0])
    # iql.Actor: trunk (hidden layers) + mean head, tanh applied in forward; here one Sequential ending in Tanh.
    if hasattr(actor, "log_std_layer") or any(isinstance(m, nn.Dropout) for m in actor.trunk):
        raise ValueError("the reference mirrors only iql.py's default actor (no dropout, state-independent log-std)")
    for dst, src in zip(linears(ref.actor.net), [*linears(actor.trunk), actor.mean]):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
    ref.actor.log_std.copy_(actor.log_std)
    return ref
