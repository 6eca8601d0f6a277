"""Choosing an implementation: an analytic FLOP model, and measured autotuning.

neural-tangents' AUTO asks XLA for FLOP counts, which its own documentation says are only
meaningful on TPU. Here each method's cost is modelled from the shapes and the jaxpr of `f`:

  * STRUCTURED_DERIVATIVES: `structured.estimate_flops`, which plans exactly what the method
    runs (forward pass, one cotangent pass per output entry, and per parameter the cheaper of
    the structured contraction or per-entry Jacobians);
  * JACOBIAN_CONTRACTION: per parameter leaf, min(leaf size, output entries) passes of cost
    ≈2F (F = forward FLOPs; per example under `vmap_axes`), plus the contraction
    2·|Θ|·T·P_leaf (T = size of the traced axes);
  * NTK_VECTOR_PRODUCTS: one column per output entry of x2, each a VJP (≈3F of one example
    under `vmap_axes`, of the x2 batch otherwise) and a JVP through the x1 batch (≈2F), plus
    the memory traffic of the parameter-sized vector that passes between them (the VJP
    writes it, the JVP reads it), at `VP_FLOPS_PER_PARAMETER` FLOPs per entry. Without it,
    a 20000×128 embedding looks cheapest by VP (0.6 GFLOP against 2.7 for structured
    derivatives), yet takes 244 ms against 17 ms: its FLOPs are few, its columns are not.

`autotuned_ntk_fn` instead times every candidate once per shape signature and device, and
remembers the winner in the process and, optionally, in a JSON file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import time
import warnings
from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np
from jax.extend import core as jcore

from ntk_dynamics import runs
from ntk_dynamics.kernels import axes as axes_lib
from ntk_dynamics.kernels import structured
from ntk_dynamics.kernels.structured.cost import jaxpr_macs
from ntk_dynamics.kernels.structured.interpreter import REVERSE_ONLY_PRIMITIVES

PyTree = Any

# Two memory passes over 4-byte entries per NTK-vector-product column, at about 8 FLOPs per
# byte: the balance of a CPU core's FMA units against its memory bandwidth (GPUs have more
# FLOPs per byte, so the term only grows there). Measured: 0.76 ms per column for 2.57M
# parameters on 2 CPU cores, i.e. 60 FLOP-equivalents per parameter at 206 GFLOP/s.
VP_FLOPS_PER_PARAMETER = 64


def _forward(f, params, x, kwargs) -> tuple[int, bool]:
  """FLOPs of one forward pass, and whether `f` can be differentiated in forward mode."""
  jaxpr = jax.make_jaxpr(lambda p, xx: f(p, xx, **kwargs))(params, x)
  return 2 * jaxpr_macs(jaxpr.jaxpr), not _has_reverse_only(jaxpr.jaxpr)


def _has_reverse_only(jaxpr) -> bool:
  """Whether a (nested) equation has a reverse-mode-only rule (custom_vjp)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in REVERSE_ONLY_PRIMITIVES:
      return True
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jcore.Jaxpr) and _has_reverse_only(inner):
          return True
  return False


