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
# # Attention maps: where the blocks look on a real photograph
#
# Shown here, on scikit-image's astronaut photograph and scikit-learn's digits:
#
# | section | block | weights |
# |---|---|---|
# | 2 | CCNet criss-cross attention, one and two recurrences (RCCA) | hand-set (shared random q/k projection) |
# | 3 | CBAM channel and spatial gates | random |
# | 4 | A2N attention dropout weights per block, attention maps, pixel attention | **released** x2 checkpoint |
# | 5 | ACmix / NATTEN neighbourhood windows, Swin (shifted) windows | hand-set |
# | 6 | DANet position attention (PAM) and channel attention (CAM) | hand-set; CAM has no weights |
# | 7 | Non-local blocks of the official MNIST network | **released** `net.pth` |
# | 8 | STN: affine warps of digits, `theta` learned by gradient | fitted in the notebook |
#
# A caution for every block without released weights: with random (or hand-set) weights a map
# shows the *structure* of the attention, where a pixel can look and how the weights depend on
# the input, not the semantics a trained network would learn. The released checkpoints are read
# from `shared/data` next to the repository (`../shared/data`); where it is absent the notebook
# falls back to random weights and says so in its output.

# %%
# %matplotlib inline
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import skimage.data
import skimage.transform

import flax_attn
from flax_attn.convert import from_torch, load_state_dict
from flax_attn.sr_metrics import bicubic_downscale, bicubic_upscale, psnr_y, quantize

