"""Public empirical-kernel API, argument-compatible with neural-tangents' empirical kernels."""
from __future__ import annotations

import collections
import enum
import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dynamics._checks import describe
from ntk_dynamics.kernels import axes as axes_lib
from ntk_dynamics.kernels import batching
from ntk_dynamics.kernels import independence
from ntk_dynamics.kernels import jacobian_contraction
from ntk_dynamics.kernels import ntk_vector_products
from ntk_dynamics.kernels import structured

PyTree = Any
Axes = Union[int, Sequence[int]]


class NtkImplementation(enum.IntEnum):
  """How Θ(x1, x2) = J(x1) J(x2)ᵀ is evaluated (the three methods of Novak et al., 2022).

  AUTO: pick the cheapest method for the given model and shapes.
  JACOBIAN_CONTRACTION: build each parameter leaf's Jacobian and contract it.
  NTK_VECTOR_PRODUCTS: one VJP and one JVP per column of Θ; never forms a Jacobian.
  STRUCTURED_DERIVATIVES: contract the structure of each primitive's derivative (dense:
    input Gram times cotangent Gram) instead of materialising it.
  """
  AUTO = 0
  JACOBIAN_CONTRACTION = 1
  NTK_VECTOR_PRODUCTS = 2
  STRUCTURED_DERIVATIVES = 3


EmpiricalKernel = collections.namedtuple("EmpiricalKernel", ["nngp", "ntk"])


def _check_inputs(x1: PyTree, x2: Optional[PyTree],
                  vmap_axes: Optional[batching.VmapAxes]) -> None:
  for name, x in (("x1", x1), ("x2", x2)):
    axes = (None if x is None else [0] * len(jax.tree.leaves(x)) if vmap_axes is None
            else vmap_axes.leaf_in_axes(x))
    for leaf, ax in zip(jax.tree.leaves(x) if x is not None else [], axes or []):
      shape = np.shape(leaf)
      if ax is not None and len(shape) > ax and shape[ax] == 0:
        raise ValueError(f"`{name}` has no examples: a leaf of shape {shape} is empty along "
                         f"the batch axis {ax}.")
  if vmap_axes is not None:
    vmap_axes.batch_size(x1)
  if x2 is None:
    return
  s1, s2 = jax.tree.structure(x1), jax.tree.structure(x2)
  if s1 != s2:
    raise ValueError(f"`x1` has pytree structure {s1} but `x2` has {s2}; they must match.")
  batch_axes = ([0] * len(jax.tree.leaves(x1)) if vmap_axes is None
                else vmap_axes.leaf_in_axes(x1))
  if vmap_axes is not None:
    vmap_axes.batch_size(x2)
  for a, b, ax in zip(jax.tree.leaves(x1), jax.tree.leaves(x2), batch_axes):
    sa, sb = list(np.shape(a)), list(np.shape(b))
    if ax is not None and len(sa) == len(sb) and len(sa) > 0:
      del sa[ax], sb[ax]
    if sa != sb:
      raise ValueError(f"`x1` and `x2` have different feature shapes: x1 {np.shape(a)} vs "
                       f"x2 {np.shape(b)} (they may differ only along the batch axis "
                       f"{ax if ax is not None else 0}).")


def _output_shapes(f: Callable, params: PyTree, x: PyTree, kwargs: dict, name: str) -> PyTree:
  try:
    fx = jax.eval_shape(functools.partial(f, **kwargs), params, x)
  except Exception as e:  # re-raised with what the user passed, keeping the cause
    raise ValueError(f"f(params, {name}) failed: {type(e).__name__}: {e}\n  params: "
                     f"{describe(params)}\n  {name}: {describe(x)}.\nCheck that `params` "
                     "is the pytree `f` expects.") from e
  for o in jax.tree.leaves(fx):
    if not jnp.issubdtype(o.dtype, jnp.inexact):
      raise ValueError(f"f(params, {name}) has an output leaf of dtype {o.dtype}; kernels "
                       "need floating-point outputs.")
  return fx


def _check_params(params: PyTree) -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("`params` has no array leaves: there is nothing to differentiate.")
  if not any(_differentiable(p) for p in leaves):
    raise ValueError(f"`params` has no floating-point leaf (dtypes "
                     f"{sorted({str(jnp.result_type(p)) for p in leaves})}): there is nothing "
                     "to differentiate.")


