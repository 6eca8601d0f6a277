"""Input validation shared by the library: errors name the argument, its shape and what was
expected, so that bad input never turns into a silent wrong answer."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def describe(tree: PyTree) -> str:
  """Short description of a pytree's structure and leaf shapes for error messages."""
  leaves, treedef = jax.tree.flatten(tree)
  shapes = [tuple(np.shape(x)) for x in leaves]
  text = f"{treedef} with leaf shapes {shapes}"
  return text if len(text) < 600 else text[:600] + "..."


def check_params_match(name: str, params: PyTree, reference: PyTree) -> None:
  """Raises if `params` does not have the structure and leaf shapes of `reference`."""
  s1, s2 = jax.tree.structure(params), jax.tree.structure(reference)
  if s1 != s2:
    raise ValueError(f"`{name}` has pytree structure {s1}, expected {s2} (the parameters "
                     "the function was built around).")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"`{name}` has a leaf of shape {np.shape(a)} where {np.shape(b)} "
                       f"was expected; got {describe(params)}, expected "
                       f"{describe(reference)}.")


def check_finite(name: str, x: Any) -> None:
  """Raises if a concrete array holds NaN or infinity (skipped for tracers)."""
  if isinstance(x, jax.core.Tracer):
    return
  arr = np.asarray(x)
  if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    raise ValueError(f"`{name}` (shape {arr.shape}) holds {bad} non-finite value(s).")
