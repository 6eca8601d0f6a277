"""Static proof that `f(params, x)` treats examples independently (so `vmap_axes=0` is safe).

The jaxpr of `f` is walked once with an abstract state per variable:
  * `Example(k)`: axis k indexes examples and entry i depends on example i only;
  * `Constant(uniform)`: does not depend on x; `uniform` lists axes along which the value is
    known to be constant (they came from broadcasting), so combining it with an example axis
    there keeps examples apart;
  * `MIXED`: may combine several examples.
Each primitive maps input states to output states. Anything without a rule, or any doubt,
gives MIXED: the analysis may miss independence (then the default path is slower) but never
claims it falsely. It is what lets `empirical_ntk_fn(f)` with default arguments take the
per-example path.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Example:
  axis: int


@dataclasses.dataclass(frozen=True)
class Constant:
  uniform: frozenset


MIXED = "mixed"
State = Any

_ELEMENTWISE = set("""
abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type copy
copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag integer_pow
is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real
reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh xor
shift_left shift_right_logical shift_right_arithmetic population_count clz stop_gradient
""".split())
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
               "reduce_or", "reduce_xor", "argmax", "argmin"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}


def _shape(v) -> tuple:
  return tuple(getattr(v.aval, "shape", ()))


def _const_uniform(state: Constant, shape: tuple, out_shape: tuple) -> frozenset:
  """Axes along which an elementwise operand is constant, size-1 broadcasting included."""
  if len(shape) != len(out_shape):
    return frozenset()
  return state.uniform | {a for a, s in enumerate(shape) if s == 1 and out_shape[a] != 1}


def _elementwise(states, shapes, out_shape) -> State:
  axes = {s.axis for s in states if isinstance(s, Example)}
  if not axes:
    uniform = functools.reduce(frozenset.__and__, [
        _const_uniform(s, sh, out_shape) for s, sh in zip(states, shapes)
        if isinstance(s, Constant) and len(sh)], frozenset(range(len(out_shape))))
    return Constant(uniform)
  if len(axes) > 1:
    return MIXED
  k = axes.pop()
  for s, sh in zip(states, shapes):
    if isinstance(s, Example) and sh[k] != out_shape[k]:
      return MIXED
    if isinstance(s, Constant) and len(sh) and k not in _const_uniform(s, sh, out_shape):
      return MIXED
  return Example(k)


def _reshape(k: int, shape: tuple, new: tuple) -> State:
  before = math.prod(shape[:k])
  prods = np.cumprod((1,) + tuple(new))
  for j in range(len(new)):
    if prods[j] == before and new[j] == shape[k]:
      return Example(j)
  return MIXED


def _dot_general(eqn, states, shapes) -> State:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ls, rs = states
  lshape, rshape = shapes
  lfree = [a for a in range(len(lshape)) if a not in lc and a not in lb]
  rfree = [a for a in range(len(rshape)) if a not in rc and a not in rb]
  # Output: batch dims, then lhs free, then rhs free.
  if isinstance(ls, Example) and isinstance(rs, Example):
    if ls.axis in lb and rs.axis in rb and lb.index(ls.axis) == rb.index(rs.axis):
      return Example(lb.index(ls.axis))
    return MIXED
  for side, (s, c, b, free, other, offset) in enumerate((
      (ls, lc, lb, lfree, rs, len(lb)), (rs, rc, rb, rfree, ls, len(lb) + len(lfree)))):
    if not isinstance(s, Example):
      continue
    if s.axis in c:
      return MIXED
    if s.axis in b:
      ob = (rb if side == 0 else lb)[b.index(s.axis)]
      if not isinstance(other, Constant) or ob not in other.uniform:
        return MIXED
      return Example(b.index(s.axis))
    return Example(offset + free.index(s.axis))
  uniform = {i for i, (a, b) in enumerate(zip(lb, rb)) if a in ls.uniform and b in rs.uniform}
  for s, free, offset in ((ls, lfree, len(lb)), (rs, rfree, len(lb) + len(lfree))):
    uniform |= {offset + i for i, a in enumerate(free) if a in s.uniform}
  return Constant(frozenset(uniform))


def _conv(eqn, states) -> State:
  ls, rs = states
  if isinstance(rs, Example) or not isinstance(ls, Example):
    return MIXED if isinstance(rs, Example) else Constant(frozenset())
  dn = eqn.params["dimension_numbers"]
  if eqn.params.get("batch_group_count", 1) != 1 or ls.axis != dn.lhs_spec[0]:
    return MIXED
  return Example(dn.out_spec[0])


def _gather(eqn, states, shapes) -> State:
  operand, indices = states
  dn = eqn.params["dimension_numbers"]
  if isinstance(operand, Example) or not isinstance(indices, Example):
    return MIXED if isinstance(operand, Example) else Constant(frozenset())
  if getattr(dn, "operand_batching_dims", ()) or indices.axis == len(shapes[1]) - 1:
    return MIXED
  out_rank = len(eqn.outvars[0].aval.shape)
  batch_positions = [a for a in range(out_rank) if a not in dn.offset_dims]
  return Example(batch_positions[indices.axis])


def _join(a: State, b: State) -> State:
  """A state that holds for values of either state (a loop carry before and after a step)."""
  if a == b:
    return a
  if a == MIXED or b == MIXED:
    return MIXED
  if isinstance(a, Constant) and isinstance(b, Constant):
    return Constant(a.uniform & b.uniform)
  ex, other = (a, b) if isinstance(a, Example) else (b, a)
  # A constant that is uniform along the example axis is trivially per-example there.
  if isinstance(other, Constant) and ex.axis in other.uniform:
    return ex
  return MIXED


def _scan(eqn, states) -> list[State]:
  """Body states of `scan` at the fixed point of its carry (a loop over time steps: the
  scanned axis 0 of xs and ys is not the example axis unless the scan runs over examples)."""
  p = eqn.params
  body = p["jaxpr"].jaxpr
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts, carry = list(states[:n_consts]), list(states[n_consts:n_consts + n_carry])

  def sliced(s):
    if isinstance(s, Example):
      return MIXED if s.axis == 0 else Example(s.axis - 1)
    return s if s == MIXED else Constant(frozenset(a - 1 for a in s.uniform if a > 0))

  xs = [sliced(s) for s in states[n_consts + n_carry:]]
  for _ in range(8):   # each round can only coarsen a carry state: few rounds suffice
    outs = _walk(body, consts + carry + xs)
    joined = [_join(c, o) for c, o in zip(carry, outs[:n_carry])]
    if joined == carry:
      break
    carry = joined
  else:
    return [MIXED] * len(eqn.outvars)

  def stacked(s):
    if isinstance(s, Example):
      return Example(s.axis + 1)
    return s if s == MIXED else Constant(frozenset(a + 1 for a in s.uniform))

  return carry + [stacked(s) for s in outs[n_carry:]]


def _transfer(eqn, states) -> list[State]:
  name = eqn.primitive.name
  shapes = [_shape(v) for v in eqn.invars]
  out_shapes = [_shape(v) for v in eqn.outvars]
  p = eqn.params
  if name == "scan" and len(p["jaxpr"].jaxpr.invars) == len(states):
    return _scan(eqn, states)
  if name in _CALLS and _CALLS[name] in p:
    sub = p[_CALLS[name]]
    sub = getattr(sub, "jaxpr", sub)
    if len(sub.invars) != len(states):
      return [MIXED] * len(eqn.outvars)
    return _walk(sub, states)
  if any(s == MIXED for s in states):
    return [MIXED] * len(eqn.outvars)
  if not any(isinstance(s, Example) for s in states):
    if name == "broadcast_in_dim":
      dims = p["broadcast_dimensions"]
      kept = {dims[a] for a in states[0].uniform} if states else set()
      new = {a for a in range(len(out_shapes[0])) if a not in dims}
      grown = {dims[a] for a, s in enumerate(shapes[0]) if s == 1 and out_shapes[0][dims[a]] != 1}
      return [Constant(frozenset(kept | new | grown))]
    if name in _ELEMENTWISE:
      return [_elementwise(states, shapes, out_shapes[0])]
    if name == "dot_general":  # e.g. a recurrent state broadcast over the batch times W_h
      return [_dot_general(eqn, states, shapes)]
    return [Constant(frozenset())] * len(eqn.outvars)
  if name in _ELEMENTWISE:
    return [_elementwise(states, shapes, out_shapes[0])] * len(eqn.outvars)
  k = next(s.axis for s in states if isinstance(s, Example))
  if name == "broadcast_in_dim":
    j = p["broadcast_dimensions"][k]
    return [Example(j) if out_shapes[0][j] == shapes[0][k] else MIXED]
  if name == "reshape":
    return [_reshape(k, shapes[0], out_shapes[0])]
  if name == "transpose":
    return [Example(list(p["permutation"]).index(k))]
  if name == "squeeze":
    dims = [d % len(shapes[0]) for d in p["dimensions"]]
    return [MIXED if k in dims else Example(k - sum(d < k for d in dims))]
  if name in _REDUCTIONS:
    axes = p["axes"]
    return [MIXED if k in axes else Example(k - sum(a < k for a in axes))] * len(eqn.outvars)
  if name == "split":   # e.g. a GRU's gates from one fused matmul
    return [MIXED if p["axis"] == k else Example(k)] * len(eqn.outvars)
  if name in _CUMULATIVE:
    return [MIXED if p["axis"] == k else Example(k)]
  if name == "dot_general":
    return [_dot_general(eqn, states, shapes)]
  if name == "conv_general_dilated":
    return [_conv(eqn, states)]
  if name == "gather":
    return [_gather(eqn, states, shapes)]
  if name == "concatenate":
    if p["dimension"] == k or any(isinstance(s, Example) and s.axis != k for s in states):
      return [MIXED]
    return [_elementwise([s if isinstance(s, Example) else s for s in states],
                         [tuple(sh[:k]) + (out_shapes[0][k],) + tuple(sh[k + 1:])
                          for sh in shapes], out_shapes[0])]
  if name == "pad":
    lo, hi, interior = p["padding_config"][k]
    return [Example(k) if (lo, hi, interior) == (0, 0, 0) and
            isinstance(states[1], Constant) else MIXED]
  if name == "slice":
    start, limit = p["start_indices"][k], p["limit_indices"][k]
    strides = p["strides"] or [1] * len(shapes[0])
    return [Example(k) if (start, limit, strides[k]) == (0, shapes[0][k], 1) else MIXED]
  if name == "sort":
    return [MIXED if p["dimension"] == k else Example(k)] * len(eqn.outvars)
  return [MIXED] * len(eqn.outvars)


def _walk(jaxpr, in_states: Sequence[State]) -> list[State]:
  env: dict = {}

  def read(v):
    if isinstance(v, jex.core.Literal):
      return Constant(frozenset(range(len(_shape(v)))))
    return env.get(v, Constant(frozenset()))

  for v, s in zip(jaxpr.invars, in_states):
    env[v] = s
  for v in jaxpr.constvars:
    env[v] = Constant(frozenset())
  for eqn in jaxpr.eqns:
    outs = _transfer(eqn, [read(v) for v in eqn.invars])
    for v, s in zip(eqn.outvars, outs):
      env[v] = s
  return [read(v) for v in jaxpr.outvars]


def _matches(big: Any, small: Any, n: int, shape_like: bool) -> bool:
  """Whether a value of the batch-`n` trace equals its batch-1 counterpart, allowing n → 1 in
  shape-like integers (shapes, sizes) but not in literal operands."""
  if isinstance(big, jex.core.ClosedJaxpr) or isinstance(big, jex.core.Jaxpr):
    return type(big) is type(small) and _same_program(big, small, n)
  if isinstance(big, (tuple, list)):
    return (isinstance(small, (tuple, list)) and len(big) == len(small)
            and all(_matches(a, b, n, shape_like) for a, b in zip(big, small)))
  if isinstance(big, np.ndarray) or isinstance(small, np.ndarray):
    big, small = np.asarray(big), np.asarray(small)
    return big.shape == small.shape and big.dtype == small.dtype and bool(
        np.array_equal(big, small, equal_nan=True))
  if isinstance(big, (int, np.integer)) and not isinstance(big, bool):
    return big == small or (shape_like and big == n and small == 1)
  if big is None or isinstance(big, (bool, float, complex, str, bytes, np.generic, np.dtype,
                                     enum.Enum)):
    return type(big) is type(small) and bool(big == small)
  # Rules and thunks (custom_jvp's jvp, custom_vjp's fwd/bwd) are new objects in every trace;
  # their primal computation is what is compared.
  return type(big) is type(small)


def _same_const(a: Any, b: Any, n: int) -> bool:
  if a is b:  # e.g. an array kwarg, traced by the enclosing jit: the same value in both
    return True
  if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
    return False
  return _matches(np.asarray(a), np.asarray(b), n, False)


def _same_program(big, small, n: int) -> bool:
  """Whether two jaxprs of `f`, traced at batch sizes n and 1, are the same program: the same
  equations wired the same way, equal literals and parameters, shapes equal up to n → 1."""
  if isinstance(big, jex.core.ClosedJaxpr):
    return (len(big.consts) == len(small.consts)
            and all(_same_const(a, b, n) for a, b in zip(big.consts, small.consts))
            and _same_program(big.jaxpr, small.jaxpr, n))
  ids_big: dict = {}
  ids_small: dict = {}

  def same_var(a, b) -> bool:
    if isinstance(a, jex.core.Literal) or isinstance(b, jex.core.Literal):
      return (isinstance(a, jex.core.Literal) and isinstance(b, jex.core.Literal)
              and _matches(np.asarray(a.val), np.asarray(b.val), n, False))
    if a.aval.dtype != b.aval.dtype or not _matches(_shape(a), _shape(b), n, True):
      return False
    return ids_big.setdefault(a, len(ids_big)) == ids_small.setdefault(b, len(ids_small))

  if (len(big.eqns) != len(small.eqns) or len(big.invars) != len(small.invars)
      or len(big.constvars) != len(small.constvars)
      or len(big.outvars) != len(small.outvars)):
    return False
  if not all(same_var(a, b) for a, b in zip(big.constvars + big.invars,
                                            small.constvars + small.invars)):
    return False
  for e, g in zip(big.eqns, small.eqns):
    if (e.primitive != g.primitive or len(e.invars) != len(g.invars)
        or len(e.outvars) != len(g.outvars) or set(e.params) != set(g.params)):
      return False
    if not all(same_var(a, b) for a, b in zip(e.invars, g.invars)):
      return False
    if not all(_matches(e.params[k], g.params[k], n, True) for k in e.params):
      return False
    if not all(same_var(a, b) for a, b in zip(e.outvars, g.outvars)):
      return False
  return all(same_var(a, b) for a, b in zip(big.outvars, small.outvars))


def is_per_example(f: Callable, params: PyTree, x: PyTree, kwargs: Optional[dict] = None,
                   axis: int = 0) -> bool:
  """True only if every output of `f(params, x, **kwargs)` provably depends, along `axis`,
  on the matching example of every input leaf alone (inputs and outputs batched on `axis`),
  and `f` run on one example (a batch of 1, as the per-example path runs it) is the same
  program: a function that reads the batch size as a value (`/ x.shape[0]`, a state sized by
  a configured batch, a branch on the batch size) is refused.
  Non-array kwargs are static; array kwargs are treated as shared, unbatched constants."""
  kwargs = kwargs or {}
  x_leaves = jax.tree.leaves(x)
  if not x_leaves or any(np.ndim(l) <= axis for l in x_leaves):
    return False
  n = {np.shape(l)[axis] for l in x_leaves}
  if len(n) != 1:
    return False
  n = n.pop()
  closed = jax.make_jaxpr(lambda p, xx: f(p, xx, **kwargs))(params, x)
  n_params = len(jax.tree.leaves(params))
  states = [Constant(frozenset())] * n_params + [Example(axis)] * len(x_leaves)
  outs = _walk(closed.jaxpr, states)
  if not all(isinstance(s, Example) and s.axis == axis and len(a.shape) > axis and
             a.shape[axis] == n for s, a in zip(outs, closed.out_avals)):
    return False
  if n == 1:
    return True
  one = jax.tree.map(lambda l: jax.ShapeDtypeStruct(
      np.shape(l)[:axis] + (1,) + np.shape(l)[axis + 1:], jnp.result_type(l)), x)
  try:
    single = jax.make_jaxpr(lambda p, xx: f(p, xx, **kwargs))(params, one)
  except Exception:  # noqa: BLE001 - f cannot even run on one example
    return False
  return (all(len(a.shape) > axis and a.shape[axis] == 1 for a in single.out_avals)
          and _same_program(closed, single, n))
