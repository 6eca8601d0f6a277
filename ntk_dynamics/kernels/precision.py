"""Matmul precision of kernel computations.

Every kernel in this package is built from ordinary `jnp.einsum` / `jnp.dot` / autodiff calls
without a hard-coded `precision=`, so they all follow `jax.default_matmul_precision`:

    with jax.default_matmul_precision("highest"):
      k = ntk_fn(x1, x2, params)          # full float32 matmuls, also on GPU/TPU

The context is part of JAX's jit cache key, so the same kernel function compiles once per
precision. `batch(..., precision=...)` applies it to every block it evaluates.

Defaults: inputs and parameters keep their dtype (float32 unless you pass float64 with
`jax_enable_x64`). On CPU float32 matmuls are exact float32. On NVIDIA GPUs (Ampere and later)
XLA's "default" float32 matmul precision is TF32 (10-bit mantissa inputs, float32
accumulation): kernels then carry a relative error of about 2e-5 against full float32 (a figure
measured on an H200 when this project was planned, not re-measured here); TPUs default to
bfloat16 passes, which is coarser still. Use
`"highest"` (or `"float32"`) when that matters, e.g. for ill-conditioned kernel solves.
"""
from __future__ import annotations

import contextlib
from typing import Union

import jax

# Names accepted by `jax.default_matmul_precision` that users most often want.
COMMON_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")

Precision = Union[None, str, jax.lax.Precision]


def canonical_precision(precision: Precision, name: str = "precision") -> str | None:
  """Validates a precision given as None, a string or a `jax.lax.Precision`.

  Returns the string `jax.default_matmul_precision` takes, or None (leave the ambient setting).
  """
  if precision is None:
    return None
  if isinstance(precision, jax.lax.Precision):
    return precision.name.lower()
  if isinstance(precision, str):
    try:
      with jax.default_matmul_precision(precision):
        pass
    except ValueError as e:
      raise ValueError(f"`{name}`={precision!r} is not a matmul precision; use one of "
                       f"{COMMON_PRECISIONS} (or another name jax.default_matmul_precision "
                       f"accepts), a jax.lax.Precision, or None.") from e
    return precision
  raise TypeError(f"`{name}` must be None, a string such as 'highest', or a "
                  f"jax.lax.Precision; got {precision!r}.")


def matmul_precision(precision: Precision):
  """Context manager: `jax.default_matmul_precision(precision)`, or a no-op for None."""
  precision = canonical_precision(precision)
  if precision is None:
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)
