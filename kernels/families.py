"""Importing this registers every built-in op family (each in the file of its kernels)."""

from . import fp8_gemm  # noqa: F401  fp8_gemm
from . import grouped_mm  # noqa: F401  moe_experts
