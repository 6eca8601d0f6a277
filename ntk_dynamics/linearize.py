"""Linearization and Taylor expansion of `f(params, *args, **kwargs)` in its parameters.

Both return functions with the signature of `f` itself, so they drop into any code that trains
or evaluates `f` (optax loops, the empirical NTK, the closed-form dynamics).

Conventions shared by `linearize` and `taylor_expand`:

* Only floating-point (and complex) parameter leaves are expanded in. Integer and boolean
  leaves (step counters, index tables, masks) are not differentiable: they are constants of
  the expansion, fixed at θ₀'s values. A concrete `p` whose integer leaf differs from θ₀'s
  raises a `ValueError` naming the leaf; under `jax.jit` (traced `p`) values cannot be
  compared and θ₀'s value is used.
* Integer and boolean *output* leaves have zero derivative; they are returned as f(θ₀)'s
  (neural-tangents' degree-0 behaviour).
* `p − θ₀` is computed in the wider of the two dtypes, so a float32 `p` around a bfloat16 θ₀
  (or float64 around float32) keeps steps smaller than θ₀'s rounding. See `linearize`.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
ApplyFn = Callable[..., PyTree]


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _is_extended(dtype: Any) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


def _leaf_values(x: jax.Array) -> np.ndarray:
  """Concrete values of a leaf for an equality test (PRNG key arrays by their key data)."""
  if _is_extended(x.dtype):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _as_leaf(fn: str, name: str, path: Any, leaf: Any) -> jax.Array:
  """`leaf` as a JAX array with a numeric (or PRNG key) dtype; a TypeError naming the leaf
  otherwise (strings, arbitrary objects, object arrays)."""
  where = f"`{name}` leaf {jax.tree_util.keystr(path) or '(the root)'}"
  try:
    arr = jnp.asarray(leaf)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{fn}: {where} has type {type(leaf).__name__} ({leaf!r:.80}); "
                    f"parameters must be numeric arrays or numbers ({e}).") from None
  if not (_is_extended(arr.dtype) or arr.dtype == np.bool_ or
          jnp.issubdtype(arr.dtype, jnp.number)):
    raise TypeError(f"{fn}: {where} has dtype {arr.dtype}; parameters must be numeric arrays.")
  return arr


class _Point(NamedTuple):
  """The expansion point θ₀, flattened: `diff[i]` says whether leaf i is expanded in (inexact
  dtype) or is a constant of the expansion (integer, bool, PRNG key)."""
  treedef: Any
  paths: list
  leaves: list
  diff: list

  @property
  def float_idx(self) -> list[int]:
    return [i for i, d in enumerate(self.diff) if d]

  def unflatten(self, float_leaves: Sequence[jax.Array]) -> PyTree:
    """θ₀ with its expanded leaves replaced by `float_leaves` (constants stay θ₀'s)."""
    leaves = list(self.leaves)
    for i, v in zip(self.float_idx, float_leaves):
      leaves[i] = v
    return self.treedef.unflatten(leaves)


def _point(fn: str, params: PyTree) -> _Point:
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path for path, _ in with_path]
  leaves = [_as_leaf(fn, "params", path, leaf) for path, leaf in with_path]
  diff = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]
  return _Point(treedef, paths, leaves, diff)


def _structure_difference(with_path: list, treedef: Any, point: _Point) -> str:
  """The leaf paths `p` lacks or adds, first: a large model's two full structures are
  thousands of characters that differ in one key."""
  def shown(paths):
    names = [jax.tree_util.keystr(k) or "(the root)" for k in paths[:3]]
    return ", ".join(names) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

  given = [path for path, _ in with_path]
  given_set, expected_set = set(given), set(point.paths)
  missing = [k for k in point.paths if k not in given_set]
  extra = [k for k in given if k not in expected_set]
  parts = ([f"it lacks {shown(missing)}"] if missing else []) + (
      [f"it has {shown(extra)}, which `params` lacks"] if extra else [])
  if not parts:
    parts = ["it has the same leaf paths in other containers (e.g. a list for a tuple)"]
  text = f"{'; '.join(parts)} (got {treedef}, expected {point.treedef})"
  return text if len(text) < 1000 else text[:1000] + "..."


