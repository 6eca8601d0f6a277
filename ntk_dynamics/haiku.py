"""Adapter from Haiku transforms to plain `f(params, x, **kwargs)` functions."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import haiku as hk
import jax

PyTree = Any


def _takes_rng(apply_fn: Callable, position: int) -> bool:
  """Whether `apply_fn` has an `rng` parameter (Haiku drops it under `without_apply_rng`)."""
  try:
    names = list(inspect.signature(apply_fn).parameters)
  except (TypeError, ValueError):
    return True
  return len(names) > position and names[position] == "rng"


def from_haiku(transformed: hk.Transformed | hk.TransformedWithState, *,
               state: Optional[PyTree] = None,
               rng: Optional[jax.Array] = None) -> Callable[..., PyTree]:
  """Turns a Haiku transform into `f(params, x, **kwargs)` for the NTK and dynamics APIs.

  Args:
    transformed: `hk.transform(...)` (with or without `hk.without_apply_rng`) or
      `hk.transform_with_state(...)`.
    state: for `TransformedWithState`, the state held fixed during differentiation (for
      example BatchNorm statistics in evaluation mode). Required for such transforms; the
      updated state that `apply` returns is discarded.
    rng: the key passed to `apply` when it takes one (stochastic layers such as dropout see
      the same key in every call, so the function stays deterministic). `None` is fine for
      deterministic models.

  Returns:
    `f(params, x, **kwargs) = transformed.apply(params, [state,] [rng,] x, **kwargs)`.

  Note:
    `vmap_axes` in the kernel functions certifies that outputs of example i depend only on
    input i. Keep `vmap_axes=None` for any model whose outputs mix examples: BatchNorm in
    training mode, attention or pooling across the batch axis, or any batch statistic.
  """
  if isinstance(transformed, hk.TransformedWithState):
    if state is None:
      raise ValueError("from_haiku: `state` is required for an hk.TransformedWithState "
                       "(pass the state returned by `init`, e.g. BatchNorm statistics).")
    apply_fn = transformed.apply
    with_rng = _takes_rng(apply_fn, 2)

    def f(params, x, **kwargs):
      args = (params, state, rng, x) if with_rng else (params, state, x)
      out, _ = apply_fn(*args, **kwargs)
      return out

    return f

  if isinstance(transformed, hk.Transformed):
    if state is not None:
      raise ValueError("from_haiku: `state` was given but the transform has no state "
                       "(use hk.transform_with_state for stateful models).")
    apply_fn = transformed.apply
    with_rng = _takes_rng(apply_fn, 1)

    def f(params, x, **kwargs):
      args = (params, rng, x) if with_rng else (params, x)
      return apply_fn(*args, **kwargs)

    return f

  raise TypeError(f"from_haiku: expected hk.Transformed or hk.TransformedWithState, "
                  f"got {type(transformed).__name__}.")
