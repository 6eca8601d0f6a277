"""Adapter from Haiku transforms to plain `f(params, x, **kwargs)` functions."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import haiku as hk
import jax

PyTree = Any


def _signature(apply_fn: Callable) -> Optional[inspect.Signature]:
  try:
    return inspect.signature(apply_fn)
  except (TypeError, ValueError):
    return None


def _binds(sig: inspect.Signature, args: tuple, kwargs: dict) -> bool:
  try:
    sig.bind(*args, **kwargs)
  except TypeError:
    return False
  return True


def _takes_rng(sig: Optional[inspect.Signature], lead: tuple, args: tuple,
               kwargs: dict) -> bool:
  """Whether `apply(*lead, rng, *args, **kwargs)` is the intended call rather than
  `apply(*lead, *args, **kwargs)`, decided from apply's signature for this call.

  Haiku's applies are (params, [state,] rng, *inputs) or, under `hk.without_apply_rng`,
  (params, [state,] *inputs), with the inputs named as in the transformed function. When
  exactly one of the two calls binds to the signature, that one is meant (this covers any
  names, e.g. `lambda params, key, x: ...`). When both bind (inputs with defaults, *args),
  Haiku's own name for the slot decides: `rng`. Without a signature Haiku's default, an
  rng-taking apply, is assumed."""
  if sig is None:
    return True
  with_rng = _binds(sig, lead + (None,) + args, kwargs)
  without = _binds(sig, lead + args, kwargs)
  if with_rng != without:
    return with_rng
  names = list(sig.parameters)
  return len(names) > len(lead) and names[len(lead)] == "rng"


def from_haiku(transformed: hk.Transformed | hk.TransformedWithState, *,
               state: Optional[PyTree] = None,
               rng: Optional[jax.Array] = None,
               takes_rng: Optional[bool] = None) -> Callable[..., PyTree]:
  """Turns a Haiku transform into `f(params, *args, rng=None, **kwargs)` for the NTK and
  dynamics APIs.

  Args:
    transformed: `hk.transform(...)` (with or without `hk.without_apply_rng`),
      `hk.transform_with_state(...)`, or an `hk.Transformed(init, apply)` /
      `hk.TransformedWithState` built by hand (e.g. around `jax.jit(apply)`).
    state: for `TransformedWithState`, the state held fixed during differentiation (for
      example BatchNorm statistics in evaluation mode). Required for such transforms; the
      updated state that `apply` returns is discarded.
    rng: the default key passed to `apply` when it takes one (stochastic layers such as
      dropout see the same key in every call, so the function stays deterministic). `None`
      is fine for deterministic models.
    takes_rng: whether `apply` takes an rng argument after params [and state]. `None`
      (default) decides from apply's signature at each call: the call that binds (with or
      without an rng slot) is used, and when both bind, a slot named `rng` (Haiku's name)
      means it takes one. Pass True/False for hand-made applies whose signature is
      ambiguous, e.g. `lambda params, key, x=None: ...`.

  Returns:
    `f(params, *args, rng=None, **kwargs) = transformed.apply(params, [state,] [key,] *args,
    **kwargs)`, where `key` is the per-call `rng` when given (not None) and the fixed `rng`
    otherwise. A per-call `rng` is how `empirical_ntk_fn(f)(x1, x2, params, rng=k)` gives
    the x2 side its own key (`fold_in(k, 1)`), as in neural-tangents. Passing a per-call
    `rng` to a transform whose apply takes none is a TypeError.

  Note:
    `vmap_axes` in the kernel functions certifies that outputs of example i depend only on
    input i. Keep `vmap_axes=None` for any model whose outputs mix examples: BatchNorm in
    training mode, attention or pooling across the batch axis, or any batch statistic.
  """
  if takes_rng is not None and not isinstance(takes_rng, bool):
    raise TypeError(f"from_haiku: `takes_rng` must be None, True or False, got {takes_rng!r}.")
  if isinstance(transformed, hk.TransformedWithState):
    if state is None:
      raise ValueError("from_haiku: `state` is required for an hk.TransformedWithState "
                       "(pass the state returned by `init`, e.g. BatchNorm statistics).")
    stateful = True
  elif isinstance(transformed, hk.Transformed):
    if state is not None:
      raise ValueError("from_haiku: `state` was given but the transform has no state "
                       "(use hk.transform_with_state for stateful models).")
    stateful = False
  else:
    raise TypeError(f"from_haiku: expected hk.Transformed or hk.TransformedWithState, "
                    f"got {type(transformed).__name__}.")
  apply_fn = transformed.apply
  sig = _signature(apply_fn)
  fixed_rng = rng

  def f(params, *args, rng=None, **kwargs):
    lead = (params, state) if stateful else (params,)
    with_rng = (takes_rng if takes_rng is not None else
                _takes_rng(sig, lead, args, kwargs))
    if with_rng:
      key = fixed_rng if rng is None else rng
      out = apply_fn(*lead, key, *args, **kwargs)
    else:
      if rng is not None:
        raise TypeError(
            "from_haiku: a per-call `rng` was given, but this transform's apply takes no rng "
            "(hk.without_apply_rng, a signature without an rng slot, or takes_rng=False). "
            "Drop the `rng` keyword, or use hk.transform for a stochastic model (pass "
            "takes_rng=True if the apply is hand-made and does take a key).")
      out = apply_fn(*lead, *args, **kwargs)
    return out[0] if stateful else out

  return f
