"""Kernel/target layout and argument checks shared by the closed forms and the ODE solver.

Kernels follow neural-tangents' layout: for targets `y_train` of shape S and `trace_axes` T,
`k_train_train` has the shape of `zip(S', S')` where S' is S without the axes in T, e.g.
y (n, k) with `trace_axes=(-1,)` -> kernel (n, n); with `trace_axes=()` -> (n, n, k, k). A
traced kernel stands for Θ ⊗ I on the traced axes. Internally every kernel is flattened to a
matrix over the A = prod(S') untraced entries and every target to an (A, C) matrix whose C
columns are the traced entries, so all dynamics are plain matrix algebra.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dynamics import _checks

Axes = Union[int, Sequence[int]]


def is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_finite(fn: str, name: str, x: Any) -> None:
  """`_checks.check_finite` with the function's name in the message."""
  try:
    _checks.check_finite(name, x)
  except ValueError as e:
    raise ValueError(f"{fn}: {e}") from None


def eps_of(dtype: Any) -> float:
  """Machine epsilon of a floating dtype, bfloat16 included (np.finfo does not know it);
  float64's for integer and boolean dtypes, which are exact."""
  floating = jnp.issubdtype(np.dtype(dtype), jnp.floating)
  return float(jnp.finfo(np.dtype(dtype) if floating else np.float64).eps)


def compute_dtype(dtype: Any) -> np.dtype:
  """The dtype the linear algebra runs in: `dtype`, widened to float32 for float16 and
  bfloat16 (XLA has no half-precision eigensolver, and half-precision series, exponentials
  and ODE steps would lose the accuracy the kernel has)."""
  dtype = np.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and eps_of(dtype) > eps_of(np.float32):
    return np.dtype(np.float32)
  return dtype


def check_real_array(fn: str, name: str, x: Any) -> None:
  """Raises unless `x` holds real numbers: a boolean, integer or floating dtype (not complex,
  string or object)."""
  dtype = np.dtype(jnp.result_type(x)) if hasattr(x, "dtype") else np.asarray(x).dtype
  if not (dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.floating)):
    raise ValueError(f"{fn}: `{name}` (shape {np.shape(x)}) must hold real numbers (a "
                     f"boolean, integer or floating dtype), got dtype {dtype}.")


def check_scalar(fn: str, name: str, value: Any, *, positive: bool = False,
                 upper: Optional[float] = None) -> None:
  """Raises unless `value` is a finite real scalar >= 0 (> 0 if `positive`, < `upper`)."""
  if np.ndim(value) != 0:
    raise ValueError(f"{fn}: `{name}` must be a scalar, got shape {np.shape(value)}.")
  if not is_concrete(value):
    return
  try:
    if isinstance(value, (str, bytes)) or np.iscomplexobj(value):
      raise TypeError
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: `{name}` must be a real scalar, got {value!r}.") from None
  low_ok = v > 0 if positive else v >= 0
  high_ok = upper is None or v < upper
  if not (math.isfinite(v) and low_ok and high_ok):
    bound = "> 0" if positive else ">= 0"
    if upper is not None:
      bound += f" and < {upper}"
    raise ValueError(f"{fn}: `{name}` must be a finite scalar {bound}, got {v!r}.")


def check_int(fn: str, name: str, value: Any, *, minimum: int = 1) -> int:
  """Returns `value` as a Python int if it is an integral scalar >= `minimum`: a Python int,
  a numpy integer or a 0-d integer array (numpy or concrete jax); raises otherwise."""
  dtype = getattr(value, "dtype", None)
  is_bool = isinstance(value, (bool, np.bool_)) or (dtype is not None and
                                                    np.dtype(dtype) == np.bool_)
  try:
    v = None if is_bool or np.ndim(value) != 0 else operator.index(value)
  except TypeError:  # floats, non-integer arrays, tracers
    v = None
  if v is None or v < minimum:
    kind = "positive" if minimum == 1 else f">= {minimum}"
    shown = f"{value!r}" if np.ndim(value) == 0 else f"an array of shape {np.shape(value)}"
    raise ValueError(f"{fn}: `{name}` must be a {kind} integer (a Python int, numpy integer "
                     f"or 0-d integer array), got {shown}.")
  return int(v)