jax.config.update("jax_default_matmul_precision", "highest")
FIG_DIR = os.environ.get("FLAX_ATTN_FIG_DIR", tempfile.mkdtemp())
os.makedirs(FIG_DIR, exist_ok=True)
REPO_ROOT = Path(flax_attn.__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "data"
A2N_CKPT = SHARED / "a2n" / "aan_x2.pt"
print("released A2N x2 checkpoint:", A2N_CKPT if A2N_CKPT.exists() else "absent (random weights below)")

photo = skimage.data.astronaut()  # 512 x 512 RGB, uint8
small = skimage.transform.resize(photo, (96, 96), anti_aliasing=True).astype(np.float32)  # [0, 1]

# %% [markdown]
# ## 1. Features to attend over
#
# Attention blocks sit inside networks and attend over features, not raw pixels. As a stem we
# use the first convolution of the released A2N model (40 learned 3x3 filters: edges and colour
# opponents), or a random convolution when the checkpoint is absent.

# %%
a2n_model = flax_attn.A2N(scale=2)  # the released configuration: nf 40, unf 24, 16 AABs
if A2N_CKPT.exists():
    a2n_vars = from_torch(a2n_model, load_state_dict(A2N_CKPT), jnp.zeros((1, 8, 8, 3)))
else:
    a2n_vars = a2n_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    print("NOTE: A2N checkpoint not found; the stem and section 4 use random weights")
stem_w = a2n_vars["params"]["conv_first"]

stem = flax_attn.layers.Conv(40, 3, padding=1)
feats = stem.apply({"params": stem_w}, jnp.asarray(small * 255.0)[None])
feats = (feats - feats.mean((0, 1, 2))) / (feats.std((0, 1, 2)) + 1e-6)  # per-channel standardised
print("features:", feats.shape)

# %% [markdown]
# ## 2. CCNet: criss-cross attention, one and two recurrences
#
# Each pixel attends to the `H + W - 1` pixels of its row and column, with one softmax over all
# of them. CCNet's RCCA module applies the *same* block twice: after the first pass every pixel
# has gathered its cross; in the second pass it gathers crosses of pixels that already hold their
# own crosses, so information from *every* pixel can reach it (two hops: along a row, then along
# a column). The effective two-hop weights of pixel `p` are row `p` of `A2 @ A1`.
#
# Weights: `query_conv` and `key_conv` are set to the same random projection (scaled so the
# softmax is not flat), so the logits are a similarity of projected stem features; `gamma` is
# set to 1 (it starts at 0, which would make the second pass see the unchanged input). A trained
# CCNet learns its own projections; the *reach* shown here is the same for any weights.

# %%
cca = flax_attn.CrissCrossAttention(in_dim=40, implementation="xla")
cca_vars = cca.init(jax.random.PRNGKey(1), feats)
params = jax.tree_util.tree_map(lambda a: a, cca_vars["params"])
params["query_conv"] = {"kernel": params["query_conv"]["kernel"] * 1.3, "bias": jnp.zeros(5)}
params["key_conv"] = params["query_conv"]
params["gamma"] = jnp.ones(1)
cca_vars = {"params": params}

out1, w1 = cca.apply(cca_vars, feats, return_weights=True)
out2, w2 = cca.apply(cca_vars, out1, return_weights=True)  # RCCA: shared weights, recurrence 2
w1, w2 = np.asarray(w1[0]), np.asarray(w2[0])
H, W = w1.shape[:2]
print("weights per pixel:", w1.shape[-1], "= H + W - 1; rows sum to", w1[0, 0].sum())


def cross_map(weights, y, x):
    """Scatter pixel (y, x)'s H + W - 1 weights (official order: row, then column without the centre)."""
    m = np.zeros((H, W), np.float32)
    m[y, :] = weights[y, x, :W]
    rows = [j for j in range(H) if j != y]
    m[rows, x] = weights[y, x, W:]
    return m


def two_hop_map(y, x):
    """Row (y, x) of A2 @ A1: the second pass's weights spread through each cross pixel's first pass."""
    m = np.zeros((H, W), np.float32)
    a2 = cross_map(w2, y, x)
    for qy, qx in zip(*np.nonzero(a2)):
        m += a2[qy, qx] * cross_map(w1, qy, qx)
    return m


def log_overlay(ax, m, title, decades=3.0):
    """Weights on a log scale over the grey photo; below max / 10**decades is left transparent."""
    logm = np.log10(np.maximum(m, 1e-30) / m.max())
    ax.imshow(small.mean(-1), cmap="gray", vmin=0, vmax=1.4)
    ax.imshow(np.ma.masked_less(logm, -decades), cmap="plasma", vmin=-decades, vmax=0)
    ax.set_title(title, fontsize=10)


pixels = {"hair": (8, 40), "face": (30, 50), "flag": (20, 88), "suit": (75, 30)}
fig, axes = plt.subplots(len(pixels), 3, figsize=(9, 3 * len(pixels)))
for row, (name, (y, x)) in enumerate(pixels.items()):
    axes[row, 0].imshow(small)
    axes[row, 0].set_title(f"{name} pixel ({y}, {x})", fontsize=10)
    log_overlay(axes[row, 1], cross_map(w1, y, x), "recurrence 1: its cross")
    log_overlay(axes[row, 2], two_hop_map(y, x), "recurrence 2: row of A2 @ A1")
    for ax in axes[row]:
        ax.plot(x, y, "c+", ms=12, mew=2)
        ax.axis("off")
fig.suptitle("criss-cross weights, log10 of weight / max (3 decades)")
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "ccnet_recurrences.png"), dpi=70)
print(
    "pixels reached after 1 / 2 recurrences:",
    int((cross_map(w1, 30, 50) > 0).sum()),
    "/",
    int((two_hop_map(30, 50) > 0).sum()),
    "of",
    H * W,
)

# %% [markdown]
# The middle column is exactly zero off the cross: a single criss-cross pass cannot see
# anything else. On the cross, the weight concentrates on the pixels whose projected features
# are most similar to the query's (with these untrained projections, similar colour and edge
# content). After the second recurrence (right) every one of the `H W` pixels carries some
# weight: RCCA reaches the whole image with `2 (H + W - 1)` weights per pixel instead of the
# `H W` of a non-local block, and the two-hop weights follow regions similar to the query.

