"""python -m flax_attn: blocks, convert, verify, demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_attn import catalogue
from flax_attn.__main__ import UsageError, candidate_inputs, main
from flax_attn.convert import from_torch, load_variables, save_state_dict

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def _mha_checkpoint(tmp_path):
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(24, 4, kdim=20, vdim=12, add_bias_kv=True, batch_first=True)
    path = tmp_path / "mha.pth"
    torch.save(tm.state_dict(), path)
    return tm, path


def test_blocks_lists_catalogue(capsys):
    assert main(["blocks"]) == 0
    out = capsys.readouterr().out
    assert "multihead_attention" in out
    # Each block with its Flax class and the catalogue's constructor arguments.
    assert "flax_attn.cbam.CBAM(gate_channels=32, reduction_ratio=4)" in out
    # A catalogue factory function is named by the public class it builds.
    assert "flax_attn.stn.SpatialTransformer(in_channels=2" in out and "_spatial_transformer" not in out


@pytest.mark.parametrize("out_name", ["mha.msgpack", "mha_orbax"])
def test_convert_writes_loadable_variables(tmp_path, capsys, out_name):
    tm, path = _mha_checkpoint(tmp_path)
    out = tmp_path / out_name
    assert main(["convert", str(path), str(out), "--block", "multihead_attention"]) == 0
    assert "converted" in capsys.readouterr().out
    v = load_variables(out)
    np.testing.assert_array_equal(np.asarray(v["params"]["k_proj"]["kernel"]), tm.k_proj_weight.detach().numpy().T)


def test_verify_passes_on_matching_checkpoint_and_fails_on_wrong_one(tmp_path, capsys):
    _, path = _mha_checkpoint(tmp_path)
    assert main(["verify", "--block", "multihead_attention", "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "max abs err" in out
    bad = tmp_path / "bad.pth"
    save_state_dict({"in_proj_bias": np.zeros(3, np.float32)}, bad)
    assert main(["verify", "--block", "multihead_attention", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "missing torch key 'k_proj_weight'" in err and "shape mismatch: torch 'in_proj_bias'" in err


def test_verify_with_config_override(capsys):
    assert (
        main(["verify", "--block", "multihead_attention", "--config", "kdim=None", "vdim=None", "add_bias_kv=False"])
        == 0
    )


def test_module_entry_point_runs_as_subprocess():
    res = subprocess.run([sys.executable, "-m", "flax_attn", "blocks"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "projected_multi_head_attention" in res.stdout


def _run(*args):
    return subprocess.run([sys.executable, "-m", "flax_attn", *args], capture_output=True, text=True, cwd=ROOT)


def _cbam64(tmp_path):
    from flax_attn.testing.torch_ref.cbam import CBAM

    torch.manual_seed(0)
    tm = CBAM(gate_channels=64, reduction_ratio=16)
    path = tmp_path / "cbam64.pth"
    torch.save(tm.state_dict(), path)
    return tm, path


def test_convert_inputs_follow_config_for_image_block(tmp_path, capsys):
    # The command: example inputs used to keep the catalogue's 32 channels.
    tm, path = _cbam64(tmp_path)
    out = tmp_path / "o.msgpack"
    args = ["convert", str(path), str(out), "--block", "cbam", "--config", "gate_channels=64", "reduction_ratio=16"]
    assert main(args) == 0
    v = load_variables(out)
    w = tm.state_dict()["ChannelGate.mlp.1.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(v["params"]["ChannelGate"]["mlp_1"]["kernel"]), w.T)


def test_convert_config_merges_into_catalogue_config(tmp_path):
    # `--config reduction=8` alone used to replace the config: TypeError, missing 'channel'.
    from flax_attn.testing.torch_ref.se import SELayer

    path = tmp_path / "se.pth"
    torch.save(SELayer(channel=32, reduction=8).state_dict(), path)
    assert (
        main(["convert", str(path), str(tmp_path / "o.msgpack"), "--block", "se_layer", "--config", "reduction=8"]) == 0
    )
    assert np.asarray(load_variables(tmp_path / "o.msgpack")["params"]["fc_0"]["kernel"]).shape == (32, 4)


def test_verify_follows_config(tmp_path, capsys):
    _, path = _cbam64(tmp_path)
    args = [
        "verify",
        "--block",
        "cbam",
        "--checkpoint",
        str(path),
        "--config",
        "gate_channels=64",
        "reduction_ratio=16",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.count("PASS") == 2


def test_mismatch_prints_report_and_suggests_config(tmp_path):
    _, path = _cbam64(tmp_path)
    res = _run("convert", str(path), str(tmp_path / "o.msgpack"), "--block", "cbam")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("error: the checkpoint does not match cbam")
    assert "shape mismatch: torch 'ChannelGate.mlp.3.bias' has shape (64,), expected (32,)" in res.stderr
    assert "hint:" in res.stderr and "--config gate_channels=64" in res.stderr


class _Net(torch.nn.Module if torch else object):
    def __init__(self):
        from flax_attn.testing.torch_ref.cbam import CBAM

        super().__init__()
        self.stem = torch.nn.Conv2d(3, 64, 3)
        self.body = torch.nn.Sequential(torch.nn.Identity(), CBAM(gate_channels=64, reduction_ratio=16))


def test_prefix_selects_submodule_of_bigger_checkpoint(tmp_path, capsys):
    torch.manual_seed(1)
    net = _Net()
    path = tmp_path / "net.pth"
    torch.save({"model": net.state_dict()}, path)
    cfg = ["--config", "gate_channels=64", "reduction_ratio=16"]
    out = tmp_path / "o.msgpack"
    # Without --prefix the report says where the block probably is.
    assert main(["convert", str(path), str(out), "--block", "cbam", "--key", "model", *cfg]) == 2
    assert "try --prefix body.1" in capsys.readouterr().err
    assert main(["convert", str(path), str(out), "--block", "cbam", "--key", "model", "--prefix", "body.1", *cfg]) == 0
    entry = catalogue.get("cbam")
    config = {**entry.config, "gate_channels": 64, "reduction_ratio": 16}
    want = from_torch(entry.build_flax(config), net.body[1].state_dict(), x=np.zeros((1, 5, 5, 64), np.float32))
    got = load_variables(out)
    for (kp, a), (_, b) in zip(sorted(_flat(want).items()), sorted(_flat(got).items()), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=kp)
    assert main(["convert", str(path), str(out), "--block", "cbam", "--key", "model", "--prefix", "body.2", *cfg]) == 2
    err = capsys.readouterr().err
    assert "--prefix 'body.2' matches no key" in err and "body.1.ChannelGate.mlp.1" in err


def _flat(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(tree), sep="/")


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "{tmp}/missing.pth", "{tmp}/o.msgpack", "--block", "cbam"], "does not exist"),
        (["convert", "{ckpt}", "{tmp}/o.msgpack", "--block", "no_such_block"], "unknown block 'no_such_block'"),
        (["convert", "{ckpt}", "{tmp}/o.msgpack", "--block", "cbam", "--config", "gate_channels"], "key=value"),
        (["convert", "{ckpt}", "{tmp}/o.msgpack", "--block", "cbam", "--config", "colour=3"], "'colour'"),
        (["convert", "{junk}", "{tmp}/o.msgpack", "--block", "cbam"], "junk.pth"),
        (["convert", "{ckpt}", "{tmp}/o.msgpack", "--block", "cbam", "--layout", "nope"], "layout 'nope'"),
        (["verify", "--block", "coord_att", "--config", "inp=64"], "coord_att does not run with config"),
    ],
    ids=["missing-file", "unknown-block", "config-syntax", "config-key", "junk-file", "layout", "unrunnable-config"],
)
def test_user_errors_exit_2_with_one_line(tmp_path, args, message):
    _, ckpt = _cbam64(tmp_path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    args = [a.format(tmp=tmp_path, ckpt=ckpt, junk=junk) for a in args]
    res = _run(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message in lines[0]
    # --debug shows the traceback instead.
    res = _run(*args, "--debug")
    assert res.returncode != 0 and "Traceback (most recent call last)" in res.stderr


def test_debug_raises_in_process(tmp_path):
    with pytest.raises(UsageError, match="unknown block"):
        main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "o.msgpack"), "--block", "nope", "--debug"])


def _channel_keys(entry):
    """Integer config arguments equal to the last axis of an input, held by no other argument."""
    import numpy as np

    inputs = entry.make_inputs(np.random.default_rng(0))
    last = {np.shape(a)[-1] for a in inputs.values() if np.ndim(a)}
    ints = {k: v for k, v in entry.config.items() if isinstance(v, int) and not isinstance(v, bool)}
    return [k for k, v in ints.items() if v in last and list(ints.values()).count(v) == 1]


FOLLOWING = [(e.name, k) for e in catalogue.entries() if not e.slow for k in _channel_keys(e)]


def _follow(name, key):
    """``(old inputs, new inputs, module, entry)`` after doubling ``key``; UsageError if refused."""
    from flax_attn.__main__ import _runnable_inputs

    entry = catalogue.get(name)
    config = {**entry.config, key: 2 * entry.config[key]}
    module = entry.build_flax(config)
    return entry.make_inputs(np.random.default_rng(0)), _runnable_inputs(entry, module, config, 0), module, entry


@pytest.mark.parametrize("name, key", FOLLOWING, ids=[f"{n}-{k}" for n, k in FOLLOWING])
def test_example_inputs_follow_changed_channels(name, key):
    """Every block: after doubling an argument equal to an input's channel count, the CLI finds
    inputs the block accepts, or says clearly that the block refuses the change alone (in == out)."""
    import jax

    old = catalogue.get(name).config[key]
    try:
        base, inputs, module, entry = _follow(name, key)
    except UsageError as e:
        assert name in str(e) and f"{key}={2 * old}" in str(e)
        pytest.skip(f"{name} refuses {key}={2 * old} alone: {e}")
    jax.eval_shape(lambda kw: module.init(jax.random.PRNGKey(0), **kw, **entry.flax_kwargs), inputs)
    if any(np.shape(inputs[k]) != np.shape(base[k]) for k in base):
        changed = [k for k in base if np.shape(base[k])[-1:] == (old,)]
        assert all(np.shape(inputs[k])[-1] == 2 * old for k in changed), {k: np.shape(v) for k, v in inputs.items()}


@pytest.mark.parametrize(
    "name, key, arg, shape",
    [
        ("cbam", "gate_channels", "x", (3, 13, 17, 64)),
        ("se_layer", "channel", "x", (3, 13, 17, 64)),
        ("eca", "channel", "x", (3, 13, 17, 64)),
        ("criss_cross_attention", "in_dim", "x", (3, 13, 17, 32)),
        ("window_attention", "dim", "x", (3, 9, 15, 24)),
        ("acmix", "in_planes", "x", (3, 13, 17, 16)),
        ("multihead_attention", "kdim", "key", (3, 17, 40)),
        ("transformer_encoder_layer", "d_model", "pos", (3, 13, 48)),
        ("non_local_2d_embedded_gaussian", "in_channels", "x", (3, 13, 17, 24)),
        ("deform_conv2d", "in_channels", "x", (3, 13, 17, 8)),
    ],
)
def test_channel_arguments_reach_the_inputs(name, key, arg, shape):
    _, inputs, _, _ = _follow(name, key)
    assert np.shape(inputs[arg]) == shape


def test_candidates_keep_sizes_still_claimed_by_other_arguments():
    # se_basic_block: reduction=32 must not turn the 16 input channels (inplanes=16) into 32.
    entry = catalogue.get("se_basic_block")
    first = next(candidate_inputs(entry, {**entry.config, "reduction": 16 * 2}))
    assert first["x"].shape == (3, 13, 17, 16)