def psd_tolerance(dim: int, dtype: Any) -> float:
  """Relative tolerance below 0 for the smallest eigenvalue of a PSD kernel computed at
  precision `dtype`: max(10·A·eps, √eps) (rounding of J Jᵀ and of the eigensolver)."""
  eps = eps_of(dtype)
  return max(10. * dim * eps, math.sqrt(eps))


def check_psd(fn: str, name: str, shape: tuple, evals: Any, dtype: Any,
              absolute_error: float = 0.) -> None:
  """Raises if concrete eigenvalues of a kernel show it is not positive semi-definite.

  A kernel fails when its smallest eigenvalue is below −tol·λ_max (tol = `psd_tolerance`,
  plus `absolute_error` for eigenvalues recovered by a shift), or when λ_max ≤ 0 although
  some eigenvalue is negative. Skipped for tracers (under `jax.jit`).
  """
  if not is_concrete(evals):
    return
  lam = np.asarray(evals, np.float64)
  if lam.size == 0:
    return
  lo, hi = float(np.min(lam)), float(np.max(lam))
  tol = psd_tolerance(lam.size, dtype)
  bound = -(tol * max(hi, 0.) + absolute_error)
  if lo < 0 and lo < bound:
    why = (f"its largest eigenvalue {hi:.6g} is <= 0 although the kernel is nonzero"
           if hi <= 0 else f"the smallest is below the tolerance -tol·λ_max = {bound:.3g}")
    raise ValueError(
        f"{fn}: `{name}` (shape {shape}) is not positive semi-definite: its eigenvalues range "
        f"from {lo:.6g} to {hi:.6g}; {why} (tol = max(10·A·eps, √eps) = {tol:.3g} for "
        f"A = {lam.size} and {np.dtype(dtype).name}). A neural tangent kernel Θ = J Jᵀ has no "
        "negative eigenvalues beyond rounding; pass Θ(x_train, x_train).")


def check_symmetric(fn: str, name: str, matrix: jax.Array, shape: tuple) -> None:
  """Raises if a concrete flattened kernel is not symmetric up to rounding: max |K − Kᵀ| ≤
  √eps · max |K| with eps that of float32, or of the kernel's own dtype if coarser (float16,
  bfloat16)."""
  if not is_concrete(matrix):
    return
  eps = max(eps_of(matrix.dtype), eps_of(np.float32))
  m = np.asarray(matrix, np.float64)
  scale = float(np.max(np.abs(m))) if m.size else 0.0
  # Loose enough for kernels accumulated in float32 (J₁J₂ᵀ and J₂J₁ᵀ round differently, by
  # up to ~√eps₃₂ relative; √eps of a half-precision kernel), tight enough to reject a
  # test-train or otherwise wrong kernel.
  tol = math.sqrt(eps) * scale
  asym = float(np.max(np.abs(m - m.T))) if m.size else 0.0
  if asym > tol:
    raise ValueError(f"{fn}: `{name}` (shape {shape}) is not symmetric: max |K - Kᵀ| = "
                     f"{asym:.3g} exceeds {tol:.3g} (√eps × max |K| at "
                     f"{np.dtype(matrix.dtype).name if eps > eps_of(np.float32) else 'float32'})."
                     " Pass the train-train kernel Θ(x_train, x_train).")


