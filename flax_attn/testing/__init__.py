"""Parity tooling: PyTorch references (``torch_ref``) and the shared parity check (``parity``).

``flax_attn.testing.parity`` imports torch only when a check runs.
"""
