"""Tasks: what the data is, what the loss is, what evaluation reports.

A task bundles a training source (``batch(step, rows)``, a pure function of ``(seed, step)``), a
fixed evaluation set, the loss and the evaluation metrics. The trainer is task-agnostic: it jits
:meth:`Task.loss` into the train step and :meth:`Task.eval_sums` into the eval step.

Models whose call takes more than the image (the recurrent attention model also takes the first
location and the policy noise) say so with :meth:`Task.init_args`; :class:`HardAttentionTask`
is the example: its :meth:`~HardAttentionTask.loss` draws those from the per-step ``rng`` the
trainer folds from ``(seed, step)``, so sampled glimpse locations are reproducible and resumable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attn.hard_attention import ram_hybrid_loss
from flax_attn.training import data as data_lib
from flax_attn.training.configs import Config
from flax_attn.training.metrics import psnr_y, ssim_y

__all__ = [
    "TASKS",
    "ClassifyFolderTask",
    "ClassifyTask",
    "HardAttentionTask",
    "SuperResFolderTask",
    "SuperResTask",
    "Task",
    "make_task",
]


class Task:
    """Base class. Subclasses set ``train_source``, ``eval_set``, ``input_key`` and the two methods."""

    name = "task"
    input_key = "image"
    #: metric whose best checkpoint is kept when the config names none
    default_best = ("loss", "min")

    #: number of classes found in the data (folder tasks), filled into ``model.kwargs.num_classes``
    num_classes: int | None = None

    def __init__(self, config: Config):
        self.config = config
        self.train_source: Any = None
        self.eval_set: data_lib.EvalSet | None = None
        #: several evaluation sets (whole images of different shapes); ``None`` = ``[eval_set]``
        self.eval_sets: list[data_lib.EvalSet] | None = None

    def example_input(self) -> np.ndarray:
        """One example batch (host numpy) for ``model.init``."""
        return self.train_source.batch(0, slice(0, 1))[self.input_key]

    def init_args(self, model, example) -> tuple:
        """Positional arguments of ``model.init`` (and ``from_torch``) for the example input."""
        return (jnp.asarray(example),)

    def apply(self, model, params, batch_stats, x, *, train: bool, rng=None):
        """Model forward; returns ``(outputs, new_batch_stats)``."""
        variables = {"params": params, "batch_stats": batch_stats}
        rngs = {"dropout": rng} if rng is not None else None
        if train:
            out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
            return out, updates.get("batch_stats", batch_stats)
        return model.apply(variables, x, train=False), batch_stats

    def loss(self, model, params, batch_stats, batch, rng) -> tuple[jax.Array, tuple[dict, Any]]:
        """``(scalar loss, (metrics dict, new batch_stats))`` for one training batch."""
        raise NotImplementedError

    def eval_sums(self, model, variables, batch) -> dict[str, jax.Array]:
        """Sums over the real (``mask``) rows of one eval batch, including ``count``."""
        raise NotImplementedError

    @staticmethod
    def finalize(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.pop("count"), 1.0)
        return {k: v / n for k, v in sums.items()}


class ClassifyTask(Task):
    """Digits classification: softmax cross-entropy, accuracy."""

    name = "classify"
    default_best = ("accuracy", "max")

    def __init__(self, config: Config):
        super().__init__(config)
        d = config.data
        x_tr, y_tr, x_te, y_te = data_lib.digits_split(d.image_size, d.test_fraction, d.split_seed)
        self.train_source = data_lib.DigitsSource(x_tr, y_tr, d.batch_size, config.seed, d.augment)
        self.eval_set = data_lib.EvalSet({"image": x_te, "label": y_te}, d.eval_batch_size)

    def loss(self, model, params, batch_stats, batch, rng):
        logits, new_bs = self.apply(model, params, batch_stats, batch["image"], train=True, rng=rng)
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, ({"loss": loss, "accuracy": acc}, new_bs)

    def eval_sums(self, model, variables, batch):
        logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
        m = batch["mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss": jnp.sum(ce * m), "accuracy": jnp.sum(correct * m), "count": jnp.sum(m)}


class SuperResTask(Task):
    """x``scale`` super-resolution: L1 loss; PSNR/SSIM on Y for the model and the bicubic baseline."""

    name = "superres"
    input_key = "lr"
    default_best = ("psnr", "max")

    def __init__(self, config: Config):
        super().__init__(config)
        d = config.data
        overlap = set(d.train_images) & set(d.eval_images)
        if overlap or ({"cat", "chelsea"} <= set(d.train_images) | set(d.eval_images)):
            # skimage.data.cat is chelsea: the same photograph under two names.
            raise ValueError(f"superres: training and evaluation images overlap: {sorted(overlap) or ['cat/chelsea']}")
        self.train_source = data_lib.superres_train_source(
            d.train_images,
            batch_size=d.batch_size,
            patch_size=d.patch_size,
            scale=d.scale,
            seed=config.seed,
            augment=d.augment,
        )
        self.eval_set = data_lib.EvalSet(
            dict(data_lib.superres_eval_set(tuple(d.eval_images), d.eval_size, d.scale)), d.eval_batch_size
        )

    def loss(self, model, params, batch_stats, batch, rng):
        sr, new_bs = self.apply(model, params, batch_stats, batch["lr"], train=True, rng=rng)
        loss = jnp.mean(jnp.abs(sr.astype(jnp.float32) - batch["hr"]))
        return loss, ({"loss": loss}, new_bs)

    def eval_sums(self, model, variables, batch):
        sr = model.apply(variables, batch["lr"], train=False).astype(jnp.float32)
        # Benchmark convention: the output is an 8-bit image.
        sr255 = jnp.round(jnp.clip(sr, 0.0, 1.0) * 255.0)
        hr255 = jnp.round(batch["hr"] * 255.0)
        bic = batch["bicubic"].astype(jnp.float32)
        s = self.config.data.scale
        m = batch["mask"]
        return {
            "psnr": jnp.sum(psnr_y(sr255, hr255, s) * m),
            "ssim": jnp.sum(ssim_y(sr255, hr255, s) * m),
            "bicubic_psnr": jnp.sum(psnr_y(bic, hr255, s) * m),
            "bicubic_ssim": jnp.sum(ssim_y(bic, hr255, s) * m),
            "l1": jnp.sum(jnp.mean(jnp.abs(sr - batch["hr"]), axis=(1, 2, 3)) * m),
            "count": jnp.sum(m),
        }

    @staticmethod
    def finalize(sums):
        out = Task.finalize(sums)
        out["psnr_gain"] = out["psnr"] - out["bicubic_psnr"]
        return out


def _start_folder_task(task: Task, config: Config, field: str, expected: str):
    """``Task.__init__`` for a task that reads image files, which ``data.<field>`` must name.

    Returns :mod:`flax_attn.training.folders` (imported here, so grain and PIL load only for these
    tasks) and ``config.data``.
    """
    Task.__init__(task, config)
    from flax_attn.training import folders

    if not getattr(config.data, field):
        raise folders.DataError(f"data.{field}: expected {expected} (--override data.{field}=DIR), got ''")
    return folders, config.data


class ClassifyFolderTask(ClassifyTask):
    """Classification from image files (``data.root``: a class-folder tree or a ``path,label`` list)
    through the grain pipeline of :mod:`flax_attn.training.folders`; evaluation on ``data.eval_root``
    or a stratified ``data.test_fraction`` held back from ``data.root``."""

    name = "classify_folder"

    def __init__(self, config: Config):
        folders, d = _start_folder_task(self, config, "root", "a class-folder tree or a .csv/.json list")
        paths, labels, classes = folders.labelled_files(d.root, arg="data.root")
        if d.eval_root:
            e_paths, e_labels, e_classes = folders.labelled_files(d.eval_root, arg="data.eval_root")
            index = {c: i for i, c in enumerate(classes)}
            unknown = sorted({e_classes[i] for i in e_labels} - set(index))
            if unknown:
                raise folders.DataError(
                    f"data.eval_root: expected only classes of data.root ({len(classes)}: {classes[:5]}...), "
                    f"got {len(unknown)} others: {unknown[:5]}"
                )
            e_labels = np.asarray([index[e_classes[i]] for i in e_labels], np.int32)
            where = "data.eval_root"
        else:
            tr, te = folders.stratified_split(labels, d.test_fraction, d.split_seed)
            e_paths, e_labels = [paths[i] for i in te], labels[te]
            paths, labels = [paths[i] for i in tr], labels[tr]
            where = "data.root"
        self.classes = classes
        self.num_classes = len(classes)
        if len(paths) < d.batch_size:
            raise folders.DataError(
                f"data.root: expected at least data.batch_size={d.batch_size} training images, got {len(paths)}"
            )
        self.train_source = folders.classify_folder_source(paths, labels, d, seed=config.seed, steps=config.steps)
        self.eval_set = data_lib.EvalSet(folders.classify_eval_arrays(e_paths, e_labels, d, where), d.eval_batch_size)


class SuperResFolderTask(SuperResTask):
    """Super-resolution from a folder of HR images (``data.train_dir``, LR made on the fly) and, with
    ``data.eval_dir``, whole-image evaluation on a Set5/Set14-layout folder; without it, the
    centre crops of ``data.eval_images`` as in ``superres``."""

    name = "superres_folder"

    def __init__(self, config: Config):
        folders, d = _start_folder_task(self, config, "train_dir", "a folder of HR images")
        self.train_source = folders.sr_folder_source(d, seed=config.seed, steps=config.steps)
        if d.eval_dir:
            self.eval_sets = [data_lib.EvalSet(a, d.eval_batch_size) for a in folders.sr_eval_sets(d.eval_dir, d.scale)]
            self.eval_set = self.eval_sets[0]
        elif d.eval_images:
            self.eval_set = data_lib.EvalSet(
                dict(data_lib.superres_eval_set(tuple(d.eval_images), d.eval_size, d.scale)), d.eval_batch_size
            )
        else:
            raise folders.DataError("data.eval_dir: expected a Set5-layout folder (or data.eval_images names), got ''")


class HardAttentionTask(Task):
    """Digits with the Recurrent Attention Model (Mnih et al., arXiv 1406.6247) trained by REINFORCE.

    The digits (the classify task's fixed split) are bilinearly resized to ``data.image_size`` and
    centred, zero-padded, on a square ``data.canvas_size`` canvas (the official retina's
    ``denormalize`` assumes square images), so the glimpse policy has somewhere to look. Training
    follows kevinzakka/recurrent-visual-attention: ``l_0 ~ U(-1, 1)``, the policy noise
    ``~ N(0, 1)``, both drawn from the step's folded ``rng`` inside the jitted step (a pure function
    of ``(seed, step)``, hence resumable), and :func:`flax_attn.hard_attention.ram_hybrid_loss`
    (NLL + REINFORCE with the baseline as a stop-gradient + baseline MSE).

    Evaluation reports ``accuracy`` the official way (the class log-probabilities averaged over
    :attr:`eval_samples` Monte-Carlo rollouts, each with its own ``l_0`` and policy noise, drawn
    from a key fixed by ``Config.seed`` so evaluations are deterministic) and ``accuracy_mean``
    with the mean policy (``l_0 = 0``, no noise), plus the NLL of the averaged prediction.
    """

    name = "hard_attention"
    default_best = ("accuracy", "max")
    #: Monte-Carlo rollouts averaged at evaluation (the official ``--M``, default 10)
    eval_samples = 10

    def __init__(self, config: Config):
        super().__init__(config)
        d = config.data
        if d.canvas_size < d.image_size:
            raise ValueError(
                f"hard_attention: data.canvas_size ({d.canvas_size}) must be >= data.image_size ({d.image_size})"
            )
        x_tr, y_tr, x_te, y_te = data_lib.digits_split(d.image_size, d.test_fraction, d.split_seed)
        x_tr, x_te = _centre_on_canvas(x_tr, d.canvas_size), _centre_on_canvas(x_te, d.canvas_size)
        self.train_source = data_lib.DigitsSource(x_tr, y_tr, d.batch_size, config.seed, d.augment)
        self.eval_set = data_lib.EvalSet({"image": x_te, "label": y_te}, d.eval_batch_size)

    def init_args(self, model, example):
        x = jnp.asarray(example)
        b = x.shape[0]
        return (x, jnp.zeros((b, 2), x.dtype), jnp.zeros((b, model.num_glimpses, 2), x.dtype))

    @staticmethod
    def _draws(model, key, b, dtype=jnp.float32):
        k_l, k_n = jax.random.split(key)
        l_0 = jax.random.uniform(k_l, (b, 2), dtype, -1.0, 1.0)
        noise = jax.random.normal(k_n, (b, model.num_glimpses, 2), dtype)
        return l_0, noise

    def loss(self, model, params, batch_stats, batch, rng):
        x = batch["image"]
        l_0, noise = self._draws(model, rng, x.shape[0])
        out = model.apply({"params": params}, x, l_0, noise, train=True)
        loss, aux = ram_hybrid_loss(
            out["log_probas"].astype(jnp.float32),
            out["log_pi"].astype(jnp.float32),
            out["baselines"].astype(jnp.float32),
            batch["label"],
        )
        return loss, ({"loss": loss, **aux}, batch_stats)

    def eval_sums(self, model, variables, batch):
        x, labels, m = batch["image"], batch["label"], batch["mask"]
        b = x.shape[0]
        variables = {"params": variables["params"]}
        key = jax.random.PRNGKey(self.config.seed)

        def sample(k):
            l_0, noise = self._draws(model, k, b)
            return model.apply(variables, x, l_0, noise)["log_probas"].astype(jnp.float32)

        # The official test: log-probabilities averaged over M rollouts, then argmax.
        log_probas = jnp.mean(jax.vmap(sample)(jax.random.split(key, self.eval_samples)), axis=0)
        mean_policy = model.apply(
            variables, x, jnp.zeros((b, 2), x.dtype), jnp.zeros((b, model.num_glimpses, 2), x.dtype)
        )["log_probas"].astype(jnp.float32)
        nll = -jnp.take_along_axis(log_probas, labels[:, None], axis=1)[:, 0]
        correct = (jnp.argmax(log_probas, -1) == labels).astype(jnp.float32)
        correct_mean = (jnp.argmax(mean_policy, -1) == labels).astype(jnp.float32)
        return {
            "loss": jnp.sum(nll * m),
            "accuracy": jnp.sum(correct * m),
            "accuracy_mean": jnp.sum(correct_mean * m),
            "count": jnp.sum(m),
        }


def _centre_on_canvas(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad ``(N, h, w, c)`` images to ``(N, size, size, c)`` with the image centred."""
    h, w = x.shape[1:3]
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((x.shape[0], size, size, x.shape[3]), x.dtype)
    out[:, top : top + h, left : left + w] = x
    return out


TASKS: dict[str, type[Task]] = {
    "classify": ClassifyTask,
    "superres": SuperResTask,
    "hard_attention": HardAttentionTask,
    "classify_folder": ClassifyFolderTask,
    "superres_folder": SuperResFolderTask,
}


def make_task(config: Config) -> Task:
    if config.task not in TASKS:
        raise KeyError(f"unknown task {config.task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[config.task](config)
