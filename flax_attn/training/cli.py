"""``flax-attn-train --config NAME [--override key=value ...] --workdir DIR [--init-from model.pth]``.

Several processes (one per host): pass ``--coordinator HOST:PORT --num-processes N --process-id I``
(or set ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``), or
``--distributed auto`` on TPU pods and SLURM clusters. Exit status: 0 done, 1 error (e.g. a
non-finite loss), 2 a user error (a bad config or override, a workdir of another config, an
unreadable ``--init-from`` file) reported in one line, 143 preempted by SIGTERM after saving a
checkpoint (restart to resume). ``--reset`` moves a workdir's previous run (of another config) to
``<workdir>/previous/<time>/`` and starts afresh.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None, prog: str = "flax-attn-train") -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config name (flax_attn.training.configs.CONFIGS)")
    p.add_argument("--workdir", required=True, help="checkpoints and metrics; resumed from if present")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config field by dotted path, e.g. optim.learning_rate=1e-3 (repeatable)",
    )
    p.add_argument("--init-from", default=None, help="PyTorch checkpoint to initialise the model from")
    p.add_argument(
        "--reset",
        action="store_true",
        help="if the workdir holds a run of another config, move it to <workdir>/previous/<time> and start afresh",
    )
    p.add_argument(
        "--profile-steps",
        default=None,
        metavar="A:B",
        help="jax.profiler trace of the steps from step A to step B (as logged) into <workdir>/profile",
    )
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument(
        "--distributed",
        choices=["off", "auto"],
        default="off",
        help="'auto': let jax.distributed.initialize detect the cluster (TPU pods, SLURM)",
    )
    args = p.parse_args(argv)
    profile = None
    if args.profile_steps is not None:
        a, sep, b = args.profile_steps.partition(":")
        try:
            profile = (int(a), int(b))
            if not sep or not 0 <= profile[0] < profile[1]:
                raise ValueError
        except ValueError:
            print(f"error: --profile-steps: expected A:B with 0 <= A < B, got {args.profile_steps!r}", file=sys.stderr)
            return 2

    # Distributed start-up must precede any use of a JAX backend.
    from flax_attn.training.sharding import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto")

    from flax_attn.convert import CheckpointError, StateDictMismatchError
    from flax_attn.training.checkpoint import CheckpointMismatchError
    from flax_attn.training.configs import ConfigError, get_config
    from flax_attn.training.trainer import ConfigMismatchError, NonFiniteLossError, train

    user_errors = (
        ConfigError,
        ConfigMismatchError,
        CheckpointMismatchError,
        CheckpointError,
        StateDictMismatchError,
        FileNotFoundError,
    )
    try:
        config = get_config(args.config, args.override)
        result = train(config, args.workdir, init_from=args.init_from, reset=args.reset, profile_steps=profile)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except user_errors as e:
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2
    if result.status == "preempted":
        return 143
    return 0


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split())
