"""``python -m train ...`` from a source checkout: the same command as ``flax-attn-train``."""

import sys

from flax_attn.training.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train"))