def _differentiable(leaf) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _split_constants(f: Callable, params: PyTree) -> tuple[Callable, list, Callable]:
  """Integer and boolean parameter leaves (counters, index tables) have no derivative: they
  are held fixed and contribute nothing to Θ, as in `linearize`. Returns (f of the
  floating-point leaves alone (a list), those leaves, and a function that puts per-leaf
  results back into `params`' structure with `fill` where the constants were)."""
  leaves, treedef = jax.tree.flatten(params)
  keep = [_differentiable(p) for p in leaves]
  floats = [p for p, k in zip(leaves, keep) if k]

  def f_floats(float_leaves, x, /, **kwargs):
    it = iter(float_leaves)
    return f(treedef.unflatten([next(it) if k else p for p, k in zip(leaves, keep)]), x,
             **kwargs)

  def restore(per_float: list, fill) -> PyTree:
    it = iter(per_float)
    return treedef.unflatten([next(it) if k else fill for k in keep])

  return f_floats, floats, restore


def _check_output_pair(fx1: PyTree, fx2: PyTree, output_axes: axes_lib.OutputAxes,
                       vmap_axes: Optional[batching.VmapAxes], x1: PyTree,
                       x2: PyTree) -> None:
  if jax.tree.structure(fx1) != jax.tree.structure(fx2):
    raise ValueError("f(params, x1) and f(params, x2) have different output structures.")
  outs2 = jax.tree.leaves(fx2)
  for o1, o2 in zip(jax.tree.leaves(fx1), outs2):
    if o1.ndim != o2.ndim:
      raise ValueError(f"f(params, x1) has an output of shape {o1.shape} but f(params, x2) "
                       f"{o2.shape}.")
    trace, diagonal = output_axes.for_rank(o1.ndim)
    for a in sorted(trace | diagonal):
      if o1.shape[a] != o2.shape[a]:
        name = "trace_axes" if a in trace else "diagonal_axes"
        given = output_axes.trace_axes if a in trace else output_axes.diagonal_axes
        raise ValueError(
            f"`{name}`={given} makes output axis {a} {name.split('_')[0]} (matching x1 and "
            f"x2 entries), but f(params, x1) has shape {o1.shape} and f(params, x2) "
            f"{o2.shape}: that axis has size {o1.shape[a]} vs {o2.shape[a]}; it needs the "
            "same size on both sides (for the batch axis: as many examples in x1 as in x2).")
  if vmap_axes is not None:
    for name, x, fx in (("x1", x1, fx1), ("x2", x2, fx2)):
      _check_out_batch(vmap_axes, x, fx, name)


def _check_out_batch(vmap_axes: batching.VmapAxes, x: PyTree, fx: PyTree, name: str) -> None:
  """Every batched output leaf must have one entry per example along its `out_axes`: the
  per-example path rebuilds outputs from single examples, so a wrong `out_axes` (or a model
  that is not per-example, e.g. outputs (K, N)) would otherwise give a wrong kernel or an
  obscure shape error deep inside the implementation."""
  n = vmap_axes.batch_size(x)
  for o, a in zip(jax.tree.leaves(fx), vmap_axes.leaf_out_axes(fx)):
    if a is not None and o.shape[a] != n:
      raise ValueError(
          f"`vmap_axes` out_axes={vmap_axes.out_axes} puts the batch axis of an output leaf of "
          f"f(params, {name}), shape {o.shape}, at axis {a}, which has {o.shape[a]} entries; "
          f"expected {n}, the batch size of {name} along in_axes={vmap_axes.in_axes}.")


def _resolve(implementation, f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2):
  implementation = NtkImplementation(implementation)
  if implementation == NtkImplementation.AUTO:
    from ntk_dynamics.kernels import choice
    implementation = choice.choose(f, params, x1, x2, kwargs, output_axes, vmap_axes,
                                   fx1, fx2)
  return implementation