# %% [markdown]
# ## 3. CBAM: channel gate, then spatial gate (random weights)
#
# CBAM rescales channels with `sigmoid(MLP(avgpool) + MLP(maxpool))`, then pixels with
# `sigmoid(BN(conv7x7([max_c, mean_c])))`. We read both gates from `capture_intermediates`.
# With random weights the spatial gate is a fixed 7x7 filter of the channel-wise max and mean,
# so it follows contrast and texture; only training makes it pick out objects.

# %%
cbam = flax_attn.CBAM(gate_channels=40, reduction_ratio=4)
cbam_vars = cbam.init(jax.random.PRNGKey(2), feats)
_, state = cbam.apply(cbam_vars, feats, capture_intermediates=True, mutable=["intermediates"])
inter = state["intermediates"]
mlp = inter["ChannelGate"]["mlp_3"]["__call__"]  # the shared MLP's output, once per pooling (avg, max)
channel_gate = np.asarray(jax.nn.sigmoid(mlp[0] + mlp[1])[0])
spatial_gate = np.asarray(jax.nn.sigmoid(inter["SpatialGate"]["spatial"]["__call__"][0])[0, ..., 0])

fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), gridspec_kw={"width_ratios": [1, 1, 1.6]})
axes[0].imshow(small)
axes[0].set_title("input")
im = axes[1].imshow(spatial_gate, cmap="magma")
axes[1].set_title("CBAM spatial gate")
fig.colorbar(im, ax=axes[1], fraction=0.045)
for ax in axes[:2]:
    ax.axis("off")
axes[2].bar(np.arange(40), channel_gate, color="tab:green")
axes[2].set_title("CBAM channel gate (one weight per stem channel)")
axes[2].set_xlabel("channel")
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "cbam_gates.png"), dpi=70)

# %% [markdown]
# ## 4. A2N: attention dropout and attention maps of the released x2 model
#
# Each of A2N's 16 attention-in-attention blocks (AAB) has an attention branch and a
# non-attention branch (a plain 3x3 conv). A small *attention dropout module* looks at the
# globally pooled input of the block and gives the two branches softmax weights that sum to one,
# so the network can turn attention down where it does not help. The model sows these weights
# and the sigmoid attention maps into the `intermediates` collection.

# %%
hr = (skimage.transform.resize(photo[:256, 128:384], (128, 128), anti_aliasing=True) * 255).round().astype(np.uint8)
lr = bicubic_downscale(hr, 2)
a2n_apply = jax.jit(lambda v, x: a2n_model.apply(v, x, mutable=["intermediates"]))
sr, a2n_state = a2n_apply(a2n_vars, jnp.asarray(lr, jnp.float32)[None])
sr = quantize(np.asarray(sr[0]))
bic = bicubic_upscale(lr, 2)
print(f"Y-PSNR on this crop: bicubic {psnr_y(bic, hr, 2):.2f} dB, A2N {psnr_y(sr, hr, 2):.2f} dB")

a2n_inter = a2n_state["intermediates"]
blocks = sorted((k for k in a2n_inter if k.startswith("AAB_trunk_")), key=lambda k: int(k.rsplit("_", 1)[1]))
adm = np.stack([np.asarray(a2n_inter[k]["attention_dropout"][0][0]) for k in blocks])  # (16, K)


def adm_weights(img_uint8):
    _, st = a2n_apply(a2n_vars, jnp.asarray(bicubic_downscale(img_uint8, 2), jnp.float32)[None])
    return np.stack([np.asarray(st["intermediates"][k]["attention_dropout"][0][0, 0]) for k in blocks])


others = {
    "chelsea": (skimage.transform.resize(skimage.data.chelsea(), (128, 192), anti_aliasing=True) * 255).round(),
    "coffee": (skimage.transform.resize(skimage.data.coffee(), (128, 192), anti_aliasing=True) * 255).round(),
}
adm_other = {name: adm_weights(img.astype(np.uint8)) for name, img in others.items()}

fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
idx = np.arange(len(blocks))
axes[0].bar(idx, adm[:, 0], color="tab:red", label="attention branch")
axes[0].bar(idx, adm[:, 1], bottom=adm[:, 0], color="tab:gray", label="non-attention branch")
axes[0].axhline(0.5, color="k", lw=0.8, ls=":")
axes[0].set_xlabel("AAB block")
axes[0].set_ylabel("attention dropout weight")
axes[0].set_title("astronaut crop: branch weights per block")
axes[0].legend(loc="lower right")
axes[1].plot(idx, adm[:, 0], "o-", label="astronaut")
for name, wa in adm_other.items():
    axes[1].plot(idx, wa, "o-", label=name)
axes[1].axhline(0.5, color="k", lw=0.8, ls=":")
axes[1].set_xlabel("AAB block")
axes[1].set_ylabel("attention-branch weight")
axes[1].set_title("the weights depend on the image")
axes[1].legend()
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "a2n_attention_dropout.png"), dpi=70)

# %% [markdown]
# Left: the split between the two branches in every block for one image; right: the
# attention-branch weight for three images. (The ADM softmax has temperature 30, which keeps the
# weights near 1/2 unless the logits are large.) With the released weights several blocks (4-8
# here) lean towards the non-attention branch, and the exact split shifts with the image, which
# is the paper's point: not every block needs attention equally, and the choice is made per
# input. With random weights (checkpoint absent) every bar sits near 1/2.

# %%
show = [blocks[0], blocks[5], blocks[10], blocks[15]]
fig, axes = plt.subplots(2, 4, figsize=(14, 7))
for ax, img, title in zip(axes[0], (lr, bic, sr, hr), ("LR input (64 x 64)", "bicubic x2", "A2N x2", "HR")):
    ax.imshow(img)
    ax.set_title(title)
for ax, k in zip(axes[1, :3], show[:3]):
    amap = np.asarray(a2n_inter[k]["attention"]["attention_map"][0][0]).mean(-1)
    ax.imshow(amap, cmap="viridis")
    ax.set_title(f"{k}: attention map (mean over 40 ch.)", fontsize=9)
pa = np.asarray(a2n_inter["att1"]["attention_map"][0][0]).mean(-1)
axes[1, 3].imshow(pa, cmap="viridis")
axes[1, 3].set_title("att1: pixel attention at 128 x 128", fontsize=9)
for ax in axes.ravel():
    ax.axis("off")
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "a2n_attention_maps.png"), dpi=70)

# %% [markdown]
# Bottom row: the attention branch's sigmoid maps, averaged over channels, in three blocks, and
# the pixel attention of the reconstruction module at the output resolution. With the released
# weights the first block responds mostly to colour (the orange suit), later blocks to edges and
# texture (hair, eyes, the suit's rim), and the pixel attention outlines the edges, which is
# where super-resolution has detail to restore.

# %% [markdown]
# ## 5. ACmix and Swin: local windows, and what happens at the border
#
# ACmix's attention path is *neighbourhood attention*: every pixel attends to the `7 x 7` window
# around it (`flax_attn.ops.neighborhood_attention`). The border rule matters: ACmix pads by
# reflection, so a pixel near the corner sees some keys twice (their weights add up), while
# NATTEN's `"clamp"` rule shifts the window inwards so it always covers 49 distinct pixels. Swin's
# window attention (`flax_attn.ops.window_attention`) instead partitions the image into fixed
# `8 x 8` windows; the next layer shifts them by 4 (with a mask between regions that the cyclic
# shift made adjacent), so pixels near a window boundary get to see across it.
#
# Weights: queries and keys are the same random projection of the stem features (as for CCNet
# above), so the weights show window structure and feature similarity, not learned attention.

# %%
from flax_attn.ops.neighborhood import neighborhood_attention, neighborhood_indices  # noqa: E402
from flax_attn.ops.window import shift_attention_mask, window_partition  # noqa: E402

N = 24  # the 24 x 24 top-left corner of the photo, where the borders are
crop = feats[:, :N, :N]
proj = jax.random.normal(jax.random.PRNGKey(3), (40, 16)) * 0.4
qk = jnp.einsum("bhwc,cd->bhwd", crop, proj)[..., None, :]  # one head: (B, H, W, 1, 16)
KS = 7


