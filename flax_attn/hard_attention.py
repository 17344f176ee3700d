"""Hard attention: the Recurrent Attention Model (RAM; Mnih et al., NeurIPS 2014, arXiv 1406.6247).

Follows kevinzakka/recurrent-visual-attention at the version that released
``models/ram_6_8x8_2_model_best.pth.tar`` (commit ``3f04ccb``): a glimpse sensor (``sensor``:
retina + ``fc1``..``fc4``), an RNN core (``rnn``: ``i2h``, ``h2h``), a Gaussian location policy
(``locator.fc``, ``mu = tanh(fc(h))``, ``l = tanh(mu + std * eps)``), a softmax classifier
(``classifier.fc``) and a reward baseline (``baseliner.fc``). The policy noise is an explicit input
(``noise``: standard normal draws), so a run is deterministic and can be compared with PyTorch.

:func:`ram_hybrid_loss` is the official training objective: NLL of the classifier, REINFORCE with
the learned baseline on the location log-probabilities, and the baseline's MSE to the reward.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn.convert.engine import LinearFromNCHW, Rename
from flax_attn.layers import BlockFields, DtypeFields, Linear, merge_train
from flax_attn.ops.checks import check_rank
from flax_attn.ops.dtypes import compute_dtype
from flax_attn.ops.sampling import foveate

__all__ = [
    "ActionNetwork",
    "BaselineNetwork",
    "CoreNetwork",
    "GlimpseNetwork",
    "LocationNetwork",
    "RecurrentAttention",
    "gaussian_log_prob",
    "ram_hybrid_loss",
]


def gaussian_log_prob(value: jax.Array, mu: jax.Array, std: float) -> jax.Array:
    """``torch.distributions.Normal(mu, std).log_prob(value)``."""
    return -((value - mu) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)


class GlimpseNetwork(DtypeFields):
    """Glimpse network ``g_t = relu(fc3(relu(fc1(phi))) + fc4(relu(fc2(l))))`` (official ``glimpse_network``).

    Attributes:
      h_g, h_l: hidden sizes of the "what" (``fc1``) and "where" (``fc2``) layers.
      g, k, s: retina patch size, number of patches, scale between patches (:func:`flax_attn.ops.foveate`).
      c: image channels.

    Call ``(x (B, H, W, c), l_t_prev (B, 2))`` -> ``(B, h_g + h_l)``. ``fc1`` reads the glimpse
    flattened in PyTorch's ``(k * c, g, g)`` order; the rename table converts its weight.
    """

    h_g: int
    h_l: int
    g: int
    k: int
    s: float
    c: int

    @nn.nowrap
    def torch_rules(self, layout):
        return [Rename(r"fc1\.weight", "fc1.weight", LinearFromNCHW(self.k * self.c, self.g, self.g))]

    @nn.compact
    def __call__(self, x, l_t_prev):
        kw = self.precision()
        phi = foveate(x, l_t_prev, self.g, self.k, self.s)
        phi = phi.reshape(phi.shape[0], -1)
        phi_out = nn.relu(Linear(self.h_g, name="fc1", **kw)(phi))
        l_out = nn.relu(Linear(self.h_l, name="fc2", **kw)(l_t_prev))
        what = Linear(self.h_g + self.h_l, name="fc3", **kw)(phi_out)
        where = Linear(self.h_g + self.h_l, name="fc4", **kw)(l_out)
        return nn.relu(what + where)


class CoreNetwork(DtypeFields):
    """RNN core ``h_t = relu(i2h(g_t) + h2h(h_{t-1}))`` (official ``core_network``)."""

    input_size: int
    hidden_size: int

    @nn.compact
    def __call__(self, g_t, h_t_prev):
        kw = self.precision()
        return nn.relu(
            Linear(self.hidden_size, name="i2h", **kw)(g_t) + Linear(self.hidden_size, name="h2h", **kw)(h_t_prev)
        )


class _LinearHead(DtypeFields):
    """The one-``fc`` heads of the official port: ``input_size`` is torch's (the input gives the width)."""

    input_size: int
    output_size: int

    @nn.nowrap
    def _fc(self) -> Linear:
        return Linear(self.output_size, name="fc", dtype=self.dtype, param_dtype=self.param_dtype)