def _for_unbatched_outputs(implementation) -> NtkImplementation:
  """Output leaves declared unbatched (`out_axes` None) are supported by structured
  derivatives only; AUTO picks it."""
  implementation = NtkImplementation(implementation)
  if implementation == NtkImplementation.AUTO:
    return NtkImplementation.STRUCTURED_DERIVATIVES
  if implementation != NtkImplementation.STRUCTURED_DERIVATIVES:
    raise ValueError(
        f"`vmap_axes` declares some output leaves unbatched (out_axes None), which only "
        f"STRUCTURED_DERIVATIVES (or AUTO, which then picks it) supports; with "
        f"{implementation.name} pass vmap_axes=None instead (any output, whole batch).")
  return implementation


def _provably_per_example(f, params, x1, x2, kwargs) -> bool:
  """Whether the per-example path is safe although the user passed `vmap_axes=None`."""
  return all(independence.is_per_example(f, params, x, kwargs)
             for x in ((x1,) if x2 is None else (x1, x2)))


def _ntk(f, params, x1, x2, kwargs, output_axes, vmap_axes, implementation,
         per_parameter: bool) -> PyTree:
  """Validated NTK; per-parameter results have `params`' structure with kernel leaves."""
  _check_params(params)
  if not all(_differentiable(p) for p in jax.tree.leaves(params)):
    f_floats, floats, restore = _split_constants(f, params)
    result = _ntk(f_floats, floats, x1, x2, kwargs, output_axes, vmap_axes, implementation,
                  per_parameter)
    return restore(result, jax.tree.map(jnp.zeros_like, result[0])) if per_parameter \
        else result
  _check_inputs(x1, x2, vmap_axes)
  fx1 = _output_shapes(f, params, x1, kwargs, "x1")
  fx2 = fx1 if x2 is None else _output_shapes(f, params, x2, kwargs, "x2")
  _check_output_pair(fx1, fx2, output_axes, vmap_axes, x1, x1 if x2 is None else x2)
  if vmap_axes is None and _provably_per_example(f, params, x1, x2, kwargs):
    vmap_axes = batching.VmapAxes(0, 0, {})
  if vmap_axes is not None and None in vmap_axes.leaf_out_axes(fx1):
    implementation = _for_unbatched_outputs(implementation)
  f, kwargs, vmap_axes = _private_kwargs(f, kwargs, vmap_axes)
  implementation = _resolve(implementation, f, params, x1, x2, kwargs, output_axes,
                            vmap_axes, fx1, fx2)
  if implementation in (NtkImplementation.JACOBIAN_CONTRACTION,
                        NtkImplementation.STRUCTURED_DERIVATIVES):
    method = (structured.ntk if implementation == NtkImplementation.STRUCTURED_DERIVATIVES
              else jacobian_contraction.ntk)
    parts = method(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2)
    if per_parameter:
      return jax.tree.structure(params).unflatten(parts)
    return jax.tree.map(lambda *ks: functools.reduce(jnp.add, ks), *parts)
  if implementation == NtkImplementation.NTK_VECTOR_PRODUCTS:
    if not per_parameter:
      return ntk_vector_products.ntk(f, params, x1, x2, kwargs, output_axes, vmap_axes,
                                     fx1, fx2)
    leaves, treedef = jax.tree.flatten(params)
    parts = [ntk_vector_products.ntk(_of_leaf(f, leaves, treedef, i), leaves[i], x1, x2,
                                     kwargs, output_axes, vmap_axes, fx1, fx2)
             for i in range(len(leaves))]
    return treedef.unflatten(parts)
  raise ValueError(f"Unknown implementation {implementation!r}.")


def _of_leaf(f: Callable, leaves: list, treedef, i: int) -> Callable:
  """`f` as a function of parameter leaf `i` alone, the others held at `leaves`."""
  def f_leaf(leaf, x, /, **kwargs):
    return f(treedef.unflatten(leaves[:i] + [leaf] + leaves[i + 1:]), x, **kwargs)
  return f_leaf


_KWARG_PREFIX = "_ntk_kwarg_"