def estimate_flops(f, params, x1, x2, kwargs, output_axes: axes_lib.OutputAxes, vmap_axes,
                   fx1, fx2) -> dict:
  """Modelled FLOPs of each implementation for these arguments (see the module docstring)."""
  from ntk_dynamics.kernels.api import NtkImplementation as Impl
  f1, forward_mode = _forward(f, params, x1, kwargs)
  f2 = f1 if x2 is None else _forward(f, params, x2, kwargs)[0]
  n1 = n2 = 1
  if vmap_axes is not None:
    n1 = vmap_axes.batch_size(x1)
    n2 = n1 if x2 is None else vmap_axes.batch_size(x2)
  o1 = sum(int(np.size(o)) for o in jax.tree.leaves(fx1))
  o2 = sum(int(np.size(o)) for o in jax.tree.leaves(fx2))
  entries = sum(math.prod(output_axes.kernel_shape(a.shape, b.shape)) *
                axes_lib.trace_size(a.shape, output_axes)
                for a, b in zip(jax.tree.leaves(fx1), jax.tree.leaves(fx2)))
  sides = ((f1, o1 // n1),) if x2 is None else ((f1, o1 // n1), (f2, o2 // n2))
  jc = 0
  for leaf in jax.tree.leaves(params):
    size = int(np.size(leaf))
    jc += sum(2 * fwd * min(size, per_example_out) for fwd, per_example_out in sides)
    jc += 2 * entries * size
  vp_column = 3 * f2 / n2 + 2 * f1 if vmap_axes is not None else 2 * (f1 + f2)
  vp_column += VP_FLOPS_PER_PARAMETER * sum(int(np.size(l)) for l in jax.tree.leaves(params))
  costs = {Impl.JACOBIAN_CONTRACTION: jc}
  if forward_mode:  # NTK-vector products take a JVP, which custom_vjp functions refuse
    costs[Impl.NTK_VECTOR_PRODUCTS] = int(o2 * vp_column + f1 + f2)
  try:
    costs[Impl.STRUCTURED_DERIVATIVES] = structured.estimate_flops(
        f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2)["total"]
  except Exception:  # a model the planner cannot trace abstractly: leave it to the others
    pass
  return costs


def choose(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2):
  """The implementation with the smallest modelled FLOP count."""
  costs = estimate_flops(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2)
  return min(costs, key=costs.get)


def _signature(x1, x2, params, kwargs) -> str:
  def shapes(tree):
    return [(tuple(np.shape(l)), str(getattr(l, "dtype", type(l).__name__)))
            for l in jax.tree.leaves(tree)]
  static = sorted((k, repr(v)) for k, v in kwargs.items()
                  if not all(isinstance(l, (jax.Array, np.ndarray)) for l in jax.tree.leaves(v)))
  return json.dumps([shapes(x1), None if x2 is None else shapes(x2), shapes(params),
                     sorted((k, shapes(v)) for k, v in kwargs.items()), static,
                     str(jax.tree.structure(params)), jax.devices()[0].device_kind,
                     jax.__version__])


def _read_cache(path: pathlib.Path) -> dict:
  """The autotune cache at `path` as {key: implementation name}; {} if there is none.

  The cache only saves time, so a file that cannot be parsed as a JSON object (truncated by
  a crash, emptied, written by something else) is ignored with a warning, then rewritten.
  """
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return {}
  try:
    stored = json.loads(data)
  except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
    stored = e
  if not isinstance(stored, dict):
    warnings.warn(f"autotuned_ntk_fn: ignoring the unreadable autotune cache {path} "
                  f"({stored!s:.100}); it is rewritten with the new measurements.",
                  stacklevel=3)
    return {}
  return stored


def autotuned_ntk_fn(f: Callable[..., PyTree], trace_axes=(-1,), diagonal_axes=(),
                     vmap_axes: Any = None, *, cache_path: Optional[str | os.PathLike] = None,
                     candidates: Optional[Iterable] = None, repeats: int = 1
                     ) -> Callable[..., PyTree]:
  """`empirical_ntk_fn` that measures which implementation is fastest, once per signature.

  On the first call for a given set of shapes, dtypes, static kwargs and device, every
  candidate implementation is compiled, run once to warm up and timed `repeats` times; the
  fastest is remembered for the process and, with `cache_path`, in a JSON file keyed also by a
  hash of `f`'s jaxpr (so a changed model is tuned again). Candidates that fail (for example
  out of memory) are skipped; if all fail, the first one's error is raised (bad arguments
  give the same `ValueError` as `empirical_ntk_fn`). A cache file that is not a JSON object
  (truncated, emptied) is ignored with a warning and rewritten. Under an outer `jax.jit`
  nothing can be timed, so the analytic AUTO choice is used.

  Returns `ntk_fn(x1, x2, params, **kwargs)` with `empirical_ntk_fn`'s semantics; its
  attribute `choices` maps each signature to the chosen implementation's name.
  """
  from ntk_dynamics.kernels.api import NtkImplementation as Impl
  from ntk_dynamics.kernels.api import empirical_ntk_fn
  if (isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer))
      or repeats < 1):
    raise ValueError(f"`repeats` must be a positive integer, got {repeats!r}.")
  candidates = list(candidates or (Impl.STRUCTURED_DERIVATIVES, Impl.JACOBIAN_CONTRACTION,
                                   Impl.NTK_VECTOR_PRODUCTS))
  fns = {Impl(c): empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, c)
         for c in candidates}
  auto = empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, Impl.AUTO)
  choices: dict[str, str] = {}

  def disk_key(sig, x1, params, kwargs):
    jaxpr = jax.make_jaxpr(lambda p, xx: f(p, xx, **kwargs))(params, x1)
    text = f"{sig}|{trace_axes}|{diagonal_axes}|{vmap_axes}|{jaxpr}"
    return hashlib.sha256(text.encode()).hexdigest()

  def measure(x1, x2, params, kwargs):
    best, best_time, errors = None, math.inf, []
    for impl, fn in fns.items():
      try:
        jax.block_until_ready(fn(x1, x2, params, **kwargs))
        t0 = time.perf_counter()
        for _ in range(repeats):
          jax.block_until_ready(fn(x1, x2, params, **kwargs))
        seconds = (time.perf_counter() - t0) / repeats
      except Exception as e:  # noqa: BLE001 - a failing candidate is simply not chosen
        errors.append((impl, e))
        continue
      if seconds < best_time:
        best, best_time = impl, seconds
    if best is None:
      # Usually bad arguments, which every candidate rejects with the same message: raise
      # the first candidate's own error (it names the argument) rather than a generic one.
      raise errors[0][1]
    return best

  def ntk_fn(x1, x2, params, **kwargs):
    if any(isinstance(l, jax.core.Tracer) for l in jax.tree.leaves((x1, x2, params, kwargs))):
      return auto(x1, x2, params, **kwargs)
    sig = _signature(x1, x2, params, kwargs)
    if sig not in choices and cache_path is not None:
      path = pathlib.Path(cache_path)
      stored = _read_cache(path)
      key = disk_key(sig, x1, params, kwargs)
      if isinstance(stored.get(key), str) and stored[key] in {impl.name for impl in fns}:
        choices[sig] = stored[key]
      else:
        choices[sig] = measure(x1, x2, params, kwargs).name
        stored = _read_cache(path)  # re-read: another process may have added entries
        stored[key] = choices[sig]
        runs.atomic_write_json(path, stored)
    elif sig not in choices:
      choices[sig] = measure(x1, x2, params, kwargs).name
    return fns[Impl[choices[sig]]](x1, x2, params, **kwargs)

  ntk_fn.choices = choices
  ntk_fn.output_axes = auto.output_axes
  return ntk_fn