def _delta(fn: str, p: PyTree, point: _Point) -> tuple[list, Optional[list]]:
  """Checks `p` against θ₀ and returns the step p − θ₀ on the expanded leaves as tangents in
  θ₀'s dtypes: (`hi`, `lo`), where `lo` is None when every step is exactly representable
  that way (p's dtype is no wider than θ₀'s) and otherwise the rounding error of `hi`, so
  that hi + lo carries about twice θ₀'s mantissa bits of the wide-dtype step."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(p)
  if treedef != point.treedef:
    raise ValueError(f"{fn}: `p` does not have the pytree structure of `params`, the "
                     f"expansion point: {_structure_difference(with_path, treedef, point)}.")
  hi, lo, split = [], [], False
  for (path, leaf), p0, diff in zip(with_path, point.leaves, point.diff):
    where = f"`p` leaf {jax.tree_util.keystr(path) or '(the root)'}"
    x = _as_leaf(fn, "p", path, leaf)
    if x.shape != p0.shape:
      raise ValueError(f"{fn}: {where} has shape {x.shape}, expected {p0.shape} (its shape "
                       "in `params`, the expansion point).")
    if not diff:
      # A constant of the expansion: p must hold θ₀'s value (checked when both are concrete).
      if _is_extended(x.dtype) != _is_extended(p0.dtype):
        raise TypeError(f"{fn}: {where} has dtype {x.dtype}, but `params` holds {p0.dtype} "
                        "there.")
      if not (_is_tracer(x) or _is_tracer(p0)) and not np.array_equal(_leaf_values(x),
                                                                      _leaf_values(p0)):
        raise ValueError(
            f"{fn}: {where} (dtype {x.dtype}) differs from its value in `params` (the "
            "expansion point). Integer and boolean parameters are not differentiable, so the "
            "expansion holds them at θ₀'s values; pass them unchanged (or expand around the "
            "new values).")
      continue
    if _is_extended(x.dtype) or x.dtype == np.bool_:
      raise TypeError(f"{fn}: {where} has dtype {x.dtype}, but `params` holds {p0.dtype} "
                      "there.")
    if jnp.issubdtype(x.dtype, jnp.complexfloating) and not jnp.issubdtype(
        p0.dtype, jnp.complexfloating):
      raise TypeError(f"{fn}: {where} is complex ({x.dtype}) but `params` holds the real "
                      f"dtype {p0.dtype} there; a real function's expansion has no "
                      "imaginary direction.")
    wide = jnp.promote_types(x.dtype, p0.dtype)
    step = x.astype(wide) - p0.astype(wide)
    h = step.astype(p0.dtype)
    hi.append(h)
    if wide != p0.dtype:
      split = True
      lo.append((step - h.astype(wide)).astype(p0.dtype))
    else:
      lo.append(jnp.zeros_like(h))
  return hi, (lo if split else None)


def _is_inexact(y: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(y), jnp.inexact)


def _add_to_outputs(f0: PyTree, increments: Sequence[list]) -> PyTree:
  """f0 + Σ increments on inexact output leaves; other leaves (int, bool) stay f0's. Each
  increment is a list aligned with f0's leaves (ignored at non-inexact leaves)."""
  leaves, treedef = jax.tree.flatten(f0)
  out = []
  for i, y in enumerate(leaves):
    if _is_inexact(y):
      d = increments[0][i]
      for inc in increments[1:]:
        d = d + inc[i]
      y = y + d
    out.append(y)
  return treedef.unflatten(out)


