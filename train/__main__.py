"""``python -m train --config NAME [--override key=value ...] --workdir DIR [--init-from model.pth]``.

Several processes (one per host): pass ``--coordinator HOST:PORT --num-processes N --process-id I``
(or set ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``), or
``--distributed auto`` on TPU pods and SLURM clusters. Exit status: 0 done, 1 error (e.g. a
non-finite loss), 143 preempted by SIGTERM after saving a checkpoint (restart to resume).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config name (train.configs.CONFIGS)")
    p.add_argument("--workdir", required=True, help="checkpoints and metrics; resumed from if present")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config field by dotted path, e.g. optim.learning_rate=1e-3 (repeatable)",
    )
    p.add_argument("--init-from", default=None, help="PyTorch checkpoint to initialise the model from")
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

    # Distributed start-up must precede any use of a JAX backend.
    from train.sharding import initialize_distributed

    initialize_distributed(
        args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto"
    )

    from train.configs import get_config
    from train.trainer import NonFiniteLossError, train

    config = get_config(args.config, args.override)
    try:
        result = train(config, args.workdir, init_from=args.init_from)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if result.status == "preempted":
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