def window_weights(border, y, x):
    """Pixel (y, x)'s k*k neighbourhood weights scattered onto the crop, and how often each key occurs."""
    _, wts = neighborhood_attention(qk, qk, qk, kernel_size=KS, border=border, return_weights=True)
    idx = neighborhood_indices(N, KS, border=border)  # (KS, N): key position per (offset, query)
    m, hits = np.zeros((N, N), np.float32), np.zeros((N, N), int)
    wts = np.asarray(wts[0, y, x, 0])
    for dy in range(KS):
        for dx in range(KS):
            m[idx[dy, y], idx[dx, x]] += wts[dy * KS + dx]  # a reflected key collects every weight it gets
            hits[idx[dy, y], idx[dx, x]] += 1
    return m, hits


def swin_reach(y, x, ws=8, shift=0):
    """Pixels that (y, x) can attend to in Swin's (shifted) window attention on the crop."""
    pos = np.arange(N * N).reshape(1, N, N)
    rolled = np.roll(pos, (-shift, -shift), axis=(1, 2))
    wins = np.asarray(window_partition(jnp.asarray(rolled), ws))[0]  # (nW, ws*ws) original positions
    w_idx, t_idx = [int(a[0]) for a in np.nonzero(wins == y * N + x)]
    allowed = np.ones(ws * ws, bool)
    if shift:
        allowed = shift_attention_mask(N, N, ws, shift)[w_idx, t_idx] == 0
    m = np.zeros(N * N, np.float32)
    m[wins[w_idx][allowed]] = 1.0
    return m.reshape(N, N)


fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
grey = small[:N, :N].mean(-1)
for ax, border in zip(axes[:2], ("reflect", "clamp")):
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1.4)
    for (y, x), cmap in zip([(14, 13), (1, 2)], ("Reds", "Blues")):
        m, hits = window_weights(border, y, x)
        ax.imshow(np.ma.masked_equal(m, 0), cmap=cmap, alpha=0.8, vmin=-0.6 * m.max(), vmax=m.max())
        for ky, kx in zip(*np.nonzero(hits > 1)):
            ax.text(kx, ky, str(hits[ky, kx]), ha="center", va="center", fontsize=7)
        ax.plot(x, y, "k+", ms=10, mew=2)
    ax.set_title(
        {"reflect": "ACmix window (reflect): digits = key counted n times", "clamp": "NATTEN window (clamp)"}[border],
        fontsize=9,
    )
for ax, shift in zip(axes[2:], (0, 4)):
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1.4)
    for (y, x), colour in zip([(7, 7), (8, 8), (1, 2)], ("tab:red", "tab:blue", "tab:green")):
        m = swin_reach(y, x, shift=shift)
        ax.contourf(m, levels=[0.5, 1.5], colors=[colour], alpha=0.35)
        ax.contour(m, levels=[0.5], colors=[colour], linewidths=2)
        ax.plot(x, y, "+", color=colour, ms=10, mew=2)
    ax.set_title(f"Swin, window 8, shift {shift}", fontsize=9)
for ax in axes:
    ax.set_xlim(-0.5, N - 0.5)
    ax.set_ylim(N - 0.5, -0.5)
    ax.axis("off")
fig.suptitle("where a pixel (+) can attend, on the 24 x 24 top-left corner of the photo")
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "local_windows.png"), dpi=70)
_, h_reflect = window_weights("reflect", 1, 2)
_, h_clamp = window_weights("clamp", 1, 2)
print(
    f"corner pixel (1, 2): reflect covers {int((h_reflect > 0).sum())} distinct keys with {KS * KS} weights,",
    f"clamp {int((h_clamp > 0).sum())}",
)

