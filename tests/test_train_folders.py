"""Training from image files: the grain pipeline of flax_attn.training.folders on generated folders.

The folders are written here: the 1797 scikit-learn digits as 8x8 PNGs in class folders, and a few
scikit-image photographs as HR PNGs. Runs are tiny (a few dozen steps of small models).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from flax_attn.training import configs as cfg_lib
from flax_attn.training import folders
from flax_attn.training.metrics import Progress
from flax_attn.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _write_digits(root: Path, n: int | None = None) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (im, y) in enumerate(zip(d.images[:n], d.target[:n])):
        (root / f"digit{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(im * 255 / 16).astype(np.uint8)).save(root / f"digit{y}" / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return _write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    from PIL import Image

    from flax_attn.training.data import load_skimage_image

    root = tmp_path_factory.mktemp("hr")
    for name in ("astronaut", "coffee", "rocket", "chelsea", "immunohistochemistry", "hubble_deep_field"):
        im = load_skimage_image(name)
        Image.fromarray(im[:200, :240]).save(root / f"{name}.png")
    return root


# The digits from their folder the way the in-memory path sees them: no crops or flips.
DIGITS_FOLDER = [
    "data.image_size=8",
    "data.channels=1",
    "data.augment=False",
    "data.hflip=False",
    "data.eval_crop_fraction=1.0",
    "data.test_fraction=0.2",
    "data.workers=0",
]
TINY = [
    "model.kwargs.widths=(8, 16)",
    "data.batch_size=16",
    "steps=12",
    "log_every=1",
    "eval_every=6",
    "checkpoint.every_steps=4",
    "checkpoint.async_save=False",
    "optim.warmup_steps=2",
]


def _losses(workdir: Path, key: str = "loss") -> list[float]:
    lines = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [ln[key] for ln in lines if ln["kind"] == "train"]


# --------------------------------------------------------------------------- listing and transforms


def test_class_tree_and_lists(tmp_path, digits_dir):
    paths, labels, classes = folders.labelled_files(digits_dir)
    assert classes == [f"digit{i}" for i in range(10)] and len(paths) == 1797
    from sklearn.datasets import load_digits

    assert np.bincount(labels).tolist() == np.bincount(load_digits().target).tolist()
    rel = [os.path.relpath(p, tmp_path) for p in paths[:5]]
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in zip(rel, "abcab")))
    p2, l2, c2 = folders.labelled_files(tmp_path / "list.csv")
    assert p2 == paths[:5] and c2 == ["a", "b", "c"] and l2.tolist() == [0, 1, 2, 0, 1]
    (tmp_path / "list.json").write_text(json.dumps([{"path": p, "label": 3} for p in paths[:2]]))
    p3, l3, _ = folders.labelled_files(tmp_path / "list.json")
    assert p3 == paths[:2] and l3.tolist() == [3, 3]
    tr, te = folders.stratified_split(labels, 0.2, 0)
    assert not set(tr) & set(te) and len(tr) + len(te) == len(labels)
    assert all(abs(np.mean(labels[te] == c) - 0.1) < 0.02 for c in range(10))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("missing_dir", r"data.root: expected a class-folder tree .* \(does not exist\)"),
        ("empty_dir", r"data.root: expected class sub-directories .* found none"),
        ("bad.txt", r"data.root: expected a directory or a .csv/.json file"),
        ("bad.csv", r"line 1 of .* must be 'path,label', got \['a', 'b', 'c'\]"),
        ("bad.json", r"expected a JSON list"),
    ],
)
def test_bad_folders_name_the_argument(tmp_path, spec, match):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "bad.txt").write_text("x")
    (tmp_path / "bad.csv").write_text("a,b,c\n")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(folders.DataError, match=match):
        folders.labelled_files(tmp_path / spec)


def test_sr_patch_equals_the_whole_image_downscale(hr_dir):
    """The margin trick: a patch's LR is exactly the PIL bicubic downscale of the whole image, cut."""
    im = folders.decode_image(str(hr_dir / "astronaut.png"))
    for scale in (2, 3, 4):
        hr = folders.crop_to_multiple(im, scale)
        whole = folders.bicubic_downscale(hr, scale)
        for seed in range(12):  # includes windows at the image edges
            rng = np.random.default_rng(seed)
            lr_p, hr_p = folders.sr_patch(im, rng, 16, scale, augment=False)
            rng = np.random.default_rng(seed)
            lh, lw = whole.shape[:2]
            y, x = int(rng.integers(0, lh - 16 + 1)), int(rng.integers(0, lw - 16 + 1))
            np.testing.assert_array_equal(lr_p, whole[y : y + 16, x : x + 16])
            np.testing.assert_array_equal(hr_p, hr[y * scale : (y + 16) * scale, x * scale : (x + 16) * scale])
    # Flips and the transposition move LR and HR together.
    lr_p, hr_p = folders.sr_patch(im, np.random.default_rng(5), 16, 2, augment=True)
    np.testing.assert_array_equal(folders.bicubic_downscale(hr_p, 2)[4:-4, 4:-4], lr_p[4:-4, 4:-4])