def linearize(f: ApplyFn, params: PyTree) -> ApplyFn:
  """First-order Taylor expansion of `f` around `params`.

  Args:
    f: `f(params, *args, **kwargs) -> outputs` (any pytrees), differentiable in `params`.
    params: the expansion point θ₀ (a pytree like `f`'s first argument). Leaves are
      converted with `jnp.asarray` once; they must be numeric (a TypeError naming the leaf
      otherwise). Integer and boolean leaves are constants of the expansion (see below).

  Returns:
    `f_lin(p, *args, **kwargs) = f(θ₀, *args) + J(θ₀, *args)·(p − θ₀)`, computed with one
    forward-mode JVP (cost about two to three forward passes, no Jacobian formed). Outputs
    have the structure and dtypes of `f(θ₀, ...)`. Jittable and differentiable in `p` (its NTK
    equals `f`'s NTK at θ₀). Accepts any positional arguments after `p`, like
    neural-tangents' `linearize`.

  Details:
    * `p` must have θ₀'s pytree structure and leaf shapes (a ValueError naming the leaf
      path otherwise). A complex `p` leaf where θ₀ is real is a TypeError.
    * Integer/boolean parameter leaves are not differentiable: they are held at θ₀'s values.
      A concrete `p` whose integer leaf differs from θ₀'s raises a ValueError naming the
      leaf; under `jax.jit` (traced `p`) no comparison is possible and θ₀'s value is used.
    * Integer/boolean output leaves have zero derivative and are returned as f(θ₀)'s.
    * Mixed precision: p − θ₀ is computed in the wider of the two dtypes (e.g. float32 `p`
      around a bfloat16 θ₀). JAX needs the tangent in θ₀'s dtype, so when `p` is wider the
      step is split into its θ₀-dtype rounding `hi` and the remainder `lo`, and the result
      is f(θ₀) + J·hi + J·lo, both JVPs evaluated by `f`'s own arithmetic at θ₀ (J is linear,
      so this is exactly J·(p − θ₀) up to rounding; it costs one more tangent pass, only in
      this case). Casting the step to θ₀'s dtype alone would lose the step's low bits: with a
      bfloat16 θ₀, float32 `p` and float32 compute, the relative error of J·(p − θ₀) was
      2e-3 that way against 3e-6 to 1e-5 with the split (float64 reference).

  Avoiding embedded constants under jit:
    `jax.jit(linearize(f, params))` closes over θ₀, so XLA embeds it as constants in the
    program (for large models: the parameters' size again in host memory and a slow
    compile). Pass θ₀ as an argument instead:

      f_lin = jax.jit(lambda params, p, x: linearize(f, params)(p, x))
      f_lin(params, p, x)
  """
  if not callable(f):
    raise TypeError(f"linearize: `f` must be callable, got {type(f).__name__}.")
  point = _point("linearize", params)

  def f_lin(p: PyTree, *args, **kwargs) -> PyTree:
    hi, lo = _delta("linearize", p, point)
    float_idx = point.float_idx
    f0_float = [point.leaves[i] for i in float_idx]

    def g(float_leaves):
      return f(point.unflatten(float_leaves), *args, **kwargs)

    if not float_idx:
      return g([])
    if lo is None:
      f0, df = jax.jvp(g, (f0_float,), (hi,))
      return _add_to_outputs(f0, [jax.tree.leaves(df)])
    f0, g_jvp = jax.linearize(g, f0_float)
    return _add_to_outputs(f0, [jax.tree.leaves(g_jvp(hi)), jax.tree.leaves(g_jvp(lo))])

  return f_lin


def _check_degree(degree: Any) -> int:
  """`degree` as a Python int: a Python int, numpy integer or concrete 0-d integer array
  (TypeError for other types, ValueError for negative values)."""
  dtype = getattr(degree, "dtype", None)
  is_bool = isinstance(degree, (bool, np.bool_)) or (dtype is not None and
                                                     np.dtype(dtype) == np.bool_)
  integral = not is_bool and (
      isinstance(degree, numbers.Integral) or
      (dtype is not None and np.ndim(degree) == 0 and jnp.issubdtype(dtype, jnp.integer)))
  if not integral or _is_tracer(degree):
    shown = ("a traced value" if _is_tracer(degree) else
             f"{degree!r} ({type(degree).__name__})" if np.ndim(degree) == 0 else
             f"an array of shape {np.shape(degree)}")
    raise TypeError(f"taylor_expand: `degree` must be a non-negative integer (a Python int, "
                    f"numpy integer or concrete 0-d integer array), got {shown}.")
  d = operator.index(degree) if not hasattr(degree, "shape") else int(np.asarray(degree))
  if d < 0:
    raise ValueError(f"taylor_expand: `degree` must be a non-negative integer, got {d}.")
  return d