def _private_kwargs(f: Callable, kwargs: dict, vmap_axes: Optional[batching.VmapAxes]):
  """Renames the kwargs meant for `f` so that none can collide with a parameter name of the
  internal functions that forward `**kwargs` to it (a dropout rate `p`, an input `x`, an
  index `i`...). Returns (f taking the renamed kwargs, renamed kwargs, vmap_axes with its
  kwargs_axes renamed)."""
  if not kwargs:
    return f, kwargs, vmap_axes
  cut = len(_KWARG_PREFIX)

  def f_renamed(params, x, /, **kw):
    return f(params, x, **{k[cut:]: v for k, v in kw.items()})

  if vmap_axes is not None:
    vmap_axes = batching.VmapAxes(
        vmap_axes.in_axes, vmap_axes.out_axes,
        {_KWARG_PREFIX + k: a for k, a in vmap_axes.kwargs_axes.items()})
  return f_renamed, {_KWARG_PREFIX + k: v for k, v in kwargs.items()}, vmap_axes


def _rng_per_side(key: jax.Array, x1: PyTree, x2: PyTree) -> tuple[jax.Array, jax.Array]:
  """neural-tangents' `rng` convention: the x2 side gets `fold_in(key, 1)` unless x2 equals x1
  (same structure, shapes and values), so stochastic layers (dropout) draw independent noise
  for different inputs and the same noise for the same inputs."""
  leaves1, tree1 = jax.tree.flatten(x1)
  leaves2, tree2 = jax.tree.flatten(x2)
  other = jax.random.fold_in(key, 1)
  if tree1 != tree2 or [np.shape(a) for a in leaves1] != [np.shape(b) for b in leaves2]:
    return key, other
  same = jnp.all(jnp.asarray([jnp.all(a == b) for a, b in zip(leaves1, leaves2)]))
  return key, jax.lax.select(same, key, other)


def _per_side(f: Callable, x1: PyTree, x2: Optional[PyTree], kwargs: dict,
              vmap_axes: Optional[batching.VmapAxes]):
  """neural-tangents' kwargs convention: a kwarg given as a 2-tuple `(for_x1, for_x2)` is
  split between the two sides, and so is a single `rng` key when x2 is given
  (`_rng_per_side`). Such kwargs travel with the inputs, `x = (x, side_kwargs)`, so
  every implementation sees one `f`. Returns (f, x1, x2, shared kwargs, vmap_axes)."""
  if x2 is not None and kwargs.get("rng") is not None and not isinstance(kwargs["rng"], tuple):
    kwargs = dict(kwargs, rng=_rng_per_side(kwargs["rng"], x1, x2))
  sided = {k: v for k, v in kwargs.items() if isinstance(v, tuple) and len(v) == 2}
  if not sided:
    return f, x1, x2, kwargs, vmap_axes
  shared = {k: v for k, v in kwargs.items() if k not in sided}

  def f_sided(params, x, /, **kw):
    inputs, side = x
    return f(params, inputs, **kw, **side)

  side1 = {k: v[0] for k, v in sided.items()}
  side2 = {k: v[1] for k, v in sided.items()}
  if vmap_axes is not None:
    for k in sided:
      shapes = [[np.shape(l) for l in jax.tree.leaves(v)] for v in sided[k]]
      if vmap_axes.kwargs_axes.get(k) is None and shapes[0] != shapes[1]:
        raise ValueError(
            f"kwarg `{k}` is given per side with shapes {shapes[0]} (x1) and {shapes[1]} (x2), "
            f"but `vmap_axes` declares it unbatched; give its batch axis in kwargs_axes, e.g. "
            f"vmap_axes=(0, 0, {{'{k}': 0}}).")
    vmap_axes = batching.VmapAxes(
        (vmap_axes.in_axes, {k: vmap_axes.kwargs_axes.get(k) for k in sided}),
        vmap_axes.out_axes,
        {k: a for k, a in vmap_axes.kwargs_axes.items() if k not in sided})
  # With x2=None the two sides still differ in their kwargs: x2 is x1 again, not skipped.
  return (f_sided, (x1, side1), (x1 if x2 is None else x2, side2), shared, vmap_axes)


def _split_static(kwargs: dict) -> tuple[dict, tuple]:
  """Array-valued kwargs are traced; everything else (flags, strings) is a static key."""
  dynamic, static = {}, []
  for k, v in kwargs.items():
    leaves = jax.tree.leaves(v)
    if leaves and all(isinstance(l, (jax.Array, np.ndarray)) for l in leaves):
      dynamic[k] = v
    else:
      static.append((k, v))
  return dynamic, tuple(sorted(static, key=lambda kv: kv[0]))


