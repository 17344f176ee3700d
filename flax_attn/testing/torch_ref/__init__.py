"""PyTorch reference implementations, one module per block family (imports torch).

They follow the official repositories' semantics and state-dict key names; the parity tests and
``python -m flax_attn verify`` build them from the catalogue. Only import these where torch is
installed (the ``torch`` extra).
"""
