"""References for ``flax_attn.hard_attention``: the recurrent attention model in plain torch.

Written from kevinzakka/recurrent-visual-attention at the commit that released
``models/ram_6_8x8_2_model_best.pth.tar`` (``modules.py``/``model.py``/``trainer.py`` of 3f04ccb):
per-image patch extraction with the zero padding applied only when a patch crosses the border,
``F.avg_pool2d`` to shrink the larger patches, the ``glimpse_network``/``core_network``/
``location_network``/``action_network``/``baseline_network`` modules under the names
``sensor``/``rnn``/``locator``/``classifier``/``baseliner``. The one change: the policy's
``noise.data.normal_(std=std)`` draw is an argument (``std * eps``), so runs are deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal


class retina:
    def __init__(self, g, k, s):
        self.g, self.k, self.s = g, k, s

    def foveate(self, x, l):
        phi = []
        size = self.g
        for _ in range(self.k):
            phi.append(self.extract_patch(x, l, size))
            size = int(self.s * size)
        for i in range(1, len(phi)):
            k = phi[i].shape[-1] // self.g
            phi[i] = F.avg_pool2d(phi[i], k)
        phi = torch.cat(phi, 1)
        return phi.view(phi.shape[0], -1)

    def extract_patch(self, x, l, size):
        B, C, H, W = x.shape
        coords = self.denormalize(H, l)
        patch_x = coords[:, 0] - (size // 2)
        patch_y = coords[:, 1] - (size // 2)
        patch = []
        for i in range(B):
            im = x[i].unsqueeze(dim=0)
            T = im.shape[-1]
            from_x, to_x = int(patch_x[i]), int(patch_x[i]) + size
            from_y, to_y = int(patch_y[i]), int(patch_y[i]) + size
            if self.exceeds(from_x, to_x, from_y, to_y, T):
                p = size // 2 + 1
                im = F.pad(im, (p, p, p, p, 0, 0, 0, 0), "constant", 0)
                from_x, to_x, from_y, to_y = from_x + p, to_x + p, from_y + p, to_y + p
            patch.append(im[:, :, from_y:to_y, from_x:to_x])
        return torch.cat(patch)

    def denormalize(self, T, coords):
        return (0.5 * ((coords + 1.0) * T)).long()

    def exceeds(self, from_x, to_x, from_y, to_y, T):
        return (from_x < 0) or (from_y < 0) or (to_x > T) or (to_y > T)


class glimpse_network(nn.Module):
    def __init__(self, h_g, h_l, g, k, s, c):
        super().__init__()
        self.retina = retina(g, k, s)
        self.fc1 = nn.Linear(k * g * g * c, h_g)
        self.fc2 = nn.Linear(2, h_l)
        self.fc3 = nn.Linear(h_g, h_g + h_l)
        self.fc4 = nn.Linear(h_l, h_g + h_l)

    def forward(self, x, l_t_prev):
        phi = self.retina.foveate(x, l_t_prev)
        l_t_prev = l_t_prev.view(l_t_prev.size(0), -1)
        phi_out = F.relu(self.fc1(phi))
        l_out = F.relu(self.fc2(l_t_prev))
        return F.relu(self.fc3(phi_out) + self.fc4(l_out))


class core_network(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.i2h = nn.Linear(input_size, hidden_size)
        self.h2h = nn.Linear(hidden_size, hidden_size)

    def forward(self, g_t, h_t_prev):
        return F.relu(self.i2h(g_t) + self.h2h(h_t_prev))


class action_network(nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.fc = nn.Linear(input_size, output_size)

    def forward(self, h_t):
        return F.log_softmax(self.fc(h_t), dim=1)


class location_network(nn.Module):
    def __init__(self, input_size, output_size, std):
        super().__init__()
        self.std = std
        self.fc = nn.Linear(input_size, output_size)

    def forward(self, h_t, eps):
        mu = torch.tanh(self.fc(h_t.detach()))
        noise = self.std * eps  # official: torch.zeros_like(mu).normal_(std=self.std)
        l_t = torch.tanh(mu + noise)
        return mu, l_t.detach()


class baseline_network(nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.fc = nn.Linear(input_size, output_size)

    def forward(self, h_t):
        return F.relu(self.fc(h_t.detach()))


class RecurrentAttention(nn.Module):
    """The official ``RecurrentAttention``: one glimpse per ``forward``."""

    def __init__(self, g, k, s, c, h_g, h_l, std, hidden_size, num_classes):
        super().__init__()
        self.std = std
        self.sensor = glimpse_network(h_g, h_l, g, k, s, c)
        self.rnn = core_network(hidden_size, hidden_size)
        self.locator = location_network(hidden_size, 2, std)
        self.classifier = action_network(hidden_size, num_classes)
        self.baseliner = baseline_network(hidden_size, 1)

    def forward(self, x, l_t_prev, h_t_prev, eps, last=False):
        g_t = self.sensor(x, l_t_prev)
        h_t = self.rnn(g_t, h_t_prev)
        mu, l_t = self.locator(h_t, eps)
        b_t = self.baseliner(h_t).squeeze(1)
        log_pi = Normal(mu, self.std).log_prob(l_t)
        log_pi = torch.sum(log_pi, dim=1)
        if last:
            log_probas = self.classifier(h_t)
            return h_t, l_t, b_t, log_probas, log_pi, mu
        return h_t, l_t, b_t, log_pi, mu


class RecurrentAttentionRollout(RecurrentAttention):
    """The official trainer's glimpse loop over ``num_glimpses`` steps (same parameters and keys)."""

    def __init__(self, g, k, s, c, h_g, h_l, std, hidden_size, num_classes, num_glimpses=6):
        super().__init__(g, k, s, c, h_g, h_l, std, hidden_size, num_classes)
        self.num_glimpses = num_glimpses
        self.hidden_size = hidden_size

    def forward(self, x, l_0, noise):
        h_t = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype)
        l_t = l_0
        locs, mus, baselines, log_pi = [], [], [], []
        for t in range(self.num_glimpses - 1):
            h_t, l_t, b_t, p, mu = super().forward(x, l_t, h_t, noise[:, t])
            locs.append(l_t)
            mus.append(mu)
            baselines.append(b_t)
            log_pi.append(p)
        h_t, l_t, b_t, log_probas, p, mu = super().forward(x, l_t, h_t, noise[:, -1], last=True)
        locs.append(l_t)
        mus.append(mu)
        baselines.append(b_t)
        log_pi.append(p)
        return {
            "baselines": torch.stack(baselines).transpose(1, 0),
            "locations": torch.stack(locs, dim=1),
            "log_pi": torch.stack(log_pi).transpose(1, 0),
            "log_probas": log_probas,
            "mu": torch.stack(mus, dim=1),
        }


def hybrid_loss(log_probas, log_pi, baselines, y):
    """The official trainer's loss (``train_one_epoch``)."""
    predicted = torch.max(log_probas, 1)[1]
    R = (predicted.detach() == y).float()
    R = R.unsqueeze(1).repeat(1, log_pi.shape[1])
    loss_action = F.nll_loss(log_probas, y)
    loss_baseline = F.mse_loss(baselines, R)
    adjusted_reward = R - baselines.detach()
    loss_reinforce = torch.sum(-log_pi * adjusted_reward, dim=1)
    loss_reinforce = torch.mean(loss_reinforce, dim=0)
    return loss_action + loss_baseline + loss_reinforce
