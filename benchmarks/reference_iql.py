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
    def __init__(
        self,
        obs_dim,
        act_dim,
        hidden_dims=(256, 256),
        total_steps=1_000_000,
        lr=3e-4,
        discount=0.99,
        tau=0.005,
        expectile=0.7,
        temperature=3.0,
        exp_adv_max=100.0,
        device="cpu",
    ):
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


def member_layers(ensemble, k: int) -> list:
    """Member k of an iql.Ensemble as (weight, bias) per layer, laid out as nn.Linear holds them: (out, in) and (out,)."""
    return [(w[k].T, b[k, 0]) for w, b in zip(ensemble.weights, ensemble.biases)]


@torch.no_grad()
def copy_from_iql(ref: ReferenceIQL, value, critic, target_critic, actor) -> ReferenceIQL:
    """Load the networks of a single-seed iql.py run into `ref` (before its first update, so the Adam states are fresh)."""

    def load(linears, layers):
        for dst, (w, b) in zip([m for m in linears if isinstance(m, nn.Linear)], layers, strict=True):
            dst.weight.copy_(w)
            dst.bias.copy_(b)

    load(ref.vf, member_layers(value, 0))
    for twin, twin_src in ((ref.qf, critic), (ref.q_target, target_critic)):  # a seed's twins are critic members 0 and 1
        for k, q in enumerate((twin.q1, twin.q2)):
            load(q, member_layers(twin_src, k))
    # iql.Actor: trunk (hidden layers) + mean head, tanh applied in forward; here one Sequential ending in Tanh.
    if hasattr(actor, "log_std_layer") or actor.trunk.dropout > 0:
        raise ValueError("the reference mirrors only iql.py's default actor (no dropout, state-independent log-std)")
    load(ref.actor.net, member_layers(actor.trunk, 0) + member_layers(actor.mean, 0))
    ref.actor.log_std.copy_(actor.log_std[0, 0])
    return ref
