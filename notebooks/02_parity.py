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
# # Parity: a PyTorch checkpoint in, the same numbers out, and back again
#
# We build PyTorch originals with random weights, save them as `.pth` files, load them into the
# Flax blocks with `flax_attn.convert`, compare every output element, and write the Flax
# variables back into a PyTorch state dict that `load_state_dict(strict=True)` accepts.

# %%
# %matplotlib inline
import os
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
import torch

import flax_attn
from flax_attn.convert import from_torch, load_state_dict, mapping, to_torch

jax.config.update("jax_default_matmul_precision", "highest")
FIG_DIR = os.environ.get("FLAX_ATTN_FIG_DIR", tempfile.mkdtemp())
torch.manual_seed(0)

# %% [markdown]
# ## 1. `torch.nn.MultiheadAttention` with different key/value widths and padding

# %%
torch_mha = torch.nn.MultiheadAttention(64, 8, kdim=48, vdim=32, batch_first=True).eval()
path = os.path.join(tempfile.mkdtemp(), "mha.pth")
torch.save(torch_mha.state_dict(), path)

state_dict = load_state_dict(path)  # torch.load(weights_only=True): no code from the file runs
rng = np.random.default_rng(0)
q = rng.standard_normal((4, 13, 64), dtype=np.float32)
kv_k = rng.standard_normal((4, 17, 48), dtype=np.float32)
kv_v = rng.standard_normal((4, 17, 32), dtype=np.float32)
pad = np.zeros((4, 17), bool)
pad[0, -5:] = True

mha = flax_attn.MultiheadAttention(embed_dim=64, num_heads=8, kdim=48, vdim=32)
variables = from_torch(mha, state_dict, q, kv_k, kv_v)
for flax_name, torch_name in list(mapping(mha, q, kv_k, kv_v).items())[:6]:
    print(f"{flax_name:<28s} <- {torch_name}")

# %%
flax_out, flax_w = jax.jit(lambda v: mha.apply(v, q, kv_k, kv_v, key_padding_mask=pad))(variables)
with torch.no_grad():
    t_out, t_w = torch_mha(
        torch.from_numpy(q), torch.from_numpy(kv_k), torch.from_numpy(kv_v), key_padding_mask=torch.from_numpy(pad)
    )
err = np.abs(np.asarray(flax_out) - t_out.numpy())
print(f"outputs: max abs error {err.max():.2e}, mean {err.mean():.2e}")
print(f"weights: max abs error {np.abs(np.asarray(flax_w) - t_w.numpy()).max():.2e}")

# %% [markdown]
# ## 2. A criss-cross attention head (CCNet), BatchNorm statistics included

# %%
from flax_attn.testing.parity import randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref.ccnet import RCCAModule as TorchRCCA  # noqa: E402

t_rcca = TorchRCCA(64, 32, 5, dropout=0.0)
randomize_torch_module(t_rcca, seed=0)  # non-trivial weights, gamma and BN running statistics
t_rcca.eval()
x = rng.standard_normal((2, 21, 27, 64), dtype=np.float32)  # NHWC, odd sizes
rcca = flax_attn.RCCAModule(64, 32, 5, dropout=0.0)
rcca_vars = from_torch(rcca, t_rcca.state_dict(), x)
flax_seg = np.asarray(jax.jit(lambda v, x: rcca.apply(v, x))(rcca_vars, x))
with torch.no_grad():
    torch_seg = t_rcca(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
seg_err = np.abs(flax_seg - torch_seg)
print(f"RCCA logits: max abs error {seg_err.max():.2e} over {seg_err.size} values")

# %% [markdown]
# ## 3. Where the errors are: per-element histogram

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, e, title in ((axes[0], err, "MultiheadAttention output"), (axes[1], seg_err, "RCCA head output")):
    ax.hist(np.log10(e.ravel() + 1e-12), bins=60, color="tab:blue")
    ax.axvline(np.log10(1e-5), color="tab:red", ls="--", label="tolerance 1e-5")
    ax.set_xlabel("log10 |Flax - PyTorch|")
    ax.set_title(title)
    ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "parity_histogram.png"), dpi=80)
assert err.max() < 1e-5 and seg_err.max() < 1e-4

# %% [markdown]
# ## 4. Round trip back to PyTorch

# %%
back = to_torch(rcca, rcca_vars, x, return_tensors="pt")
t_fresh = TorchRCCA(64, 32, 5, dropout=0.0)
missing, unexpected = t_fresh.load_state_dict(back, strict=False)
print("missing:", missing, "unexpected:", unexpected)
same = all(torch.equal(back[k], v) for k, v in t_rcca.state_dict().items() if k in back)
print("every exported tensor identical to the original:", same)
