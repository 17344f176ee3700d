"""NeighborhoodAttention{1,2,3}D against NATTEN 0.21's modules and NAT's layer (loaded through the converter)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from flax_attn.convert import StateDictMismatchError, from_torch

CLASSES = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


NATTEN_CASES = [  # spatial, kernel_size, stride, dilation, is_causal
    ((19,), 5, 2, 3, True),
    ((13, 17), (3, 5), (2, 1), (1, 2), (True, False)),
    ((11, 10), 4, 3, 2, False),
    ((4, 7, 9), (2, 3, 3), (1, 2, 3), (1, 2, 1), (True, False, False)),
]


@pytest.mark.parametrize("spatial,ks,st,dl,ca", NATTEN_CASES)
def test_matches_nattens_module(spatial, ks, st, dl, ca):
    torch = pytest.importorskip("torch")
    pytest.importorskip("natten", reason="natten (pip install natten) runs its Flex backend on CPU")
    from flax_attn.testing.torch_ref.neighborhood import natten_module

    n, embed, heads = len(spatial), 16, 2
    torch.manual_seed(0)
    ref = natten_module(embed, heads, ks, stride=st, dilation=dl, is_causal=ca, na_dim=n).eval()
    x = np.random.default_rng(0).standard_normal((3, *spatial, embed)).astype(np.float32)
    with torch.no_grad(), warnings.catch_warnings():  # no CPU backward in flex; unfused-mode warnings
        warnings.simplefilter("ignore")
        want = ref(torch.from_numpy(x)).numpy()
    block = CLASSES[n](embed_dim=embed, num_heads=heads, kernel_size=ks, stride=st, dilation=dl, is_causal=ca)
    variables = from_torch(block, ref.state_dict(), jnp.asarray(x))  # strict: every key used, none missing
    got = block.apply(variables, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_nat_layer_pads_inputs_smaller_than_the_window():
    torch = pytest.importorskip("torch")
    from flax_attn.testing.torch_ref.neighborhood import NATNeighborhoodAttention

    torch.manual_seed(1)
    ref = NATNeighborhoodAttention(16, 5, 2, dilation=2, bias=True).eval()
    with torch.no_grad():
        ref.rpb.normal_()
    x = np.random.default_rng(1).standard_normal((2, 7, 12, 16)).astype(np.float32)  # 7 < 5 * 2
    want = ref(torch.from_numpy(x)).detach().numpy()
    block = NeighborhoodAttention2D(embed_dim=16, num_heads=2, kernel_size=5, dilation=2, bias=True)
    got = block.apply(from_torch(block, ref.state_dict(), jnp.asarray(x)), x)
    assert got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_strict_loading_tells_rpb_layouts_apart():
    torch = pytest.importorskip("torch")
    from flax_attn.testing.torch_ref.neighborhood import NATNeighborhoodAttention

    x = jnp.zeros((1, 9, 9, 16))
    nat = NATNeighborhoodAttention(16, 3, 2, bias=True).state_dict()
    with pytest.raises(StateDictMismatchError, match="rpb"):
        from_torch(NeighborhoodAttention2D(embed_dim=16, num_heads=2, kernel_size=3), nat, x)
    no_rpb = {k: v for k, v in nat.items() if k != "rpb"}
    with pytest.raises(StateDictMismatchError, match="rpb"):
        from_torch(NeighborhoodAttention2D(embed_dim=16, num_heads=2, kernel_size=3, bias=True), no_rpb, x)
    assert torch.is_tensor(nat["rpb"]) and tuple(nat["rpb"].shape) == (2, 5, 5)


def test_dropout_follows_train():
    # attn_drop alone: the attention-weight dropout inside ops.na1d must act (proj_drop is nn.Dropout).
    block = NeighborhoodAttention1D(embed_dim=8, num_heads=2, kernel_size=3, attn_drop=0.5)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 11, 8)), jnp.float32)
    variables = block.init(jax.random.PRNGKey(0), x)
    eval_out = block.apply(variables, x)
    np.testing.assert_array_equal(np.asarray(block.apply(variables, x, train=False)), np.asarray(eval_out))
    a = block.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = block.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(np.asarray(a), np.asarray(eval_out)) and not np.allclose(np.asarray(a), np.asarray(b))
    fixed = block.clone(train=False)
    np.testing.assert_array_equal(np.asarray(fixed.apply(variables, x)), np.asarray(eval_out))
    with pytest.raises(ValueError, match="give it in one place"):
        fixed.apply(variables, x, train=True)
    on = block.clone(train=True)  # the constructor route nn.scan/nn.remat need
    np.testing.assert_array_equal(
        np.asarray(on.apply(variables, x, rngs={"dropout": jax.random.PRNGKey(1)})), np.asarray(a)
    )


def test_bfloat16_compute_and_float32_params():
    block = NeighborhoodAttention3D(embed_dim=16, num_heads=2, kernel_size=3, bias=True, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 4, 5, 6, 16)), jnp.float32)
    variables = block.init(jax.random.PRNGKey(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    out = block.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    ref = block.clone(dtype=jnp.float32).apply(variables, x)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=5e-2, rtol=5e-2)


def test_bad_input_names_the_argument():
    block = NeighborhoodAttention2D(embed_dim=16, num_heads=2, kernel_size=3)
    with pytest.raises(ValueError, match="`x` must be 4-D"):
        block.init(jax.random.PRNGKey(0), jnp.zeros((2, 9, 16)))
    with pytest.raises(ValueError, match="`x` must have 16 channels"):
        block.init(jax.random.PRNGKey(0), jnp.zeros((2, 9, 9, 8)))
    with pytest.raises(ValueError, match="`embed_dim`=16 must be divisible by `num_heads`=3"):
        NeighborhoodAttention2D(embed_dim=16, num_heads=3, kernel_size=3).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 9, 9, 16))
        )
    with pytest.raises(ValueError, match="`kernel_size` and `dilation` must be ints or tuples of 2"):
        NeighborhoodAttention2D(embed_dim=16, num_heads=2, kernel_size=(3, 3, 3)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 9, 9, 16))
        )
