"""Input-pipeline throughput of flax_attn.training.folders against the training step's consumption.

Writes generated folders into a temporary directory (scikit-image photographs, so decoding costs
what real photographs cost):

* classification: 96 JPEGs of 375x500 (about an ImageNet image) in 4 class folders, decoded,
  random-resized-cropped to ``--image-size`` and flipped;
* super-resolution: 16 PNGs of 480x480 (a DIV2K image is about 2040x1356: 12x the pixels),
  decoded, a 48x48 LR patch at x2 sampled, LR made by PIL bicubic.

Measures images/s of each pipeline with 0 workers (reader threads in this process) and with 2
grain worker processes, the training step's consumption (img/s of the jitted step of the
``classify_folder`` / ``superres`` models on this machine), and the step time when the batches
come from the grain loader vs from memory. Prints a markdown report (``--out`` writes it)::

    python benchmarks/input_pipeline.py --out benchmarks/results/input_pipeline_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "motorcycle_left",
)


def _photos():
    from flax_attn.training.data import load_skimage_image

    out = []
    for name in PHOTOS:
        try:
            out.append(load_skimage_image(name))
        except (ValueError, OSError):
            continue
    return out


def write_folders(root: Path) -> tuple[Path, Path]:
    from PIL import Image

    photos = _photos()
    rng = np.random.default_rng(0)
    cls = root / "classify"
    for i in range(96):
        im = photos[i % len(photos)]
        im = np.asarray(Image.fromarray(im).resize((500, 375), Image.BILINEAR))
        im = np.roll(im, int(rng.integers(0, 100)), axis=1)  # distinct files
        (cls / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(cls / f"class{i % 4}" / f"{i:03d}.jpg", quality=90)
    sr = root / "hr"
    sr.mkdir()
    for i in range(16):
        im = photos[i % len(photos)]
        im = np.asarray(Image.fromarray(im).resize((480, 480), Image.BICUBIC))
        Image.fromarray(np.roll(im, 7 * i, axis=0)).save(sr / f"{i:02d}.png")
    return cls, sr


def _config(name, overrides):
    from flax_attn.training.configs import get_config

    return get_config(name, overrides)


def pipeline_rate(source, n_batches: int) -> float:
    """Images/s of ``source.iterator()`` over ``n_batches`` after one warm-up batch."""
    it = source.iterator()
    try:
        next(it)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        dt = time.perf_counter() - t0
    finally:
        it.close()
    return n_batches * source.batch_size / dt


def step_rates(trainer, n_steps: int) -> tuple[float, float, float]:
    """(seconds per step with the batches already in memory, seconds per step reading from the loader)."""
    import jax

    from flax_attn.training import sharding as sh

    cfg = trainer.config
    src = trainer.task.train_source
    state = trainer.initial_state()
    batches = [src.batch(i, trainer.rows) for i in range(n_steps + 1)]
    glob = [sh.to_global(b, trainer.mesh, cfg.data.batch_size) for b in batches]
    state, m = trainer.train_step(state, glob[0], trainer.step_key)  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for g in glob[1:]:
        state, m = trainer.train_step(state, g, trainer.step_key)
    jax.block_until_ready(m)
    mem = (time.perf_counter() - t0) / n_steps
    it = src.iterator(trainer.rows)
    try:
        next(it)
        t0 = time.perf_counter()
        for _ in range(n_steps):
            g = sh.to_global(next(it), trainer.mesh, cfg.data.batch_size)
            state, m = trainer.train_step(state, g, trainer.step_key)
        jax.block_until_ready(m)
        loader = (time.perf_counter() - t0) / n_steps
    finally:
        it.close()
    return mem, loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args()

    from flax_attn.training.trainer import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cls, sr = write_folders(Path(tmp))
        common_c = [
            f"data.root={cls}",
            f"data.image_size={args.image_size}",
            "data.batch_size=32",
            "data.test_fraction=0.1",
        ]
        common_s = [f"data.train_dir={sr}", "data.eval_images=('camera',)", "data.eval_size=48", "data.patch_size=48"]
        common_s += ["data.batch_size=16"]
        results = {}
        for kind, name, common in (
            ("classify", "classify_folder", common_c),
            ("superres x2", "superres_folder", common_s),
        ):
            for workers in (0, 2):
                # One reader thread per process: workers=0 is the cost on one core.
                cfg = _config(name, [*common, f"data.workers={workers}", "data.read_threads=1", "steps=1000"])
                t = Trainer(cfg, os.path.join(tmp, f"w{kind}{workers}"))
                rate = pipeline_rate(t.task.train_source, args.batches)
                results[(kind, workers)] = rate
                rows.append((kind, workers, rate))
                print(f"{kind:12s} workers={workers}: {rate:8.1f} img/s", flush=True)
        steps = {}
        for kind, name, common in (
            ("classify", "classify_folder", common_c),
            ("superres x2", "superres_folder", common_s),
        ):
            cfg = _config(name, [*common, "data.workers=2", "steps=1000"])
            t = Trainer(cfg, os.path.join(tmp, f"s{kind}"))
            mem, loader = step_rates(t, args.steps)
            steps[kind] = (cfg, mem, loader)
            print(f"{kind:12s} step: {mem * 1e3:.0f} ms from memory, {loader * 1e3:.0f} ms from the loader", flush=True)

    cores = os.cpu_count()
    lines = [
        "# Input pipeline (grain over image folders) vs the training step, CPU",
        "",
        f"`python benchmarks/input_pipeline.py --out benchmarks/results/input_pipeline_cpu.md` on "
        f"{platform.machine()} with {cores} CPU cores, shared with other jobs while it ran (load average above the "
        "core count), so absolute numbers are noisy; ratios within the run are the figures to read. "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        "Pipelines: classification = decode a 375x500 JPEG, random-resized crop to "
        f"{args.image_size}x{args.image_size}, flip; super-resolution = decode a 480x480 PNG, sample an x2 "
        "48x48 LR patch, PIL bicubic LR of a window around it, flips.",
        "",
        "| pipeline | worker processes (1 reader thread each; 0 = in the trainer) | img/s | ms per image |",
        "|---|---|---|---|",
    ]
    for kind, workers, rate in rows:
        lines.append(f"| {kind} | {workers} | {rate:.1f} | {1e3 / rate:.1f} |")
    lines += [
        "",
        "| task (model) | batch | step from memory | step from the loader (2 workers) | consumes | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for kind, (cfg, mem, loader) in steps.items():
        b = cfg.data.batch_size
        lines.append(
            f"| {kind} ({cfg.model.name.split(':')[-1]}) | {b} | {mem * 1e3:.0f} ms | {loader * 1e3:.0f} ms | "
            f"{b / mem:.0f} img/s | {loader / mem:.2f} |"
        )
    lines.append("")
    open_text = "\n".join(lines)
    print(open_text)
    if args.out:
        Path(args.out).write_text(open_text + "\n")


if __name__ == "__main__":
    main()
