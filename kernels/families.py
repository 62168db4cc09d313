"""Importing this registers every built-in op family (each in the file of its kernels)."""

from . import attention, fp8_gemm, grouped_mm, mla_decode  # noqa: F401  each registers its family