def check_times(fn: str, name: str, t: jax.Array, *, integer: bool) -> jax.Array:
  """Validates times/step counts (non-negative, finite, integer-valued if `integer`)."""
  step_dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
  if is_concrete(t):
    # Checked in numpy, before JAX converts: without x64 it would wrap int64 counts beyond
    # 2³¹ − 1 around to negative ones (and refuse such Python ints outright).
    values = np.asarray(t)
    if values.dtype == np.bool_ or not (jnp.issubdtype(values.dtype, jnp.integer)
                                        or jnp.issubdtype(values.dtype, jnp.floating)):
      raise ValueError(f"{fn}: `{name}` must hold real numbers of steps (an integer or "
                       f"floating dtype), got dtype {values.dtype} (shape {values.shape}).")
    values = values.astype(np.float32) if values.dtype.kind == "V" else values  # bfloat16
    bad = ~np.isfinite(values) | (values < 0) if values.dtype.kind == "f" else values < 0
    if np.any(bad):
      raise ValueError(f"{fn}: `{name}` (shape {values.shape}) must be finite and >= 0; got "
                       f"{values[bad].ravel()[:3]}.")
    if integer and values.dtype.kind == "f" and not np.all(values == np.round(values)):
      raise ValueError(f"{fn}: `{name}` counts gradient steps and must be integer-valued, got "
                       f"an array of shape {values.shape} with non-integer entries (e.g. "
                       f"{values[values != np.round(values)].ravel()[:3]}).")
    limit = np.iinfo(step_dtype).max
    # Compared in float64: float32(2³¹) == float32(2³¹ − 1) would let 2³¹ steps through.
    if integer and values.size and np.max(values.astype(np.float64)) > limit:
      raise ValueError(f"{fn}: `{name}` (shape {values.shape}) counts up to "
                       f"{np.max(values):.6g} steps, beyond the largest "
                       f"{np.dtype(step_dtype).name} ({limit}); enable jax_enable_x64 for "
                       "more steps, or pass t=None for the limit.")
    t = values.astype(np.float64) if not integer and values.dtype.kind in "iub" else values
  t = jnp.asarray(t)
  if integer and not jnp.issubdtype(t.dtype, jnp.integer):
    return jnp.round(t).astype(step_dtype)
  if not integer and not jnp.issubdtype(t.dtype, jnp.floating):
    return t.astype(jnp.result_type(float))  # flows square t; integer dtypes could overflow
  return t


@dataclasses.dataclass(frozen=True)
class Layout:
  """How targets of shape `shape` with traced axes `trace_axes` map to (A, C) matrices."""
  shape: tuple[int, ...]
  trace_axes: tuple[int, ...]

  @classmethod
  def create(cls, fn: str, y_train: Any, trace_axes: Axes) -> "Layout":
    shape = tuple(np.shape(y_train))
    ndim = len(shape)
    if ndim == 0:
      raise ValueError(f"{fn}: `y_train` must have at least one axis (the examples), got shape "
                       f"{shape} (a scalar); pass targets shaped (n,) or (n, k).")
    if 0 in shape:
      raise ValueError(f"{fn}: `y_train` has shape {shape}, with no entries: there is "
                       "nothing to train on.")
    check_real_array(fn, "y_train", y_train)
    axes = (trace_axes,) if isinstance(trace_axes, numbers.Integral) else tuple(trace_axes)
    if any(not isinstance(a, numbers.Integral) or not -ndim <= a < ndim for a in axes):
      raise ValueError(f"{fn}: `trace_axes` {trace_axes!r} must be integers in [-{ndim}, "
                       f"{ndim}) for `y_train` of shape {shape}.")
    canonical = tuple(sorted(int(a) % ndim for a in axes))
    if len(set(canonical)) != len(canonical):
      raise ValueError(f"{fn}: `trace_axes` {trace_axes!r} repeats an axis of `y_train` "
                       f"(shape {shape}).")
    if len(canonical) == ndim:
      raise ValueError(f"{fn}: `trace_axes` {trace_axes!r} traces every axis of `y_train` "
                       f"(shape {shape}); at least the batch axis must remain.")
    return cls(shape, canonical)

  @property
  def kept_axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(len(self.shape)) if a not in self.trace_axes)

  @property
  def kept_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.kept_axes)

  @property
  def traced_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.trace_axes)

  @property
  def size(self) -> int:
    """Number of entries of `y_train`: the MSE normalisation N."""
    return math.prod(self.shape)

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    return tuple(d for d in self.kept_shape for _ in range(2))

  def _describe(self) -> str:
    return (f"`y_train` shape {self.shape} with `trace_axes` "
            f"{tuple(a - len(self.shape) for a in self.trace_axes)}")

  def train_kernel(self, fn: str, name: str, kernel: Any) -> jax.Array:
    """Validates `kernel` (zipped layout) and returns it as an (A, A) matrix."""
    kernel = jnp.asarray(kernel)
    if kernel.shape != self.kernel_shape:
      raise ValueError(f"{fn}: `{name}` has shape {kernel.shape}; expected "
                       f"{self.kernel_shape}: each untraced axis of {self._describe()} "
                       "appears twice, zipped (N1, N2, K1, K2, ...).")
    check_real_array(fn, name, kernel)
    check_finite(fn, name, kernel)
    matrix = zipped_to_matrix(kernel)
    check_symmetric(fn, name, matrix, kernel.shape)
    return matrix

  def test_shape(self, fn: str, name: str, kernel: Any) -> tuple[int, ...]:
    """Validates a test-train kernel (zipped layout); returns the test target shape."""
    shape = tuple(np.shape(kernel))
    train_kept = self.kept_shape
    if len(shape) != 2 * len(train_kept) or shape[1::2] != train_kept:
      expected = ", ".join(f"M{i}, {d}" for i, d in enumerate(train_kept, 1))
      raise ValueError(f"{fn}: `{name}` has shape {shape}; expected ({expected}) for test "
                       f"sizes M1, ...: the zipped test and train untraced axes for "
                       f"{self._describe()}.")
    check_real_array(fn, name, kernel)
    check_finite(fn, name, kernel)
    test_shape = list(self.shape)
    for a, d in zip(self.kept_axes, shape[0::2]):
      test_shape[a] = d
    return tuple(test_shape)

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """(shape-like) -> (A', C): untraced entries as rows, traced entries as columns."""
    nt = len(self.trace_axes)
    moved = jnp.moveaxis(x, self.trace_axes, range(x.ndim - nt, x.ndim))
    return moved.reshape(-1, math.prod(self.traced_shape))

  def from_matrix(self, m: jax.Array, shape: tuple, lead: tuple = ()) -> jax.Array:
    """Inverse of `to_matrix` for targets of `shape`, keeping leading axes `lead`."""
    kept = tuple(shape[a] for a in self.kept_axes)
    x = m.reshape(lead + kept + self.traced_shape)
    nl, nt = len(lead), len(self.trace_axes)
    return jnp.moveaxis(x, range(x.ndim - nt, x.ndim), tuple(nl + a for a in self.trace_axes))