def test_random_resized_crop_and_eval_view():
    im = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    out = folders.random_resized_crop(im, np.random.default_rng(0), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    full = folders.random_resized_crop(im, np.random.default_rng(0), 40, scale=(1.0, 1.0), ratio=(1.5, 1.5))
    assert full.shape == (40, 40, 3)
    ev = folders.resize_center_crop(im, 32, 1.0)
    assert ev.shape == (32, 32, 3)


# --------------------------------------------------------------------------- the grain source


def _source(digits_dir, *overrides, steps=20):
    cfg = cfg_lib.get_config(
        "classify_folder", [f"data.root={digits_dir}", *DIGITS_FOLDER, *TINY, f"steps={steps}", *overrides]
    )
    from flax_attn.training.tasks import make_task

    return make_task(cfg).train_source


def test_rows_are_independent_of_the_process_layout_and_the_state_resumes(digits_dir):
    src = _source(digits_dir, "data.augment=True", "data.crop_scale=(0.5, 1.0)", "data.hflip=True")
    full = src.batch(3)
    halves = [src.batch(3, slice(0, 8)), src.batch(3, slice(8, 16))]
    for k in full:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k])
    # The prefetching iterator yields the random-access batches; a state taken mid-stream resumes
    # with exactly the next batch.
    it = src.iterator(slice(8, 16))
    got = [next(it) for _ in range(4)]
    state = it.get_state()
    nxt = next(it)
    it.close()
    for s, b in enumerate(got + [nxt]):
        np.testing.assert_array_equal(b["image"], src.batch(s, slice(8, 16))["image"])
    it2 = src.iterator(slice(8, 16), json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(it2)["image"], nxt["image"])
    it2.close()
    # Every training image once per epoch (1437 of 1797 after the held-back split).
    n = len(src.example.reader.paths)
    epoch = [int(src.example.reader.order[g]) for g in range(n)]
    assert sorted(epoch) == list(range(n))


def test_worker_processes_give_the_same_batches(digits_dir):
    src = _source(digits_dir, "data.workers=2", "data.augment=True", "data.crop_scale=(0.5, 1.0)")
    it = src.iterator(slice(0, 16))
    try:
        got = [next(it) for _ in range(5)]
        state = it.get_state()
    finally:
        it.close()
    for s, b in enumerate(got):
        np.testing.assert_array_equal(b["image"], src.batch(s)["image"])
        np.testing.assert_array_equal(b["label"], src.batch(s)["label"])
    it = src.iterator(slice(0, 16), state)
    try:
        np.testing.assert_array_equal(next(it)["image"], src.batch(5)["image"])
    finally:
        it.close()


