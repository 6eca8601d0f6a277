"""Axis semantics of empirical kernels, shared by every implementation.

For an output leaf of rank D, each output axis `a` is one of:
  * traced (in `trace_axes`): summed over matching entries of x1 and x2, then divided by its
    size (a mean, as in neural-tangents);
  * diagonal (in `diagonal_axes`): only matching entries of x1 and x2 kept, one axis in the
    result;
  * neither: two axes in the result, x1's then x2's, side by side.
Result axes follow the output's axis order, e.g. outputs (N, X, Y, Z) with `trace_axes=(1,)`,
`diagonal_axes=(2,)` give a kernel of shape (N1, N2, Y, Z1, Z2).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def _as_tuple(axes, name: str) -> tuple[int, ...]:
  if axes is None:
    return ()
  if isinstance(axes, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.")
  if isinstance(axes, numbers.Integral):
    return (int(axes),)
  try:
    axes = tuple(axes)
  except TypeError:
    raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.") from None
  if not all(isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_))
             for a in axes):
    raise TypeError(f"`{name}` must hold ints, got {axes!r}.")
  return tuple(int(a) for a in axes)


@dataclasses.dataclass(frozen=True)
class OutputAxes:
  """`trace_axes` / `diagonal_axes` as given by the user (possibly negative)."""
  trace_axes: tuple[int, ...]
  diagonal_axes: tuple[int, ...]

  @classmethod
  def create(cls, trace_axes, diagonal_axes) -> "OutputAxes":
    return cls(_as_tuple(trace_axes, "trace_axes"), _as_tuple(diagonal_axes, "diagonal_axes"))

  def for_rank(self, ndim: int) -> tuple[frozenset[int], frozenset[int]]:
    """Canonical (non-negative) trace and diagonal axes for an output of rank `ndim`."""
    def canon(axes, name):
      out = []
      for a in axes:
        if not -ndim <= a < ndim:
          raise ValueError(f"`{name}`={axes} is out of range for an output of rank {ndim} "
                           f"(valid axes: {-ndim}..{ndim - 1}).")
        out.append(a % ndim)
      if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axes} names the same output axis twice (rank {ndim}).")
      return frozenset(out)

    trace = canon(self.trace_axes, "trace_axes")
    diagonal = canon(self.diagonal_axes, "diagonal_axes")
    if trace & diagonal:
      raise ValueError(f"`trace_axes`={self.trace_axes} and `diagonal_axes`="
                       f"{self.diagonal_axes} overlap on output axes {sorted(trace & diagonal)} "
                       f"(rank {ndim}); an axis is either traced or diagonal.")
    return trace, diagonal

  def kernel_shape(self, shape1: Sequence[int], shape2: Sequence[int]) -> tuple[int, ...]:
    """Shape of the kernel between outputs of shapes `shape1` and `shape2`."""
    trace, diagonal = self.for_rank(len(shape1))
    out = []
    for a, (s1, s2) in enumerate(zip(shape1, shape2)):
      if a in diagonal:
        out.append(s1)
      elif a not in trace:
        out += [s1, s2]
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Labels:
  """einsum sublists that contract two factors into the kernel layout above."""
  left: list[int]
  right: list[int]
  out: list[int]


def labels(ndim: int, axes: OutputAxes, *, left_axes: Sequence[int] | None = None,
           right_axes: Sequence[int] | None = None, shared: Sequence[int] = ()) -> Labels:
  """einsum labels for contracting a left factor (output axes of x1) with a right factor.

  Output axis `a` of x1 carries label `a`; of x2, label `ndim + a` unless `a` is traced or
  diagonal, in which case the two share label `a`. `left_axes`/`right_axes` list which output
  axes each factor holds (default: all, in order); `shared` are extra labels (for example the
  parameter axes of two Jacobians) appended to both factors and summed over.
  """
  trace, diagonal = axes.for_rank(ndim)
  left_axes = range(ndim) if left_axes is None else left_axes
  right_axes = range(ndim) if right_axes is None else right_axes

  def right_label(a):
    return a if (a in trace or a in diagonal) else ndim + a

  extra = [2 * ndim + i for i in range(len(shared))]
  out = []
  for a in range(ndim):
    if a in diagonal:
      out.append(a)
    elif a not in trace:
      out += [a, ndim + a]
  return Labels(list(left_axes) + extra, [right_label(a) for a in right_axes] + extra, out)


def trace_size(shape: Sequence[int], axes: OutputAxes) -> int:
  trace, _ = axes.for_rank(len(shape))
  return math.prod(shape[a] for a in trace)


def contract(left: jnp.ndarray, right: jnp.ndarray, out_shape: Sequence[int],
             axes: OutputAxes, n_shared: int = 0) -> jnp.ndarray:
  """Σ over shared trailing axes of left·right, laid out as a kernel of `out_shape`'s outputs.

  `left` has shape `out_shape1 + S`, `right` `out_shape2 + S` with `S` the `n_shared`
  trailing axes (for Jacobians: the parameter axes). Traced axes are averaged.
  """
  ndim = left.ndim - n_shared
  lab = labels(ndim, axes, shared=range(n_shared))
  res = jnp.einsum(left, lab.left, right, lab.right, lab.out)
  return res / trace_size(out_shape, axes)


def reduce_full(theta: jnp.ndarray, ndim: int, axes: OutputAxes,
                merged: Sequence[int] = ()) -> jnp.ndarray:
  """Applies trace/diagonal semantics to a kernel computed for all pairs of output entries.

  `theta` holds the axes of x1's outputs then x2's outputs, except that the output axes in
  `merged` (already diagonal: computed only for matching entries) appear once, first.
  """
  trace, diagonal = axes.for_rank(ndim)
  merged = list(merged)
  if not set(merged) <= diagonal:
    raise AssertionError("merged axes must be diagonal axes")
  rest = [a for a in range(ndim) if a not in merged]
  lab = labels(ndim, axes, left_axes=rest, right_axes=rest)
  in_labels = merged + lab.left + lab.right
  res = jnp.einsum(theta, in_labels, lab.out)
  sizes = dict(zip(in_labels, theta.shape))
  return res / math.prod(sizes[a] for a in trace)
