"""Θ = Σ_leaves J₁ J₂ᵀ by explicit Jacobians, one parameter leaf at a time.

Each leaf's Jacobian is built by forward or reverse mode, whichever needs fewer passes
(leaf size against output size), then contracted straight into the kernel layout so that
traced and diagonal output axes never materialise an O×O block. Only one leaf's Jacobians
need to be alive at a time.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dynamics.kernels import axes as axes_lib
from ntk_dynamics.kernels import batching

PyTree = Any


def _with_leaf(leaves: list, treedef, i: int, leaf) -> PyTree:
  leaves = list(leaves)
  leaves[i] = leaf
  return treedef.unflatten(leaves)


def leaf_jacobians(f: Callable, params: PyTree, x: PyTree, kwargs: dict,
                   vmap_axes: Optional[batching.VmapAxes], fx: PyTree):
  """Yields, for each parameter leaf, the Jacobian pytree of `f(params, x)` (output structure;
  each array has shape `output_shape + leaf_shape`)."""
  leaves, treedef = jax.tree.flatten(params)
  if vmap_axes is None:
    out_size = sum(np.size(o) for o in jax.tree.leaves(fx))
  else:
    n = vmap_axes.batch_size(x)
    out_size = sum(np.size(o) for o in jax.tree.leaves(fx)) // max(n, 1)
    g = batching.single_example_fn(f, vmap_axes, x, fx)
    out_axes = jax.tree.structure(fx).unflatten(vmap_axes.leaf_out_axes(fx))

  for i, leaf in enumerate(leaves):
    jac = jax.jacfwd if np.size(leaf) < out_size else jax.jacrev
    if vmap_axes is None:
      yield jac(lambda p: f(_with_leaf(leaves, treedef, i, p), x, **kwargs))(leaf)
    else:
      per_example = lambda p, x_i, **kw: jac(
          lambda q: g(_with_leaf(leaves, treedef, i, q), x_i, **kw))(p)
      yield batching.vmap_over_examples(per_example, vmap_axes, x, out_axes=out_axes)(
          leaf, x, **kwargs)


def _promoted(a: jax.Array, b: jax.Array, out: Any) -> tuple[jax.Array, jax.Array]:
  # A Jacobian comes out in the parameter's dtype; the kernel is accumulated in the wider of
  # that and the output's, so float16 weights of a float32 model do not overflow the sum.
  dtype = jnp.promote_types(jnp.result_type(a), out.dtype)
  return a.astype(dtype), b.astype(dtype)


def ntk(f: Callable, params: PyTree, x1: PyTree, x2: Optional[PyTree], kwargs: dict,
        output_axes: axes_lib.OutputAxes, vmap_axes: Optional[batching.VmapAxes],
        fx1: PyTree, fx2: PyTree) -> list[PyTree]:
  """Per-parameter-leaf NTK contributions (list over leaves of output-structured kernels).

  `x2=None` reuses x1's Jacobians for both sides.
  """
  jacs1 = leaf_jacobians(f, params, x1, kwargs, vmap_axes, fx1)
  jacs2 = jacs1 if x2 is None else leaf_jacobians(f, params, x2, kwargs, vmap_axes, fx2)
  contributions = []
  for leaf, j1 in zip(jax.tree.leaves(params), jacs1):
    j2 = j1 if x2 is None else next(jacs2)
    contributions.append(jax.tree.map(
        lambda a, b, o: axes_lib.contract(*_promoted(a, b, o), o.shape, output_axes,
                                          np.ndim(leaf)),
        j1, j2, fx1))
  return contributions