# %% [markdown]
# With reflection (first panel) the corner query's window folds back on itself: it covers 30
# distinct keys with 49 weights, and the numbers mark keys counted twice or four times. With
# clamping (second panel) the corner window is pushed inside the image, covers 49 distinct keys,
# and the query is no longer at its centre; away from the border both rules agree (red). Swin
# (right) has no window per pixel: the neighbours (7, 7) and (8, 8) sit in different windows of
# one layer and cannot see each other; the shifted partition of the next layer puts them in one
# window. The corner pixel's shifted window wraps around the image (cyclic shift), and the mask
# cuts it down to the 4 x 4 region that is really adjacent to it.

# %% [markdown]
# ## 6. DANet: position attention over all pixel pairs, and channel attention
#
# DANet's position attention module (PAM) is a dense non-local attention: every pixel weighs
# every other pixel, an `(H W) x (H W)` matrix. With the same query/key projection as the CCNet
# example above, its one-step weights can be set against CCNet's two-hop weights for the same
# pixel. (PAM runs on the 48 x 48 average-pooled features: at 96 x 96 its matrix alone would be
# 340 MB, which is exactly what criss-cross attention avoids.)
#
# DANet's channel attention module (CAM) has no parameters at all: it is `softmax(max(E) - E)`
# over the `(C, C)` Gram matrix `E` of the features, so the map below is exactly what DANet
# computes on these features. The official "max minus energy" form gives the largest weights to
# the *least* correlated channels.

# %%
from flax_attn.ops import channel_attention, position_attention  # noqa: E402

pooled = feats.reshape(1, 48, 2, 48, 2, 40).mean((2, 4))
conv1x1 = lambda p, x: jnp.einsum("bhwc,cd->bhwd", x, p["kernel"][0, 0]) + p["bias"]  # noqa: E731
q48 = conv1x1(cca_vars["params"]["query_conv"], pooled).reshape(1, 48 * 48, -1)
_, pam_w = position_attention(q48, q48, pooled.reshape(1, 48 * 48, 40), return_weights=True)
pam_w = np.asarray(pam_w[0])
_, cam_w = channel_attention(feats.reshape(1, -1, 40), return_weights=True)
cam_w = np.asarray(cam_w[0])

