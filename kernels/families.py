"""Importing this registers every built-in op family (each in the file of its kernels)."""

from . import attention, fp8_gemm, mla_decode  # noqa: F401  each registers its family
