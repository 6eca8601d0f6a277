"""`vmap_axes`: the promise that outputs along one axis depend only on the matching inputs.

With that promise every Jacobian and NTK-vector product can be taken per example, which
removes the N-fold redundancy of differentiating a whole batch for every output entry.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class VmapAxes:
  """Resolved `vmap_axes`: batch axis of each input leaf, of each output leaf, of kwargs."""
  in_axes: PyTree
  out_axes: PyTree
  kwargs_axes: dict

  @classmethod
  def create(cls, vmap_axes) -> Optional["VmapAxes"]:
    """Accepts None, an int (same axis for inputs and outputs) or a triple
    `(in_axes, out_axes, kwargs_axes)` as in neural-tangents."""
    if vmap_axes is None:
      return None
    if isinstance(vmap_axes, numbers.Integral) and not isinstance(vmap_axes, (bool, np.bool_)):
      return cls(int(vmap_axes), int(vmap_axes), {})
    if isinstance(vmap_axes, (tuple, list)) and len(vmap_axes) == 3:
      in_axes, out_axes, kwargs_axes = vmap_axes
      return cls(in_axes, out_axes, dict(kwargs_axes or {}))
    raise TypeError("`vmap_axes` must be None, an int, or a triple (in_axes, out_axes, "
                    f"kwargs_axes), got {vmap_axes!r}.")

  def leaf_in_axes(self, x: PyTree) -> list[Optional[int]]:
    return _broadcast_axes(self.in_axes, x, "vmap_axes (in_axes)", "x")

  def leaf_out_axes(self, fx: PyTree) -> list[Optional[int]]:
    return _broadcast_axes(self.out_axes, fx, "vmap_axes (out_axes)", "f(params, x)")

  def batch_size(self, x: PyTree) -> int:
    sizes = {np.shape(leaf)[a] for leaf, a in zip(jax.tree.leaves(x), self.leaf_in_axes(x))
             if a is not None}
    if len(sizes) != 1:
      raise ValueError(f"`vmap_axes` in_axes={self.in_axes} select batch sizes {sorted(sizes)} "
                       "across the input leaves; expected exactly one batch size.")
    return sizes.pop()


def _broadcast_axes(axes: PyTree, tree: PyTree, name: str, what: str) -> list[Optional[int]]:
  leaves = jax.tree.leaves(tree)
  if isinstance(axes, numbers.Integral) and not isinstance(axes, (bool, np.bool_)):
    axes = int(axes)
  if axes is None or isinstance(axes, int):
    per_leaf = [axes] * len(leaves)
  else:
    try:
      # A prefix of the tree is allowed: one axis for a whole subtree (a pytree kwarg).
      per_leaf = jax.tree.structure(tree).flatten_up_to(
          jax.tree.broadcast(axes, tree, is_leaf=lambda a: a is None))
    except (ValueError, TypeError) as e:
      raise ValueError(f"`{name}`={axes!r} does not match the structure of {what}: "
                       f"{jax.tree.structure(tree)}.") from e
  for leaf, a in zip(leaves, per_leaf):
    if a is None:
      continue
    ndim = np.ndim(leaf)
    if (not isinstance(a, numbers.Integral) or isinstance(a, (bool, np.bool_))
        or not -ndim <= a < ndim):
      raise ValueError(f"`{name}`={axes!r}: axis {a!r} does not fit a leaf of {what} with "
                       f"shape {np.shape(leaf)} (rank {ndim}).")
  return [None if a is None else int(a) % np.ndim(leaf) for leaf, a in zip(leaves, per_leaf)]


def single_example_fn(f: Callable, vmap_axes: VmapAxes, x_example: PyTree,
                      fx: PyTree) -> Callable:
  """`g(params, x_i, **kwargs_i)`: f on one example, batch axes removed from in and outputs.

  `x_example` and `fx` (shapes only are used) fix the pytree structures.
  """
  in_axes = vmap_axes.leaf_in_axes(x_example)
  out_axes = vmap_axes.leaf_out_axes(fx)
  x_def = jax.tree.structure(x_example)
  kw_axes = vmap_axes.kwargs_axes

  def g(params, x_i, **kwargs_i):
    leaves = [leaf if a is None else jnp.expand_dims(leaf, a)
              for leaf, a in zip(x_def.flatten_up_to(x_i), in_axes)]
    kwargs = {k: (v if kw_axes.get(k) is None else
                  jax.tree.map(lambda u, a=kw_axes[k]: jnp.expand_dims(u, a), v))
              for k, v in kwargs_i.items()}
    out = f(params, x_def.unflatten(leaves), **kwargs)
    out_leaves, out_def = jax.tree.flatten(out)
    return out_def.unflatten([o if a is None else jnp.squeeze(o, a)
                              for o, a in zip(out_leaves, out_axes)])

  return g


def vmap_over_examples(fn: Callable, vmap_axes: VmapAxes, x: PyTree, *, out_axes=0,
                       params_axis=None) -> Callable:
  """vmap of `fn(params, x_i, **kwargs_i)` over the batch axes of `x` and batched kwargs."""
  in_axes = jax.tree.structure(x).unflatten(vmap_axes.leaf_in_axes(x))

  def batched(params, x, **kwargs):
    kw_axes = {k: vmap_axes.kwargs_axes.get(k) for k in kwargs}
    return jax.vmap(lambda p, xx, kw: fn(p, xx, **kw),
                    in_axes=(params_axis, in_axes, kw_axes), out_axes=out_axes)(params, x, kwargs)

  return batched