def taylor_expand(f: ApplyFn, params: PyTree, degree: int) -> ApplyFn:
  """Degree-`degree` Taylor polynomial of `f` in its parameters around `params`.

  `f_d(p, *args) = Σ_{k=0..d} (1/k!) Dᵏf(θ₀, *args)[p − θ₀, …, p − θ₀]` (the Taylor
  polynomial of t ↦ f(θ₀ + t(p − θ₀)) at t = 0, evaluated at t = 1), computed by nesting d
  forward-mode JVPs along p − θ₀ at θ₀: one nest of depth d yields every term. Degree 0 is
  `f(θ₀, ...)`, degree 1 equals `linearize`.

  Supported functions: anything JAX can differentiate in forward mode, repeatedly. Functions
  with a `jax.custom_vjp` rule (e.g. gradient clipping, some fused attention kernels) or a
  `jax.pure_callback` / host callback without a JVP rule cannot be forward-differentiated
  and raise JAX's error (a TypeError for custom_vjp, a ValueError for pure_callback);
  `jax.custom_jvp` functions work when their JVP rule is itself differentiable to the needed
  order. The same holds for `linearize` (degree 1).

  Cost: the traced program grows quickly with the degree (a JVP of a JVP of ...: 8, 19, 44,
  101, 230 matmuls traced for d = 1..5 on a 3-matmul MLP; run eagerly, all of it executes).
  Under `jax.jit` XLA removes most of the repeated work: the compiled FLOPs measured 1.0,
  2.5, 3.6, 4.6, 5.7 and 6.8 forward passes for d = 0..5 on that MLP. Degrees up to about 4
  are practical.

  Args:
    f: `f(params, *args, **kwargs)`.
    params: expansion point θ₀ (leaves converted with `jnp.asarray` once; see `linearize`
      for integer/boolean leaves, output dtypes, mixed precision and errors, which follow
      the same rules here).
    degree: a non-negative integer d (Python int, numpy integer or 0-d integer array;
      TypeError for other types, ValueError for negative values).

  Returns:
    `f_d(p, *args, **kwargs)` with outputs shaped like `f(θ₀, ...)`. For jit, pass θ₀ as
    an argument (`jax.jit(lambda params, p, x: taylor_expand(f, params, d)(p, x))`) to keep
    it out of the compiled program's constants.

  Mixed precision: when `p` is wider than θ₀ the step is split as in `linearize` into
  hi + lo (both in θ₀'s dtype) and f_d(hi + lo) is evaluated as f_d(hi) + Df_d(hi)[lo]
  (one more JVP); the neglected term is of order |lo|², below θ₀'s precision squared.
  """
  if not callable(f):
    raise TypeError(f"taylor_expand: `f` must be callable, got {type(f).__name__}.")
  degree = _check_degree(degree)
  point = _point("taylor_expand", params)
  float_idx = point.float_idx

  def f_taylor(p: PyTree, *args, **kwargs) -> PyTree:
    hi, lo = _delta("taylor_expand", p, point)
    if degree == 0 or not float_idx:
      return f(point.treedef.unflatten(point.leaves), *args, **kwargs)
    f0_float = [point.leaves[i] for i in float_idx]
    out = {}  # output structure, recorded while tracing

    def level0(q):
      """(non-inexact output leaves, (inexact output leaves,)) of f at the float leaves q."""
      ys, out["treedef"] = jax.tree.flatten(f(point.unflatten(q), *args, **kwargs))
      out["keep"] = [_is_inexact(y) for y in ys]
      return ([y for y in ys if not _is_inexact(y)],
              ([y for y in ys if _is_inexact(y)],))

    def expand(delta):
      """(integer leaves of f(θ₀), f(θ₀)'s inexact leaves, Σ_{k=1..d} Dᵏf(θ₀)[delta^k]/k!)."""
      # deeper^k(level0)(q) holds (f(q), Df(q)[δ], ..., Dᵏf(q)[δ, ..., δ]): the primal of a
      # JVP along δ holds the lower derivatives and its tangent the next one. One nest of
      # depth d thus gives every term, with the primal evaluated at θ₀ itself.
      def deeper(prev):
        def nest(q):
          (ints, derivs), (_, tangents) = jax.jvp(prev, (q,), (delta,))
          return ints, derivs + (tangents[-1],)
        return nest

      nest = level0
      for _ in range(degree):
        nest = deeper(nest)
      ints, derivs = nest(f0_float)
      total = list(derivs[1])
      for k in range(2, degree + 1):
        total = [s + y / math.factorial(k) for s, y in zip(total, derivs[k])]
      return ints, derivs[0], total

    if lo is None:
      ints, f0_inexact, inc = expand(hi)
      incs = [inc]
    else:
      (ints, f0_inexact, inc_hi), (_, _, inc_lo) = jax.jvp(expand, (hi,), (lo,))
      incs = [inc_hi, inc_lo]
    ints_it, float_it = iter(ints), iter(f0_inexact)
    f0 = out["treedef"].unflatten([next(float_it) if k else next(ints_it)
                                   for k in out["keep"]])
    full = []
    for inc in incs:
      it = iter(inc)
      full.append([next(it) if k else None for k in out["keep"]])
    return _add_to_outputs(f0, full)

  return f_taylor