def zipped_to_matrix(kernel: jax.Array) -> jax.Array:
  """(M1, N1, M2, N2, ...) -> (M1·M2·..., N1·N2·...)."""
  rows, cols = kernel.shape[0::2], kernel.shape[1::2]
  order = tuple(range(0, kernel.ndim, 2)) + tuple(range(1, kernel.ndim, 2))
  return kernel.transpose(order).reshape(math.prod(rows), math.prod(cols))


def check_prediction_inputs(fn: str, layout: Layout, fx_train_0: Any, fx_test_0: Any,
                            k_test_train: Any) -> Optional[tuple[int, ...]]:
  """Checks the arguments of a returned `predict` (neural-tangents semantics).

  Returns the shape of the test targets, or None when no test predictions are asked for.
  """
  if fx_train_0 is None and fx_test_0 is None:
    raise ValueError(f"{fn}: both `fx_train_0` and `fx_test_0` are None, so there is nothing "
                     "to predict.")
  if fx_test_0 is not None and k_test_train is None:
    raise ValueError(f"{fn}: `fx_test_0` was given but `k_test_train` is None; test "
                     "predictions need the test-train kernel.")
  if fx_train_0 is not None:
    if np.ndim(fx_train_0) and np.shape(fx_train_0) != layout.shape:
      raise ValueError(f"{fn}: `fx_train_0` has shape {np.shape(fx_train_0)}; expected the "
                       f"`y_train` shape {layout.shape} (or a scalar).")
    check_finite(fn, "fx_train_0", fx_train_0)
  if fx_test_0 is None:
    return None
  test_shape = layout.test_shape(fn, "k_test_train", k_test_train)
  if np.ndim(fx_test_0) and np.shape(fx_test_0) != test_shape:
    raise ValueError(f"{fn}: `fx_test_0` has shape {np.shape(fx_test_0)}; expected "
                     f"{test_shape} (from `k_test_train` shape {np.shape(k_test_train)} and "
                     f"`y_train` shape {layout.shape}), or a scalar.")
  check_finite(fn, "fx_test_0", fx_test_0)
  return test_shape


def initial_outputs(y: jax.Array, fx_train_0: Any, fx_test_0: Any,
                    test_shape: Optional[tuple[int, ...]]):
  """Broadcasts checked initial outputs to full arrays (None for train means zeros, as NT)."""
  f0 = jnp.zeros_like(y) if fx_train_0 is None else jnp.broadcast_to(
      jnp.asarray(fx_train_0, y.dtype), y.shape)
  ft0 = None if fx_test_0 is None else jnp.broadcast_to(
      jnp.asarray(fx_test_0, y.dtype), test_shape)
  return f0, ft0
