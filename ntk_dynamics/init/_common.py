"""Shared plumbing of the init tools: models as `f`, input checks, leaf names, kernels.

Conventions used throughout `ntk_dynamics.init`:

* A model is an `hk.Transformed` (turned into `f` by `from_haiku`) or a plain
  `f(params, x) -> (N, K)` array with the batch on axis 0 of `x` (any pytree) and of the output.
* "The kernel" is the logit-traced empirical NTK Θ(X, X) (N, N) — the layout the dynamics
  module reads as Θ ⊗ I — unless `trace_axes=()` asks for the full (N·K, N·K) one.
* Parameter leaves are named by their path, "dense_0/w"; a leaf's *group* (a layer) is its
  path without the last key ("dense_0"), or the leaf itself when it sits at the top level.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from ntk_dynamics.haiku import from_haiku
from ntk_dynamics.kernels import NtkImplementation, empirical_ntk_fn, ntk_vp_fn

PyTree = Any
Model = Any  # hk.Transformed or f(params, x)


def as_f(model: Model, fn: str) -> Callable[..., jax.Array]:
  """`f(params, x)` from a Haiku transform or a callable."""
  if isinstance(model, hk.TransformedWithState):
    raise TypeError(f"{fn}: got an hk.TransformedWithState; pass "
                    "`ntk_dynamics.from_haiku(model, state=state)` instead, with the state "
                    "held fixed.")
  if isinstance(model, hk.Transformed):
    return from_haiku(model)
  if callable(model):
    return model
  raise TypeError(f"{fn}: `model` must be an hk.Transformed or a function f(params, x), got "
                  f"{type(model).__name__}.")


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_paths(params: PyTree) -> list[tuple[str, ...]]:
  """The path of every leaf of `params` as a tuple of key names, in `jax.tree.leaves` order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [tuple(_key_name(k) for k in path) for path, _ in flat]


def leaf_names(params: PyTree) -> list[str]:
  return ["/".join(p) if p else "<root>" for p in leaf_paths(params)]


def leaf_groups(params: PyTree) -> list[str]:
  """The layer each leaf belongs to: its path without the last key (Haiku: the module)."""
  out = []
  for p in leaf_paths(params):
    g = p[:-1] if len(p) > 1 else p
    out.append("/".join(g) if g else "<root>")
  return out


def check_params(fn: str, params: PyTree) -> None:
  """Raises for parameters there is nothing to do with: no leaves, non-float, non-finite."""
  leaves = jax.tree.leaves(params)
  if not leaves or all(np.size(p) == 0 for p in leaves):
    raise ValueError(f"{fn}: `params` has no trainable parameters (no non-empty array leaves; "
                     f"got {jax.tree.structure(params)}). The NTK of a model without "
                     "parameters is zero and nothing can be tuned.")
  bad = []
  for name, p in zip(leaf_names(params), leaves):
    if not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
      raise ValueError(f"{fn}: parameter '{name}' has dtype {jnp.result_type(p)}; all "
                       "parameters must be floating point.")
    if isinstance(p, jax.core.Tracer):
      continue
    a = np.asarray(p)
    n_bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if n_bad:
      bad.append(f"'{name}' {a.shape}: {n_bad} non-finite")
  if bad:
    raise ValueError(f"{fn}: `params` holds non-finite values ({'; '.join(bad)}). Check the "
                     "initializer or the scales applied to it.")


def batch_size(fn: str, x: PyTree, name: str = "x") -> int:
  """Number of examples (axis 0 of every leaf); raises for an empty or ragged batch."""
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError(f"{fn}: `{name}` has no array leaves.")
  sizes = {np.shape(l)[0] if np.ndim(l) else None for l in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"{fn}: every leaf of `{name}` needs the same batch axis 0; got shapes "
                     f"{[np.shape(l) for l in leaves]}.")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"{fn}: `{name}` is an empty batch (0 examples, shapes "
                     f"{[np.shape(l) for l in leaves]}); the NTK on no data has no spectrum.")
  for l in leaves:
    if isinstance(l, jax.core.Tracer):
      continue
    a = np.asarray(l)
    if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
      raise ValueError(f"{fn}: `{name}` (shape {a.shape}) holds non-finite values.")
  return n


