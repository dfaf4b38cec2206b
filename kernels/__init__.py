"""fusediff kernels: one file per op family, each registering ``fusediff::`` custom ops.

Importing this package registers every op (``torch.ops.fusediff.*``).
"""
from kernels import attention, geglu, groupnorm, softmax, winograd  # noqa: F401

__all__ = ["attention", "geglu", "groupnorm", "softmax", "winograd"]