fig, axes = plt.subplots(2, 4, figsize=(15, 7.5))
for col, (name, (y, x)) in enumerate(list(pixels.items())[:3]):
    two = two_hop_map(y, x)
    pam = pam_w[(y // 2) * 48 + x // 2].reshape(48, 48)
    log_overlay(axes[0, col], two, f"CCNet two hops, {name} pixel")
    axes[0, col].plot(x, y, "c+", ms=12, mew=2)
    axes[1, col].imshow(small[::2, ::2].mean(-1), cmap="gray", vmin=0, vmax=1.4)
    logp = np.log10(pam / pam.max())
    axes[1, col].imshow(np.ma.masked_less(logp, -3), cmap="plasma", vmin=-3, vmax=0)
    axes[1, col].set_title(f"DANet PAM, one step, {name} pixel", fontsize=10)
    axes[1, col].plot(x // 2, y // 2, "c+", ms=12, mew=2)
for ax in axes[:, :3].ravel():
    ax.axis("off")
axes[0, 3].axis("off")
axes[0, 3].text(0, 0.5, "log10 weight / max,\n3 decades, as in\nsection 2", fontsize=11)
im = axes[1, 3].imshow(cam_w, cmap="viridis")
axes[1, 3].set_title("DANet CAM: channel x channel weights", fontsize=10)
axes[1, 3].set_xlabel("key channel")
axes[1, 3].set_ylabel("query channel")
fig.colorbar(im, ax=axes[1, 3], fraction=0.045)
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "danet_maps.png"), dpi=70)
print(f"PAM weights per pixel: {pam_w.shape[1]}; CCNet per pass: {H + W - 1}")

# %% [markdown]
# With shared projections the two differ in character. PAM's one-step weights vary smoothly over
# the whole image and stay within three decades of their maximum everywhere (lower where the
# features differ from the query's, e.g. on the suit for the hair and face pixels). CCNet's
# two-hop weights are products of two softmaxes: far more uneven, concentrated on the query's
# cross and on the few routes through it. CAM's rows are essentially one-hot: summed over 9216
# positions the Gram energies are in the thousands, so the softmax of "max minus energy" picks
# the single least correlated channel for each query channel.

# %% [markdown]
# ## 7. Non-local block: the released MNIST network
#
# The official Non-local_pytorch repository ships an MNIST classifier with two embedded-Gaussian
# non-local blocks (`weights/net.pth`). `NonLocalMNISTNet` loads it directly (DataParallel's
# `module.` prefix is stripped by the converter) and returns the blocks' attention maps like the
# official `forward_with_nl_map`: the first block relates each of the 14 x 14 positions to the
# 7 x 7 sub-sampled keys. MNIST itself is not bundled, so we feed scikit-learn's 8 x 8 digits,
# upsampled to MNIST's format (digit in the centre 16 x 16 of a 28 x 28 image, values in [0, 1]).
# They look different from MNIST, so the accuracy printed below is not MNIST accuracy.

# %%
from sklearn.datasets import load_digits  # noqa: E402

from flax_attn.non_local import NonLocalMNISTNet  # noqa: E402

digits = load_digits()
mnist_like = np.stack(
    [np.pad(np.clip(skimage.transform.resize(im / 16.0, (16, 16), order=3), 0, 1), 6) for im in digits.images[:300]]
)[..., None].astype(np.float32)
NL_CKPT = SHARED / "nonlocal_mnist" / "net.pth"
nl_net = NonLocalMNISTNet()
if NL_CKPT.exists():
    nl_vars = from_torch(nl_net, load_state_dict(NL_CKPT), jnp.zeros((1, 28, 28, 1)))
else:
    nl_vars = nl_net.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    print("NOTE: net.pth not found: random weights, the maps below show structure only")
nl_logits, (nl_map1, nl_map2) = jax.jit(lambda v, x: nl_net.apply(v, x, True))(nl_vars, mnist_like)
pred = np.asarray(nl_logits.argmax(-1))
print(
    f"accuracy on 300 upsampled sklearn digits: {(pred == digits.target[:300]).mean():.1%}"
    f" ({'released weights' if NL_CKPT.exists() else 'random weights'}); maps {nl_map1.shape}, {nl_map2.shape}"
)

# %%
examples = [int(np.nonzero(digits.target[:300] == d)[0][0]) for d in (0, 3, 7)]
fig, axes = plt.subplots(len(examples), 3, figsize=(8, 2.8 * len(examples)))
for row, i in enumerate(examples):
    img = mnist_like[i, ..., 0]
    coarse = img.reshape(14, 2, 14, 2).mean((1, 3))
    on_stroke = np.unravel_index(np.argmax(coarse), coarse.shape)
    queries14 = {"query on the stroke": on_stroke, "query in the background": (1, 1)}
    axes[row, 0].imshow(img, cmap="gray")
    axes[row, 0].set_title(f"label {digits.target[i]}, predicted {pred[i]}", fontsize=10)
    for col, (title, (qy, qx)) in enumerate(queries14.items(), start=1):
        m = np.asarray(nl_map1[i, qy * 14 + qx]).reshape(7, 7)
        axes[row, col].imshow(img, cmap="gray")
        axes[row, col].imshow(np.kron(m, np.ones((4, 4))), cmap="inferno", alpha=0.6)
        axes[row, col].plot(2 * qx + 0.5, 2 * qy + 0.5, "c+", ms=12, mew=2)
        axes[row, col].set_title(title, fontsize=10)
for ax in axes.ravel():
    ax.axis("off")
fig.suptitle("first non-local block: weights over the 7 x 7 sub-sampled keys")
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "non_local_mnist.png"), dpi=70)

# %% [markdown]
# Each map is one row of the first block's `(196, 49)` affinity matrix (normalised over the 49
# keys), for a query on the digit's stroke and one in the empty corner; the weights are the
# authors' trained ones when `net.pth` is present. With them, the stroke query puts almost all
# its weight on one key cell of the stroke, while the background query spreads its weight over
# the background and avoids the digit: each position gathers from positions like itself.