def output_shape(fn: str, f: Callable, params: PyTree, x: PyTree) -> tuple[int, ...]:
  """Shape of f(params, x), which must be a single float array (N, ...) with N examples."""
  n = batch_size(fn, x)
  try:
    out = jax.eval_shape(f, params, x)
  except Exception as e:
    raise ValueError(f"{fn}: f(params, x) failed: {type(e).__name__}: {e}") from e
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise ValueError(f"{fn}: f(params, x) must return one array (N, K); got a pytree "
                     f"{jax.tree.structure(out)}.")
  if out.ndim < 1 or out.shape[0] != n:
    raise ValueError(f"{fn}: f(params, x) has shape {out.shape}; expected the {n} examples "
                     "of x along axis 0.")
  return tuple(out.shape)


def resolve_trace_axes(fn: str, out_shape: tuple[int, ...], trace_axes: Sequence[int]
                       ) -> tuple[int, ...]:
  """`trace_axes` as the kernel functions should get them, for outputs of shape `out_shape`.

  Axis 0 holds the examples and cannot be traced; an axis outside the output's rank is an
  error (a modulo would silently pick another one). One-dimensional outputs (N,) have no
  logit axis, so the default `(-1,)` gives `()`: traced and full kernels are the same (N, N).
  """
  try:
    axes = tuple(int(a) for a in trace_axes)
  except TypeError as e:
    raise ValueError(f"{fn}: `trace_axes` must be a sequence of ints, got {trace_axes!r}."
                     ) from e
  rank = len(out_shape)
  if rank == 1 and axes == (-1,):
    return ()
  bad = [a for a in axes if not -rank <= a < rank or a % rank == 0]
  if bad:
    allowed = (f"only the output axes 1..{rank - 1} (or -{rank - 1}..-1) can be traced"
               if rank > 1 else "they have no axis but the batch axis: use (-1,) or ()")
    raise ValueError(f"{fn}: `trace_axes`={axes} for outputs of shape {tuple(out_shape)}: "
                     f"{bad} is the batch axis 0 or out of range; {allowed}.")
  return tuple(sorted({a % rank for a in axes}))


def check_bounds(fn: str, bounds: Any) -> tuple[float, float]:
  """`bounds` = (lo, hi) on multiplicative scales, with 0 < lo ≤ 1 ≤ hi < inf (so the
  unscaled model is inside the box); returns them as floats."""
  try:
    lo, hi = (float(b) for b in bounds)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{fn}: `bounds` must be a pair (lo, hi) of numbers, got {bounds!r}."
                     ) from e
  if not (0 < lo <= 1 <= hi and math.isfinite(hi)):
    raise ValueError(f"{fn}: `bounds` must satisfy 0 < lo ≤ 1 ≤ hi < inf, got {bounds}.")
  return lo, hi


def check_real(fn: str, name: str, value: Any, *, positive: bool = True, hint: str = ""
               ) -> float:
  """`value` as a float if it is a finite real scalar (Python, numpy or 0-d array) > 0 (≥ 0
  unless `positive`); raises ValueError naming the argument (and `hint`) otherwise."""
  try:
    ok = (not isinstance(value, (bool, np.bool_, str)) and np.ndim(value) == 0
          and not isinstance(value, jax.core.Tracer)
          and jnp.issubdtype(jnp.result_type(value), jnp.number)
          and not jnp.issubdtype(jnp.result_type(value), jnp.complexfloating))
  except TypeError:  # objects JAX has no dtype for
    ok = False
  v = float(value) if ok else math.nan
  if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
    raise ValueError(f"{fn}: `{name}` must be a finite number {'>' if positive else '>='} 0"
                     f"{hint}, got {value!r}.")
  return v


def eigh(matrix: np.ndarray, eigenvectors: bool = True):
  """numpy `eigh`/`eigvalsh`, single-threaded BLAS for small matrices: with a multi-threaded
  OpenBLAS next to XLA's threads a 128×128 eigh measured 80 ms of CPU, single-threaded 2 ms."""
  fn = np.linalg.eigh if eigenvectors else np.linalg.eigvalsh
  if matrix.shape[0] > 1024:
    return fn(matrix)
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:  # scikit-learn brings it; without it, plain numpy
    return fn(matrix)
  with threadpool_limits(limits=1, user_api="blas"):
    return fn(matrix)