def test_a_corrupt_image_is_skipped_with_a_warning_and_counted(tmp_path):
    root = _write_digits(tmp_path / "digits", 120)
    bad = root / "digit3" / "zz_truncated.png"
    good = next((root / "digit3").glob("*.png")).read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # a truncated PNG
    (root / "digit5" / "not_an_image.jpg").write_bytes(b"hello")
    overrides = [f"data.root={root}", *DIGITS_FOLDER, "data.test_fraction=0.1", *TINY, "steps=14", "eval_every=0"]
    cfg = cfg_lib.get_config("classify_folder", overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = Trainer(cfg, tmp_path / "run").run()
    assert res.status == "completed"
    texts = [str(w.message) for w in caught if issubclass(w.category, folders.CorruptImageWarning)]
    assert any("zz_truncated.png" in t for t in texts) or any("not_an_image.jpg" in t for t in texts), texts
    # 14 steps x 16 rows = 224 examples, about two epochs of the ~108 training images: each bad file
    # that is in the training split is met (and replaced) once per epoch.
    src = Trainer(cfg, tmp_path / "probe").task.train_source
    order = [src.example.reader.paths[int(src.example.reader.order[g])] for g in range(14 * 16)]
    expected = sum(p.endswith(("zz_truncated.png", "not_an_image.jpg")) for p in order)
    assert expected >= 1
    assert _losses(tmp_path / "run", "data_skipped")[-1] == expected
    assert all(np.isfinite(_losses(tmp_path / "run")))


# --------------------------------------------------------------------------- training from folders


@pytest.mark.slow
def test_folder_classification_matches_the_in_memory_digits(tmp_path, digits_dir):
    """Same model, steps and batch on the digits, from PNG files through grain and from memory."""
    common = ["model.kwargs.widths=(16, 32)", "steps=300", "eval_every=0", "log_every=100", "data.augment=False"]
    mem = Trainer(cfg_lib.get_config("classify", common), tmp_path / "mem").run().eval_metrics
    fold = Trainer(
        cfg_lib.get_config("classify_folder", [f"data.root={digits_dir}", *DIGITS_FOLDER, *common]),
        tmp_path / "folder",
    ).run()
    print(f"accuracy: in-memory {mem['accuracy']:.4f}, folder {fold.eval_metrics['accuracy']:.4f}")
    assert mem["accuracy"] > 0.93
    assert abs(fold.eval_metrics["accuracy"] - mem["accuracy"]) < 0.03
    assert fold.state.params["fc"]["kernel"].shape[-1] == 10  # num_classes from the folder


def test_num_classes_must_match_the_folder(digits_dir, tmp_path):
    cfg = cfg_lib.get_config(
        "classify_folder", [f"data.root={digits_dir}", *DIGITS_FOLDER, "model.kwargs.num_classes=7"]
    )
    with pytest.raises(cfg_lib.ConfigError, match=r"num_classes: expected 10 .* got 7"):
        Trainer(cfg, tmp_path)
    with pytest.raises(folders.DataError, match=r"data.root: expected .*--override data.root=DIR"):
        Trainer(cfg_lib.get_config("classify_folder"), tmp_path)


SR_FOLDER = [
    "model.name=tiny_sr",
    "model.kwargs={'scale': 2, 'num_feat': 16, 'num_blocks': 2}",
    "data.batch_size=8",
    "data.patch_size=24",
    "data.workers=0",
    "optim.learning_rate=2e-3",
    "optim.warmup_steps=5",
    "checkpoint.async_save=False",
]


@pytest.mark.slow
@pytest.mark.data
def test_superres_from_a_folder_beats_bicubic_on_set5(tmp_path, hr_dir, shared_data):
    set5 = shared_data / "set5"
    if not set5.is_dir():
        pytest.skip(f"{set5} not available")
    cfg = cfg_lib.get_config(
        "superres_folder",
        [*SR_FOLDER, f"data.train_dir={hr_dir}", f"data.eval_dir={set5}", "steps=400", "eval_every=0", "log_every=100"],
    )
    res = Trainer(cfg, tmp_path / "sr").run()
    m = res.eval_metrics
    print({k: round(v, 4) for k, v in m.items()})
    # Whole Set5 images (five shapes), Y channel, border of 2: the A2N protocol.
    # The protocol's bicubic Set5 x2 (PIL) is 33.67 dB; the literature's (MATLAB) 33.66 dB.
    assert 33.5 < m["bicubic_psnr"] < 33.8, m
    assert m["psnr_gain"] > 0.5, m  # measured +1.41 dB after these 400 steps


def test_superres_folder_ema_and_accumulation(tmp_path, hr_dir):
    """grad_accum_steps=2 takes the same step as one full batch (no BatchNorm in TinySR); EMA
    parameters follow their definition."""
    base = [*SR_FOLDER, f"data.train_dir={hr_dir}", "data.eval_images=('camera',)", "data.eval_size=48"]
    base += ["steps=3", "eval_every=0", "log_every=1", "optim.clip_grad_norm=None"]
    one = Trainer(cfg_lib.get_config("superres_folder", base), tmp_path / "a").run()
    two = Trainer(cfg_lib.get_config("superres_folder", [*base, "grad_accum_steps=2"]), tmp_path / "b").run()
    np.testing.assert_allclose(_losses(tmp_path / "b"), _losses(tmp_path / "a"), rtol=2e-5)
    for x, y in zip(jax.tree_util.tree_leaves(one.state.params), jax.tree_util.tree_leaves(two.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    with pytest.raises(cfg_lib.ConfigError, match="grad_accum_steps: expected a divisor of data.batch_size 8, got 3"):
        cfg_lib.get_config("superres_folder", [*base, "grad_accum_steps=3"])

    # EMA with decay d from params p_0: after 3 steps e = d^3 p_0 + (1 - d) sum_i d^(3-i) p_i.
    d = 0.5
    cfg = cfg_lib.get_config(
        "superres_folder", [*base, f"ema_decay={d}", "checkpoint.every_steps=1", "checkpoint.max_to_keep=5"]
    )
    t = Trainer(cfg, tmp_path / "ema")
    res = t.run()
    from flax_attn.training.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "ema", cfg.checkpoint)
    ps = [t.initial_state().params] + [ck.restore(s, t.abstract_state)[0].params for s in (1, 2, 3)]
    ck.close()
    want = jax.tree_util.tree_map(
        lambda p0, p1, p2, p3: d**3 * p0 + (1 - d) * (d**2 * p1 + d * p2 + p3), *[jax.device_get(p) for p in ps]
    )
    for x, y in zip(jax.tree_util.tree_leaves(res.state.ema_params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_superres_folder_from_the_cli_with_a_set5_layout_eval_folder(tmp_path, hr_dir, capsys):
    from PIL import Image

    from flax_attn.training.cli import main
    from flax_attn.training.data import load_skimage_image

    ev = tmp_path / "Set5"
    ev.mkdir()
    for name, size in (("camera", (60, 50)), ("coins", (44, 52)), ("moon", (60, 50))):
        im = load_skimage_image(name)
        Image.fromarray(im[: size[0], : size[1]]).save(ev / f"{name}.png")
        Image.fromarray(im[: size[0] // 4, : size[1] // 4]).save(ev / f"{name}_x4_lr.png")  # not used
    argv = ["--config", "superres_folder", "--workdir", str(tmp_path / "run")]
    for o in [*SR_FOLDER, f"data.train_dir={hr_dir}", f"data.eval_dir={ev}", "steps=2", "log_every=1"]:
        argv += ["--override", o]
    assert main(argv) == 0
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    sets = folders.sr_eval_sets(str(ev), 2)
    # Grouped by shape (one compilation each); the x4 LR files are not HR images.
    assert sorted((s["hr"].shape[:3]) for s in sets) == [(1, 44, 52), (2, 60, 50)]
    np.testing.assert_array_equal(sets[0]["lr"].shape, (1, 22, 26, 3))
    assert np.isfinite(final["psnr"]) and np.isfinite(final["bicubic_psnr"])
    # An empty train_dir is a one-line user error.
    assert main(["--config", "superres_folder", "--workdir", str(tmp_path / "x")]) == 2
    assert "data.train_dir: expected a folder of HR images" in capsys.readouterr().err


# --------------------------------------------------------------------------- logs people read


def _read_events(path: Path) -> list:
    from tensorboardX.proto import event_pb2

    out, data = [], path.read_bytes()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return out


def test_tensorboard_events_read_back_and_profile_window(tmp_path, digits_dir, capsys):
    """classify_folder end to end from the CLI, with a profiler window; the TensorBoard events hold
    the same scalars as metrics.jsonl."""
    from flax_attn.training.cli import main

    argv = ["--config", "classify_folder", "--workdir", str(tmp_path), "--profile-steps", "3:5"]
    for o in [f"data.root={digits_dir}", *DIGITS_FOLDER, *TINY]:
        argv += ["--override", o]
    assert main(argv) == 0
    assert "profile of steps 3..5" in capsys.readouterr().out
    assert main([*argv[:4], "--profile-steps", "5:5"]) == 2
    assert "--profile-steps: expected A:B with 0 <= A < B, got '5:5'" in capsys.readouterr().err
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars: dict[str, dict[int, float]] = {}
    for ev in _read_events(files[0]):
        for v in ev.summary.value:
            scalars.setdefault(v.tag, {})[ev.step] = v.simple_value
    jsonl = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in jsonl if r["kind"] == "train"}
    assert sorted(scalars["train/loss"]) == sorted(train) == list(range(1, 13))
    for s, v in train.items():
        assert abs(scalars["train/loss"][s] - v) < 1e-6 * max(1.0, abs(v))
    assert set(scalars["eval/accuracy"]) == {6, 12}
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


class _Stream:
    def __init__(self, tty):
        self.text, self._tty = "", tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self._tty


def test_progress_bar_on_a_terminal_and_quiet_in_logs():
    for tty in (True, False):
        st = _Stream(tty)
        p = Progress(40, 16, 0, st)
        assert p.tty is tty
        for s in range(1, 41):
            time.sleep(0.003)
            p.update(s, force=s % 10 == 5)
            if s % 20 == 0:
                p.print(s, {"loss": 1.0 / s})
        lines = [ln for ln in st.text.split("\n") if ln]
        if tty:
            assert "\r[" in st.text and "ETA" in st.text and "steps/s" in st.text
            assert st.text.count("\r[") >= 2
            p.update(40, force=True)
            p.clear()  # the trainer's messages erase the bar first
            assert st.text.endswith("\r\x1b[K")
        else:
            assert "\r" not in st.text and "[" not in st.text
            assert len(lines) == 2 and lines[1].startswith("step 40/40 (100%)")


# --------------------------------------------------------------------------- processes, kills


WORKER = r"""
import json, sys, time
args = json.loads(sys.argv[1])
from flax_attn.training.sharding import initialize_distributed
initialize_distributed()
import jax, numpy as np
from flax_attn.training import sharding
from flax_attn.training.configs import get_config
from flax_attn.training.trainer import Trainer
if args.get("delay"):
    orig = sharding.to_global
    def slow(*a, **k):
        time.sleep(args["delay"])
        return orig(*a, **k)
    sharding.to_global = slow
res = Trainer(get_config("classify_folder", args["overrides"]), args["workdir"]).run()
if jax.process_index() == 0:
    flat = jax.tree_util.tree_leaves_with_path(res.state.params)
    arrays = {jax.tree_util.keystr(p): np.asarray(x.addressable_data(0)) for p, x in flat}
    np.savez(args["workdir"] + "/final_vars.npz", **arrays)
print("devices", jax.device_count(), "processes", jax.process_count(), "status", res.status, flush=True)
"""


def _start(workdir: Path, overrides, devices: int, delay: float = 0.0, **env) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    e.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=flags, **env)
    args = json.dumps({"overrides": list(overrides), "workdir": str(workdir), "delay": delay})
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, args],
        env=e,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_with_folder_data(tmp_path, digits_dir):
    overrides = [f"data.root={digits_dir}", *DIGITS_FOLDER, *TINY, "steps=6", "eval_every=0", "data.augment=True"]
    overrides += ["data.crop_scale=(0.6, 1.0)", "checkpoint.every_steps=0"]
    coord = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    procs = [
        _start(tmp_path / "d4", overrides, 4),
        _start(tmp_path / "h2x2", overrides, 2, JAX_PROCESS_ID="0", **coord),
        _start(tmp_path / "h2x2", overrides, 2, JAX_PROCESS_ID="1", **coord),
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "devices 4 processes 2" in outs[1]
    assert len(_losses(tmp_path / "d4")) == 6
    np.testing.assert_allclose(_losses(tmp_path / "h2x2"), _losses(tmp_path / "d4"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sigkill_mid_epoch_and_resume_is_exact_with_folder_data(tmp_path, digits_dir):
    overrides = [f"data.root={digits_dir}", *DIGITS_FOLDER, "data.augment=True", "data.crop_scale=(0.6, 1.0)"]
    overrides += ["model.kwargs.widths=(8, 16)", "data.batch_size=16", "steps=30", "log_every=1", "eval_every=15"]
    overrides += ["checkpoint.every_steps=4", "optim.warmup_steps=2", "data.workers=2"]
    ref = Trainer(cfg_lib.get_config("classify_folder", overrides), tmp_path / "ref").run()
    work = tmp_path / "run"
    p = _start(work, overrides, 1, delay=0.15)
    t0 = time.time()
    while time.time() - t0 < 300:
        assert p.poll() is None, p.communicate()[0][-3000:]
        path = work / "metrics.jsonl"
        lines = [ln for ln in path.read_text().splitlines() if ln.endswith("}")] if path.exists() else []
        if lines and json.loads(lines[-1])["step"] >= 10:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)  # mid-epoch (an epoch is ~90 steps), maybe mid-checkpoint
    p.wait()
    assert not (work / "final_metrics.json").exists()
    p = _start(work, overrides, 1)
    out = p.communicate(timeout=400)[0]
    assert p.returncode == 0 and "resumed from step" in out, out[-3000:]
    with np.load(work / "final_vars.npz") as z:
        for path_, x in jax.tree_util.tree_leaves_with_path(ref.state.params):
            np.testing.assert_array_equal(z[jax.tree_util.keystr(path_)], np.asarray(x))
    assert (work / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert (work / "final_metrics.json").read_text() == (tmp_path / "ref" / "final_metrics.json").read_text()


def test_step_schedule_recipes_and_old_workdirs():
    from flax_attn.training.trainer import _config_diff, build_optimizer

    c = cfg_lib.get_config("a2n_x3")
    assert (c.data.patch_size, c.data.batch_size, c.optim.learning_rate, c.task) == (64, 16, 1e-4, "superres_folder")
    _, sched = build_optimizer(c.optim, c.steps)
    assert [float(sched(s)) for s in (0, 199_999, 200_000, 400_000)] == pytest.approx([1e-4, 1e-4, 5e-5, 2.5e-5])
    with pytest.raises(cfg_lib.ConfigError, match="optim.decay_every: expected >= 1 with schedule 'step', got 0"):
        cfg_lib.get_config("classify", ["optim.schedule='step'"])
    with pytest.raises(cfg_lib.ConfigError, match=r"data.crop_scale: expected \(low, high\)"):
        cfg_lib.get_config("classify_folder", ["data.crop_scale=(0.5, 0.1)"])
    # A workdir written before the folder fields existed resumes: absent keys at their defaults match.
    now = json.loads(json.dumps(cfg_lib.get_config("classify").to_dict()))
    old = json.loads(json.dumps(now))
    for k in ("root", "workers", "crop_scale"):
        del old["data"][k]
    del old["ema_decay"]
    assert _config_diff(old, now) == {}
    now["data"]["workers"] = 3
    assert list(_config_diff(old, now)) == ["data.workers"]
