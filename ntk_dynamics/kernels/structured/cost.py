"""FLOP estimate of STRUCTURED_DERIVATIVES for given shapes, without running anything.

`estimate_flops` traces `f` (shapes only), builds exactly the plans `ntk` would execute and
adds them up, together with a model of the cotangent pass:

  * forward: one pass per side (per example under `vmap_axes`), counted from the jaxpr:
    dot_general and conv multiply-adds, one op per output element elsewhere;
  * cotangents: one backward pass per output entry (vmapped) through the equations that
    depend on parameters, counting only cotangents of parameter-dependent activations
    (no weight gradients are formed: those are the contraction's business);
  * contraction: the multiply-adds of the chosen plan of every (output leaf, parameter leaf)
    pair: the per-entry Jacobians and their product, or the structured network, whichever
    `ntk` would pick.

All counts are multiply-adds times 2 (FLOPs). Cost: one abstract trace of each side.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from ntk_dynamics.kernels.structured import core
from ntk_dynamics.kernels.structured import interpreter as interp


def _eqn_macs(eqn) -> int:
  name = eqn.primitive.name
  out = sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
  if name == "dot_general":
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return out * math.prod(lhs[a] for a in lc)
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    _, rhs_spec, _ = eqn.params["dimension_numbers"]
    return out * math.prod(rhs[d] for d in rhs_spec[2:]) * rhs[rhs_spec[1]]
  inner = interp.inner_jaxpr(eqn)
  if inner is not None:
    return jaxpr_macs(inner[0]) * _trips(eqn)
  return out


def _trips(eqn) -> int:
  """How often an equation runs its inner jaxpr: a scan's length, else once."""
  return int(eqn.params["length"]) if eqn.primitive.name == "scan" else 1


def jaxpr_macs(jaxpr) -> int:
  """Multiply-adds of one evaluation of `jaxpr` (a scan's body once per step, other inner
  jaxprs once)."""
  return sum(_eqn_macs(e) for e in jaxpr.eqns)


def _dependent_outputs(jaxpr, dependent: list) -> list:
  """Which outputs of `jaxpr` depend on the inputs flagged `dependent`."""
  dep = {v for v, d in zip(jaxpr.invars, dependent) if d}
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jcore.Literal) and v in dep for v in eqn.invars):
      dep.update(eqn.outvars)
  return [not isinstance(v, jcore.Literal) and v in dep for v in jaxpr.outvars]


def _scan_dependence(eqn, dependent: list) -> list:
  """A scan body's dependent inputs at the fixed point of its carry: a recurrent state that
  starts independent of the parameters (zeros) depends on them from the second step on."""
  n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
  body = eqn.params["jaxpr"].jaxpr
  dependent = list(dependent)
  while True:
    out = _dependent_outputs(body, dependent)
    carry = dependent[n_consts:n_consts + n_carry]
    grown = [c or o for c, o in zip(carry, out[:n_carry])]
    if grown == carry:
      return dependent
    dependent[n_consts:n_consts + n_carry] = grown


def backward_macs(jaxpr, dependent: list, chain: list) -> int:
  """Multiply-adds of propagating one cotangent from the outputs to every use of a
  parameter: only equations with a parameter-dependent input are visited, and only
  operands that depend on parameters without being a parameter chain need a cotangent
  (chains receive the structured Jacobian instead)."""
  dep = {v for v, d in zip(jaxpr.invars, dependent) if d}
  chains, _ = interp.static_chains(jaxpr, chain)
  lit = lambda v: isinstance(v, jcore.Literal)
  total = 0
  for eqn in jaxpr.eqns:
    in_dep = [not lit(v) and v in dep for v in eqn.invars]
    if not any(in_dep):
      continue
    dep.update(eqn.outvars)
    inner = interp.inner_jaxpr(eqn)
    if inner is not None and len(eqn.invars) >= len(inner[0].invars):
      extra = len(eqn.invars) - len(inner[0].invars)
      inner_dep = in_dep[extra:]
      if eqn.primitive.name == "scan":
        inner_dep = _scan_dependence(eqn, inner_dep)
      total += _trips(eqn) * backward_macs(
          inner[0], inner_dep, [not lit(v) and v in chains for v in eqn.invars][extra:])
      continue
    needs = sum(d and v not in chains for v, d in zip(eqn.invars, in_dep))
    if not needs:
      continue
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      total += needs * _eqn_macs(eqn)
    else:
      total += sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
  return total


def estimate_flops(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2
                   ) -> dict[str, Any]:
  """Estimated FLOPs of `structured.ntk` with these arguments (same signature).

  Returns a dict: "total", "forward", "cotangents", "contraction" (FLOPs) and "plans", a list
  over (parameter leaf, output leaf) of (leaf index, output index, "structured" or
  "jacobian", FLOPs). Shapes are all that is used; arrays may be ShapeDtypeStructs
  (params, x1, x2) as long as `f` can be traced on them.
  """
  setting = core._setup(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2)
  prep1, prep2 = setting.prep1, setting.prep2
  found = core._chunk_counts(setting)[2] or core._abstract_plans(setting, False)
  plans = [(leaf, k, plan.method, 2 * plan.cost)
           for (leaf, k), (plan, _, _) in sorted(found.items())]
  forward = cotangents = 0
  for prep, fx in ((prep1, fx1),) + (() if x2 is None else ((prep2, fx2),)):
    jaxpr, n_p = prep.traced.jaxpr, prep.traced.n_params
    n_in = len(jaxpr.invars)
    flags = [i < n_p for i in range(n_in)]
    entries = sum(int(np.size(o)) for o in jax.tree.leaves(fx)) // max(prep.n, 1)
    forward += 2 * jaxpr_macs(jaxpr) * prep.n
    cotangents += 2 * backward_macs(jaxpr, flags, flags) * prep.n * entries
  contraction = sum(p[3] for p in plans)
  return {"total": forward + cotangents + contraction, "forward": forward,
          "cotangents": cotangents, "contraction": contraction, "plans": plans}