class LocationNetwork(_LinearHead):
    """Gaussian location policy (official ``location_network``).

    ``mu = tanh(fc(stop_gradient(h_t)))``, ``l_t = stop_gradient(tanh(mu + std * eps))`` with
    ``eps`` the given standard-normal draw (``(B, output_size)``). Returns ``(mu, l_t)``.
    """

    std: float

    @nn.compact
    def __call__(self, h_t, eps):
        mu = jnp.tanh(self._fc()(jax.lax.stop_gradient(h_t)))
        l_t = jax.lax.stop_gradient(jnp.tanh(mu + self.std * eps.astype(mu.dtype)))
        return mu, l_t


class ActionNetwork(_LinearHead):
    """Classifier ``log_softmax(fc(h_t))`` (official ``action_network``)."""

    @nn.compact
    def __call__(self, h_t):
        logits = self._fc()(h_t)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


class BaselineNetwork(_LinearHead):
    """Reward baseline ``relu(fc(stop_gradient(h_t)))`` (official ``baseline_network``)."""

    @nn.compact
    def __call__(self, h_t):
        return nn.relu(self._fc()(jax.lax.stop_gradient(h_t)))


class RecurrentAttention(BlockFields):
    """Recurrent Attention Model (Mnih et al., arXiv 1406.6247), official PyTorch port semantics.

    Attributes:
      g: retina patch size; k: patches per glimpse; s: scale between patches; c: image channels.
      h_g, h_l: glimpse network hidden sizes; std: policy standard deviation.
      hidden_size: RNN size; num_classes: classifier outputs.
      num_glimpses: glimpses per image (the official training loop's ``num_glimpses``).

    Call ``(x (B, H, W, c), l_0 (B, 2), noise (B, num_glimpses, 2))``: ``l_0`` is the first glimpse
    location (the official trainer draws it from ``U(-1, 1)``), ``noise[:, t]`` the standard-normal
    draw of the policy at step ``t``. Returns a dict:

    * ``log_probas`` ``(B, num_classes)``: classifier log-probabilities after the last glimpse,
    * ``locations`` ``(B, num_glimpses, 2)``: ``l_t`` emitted at each step (``locations[:, t]`` is
      where glimpse ``t + 1`` looks),
    * ``mu`` ``(B, num_glimpses, 2)``: policy means,
    * ``baselines`` ``(B, num_glimpses)`` and ``log_pi`` ``(B, num_glimpses)``: inputs of
      :func:`ram_hybrid_loss`.

    State-dict keys are the official ones (``sensor.fc1``..``fc4``, ``rnn.i2h``/``h2h``,
    ``locator.fc``, ``classifier.fc``, ``baseliner.fc``), e.g. the released
    ``ram_6_8x8_2_model_best.pth.tar`` (``load_state_dict(path, key="model_state")``).

    Example:
      >>> ram = RecurrentAttention(g=8, k=1, s=2, c=1, h_g=128, h_l=128, std=0.17, hidden_size=256,
      ...                          num_classes=10, num_glimpses=6)
      >>> x, l0, eps = jnp.zeros((2, 28, 28, 1)), jnp.zeros((2, 2)), jnp.zeros((2, 6, 2))
      >>> out = ram.apply(ram.init(jax.random.PRNGKey(0), x, l0, eps), x, l0, eps)
      >>> out["log_probas"].shape, out["log_pi"].shape
      ((2, 10), (2, 6))
    """

    g: int = 8
    k: int = 1
    s: float = 2
    c: int = 1
    h_g: int = 128
    h_l: int = 128
    std: float = 0.17
    hidden_size: int = 256
    num_classes: int = 10
    num_glimpses: int = 6

    def setup(self):
        kw = self.precision()
        self.sensor = GlimpseNetwork(self.h_g, self.h_l, self.g, self.k, self.s, self.c, **kw)
        self.rnn = CoreNetwork(self.hidden_size, self.hidden_size, **kw)
        self.locator = LocationNetwork(self.hidden_size, 2, self.std, **kw)
        self.classifier = ActionNetwork(self.hidden_size, self.num_classes, **kw)
        self.baseliner = BaselineNetwork(self.hidden_size, 1, **kw)

    def step(self, x, l_t_prev, h_t_prev, eps):
        """One glimpse (the official ``RecurrentAttention.forward``): ``(h_t, mu, l_t, b_t, log_pi)``."""
        g_t = self.sensor(x, l_t_prev)
        h_t = self.rnn(g_t, h_t_prev)
        mu, l_t = self.locator(h_t, eps)
        b_t = self.baseliner(h_t)[:, 0]
        log_pi = jnp.sum(gaussian_log_prob(l_t, mu, self.std), axis=1)
        return h_t, mu, l_t, b_t, log_pi

    def __call__(self, x, l_0, noise, train: bool | None = None):
        train = merge_train(self, train)
        where = "RecurrentAttention"
        dtype = compute_dtype(where, self.dtype, x=x, l_0=l_0, noise=noise)
        x = x.astype(dtype)
        check_rank(where, "x", x, 4, "(B, H, W, C)")
        b = x.shape[0]
        if x.shape[-1] != self.c:
            raise ValueError(f"{where}: `x` must have c={self.c} channels (last axis), got shape {tuple(x.shape)}")
        if tuple(l_0.shape) != (b, 2):
            raise ValueError(f"{where}: `l_0` must be ({b}, 2), got {tuple(l_0.shape)}")
        if tuple(noise.shape) != (b, self.num_glimpses, 2):
            raise ValueError(
                f"{where}: `noise` must be ({b}, {self.num_glimpses}, 2) (one standard-normal draw "
                f"per glimpse), "
                f"got {tuple(noise.shape)}"
            )
        if self.h_g + self.h_l != self.hidden_size:
            # The official core is core_network(hidden_size, hidden_size) fed with g_t of size h_g + h_l.
            raise ValueError(f"{where}: h_g + h_l = {self.h_g + self.h_l} must equal hidden_size={self.hidden_size}")
        h_t = jnp.zeros((b, self.hidden_size), dtype)
        l_t = l_0.astype(dtype)
        locs, mus, bs, lps = [], [], [], []
        # A Python loop: num_glimpses is small (6) and each step differs in nothing but its inputs.
        for t in range(self.num_glimpses):
            h_t, mu, l_t, b_t, log_pi = self.step(x, l_t, h_t, noise[:, t])
            locs.append(l_t)
            mus.append(mu)
            bs.append(b_t)
            lps.append(log_pi)
        return {
            "baselines": jnp.stack(bs, axis=1),
            "locations": jnp.stack(locs, axis=1),
            "log_pi": jnp.stack(lps, axis=1),
            "log_probas": self.classifier(h_t),
            "mu": jnp.stack(mus, axis=1),
        }


