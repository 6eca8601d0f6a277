"""The largest stable learning rate for (heavy-ball) gradient descent on the MSE loss.

With the loss L = ‖f − y‖² / (2N), N = `y_train_size`, one step of gradient descent on the
linearized model multiplies each eigenmode of the residual by (1 − ηλ/N); heavy-ball momentum
m turns this into a 2x2 recurrence whose roots stay inside the unit circle iff
0 < ηλ/N < 2(1 + m). The largest stable step is therefore η_max = 2(1 + m) N / λ_max.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

from ntk_dynamics.dynamics import _inputs

Matvec = Callable[[jax.Array], jax.Array]

# Above this many rows a dense eigensolver (O(n³)) loses to Lanczos (a few dozen matvecs).
DENSE_MAX_DIM = 2048


def _as_matrix(fn: str, kernel: jax.Array) -> jax.Array:
  """Zipped (N, N, K, K, ...) kernel -> (A, A) matrix; checks shape, dtype and finiteness.
  Half-precision kernels come back in float32 (XLA has no half-precision eigensolver)."""
  _inputs.check_real_array(fn, "k_train_train", kernel)
  kernel = jnp.asarray(kernel)
  if kernel.ndim % 2 or kernel.ndim == 0 or kernel.shape[0::2] != kernel.shape[1::2]:
    raise ValueError(f"{fn}: `k_train_train` has shape {kernel.shape}; expected a square "
                     "kernel in the zipped layout (N, N) or (N, N, K, K, ...).")
  if kernel.size == 0:
    raise ValueError(f"{fn}: `k_train_train` has shape {kernel.shape}, with no entries; "
                     "expected the kernel of at least one training output.")
  _inputs.check_finite(fn, "k_train_train", kernel)
  order = tuple(range(0, kernel.ndim, 2)) + tuple(range(1, kernel.ndim, 2))
  dim = math.prod(kernel.shape[0::2])
  return kernel.transpose(order).reshape(dim, dim)


def _eigvalsh(matrix: jax.Array) -> jax.Array:
  """Ascending eigenvalues, in float32 for a half-precision (A, A) matrix."""
  return jnp.linalg.eigvalsh(matrix.astype(_inputs.compute_dtype(matrix.dtype)))


def largest_eigenvalue(k_train_train: Union[jax.Array, Matvec], *,
                       vector_shape: Optional[Sequence[int]] = None,
                       dtype: Any = None, tol: float = 1e-10) -> jax.Array:
  """λ_max of a symmetric PSD kernel, dense or matrix-free.

  Args:
    k_train_train: a kernel in the zipped layout ((N, N) traced, (N, N, K, K) full, ...) or a
      function `v -> Θ v` (e.g. `ntk_dynamics.kernels.ntk_vp_fn(f, x, None, params)`).
    vector_shape: shape of `v` when `k_train_train` is a function (e.g. `y_train.shape`).
    dtype: dtype of `v` for the matrix-free path (default: the default float dtype).
    tol: relative tolerance of the Lanczos iteration (`scipy.sparse.linalg.eigsh`).

  Returns:
    Scalar λ_max, in the units of the kernel (float32 for a float16 or bfloat16 kernel, whose
    eigenvalues are computed in float32). Kernels with at most `DENSE_MAX_DIM` rows use the
    dense `eigvalsh` (jittable); larger ones and functions use Lanczos (not jittable).
  """
  fn = "largest_eigenvalue"
  if callable(k_train_train):
    if vector_shape is None:
      raise ValueError(f"{fn}: `vector_shape` (the shape of v in v -> Θv, e.g. y_train.shape) "
                       "is required when `k_train_train` is a function.")
    shape = tuple(vector_shape)
    dtype = _inputs.compute_dtype(jnp.dtype(dtype or jnp.result_type(float)))
    matvec = jax.jit(lambda v: jnp.ravel(k_train_train(v.reshape(shape))))
    dim = math.prod(shape)
  else:
    matrix = _as_matrix(fn, k_train_train)
    dim, dtype = matrix.shape[0], _inputs.compute_dtype(matrix.dtype)
    if dim <= DENSE_MAX_DIM or not _inputs.is_concrete(matrix):
      return _eigvalsh(matrix)[-1]
    matrix = matrix.astype(dtype)
    matvec = jax.jit(lambda v: matrix @ v)
  if dim == 1:  # ARPACK needs k < dim: a 1x1 kernel is its own eigenvalue
    return jnp.ravel(matvec(jnp.ones((1,), dtype)))[0]
  # ARPACK fails ("starting vector is zero") on the zero operator. A random vector lies in
  # the null space of a nonzero operator with probability 0, so Θv = 0 means Θ = 0.
  probe = np.random.default_rng(0).standard_normal(dim)
  if not np.any(np.asarray(matvec(jnp.asarray(probe, dtype)))):
    return jnp.zeros((), dtype)
  op = scipy.sparse.linalg.LinearOperator(
      (dim, dim), dtype=dtype,
      matvec=lambda v: np.asarray(matvec(jnp.asarray(v.ravel(), dtype)), dtype))
  # 'LA' (largest algebraic) rather than 'LM': a slightly indefinite numerical kernel must
  # not return a large negative eigenvalue.
  # The fixed probe as ARPACK's start: its default start is random, which made λ_max (and
  # every learning rate derived from it) differ between identical runs in the 7th digit.
  value = scipy.sparse.linalg.eigsh(op, k=1, which="LA", tol=tol, v0=probe.astype(dtype),
                                    return_eigenvectors=False)[0]
  return jnp.asarray(value, dtype)


def max_learning_rate(k_train_train: Union[jax.Array, Matvec], y_train_size: int,
                      momentum: float = 0., *, vector_shape: Optional[Sequence[int]] = None,
                      eps: float = 1e-12) -> jax.Array:
  """Largest stable step η_max = 2(1 + m) N / λ_max of (heavy-ball) GD on the MSE loss.

  Units: the loss is L = ‖f − y‖² / (2N) with N = `y_train_size` (the number of entries of
  `y_train`, i.e. `0.5 * jnp.mean((f - y)**2)`), and the update is optax's
  `sgd(η, momentum=m)`: v ← m v + ∇L, θ ← θ − η v. Steps η < η_max make every eigenmode of
  the linearized dynamics decay; at η ≥ η_max the top mode oscillates without decaying or
  diverges. Pass the regularised kernel Θ + ρI if you use `diag_reg`.

  Args:
    k_train_train: kernel on the training set in the zipped layout, or a matrix-free
      `v -> Θ v`. A traced (n, n) kernel stands for Θ_tr ⊗ I, whose λ_max is a lower bound on
      the full kernel's (2–3× lower at finite width is common): its η_max is that of the
      infinite-width approximation, not a stable step of the network's linearization. Pass
      the full kernel (or `ntk_vp_fn`) for that.
    y_train_size: N, the number of entries the loss is averaged over (`y_train.size`): any
      integral scalar (Python int, numpy integer, 0-d integer array).
    momentum: m in [0, 1).
    vector_shape: shape of v for a matrix-free kernel (e.g. `y_train.shape`).
    eps: used in place of λ_max when λ_max ≤ 0 (an all-zero kernel), to avoid dividing by
      zero; a positive λ_max is used as it is, however small the kernel's units.

  Returns:
    Scalar η_max (float32 for a float16 or bfloat16 kernel). A concrete dense kernel must be symmetric and positive semi-definite up to
    rounding (smallest eigenvalue ≥ −max(10·A·eps, √eps)·λ_max), else ValueError.
  """
  fn = "max_learning_rate"
  y_train_size = _inputs.check_int(fn, "y_train_size", y_train_size)
  _inputs.check_scalar(fn, "momentum", momentum, upper=1.)
  if callable(k_train_train):
    lam = largest_eigenvalue(k_train_train, vector_shape=vector_shape)
  else:
    lam = _checked_largest_eigenvalue(fn, k_train_train)
  # Not λ_max + eps: that would bias η_max for kernels in small units (λ_max ~ eps).
  return 2. * (1. + momentum) * y_train_size / jnp.where(lam > 0, lam, eps)


def _checked_largest_eigenvalue(fn: str, k_train_train: Any) -> jax.Array:
  """λ_max of a dense kernel; a concrete one must be PSD (to rounding): all eigenvalues are
  checked up to `DENSE_MAX_DIM` rows, only λ_max > 0 (for a nonzero kernel) above."""
  matrix = _as_matrix(fn, k_train_train)
  shape = tuple(jnp.shape(k_train_train))
  if not _inputs.is_concrete(matrix):
    return _eigvalsh(matrix)[-1]
  _inputs.check_symmetric(fn, "k_train_train", matrix, shape)
  if matrix.shape[0] <= DENSE_MAX_DIM:
    evals = _eigvalsh(matrix)
    _inputs.check_psd(fn, "k_train_train", shape, evals, matrix.dtype)
    return evals[-1]
  lam = largest_eigenvalue(k_train_train)
  if float(lam) <= 0 and bool(jnp.any(matrix != 0)):
    raise ValueError(f"{fn}: `k_train_train` (shape {shape}) is not positive semi-definite: "
                     f"its largest eigenvalue {float(lam):.6g} is <= 0 although the kernel is "
                     "nonzero. A neural tangent kernel Θ = J Jᵀ has no negative eigenvalues "
                     "beyond rounding; pass Θ(x_train, x_train).")
  return lam


def warn_if_unstable(fn: str, learning_rate: float, momentum: float, lambda_max: jax.Array,
                     size: int) -> None:
  """Warns (with the figures) when a discrete step exceeds the stable one."""
  if not (_inputs.is_concrete(lambda_max) and _inputs.is_concrete(learning_rate)
          and _inputs.is_concrete(momentum)):
    return
  lam = float(lambda_max)
  limit = 2. * (1. + float(momentum)) * size / lam if lam > 0 else math.inf
  if float(learning_rate) >= limit:
    warnings.warn(
        f"{fn}: learning_rate={float(learning_rate):.6g} is at or beyond the largest stable "
        f"step 2(1+m)·N/λ_max = 2·(1+{float(momentum):.4g})·{size}/{lam:.6g} = {limit:.6g}; "
        "the top eigenmodes do not converge and the predictions oscillate or diverge.",
        RuntimeWarning, stacklevel=3)