# %% [markdown]
# ## 8. STN: warping digits, and learning the warp by gradient
#
# A spatial transformer predicts an affine matrix `theta` and resamples its input with
# `affine_grid` + `grid_sample` (PyTorch-exact, NHWC). No trained STN checkpoint is bundled, so
# instead of a localisation network we give `SpatialTransformer` a localisation "network" that
# is just one free `theta` per image, warp some digits with random rotations, scalings and
# shifts, and recover the inverse warps by gradient descent on the pixel error. This shows the
# thing an STN relies on: the sampler is differentiable with respect to the sampling grid.

# %%
import flax.linen as nn  # noqa: E402
import optax  # noqa: E402

from flax_attn.ops import affine_grid, grid_sample  # noqa: E402
from flax_attn.stn import SpatialTransformer  # noqa: E402


class FreeTheta(nn.Module):
    """A stand-in localisation network: one learnable affine matrix per image, starting at identity."""

    n: int

    @nn.compact
    def __call__(self, x):
        return self.param(
            "theta", lambda key, shape: jnp.tile(jnp.array([1.0, 0, 0, 0, 1, 0]), (shape[0], 1)), (self.n, 6)
        )


target = jnp.asarray(mnist_like[examples + [1, 2, 4]])  # six digits, (6, 28, 28, 1)
n_img = target.shape[0]
rng = np.random.default_rng(0)
angle, scale = rng.uniform(-0.5, 0.5, n_img), rng.uniform(0.8, 1.2, n_img)
shift = rng.uniform(-0.15, 0.15, (n_img, 2))
warp = np.stack(
    [
        np.array([[s * np.cos(a), -s * np.sin(a), t[0]], [s * np.sin(a), s * np.cos(a), t[1]]])
        for a, s, t in zip(angle, scale, shift)
    ]
).astype(np.float32)
moved = grid_sample(target, affine_grid(jnp.asarray(warp), target.shape))

stn = SpatialTransformer(localization=FreeTheta(n_img))
stn_vars = stn.init(jax.random.PRNGKey(0), moved)
opt = optax.adam(0.02)
opt_state = opt.init(stn_vars["params"])


@jax.jit
def step(params, opt_state):
    def loss_fn(p):
        smooth = lambda im: jax.image.resize(im, (n_img, 14, 14, 1), "linear")  # noqa: E731
        return jnp.mean((smooth(stn.apply({"params": p}, moved)) - smooth(target)) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss


params, losses = stn_vars["params"], []
for _ in range(300):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
recovered = stn.apply({"params": params}, moved)
print(f"pixel MSE: {losses[0]:.4f} at identity -> {losses[-1]:.4f} after 300 Adam steps")

fig, axes = plt.subplots(
    3, n_img + 1, figsize=(2 * (n_img + 1), 6.4), gridspec_kw={"width_ratios": [1] * n_img + [1.6]}
)
for j in range(n_img):
    for r, (im, title) in enumerate(((target, "digit"), (moved, "warped input"), (recovered, "STN output"))):
        axes[r, j].imshow(np.asarray(im[j, ..., 0]), cmap="gray", vmin=0, vmax=1)
        axes[r, j].set_title(title if j == 0 else "", fontsize=9)
        axes[r, j].axis("off")
gs = axes[0, -1].get_gridspec()
for ax in axes[:, -1]:
    ax.remove()
loss_ax = fig.add_subplot(gs[:, -1])
loss_ax.semilogy(losses)
loss_ax.set(xlabel="Adam step", ylabel="pixel MSE (14 x 14)", title="learning theta")
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "stn_warps.png"), dpi=70)

# %% [markdown]
# Top: the digits; middle: the same digits after a random affine warp; bottom: the spatial
# transformer's output once each `theta` has been fitted to undo the warp. The error is taken
# on 14 x 14 downsampled images, a smoother target that keeps gradient descent from stalling on
# pixel-sized misalignments. In a real STN a localisation network predicts `theta` from the
# image, trained end to end by the classification loss; what carries the gradient is the same
# sampler used here.
