# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: three attention blocks in a small Flax model, jitted and sharded
#
# Every block in `flax_attn` is an ordinary Flax linen module on NHWC images, so it drops into
# any model. Here a tiny CNN uses three of them: a squeeze-and-excitation channel gate
# (`SELayer`), CBAM's channel-then-spatial gate (`CBAM`) and CCNet's criss-cross attention
# (`CrissCrossAttention`). We initialise it, run it, compile it with `jax.jit`, and run it with the
# batch split over all devices.
#
# To see several devices on a laptop, the first cell asks XLA for four CPU devices. It must run
# *before* JAX is imported: XLA reads the flag once, when its backend starts.

# %%
# %matplotlib inline
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import tempfile  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import skimage.transform  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import flax_attn  # noqa: E402
from flax_attn.layers import BatchNorm, Conv  # noqa: E402

FIG_DIR = os.environ.get("FLAX_ATTN_FIG_DIR", tempfile.mkdtemp())
os.makedirs(FIG_DIR, exist_ok=True)
print("devices:", jax.devices())

# %% [markdown]
# ## 1. A model with three attention blocks
#
# `flax_attn.layers.Conv` and `BatchNorm` have PyTorch's semantics (explicit padding, torch
# momentum), so a model built from them converts to and from a PyTorch state dict mechanically.
# Each block takes `train=` like the rest of the library; `CrissCrossAttention` starts with its
# residual scale `gamma = 0` (the paper's init), so at initialisation it is the identity and
# learns how much attention to mix in.


# %%
class TinyAttentionNet(nn.Module):
    num_classes: int = 10
    width: int = 32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = Conv(self.width, 3, padding=1, use_bias=False, name="stem")(x)
        x = nn.relu(BatchNorm(name="stem_bn")(x, train=train))
        x = flax_attn.SELayer(channel=self.width, reduction=4, name="se")(x, train=train)
        x = Conv(self.width, 3, stride=2, padding=1, name="down")(x)
        x = nn.relu(x)
        x = flax_attn.CBAM(gate_channels=self.width, reduction_ratio=4, name="cbam")(x, train=train)
        x = flax_attn.CrissCrossAttention(in_dim=self.width, name="cca")(x, train=train)
        features = x
        x = jnp.mean(x, axis=(1, 2))  # global average pool
        return nn.Dense(self.num_classes, name="head")(x), features


model = TinyAttentionNet()
images = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32, 48, 3), dtype=np.float32))
variables = model.init(jax.random.PRNGKey(0), images)
print(jax.tree_util.tree_map(lambda a: a.shape, variables["params"]["cca"]))
n_params = sum(a.size for a in jax.tree_util.tree_leaves(variables["params"]))
print(f"{n_params} parameters; collections: {list(variables)}")

# %% [markdown]
# ## 2. Apply, eagerly and under `jax.jit`
#
# In training mode BatchNorm uses batch statistics and returns its updated running statistics
# (`mutable=["batch_stats"]`), exactly like `model.train()` in PyTorch. The jitted function gives
# the same numbers as the eager one.

# %%
logits, feats = model.apply(variables, images)
(train_logits, _), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
print("logits", logits.shape, "features", feats.shape)
print("updated statistics:", list(updates["batch_stats"]))


@jax.jit
def predict(variables, images):
    logits, _ = model.apply(variables, images)
    return jax.nn.softmax(logits)


probs = predict(variables, images)
print("jit vs eager, max abs difference:", float(jnp.max(jnp.abs(probs - jax.nn.softmax(logits)))))

# %% [markdown]
# ## 3. A data-parallel forward over every device
#
# A `Mesh` names the device axis (`"data"`); `NamedSharding(mesh, P("data"))` splits the first
# (batch) axis of the images over it, and `NamedSharding(mesh, P())` replicates the parameters.
# `jax.jit` then compiles one program that runs on every device with its slice of the batch, and
# the output comes back sharded the same way. Nothing in the model changes.

# %%
mesh = Mesh(np.array(jax.devices()), axis_names=("data",))
batch_sharding = NamedSharding(mesh, P("data"))
replicated = NamedSharding(mesh, P())

sharded_images = jax.device_put(images, batch_sharding)
sharded_vars = jax.device_put(variables, replicated)
sharded_probs = predict(sharded_vars, sharded_images)

print("input sharding :", sharded_images.sharding)
print("output sharding:", sharded_probs.sharding)
for shard in sharded_probs.addressable_shards:
    print(f"  {shard.device}: rows {shard.index[0].start}..{shard.index[0].stop - 1}, shape {shard.data.shape}")
print("sharded vs single-device, max abs difference:", float(jnp.max(jnp.abs(sharded_probs - probs))))
assert sharded_probs.sharding.spec == P("data")

# %% [markdown]
# ## 4. What the gates do to a real photograph
#
# CBAM's spatial gate is `sigmoid(BN(conv7x7([max_c x, mean_c x])))`: one weight in (0, 1) per
# pixel that rescales every channel there. `capture_intermediates=True` records the output of
# every submodule's `__call__`, so the gate's logits (the output of `cbam/SpatialGate/spatial`)
# can be read without changing the model. The weights here are the random initialisation, so
# the map shows how the gate reacts to local contrast in the features, not anything learned.

# %%
photo = skimage.transform.resize(skimage.data.chelsea(), (96, 144), anti_aliasing=True).astype(np.float32)
x = jnp.asarray((photo - photo.mean((0, 1))) / photo.std((0, 1)))[None]
(_, feats), state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
inter = state["intermediates"]
spatial_gate = jax.nn.sigmoid(inter["cbam"]["SpatialGate"]["spatial"]["__call__"][0])[0, ..., 0]
channel_gate = np.asarray(jax.nn.sigmoid(inter["se"]["fc_2"]["__call__"][0])[0])  # SE: sigmoid(fc_2)

fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
axes[0].imshow(photo)
axes[0].set_title("input (skimage chelsea)")
im = axes[1].imshow(spatial_gate, cmap="magma")
axes[1].set_title("CBAM spatial gate (48 x 72)")
fig.colorbar(im, ax=axes[1], fraction=0.035)
axes[2].imshow(np.linalg.norm(np.asarray(feats[0]), axis=-1), cmap="viridis")
axes[2].set_title("|features| after criss-cross")
for ax in axes[:3]:
    ax.axis("off")
axes[3].bar(np.arange(channel_gate.size), channel_gate, color="tab:green")
axes[3].set_title("SE gate per channel")
axes[3].set_xlabel("channel")
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "quickstart_gates.png"), dpi=80)

# %% [markdown]
# The SE gate (right) is one number per channel, computed from the globally pooled features;
# the CBAM spatial gate is one number per pixel. Untrained, both stay close to 0.5 (small logits),
# and the criss-cross block passes its input through unchanged because `gamma` starts at 0: the
# third panel is the norm of the CBAM output, i.e. what attention will start from. A trained
# network learns to open these gates on what matters for its task: notebook `03_attention_maps`
# shows the blocks with released weights where they exist.