def _jitted(compute: Callable, output_axes: axes_lib.OutputAxes) -> Callable:
  """Jits `compute(x1, x2, params, **kwargs)`, with non-array kwargs as static arguments.

  The returned function carries `output_axes` so wrappers (`batch`) know the kernel layout.
  """
  cache: dict = {}

  def call(x1, x2, params, **kwargs):
    dynamic, static = _split_static(kwargs)
    try:
      fn = cache.get(static)
    except TypeError:  # unhashable static kwargs: run eagerly rather than fail
      return compute(x1, x2, params, **kwargs)
    if fn is None:
      fn = cache[static] = jax.jit(
          lambda a, b, p, dyn: compute(a, b, p, **dyn, **dict(static)))
    return fn(x1, x2, params, dynamic)

  call.output_axes = output_axes
  return call


def empirical_ntk_fn(f: Callable[..., PyTree], trace_axes: Axes = (-1,),
                     diagonal_axes: Axes = (), vmap_axes: Any = None,
                     implementation: Union[NtkImplementation, int] = NtkImplementation.AUTO,
                     per_parameter: bool = False) -> Callable[..., PyTree]:
  """Empirical neural tangent kernel Θ(x1, x2) = Σ_θ ∂f(x1)/∂θ ∂f(x2)/∂θᵀ of `f`.

  Args:
    f: `f(params, x, **kwargs) -> outputs`; params, inputs and outputs may be pytrees.
    trace_axes: output axes summed over matching x1/x2 entries and divided by their size
      (default: the logits axis, giving an (N1, N2) kernel for (N, K) outputs).
    diagonal_axes: output axes where only matching entries are computed; `(0,)` gives the
      per-example kernel Θ(x_i, x_i).
    vmap_axes: None, an int, or `(in_axes, out_axes, kwargs_axes)`: certifies that output
      entries along `out_axes` depend only on the inputs along `in_axes`, so derivatives are
      taken per example; each batched output leaf must have as many entries along its
      out_axes as the inputs have examples (else a `ValueError`). With None, the jaxpr of
      `f` is analysed and the per-example path (axis 0) is taken only when independence is
      proven; models that mix examples (batch statistics, attention across the batch) keep
      the whole-batch path.
    implementation: an `NtkImplementation`.
    per_parameter: if True, return the contributions of every parameter leaf (a pytree of
      `params`' structure whose leaves are kernels; they sum to Θ).

  Returns:
    `ntk_fn(x1, x2, params, **kwargs)`; `x2=None` means x2 = x1 (Jacobians computed once).
    For each output leaf of shape (N, D1, …), the kernel has two axes per output axis
    (x1's then x2's) except traced axes (none) and diagonal axes (one): e.g. (N1, N2) for
    traced (N, K) logits, (N1, N2, K1, K2) with `trace_axes=()`. The result has the output
    pytree's structure. The call is jit-compiled per shape and non-array kwargs.
  """
  output_axes = axes_lib.OutputAxes.create(trace_axes, diagonal_axes)
  vmap = batching.VmapAxes.create(vmap_axes)
  NtkImplementation(implementation)

  def compute(x1, x2, params, **kwargs):
    g, x1, x2, kwargs, vmap_g = _per_side(f, x1, x2, kwargs, vmap)
    return _ntk(g, params, x1, x2, kwargs, output_axes, vmap_g, implementation, per_parameter)

  return _jitted(compute, output_axes)


def _nngp(f, params, x1, x2, kwargs, output_axes) -> PyTree:
  _check_inputs(x1, x2, None)
  fx1 = _output_shapes(f, params, x1, kwargs, "x1")
  fx2 = fx1 if x2 is None else _output_shapes(f, params, x2, kwargs, "x2")
  _check_output_pair(fx1, fx2, output_axes, None, x1, x2)
  out1 = f(params, x1, **kwargs)
  out2 = out1 if x2 is None else f(params, x2, **kwargs)
  return jax.tree.map(lambda a, b: axes_lib.contract(a, b, a.shape, output_axes), out1, out2)