def kernel_matrix(kernel: Any, fn: str = "kernel") -> np.ndarray:
  """A zipped kernel ((N, N) or (N, N, K, K)) as a symmetric float64 (A, A) matrix."""
  k = np.asarray(kernel, np.float64)
  if k.ndim == 0 or k.ndim % 2 or k.shape[0::2] != k.shape[1::2]:
    raise ValueError(f"{fn}: kernel of shape {k.shape} is not a square zipped kernel "
                     "((N, N) or (N, N, K, K)).")
  order = tuple(range(0, k.ndim, 2)) + tuple(range(1, k.ndim, 2))
  dim = math.prod(k.shape[0::2])
  m = k.transpose(order).reshape(dim, dim)
  if not np.all(np.isfinite(m)):
    raise ValueError(f"{fn}: the kernel holds {int(np.size(m) - np.isfinite(m).sum())} "
                     "non-finite entries (diverged parameters or inputs?).")
  return (m + m.T) / 2


@functools.lru_cache(maxsize=128)
def _ntk_fn(f, trace_axes, diagonal, vmap_axes, implementation, per_parameter):
  return empirical_ntk_fn(f, trace_axes=trace_axes, diagonal_axes=(0,) if diagonal else (),
                          vmap_axes=vmap_axes, implementation=implementation,
                          per_parameter=per_parameter)


def ntk_kernel(f: Callable, params: PyTree, x: PyTree, *, trace_axes: Sequence[int] = (-1,),
               implementation=NtkImplementation.AUTO, vmap_axes: Any = 0,
               per_parameter: bool = False, diagonal: bool = False) -> Any:
  """The library kernel. `empirical_ntk_fn` jits per instance, so instances are cached per
  (f, options): repeated calls (a search loop) compile once per shape."""
  try:
    fn = _ntk_fn(f, tuple(trace_axes), diagonal, vmap_axes, implementation, per_parameter)
  except TypeError:  # unhashable f or vmap_axes: no caching
    fn = _ntk_fn.__wrapped__(f, tuple(trace_axes), diagonal, vmap_axes, implementation,
                             per_parameter)
  return fn(x, None, params)


def kernel_matvec(f: Callable, params: PyTree, x: PyTree, out_shape: tuple[int, ...],
                  trace_axes: Sequence[int] = (-1,), fn: str = "kernel_matvec"
                  ) -> tuple[Callable, tuple[int, ...]]:
  """Matrix-free `v -> Θ v` on the flattened kernel, from `ntk_vp_fn` (Θ never formed).

  Traced logits (trace_axes=(-1,)): Θ_tr = (1/K) Σ_k Θ[:, k, :, k], one NTK-vector product per
  logit k on the cotangent v ⊗ e_k (vmapped). Full kernel (trace_axes=()): Θ v directly.
  Returns `(matvec, vector_shape)`; matvec maps a flat vector of size prod(vector_shape).
  """
  vp = ntk_vp_fn(f, x, None, params)
  dtype = jnp.result_type(*jax.tree.leaves(params))
  traced = tuple(a % len(out_shape) for a in trace_axes)
  if traced == ():
    shape = out_shape

    def matvec(v):
      return jnp.ravel(vp(v.reshape(shape).astype(dtype)))
  elif traced == (len(out_shape) - 1,) and len(out_shape) == 2:
    n, k = out_shape
    shape = (n,)
    eye = jnp.eye(k, dtype=dtype)

    def matvec(v):
      cots = v.astype(dtype)[None, :, None] * eye[:, None, :]  # (K, N, K): v ⊗ e_k
      cols = jax.vmap(vp)(cots)                                 # (K, N, K)
      return jnp.mean(jnp.diagonal(cols, axis1=0, axis2=2), axis=-1)
  else:
    raise ValueError(f"{fn}: matrix-free kernels support trace_axes=(-1,) or () for (N, K) "
                     f"outputs; got trace_axes={tuple(trace_axes)} for outputs {out_shape} "
                     "(use method='eigh' or trace_axes=()).")
  return jax.jit(matvec), shape


def warn(message: str) -> None:
  warnings.warn(message, RuntimeWarning, stacklevel=3)


def jsonable(x: Any) -> Any:
  """Floats/lists/dicts for reports (numpy and JAX scalars and arrays converted)."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    a = np.asarray(x)
    return a.item() if a.ndim == 0 else a.tolist()
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  return x