def ram_hybrid_loss(log_probas: jax.Array, log_pi: jax.Array, baselines: jax.Array, labels: jax.Array):
    """The official hybrid loss: ``nll + mse(baselines, R) + mean_b(sum_t(-log_pi * (R - sg(baselines))))``.

    ``R`` is 1 where the classifier's argmax equals the label (the same reward at every glimpse).

    Args:
      log_probas: ``(B, num_classes)``; log_pi, baselines: ``(B, T)``; labels: ``(B,)`` ints.

    Returns:
      ``(loss, aux)`` with ``aux`` holding ``loss_action``, ``loss_baseline``, ``loss_reinforce``
      and ``accuracy`` (fraction correct).
    """
    check_rank("ram_hybrid_loss", "log_probas", log_probas, 2, "(B, num_classes)")
    check_rank("ram_hybrid_loss", "log_pi", log_pi, 2, "(B, T)")
    if baselines.shape != log_pi.shape or labels.shape != log_probas.shape[:1] or log_pi.shape[0] != labels.shape[0]:
        raise ValueError(
            f"ram_hybrid_loss: shapes do not agree: log_probas {log_probas.shape}, log_pi {log_pi.shape}, "
            f"baselines {baselines.shape}, labels {labels.shape}"
        )
    predicted = jnp.argmax(log_probas, axis=1)
    correct = (predicted == labels).astype(jnp.float32)
    reward = jnp.broadcast_to(correct[:, None], log_pi.shape)
    loss_action = -jnp.mean(jnp.take_along_axis(log_probas, labels[:, None], axis=1))
    loss_baseline = jnp.mean((baselines - reward) ** 2)
    adjusted = reward - jax.lax.stop_gradient(baselines)
    loss_reinforce = jnp.mean(jnp.sum(-log_pi * adjusted, axis=1))
    loss = loss_action + loss_baseline + loss_reinforce
    return loss, {
        "loss_action": loss_action,
        "loss_baseline": loss_baseline,
        "loss_reinforce": loss_reinforce,
        "accuracy": jnp.mean(correct),
    }
