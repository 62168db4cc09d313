"""Importing this registers every built-in op family (each in the file of its kernels)."""

from . import fp8_gemm  # noqa: F401  fp8_gemm
from . import mla_decode  # noqa: F401  mla_decode
