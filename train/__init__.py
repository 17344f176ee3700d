"""The runnable entry point of a source checkout: ``python -m train --config NAME --workdir DIR``.

The training library itself is :mod:`flax_attn.training` (installed with the package, so the
``flax-attn-train`` console script works from a wheel too); this folder only keeps the command
that a checkout has always had. It is deliberately not installed: a top-level package named
``train`` would collide with any other project's, or with a user's own ``train.py``.
"""