def empirical_nngp_fn(f: Callable[..., PyTree], trace_axes: Axes = (-1,),
                      diagonal_axes: Axes = ()) -> Callable[..., PyTree]:
  """Empirical NNGP kernel f(params, x1) f(params, x2)ᵀ, with the axis semantics and output
  layout of `empirical_ntk_fn`. Returns `nngp_fn(x1, x2, params, **kwargs)`."""
  output_axes = axes_lib.OutputAxes.create(trace_axes, diagonal_axes)

  def compute(x1, x2, params, **kwargs):
    g, x1, x2, kwargs, _ = _per_side(f, x1, x2, kwargs, None)
    return _nngp(g, params, x1, x2, kwargs, output_axes)

  return _jitted(compute, output_axes)


def empirical_kernel_fn(f: Callable[..., PyTree], trace_axes: Axes = (-1,),
                        diagonal_axes: Axes = (), vmap_axes: Any = None,
                        implementation: Union[NtkImplementation, int] = NtkImplementation.AUTO
                        ) -> Callable[..., Any]:
  """Both empirical kernels behind one function, as in neural-tangents.

  Returns `kernel_fn(x1, x2, get, params, **kwargs)` where `get` is `'ntk'`, `'nngp'` (one
  kernel), a tuple of them (an `EmpiricalKernel` namedtuple restricted to those fields, in
  that order) or None (both, as `EmpiricalKernel(nngp, ntk)`).
  """
  fns = {"ntk": empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation),
         "nngp": empirical_nngp_fn(f, trace_axes, diagonal_axes)}

  def kernel_fn(x1, x2, get, params, **kwargs):
    if get is None:
      names = ("nngp", "ntk")
    elif isinstance(get, str):
      names = (get,)
    else:
      names = tuple(get)
    unknown = [g for g in names if g not in fns]
    if unknown or not names:
      raise ValueError(f"`get`={get!r}: expected 'ntk', 'nngp', a tuple of them, or None.")
    values = {g: fns[g](x1, x2, params, **kwargs) for g in names}
    if isinstance(get, str):
      return values[get]
    return _kernel_tuple(names)(*(values[g] for g in names))

  kernel_fn.output_axes = fns["ntk"].output_axes
  return kernel_fn


@functools.lru_cache(maxsize=None)
def _kernel_tuple(names: tuple[str, ...]) -> type:
  # One class per field list, so results of several calls share a pytree type.
  return (EmpiricalKernel if names == EmpiricalKernel._fields
          else collections.namedtuple("EmpiricalKernel", names))


def ntk_vp_fn(f: Callable[..., PyTree], x1: PyTree, x2: Optional[PyTree], params: PyTree,
              **kwargs) -> Callable[[PyTree], PyTree]:
  """Matrix-free NTK-vector product `v ↦ Θ(x1, x2) v`, never forming Θ or a Jacobian.

  Args:
    f: `f(params, x, **kwargs)`.
    x1, x2: inputs; `x2=None` means x2 = x1 (one linearization serves both sides).
    params: parameters at which the kernel is taken.

  Returns:
    `vp(v)` with `v` shaped like `f(params, x2)` and the result shaped like `f(params, x1)`:
    (Θ v)[i] = Σ_j Θ[i, j] v[j] over all output entries (no trace over any axis). Costs one
    VJP and one JVP; jittable, and `jax.vmap` over `v` evaluates several products at once.
  """
  _check_params(params)
  _check_inputs(x1, x2, None)
  fx1 = _output_shapes(f, params, x1, kwargs, "x1")
  fx2 = fx1 if x2 is None else _output_shapes(f, params, x2, kwargs, "x2")
  f_floats, floats, _ = _split_constants(f, params)
  jvp1, vjp2 = ntk_vector_products.linear_maps(f_floats, floats, x1, x2, kwargs)

  def vp(v: PyTree) -> PyTree:
    if jax.tree.structure(v) != jax.tree.structure(fx2):
      raise ValueError(f"ntk_vp_fn: `v` has structure {jax.tree.structure(v)}, expected that "
                       f"of f(params, x2): {jax.tree.structure(fx2)}.")
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(fx2)):
      if np.shape(a) != b.shape:
        raise ValueError(f"ntk_vp_fn: `v` has a leaf of shape {np.shape(a)}, expected "
                         f"{b.shape} (the shape of f(params, x2)).")
    v = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), v, fx2)
    return jvp1(vjp2(v))

  return vp
