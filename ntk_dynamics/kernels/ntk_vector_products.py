"""Θ by NTK-vector products: columns Θ e = J₁ (J₂ᵀ e) for cotangent basis vectors e.

No Jacobian is ever formed: each column costs one VJP and one JVP, and columns are evaluated
in chunks sized so that the parameter-shaped intermediates stay under a memory budget.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dynamics.kernels import axes as axes_lib
from ntk_dynamics.kernels import batching

PyTree = Any

# Bytes of parameter-shaped cotangents alive at once while mapping over basis vectors.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _chunk_size(params: PyTree, n_columns: int, chunk_bytes: int) -> int:
  param_bytes = sum(np.size(p) * np.dtype(p.dtype).itemsize for p in jax.tree.leaves(params))
  return int(max(1, min(n_columns, chunk_bytes // max(param_bytes, 1))))


def _map_columns(column: Callable, basis_size: int, chunk: int) -> PyTree:
  """Stacks `column(i)` for i in range(basis_size), `chunk` at a time."""
  idx = jnp.arange(basis_size)
  if chunk >= basis_size:
    return jax.vmap(column)(idx)
  return jax.lax.map(column, idx, batch_size=chunk)


def _one_hot(shape, dtype, i):
  return jax.nn.one_hot(i, math.prod(shape), dtype=dtype).reshape(shape)


def ntk(f: Callable, params: PyTree, x1: PyTree, x2: Optional[PyTree], kwargs: dict,
        output_axes: axes_lib.OutputAxes, vmap_axes: Optional[batching.VmapAxes],
        fx1: PyTree, fx2: PyTree, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> PyTree:
  """Output-structured NTK computed with NTK-vector products."""
  if vmap_axes is None:
    return _ntk_batched(f, params, x1, x2, kwargs, output_axes, fx1, fx2, chunk_bytes)
  return _ntk_per_example(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2,
                          chunk_bytes)


def linear_maps(f: Callable, params: PyTree, x1: PyTree, x2: Optional[PyTree],
                kwargs: dict) -> tuple[Callable, Callable]:
  """`(jvp1, vjp2)`: tangent ↦ J(x1)·tangent and cotangent ↦ J(x2)ᵀ·cotangent.

  With `x2=None` one linearization serves both sides: its transpose is x1's VJP.
  """
  _, jvp1 = jax.linearize(lambda p: f(p, x1, **kwargs), params)
  if x2 is None:
    transpose = jax.linear_transpose(jvp1, params)
    return jvp1, lambda ct: transpose(ct)[0]
  _, vjp_fn = jax.vjp(lambda p: f(p, x2, **kwargs), params)
  return jvp1, lambda ct: vjp_fn(ct)[0]


def _ntk_batched(f, params, x1, x2, kwargs, output_axes, fx1, fx2, chunk_bytes):
  jvp1, vjp2 = linear_maps(f, params, x1, x2, kwargs)

  out1_leaves, out_def = jax.tree.flatten(fx1)
  out2_leaves = out_def.flatten_up_to(fx2)
  kernels = []
  for k, (o1, o2) in enumerate(zip(out1_leaves, out2_leaves)):
    def column(i, k=k, o2=o2):
      cot = [jnp.zeros(o.shape, o.dtype) for o in out2_leaves]
      cot[k] = _one_hot(o2.shape, o2.dtype, i)
      return out_def.flatten_up_to(jvp1(vjp2(out_def.unflatten(cot))))[k]

    cols = _map_columns(column, o2.size, _chunk_size(params, o2.size, chunk_bytes))
    # cols: (size of o2,) + o1.shape  ->  o1.shape + o2.shape
    theta = jnp.moveaxis(cols.reshape(o2.shape + o1.shape), range(o2.ndim),
                         range(o1.ndim, o1.ndim + o2.ndim))
    kernels.append(axes_lib.reduce_full(theta, o1.ndim, output_axes))
  return out_def.unflatten(kernels)


def _ntk_per_example(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2,
                     chunk_bytes):
  g = batching.single_example_fn(f, vmap_axes, x1, fx1)  # axes resolved on the batched x1
  out1_leaves, out_def = jax.tree.flatten(fx1)
  out2_leaves = out_def.flatten_up_to(fx2)
  b1 = vmap_axes.leaf_out_axes(fx1)
  x2_ = x1 if x2 is None else x2
  batched_g = batching.vmap_over_examples(g, vmap_axes, x1, out_axes=out_def.unflatten(b1))
  _, jvp1 = jax.linearize(lambda p: batched_g(p, x1, **kwargs), params)

  in_axes2 = jax.tree.structure(x2_).unflatten(vmap_axes.leaf_in_axes(x2_))
  kw_axes = {k: vmap_axes.kwargs_axes.get(k) for k in kwargs}

  def example(tree, axes_tree, j):
    # `axes_tree` may be a prefix of `tree`: one axis for a whole pytree kwarg.
    axes_tree = jax.tree.broadcast(axes_tree, tree, is_leaf=lambda a: a is None)
    return jax.tree.map(lambda leaf, a: leaf if a is None else jnp.take(leaf, j, a),
                        tree, axes_tree)

  kernels = []
  for k, (o1, o2) in enumerate(zip(out1_leaves, out2_leaves)):
    single2 = tuple(s for a, s in enumerate(o2.shape) if a != b1[k])
    n2 = o2.shape[b1[k]]
    n_single = math.prod(single2)

    def column(idx, k=k, single2=single2, n_single=n_single):
      # Column (j, e): VJP through example j of x2 alone, then JVP over all of x1.
      j, e = idx // n_single, idx % n_single
      x_j = example(x2_, in_axes2, j)
      kw_j = {key: v if kw_axes[key] is None else example(v, kw_axes[key], j)
              for key, v in kwargs.items()}
      fx_j, vjp_fn = jax.vjp(lambda p: g(p, x_j, **kw_j), params)
      cot = [jnp.zeros(o.shape, o.dtype) for o in out_def.flatten_up_to(fx_j)]
      cot[k] = _one_hot(single2, o2.dtype, e)
      tangent = vjp_fn(out_def.unflatten(cot))[0]
      return out_def.flatten_up_to(jvp1(tangent))[k]

    cols = _map_columns(column, n2 * n_single,
                        _chunk_size(params, n2 * n_single, chunk_bytes))
    # cols: (n2 * |single2|,) + o1.shape -> o1.shape + o2.shape with x2's batch axis at b1[k]
    cols = cols.reshape((n2,) + single2 + o1.shape)
    cols = jnp.moveaxis(cols, 0, b1[k])
    theta = jnp.moveaxis(cols, range(o2.ndim), range(o1.ndim, o1.ndim + o2.ndim))
    kernels.append(axes_lib.reduce_full(theta, o1.ndim, output_axes))
  return out_def.unflatten(kernels)
