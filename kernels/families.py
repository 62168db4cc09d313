"""Importing this registers every built-in op family (each in the file of its kernels)."""

from . import attention, fp8_gemm  # noqa: F401  attention, fp8_gemm
