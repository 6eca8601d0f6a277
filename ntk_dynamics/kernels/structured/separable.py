"""Separable cotangents: ∂f_o/∂y = A[o, ·] ⊙ B[·] with A independent of the example.

Near the output of a network the cotangent of a layer often factorises: after a global
average pool and a dense head, the cotangent of the last conv output is
W_head[c, o] / S · relu'(·)[s, c] — an example-independent matrix A[o, c] times an
example-dependent mask B[s, c]. Written that way, the per-example Jacobian of that conv
kernel is A[o, c] · (patches ⊗ B)[k, c], formed once per example instead of once per output
entry, and the kernel contracts in O(N²·(K·C + O²·C)) instead of O(N·O·S·K·C).

`analyse` finds such cotangents by a static backward pass over the per-example jaxpr
(vmap_axes only), starting from the one-hot basis of one output leaf. It propagates
`Sep(A, B)` through: dense products with an example-independent operand (when B does not
involve the summed axes), elementwise operations (their diagonal derivative joins B, or A if
it does not depend on the example), additions, broadcasts, reductions, transposes and
size-1 reshapes. Anything else, or a variable with two differentiable consumers, is GENERAL:
those sites keep the cotangents of the VJP. `evaluate` computes A and the B factors from the
walk's primal values.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from ntk_dynamics.kernels.structured import interpreter as interp
from ntk_dynamics.kernels.structured import rules

GENERAL = "general"

_PASS = {"convert_element_type": 1.0, "copy": 1.0, "copy_p": 1.0, "neg": -1.0,
         "reduce_precision": 1.0}
_ADD = {"add": (1.0, 1.0), "add_any": (1.0, 1.0), "sub": (1.0, -1.0)}
# Complex parts are left out: their derivative is not a real diagonal factor.
_ELEMENTWISE = rules.ELEMENTWISE - {"real", "imag", "conj"}
_ZERO = frozenset({"stop_gradient", "sign", "floor", "ceil", "round"})


@dataclasses.dataclass(frozen=True)
class Sep:
  """ct[o, axes of y] = A[o, a_axes] · Π_f B_f[f.axes] (broadcast over missing axes)."""
  a_fn: Callable           # env -> array (O,) + y.shape[a_axes]
  a_axes: tuple            # sorted axes of y held by A
  b: tuple                 # ((fn env -> array y.shape[axes], sorted axes), ...)


# ----------------------------------------------------------------------- helpers


def _read(env, v):
  return v.val if isinstance(v, jcore.Literal) else env[v]


def _elementwise_call(eqn) -> bool:
  """A call (jit / custom_jvp / custom_vjp) whose body is purely elementwise."""
  inner = interp.inner_jaxpr(eqn)
  if inner is None:
    return False
  jaxpr = inner[0]
  for e in jaxpr.eqns:
    if e.primitive.name in _ELEMENTWISE:
      continue
    if (e.primitive.name in interp.INLINE_PRIMITIVES
        and e.primitive.name not in interp.REVERSE_ONLY_PRIMITIVES and _elementwise_call(e)):
      continue
    if e.primitive.name == "broadcast_in_dim" and not e.outvars[0].aval.shape == ():
      if all(s == 1 for s in e.invars[0].aval.shape):   # scalar constants broadcast
        continue
    return False
  return True


def _derivative_fn(eqn, p) -> Callable:
  """env -> ∂y/∂(operand p) of an elementwise equation, as an array of y's shape."""
  prim, params = eqn.primitive, eqn.primitive.get_bind_params(eqn.params)
  y_shape = tuple(eqn.outvars[0].aval.shape)

  def fn(env):
    args = [_read(env, v) for v in eqn.invars]

    def op(x):
      a = list(args)
      a[p] = x
      out = prim.bind(*a, **params)
      return out[0] if prim.multiple_results else out

    x0 = jnp.asarray(args[p])
    _, d = jax.jvp(op, (x0,), (jnp.ones_like(x0),))
    return jnp.broadcast_to(d, y_shape)

  return fn


def _times(sep: Sep, fn, axes, dependent: bool, y_shape) -> Sep:
  """sep ⊙ fn(env) (an array over `axes` of y)."""
  axes = tuple(sorted(axes))
  if dependent:
    return Sep(sep.a_fn, sep.a_axes, sep.b + ((fn, axes),))
  new_axes = tuple(sorted(set(sep.a_axes) | set(axes)))
  a_fn = sep.a_fn

  def a_new(env):
    a = _expand(a_fn(env), sep.a_axes, new_axes, lead=1)
    f = _expand(fn(env), axes, new_axes, lead=0)
    return a * f[None]

  return Sep(a_new, new_axes, sep.b)


def _expand(x, axes, target, lead):
  """x over `axes` (after `lead` leading axes) expanded with size-1 axes to `target`."""
  shape = list(x.shape[:lead])
  it = iter(x.shape[lead:])
  for a in target:
    shape.append(next(it) if a in axes else 1)
  return x.reshape(shape)


def _scale(sep: Sep, c: float) -> Sep:
  if c == 1.0:
    return sep
  a_fn = sep.a_fn
  return Sep(lambda env: a_fn(env) * c, sep.a_axes, sep.b)


def _sum_over(sep, axes, y_shape):
  """Σ over y axes `axes` (then absent from A and B), or GENERAL."""
  for ax in sorted(axes, reverse=True):
    in_a = ax in sep.a_axes
    with_b = [i for i, (_, ba) in enumerate(sep.b) if ax in ba]
    if in_a and with_b or len(with_b) > 1:
      return GENERAL
    if in_a:
      i = sep.a_axes.index(ax)
      a_fn = sep.a_fn
      sep = Sep(lambda env, a_fn=a_fn, i=i: jnp.sum(a_fn(env), axis=1 + i),
                tuple(a for a in sep.a_axes if a != ax), sep.b)
    elif with_b:
      j = with_b[0]
      fn, ba = sep.b[j]
      i = ba.index(ax)
      b = list(sep.b)
      b[j] = (lambda env, fn=fn, i=i: jnp.sum(fn(env), axis=i),
              tuple(a for a in ba if a != ax))
      sep = Sep(sep.a_fn, sep.a_axes, tuple(b))
    else:
      sep = _scale(sep, float(y_shape[ax]))
  return sep


def _remap(sep, mapping: dict):
  """Renames y axes to u axes (every axis still present must be mapped)."""
  def move(fn, axes, lead):
    new = [mapping[a] for a in axes]
    order = sorted(range(len(new)), key=lambda i: new[i])
    perm = list(range(lead)) + [lead + i for i in order]
    if perm == list(range(len(perm))):
      return fn, tuple(sorted(new))
    return (lambda env, fn=fn: jnp.transpose(fn(env), perm)), tuple(sorted(new))

  a_fn, a_axes = move(sep.a_fn, sep.a_axes, 1)
  b = tuple(move(fn, axes, 0) for fn, axes in sep.b)
  return Sep(a_fn, a_axes, b)


def _drop_size1(sep, axes, y_shape):
  """Removes size-1 axes from A and B (they carry nothing)."""
  for ax in axes:
    assert y_shape[ax] == 1
  return _sum_over(sep, axes, y_shape)


# ----------------------------------------------------------------------- transfer rules


def _transfer(eqn, p, ct, dep: set):
  """ct of operand p given the output cotangent (single-output equations)."""
  name = eqn.primitive.name
  if name in _ZERO:
    return None
  if ct is GENERAL or len(eqn.outvars) != 1:
    return GENERAL
  y = eqn.outvars[0]
  u = eqn.invars[p]
  y_shape, u_shape = tuple(y.aval.shape), tuple(u.aval.shape)
  is_dep = lambda v: not isinstance(v, jcore.Literal) and v in dep

  def unbroadcast(sep):
    """ct of an operand that was broadcast (size-1 axes or a scalar) into y."""
    if u_shape == y_shape:
      return sep
    if len(u_shape) == 0:
      return _sum_over(sep, range(len(y_shape)), y_shape) if sep is not GENERAL else GENERAL
    if len(u_shape) != len(y_shape):
      return GENERAL
    axes = [a for a in range(len(y_shape)) if u_shape[a] != y_shape[a]]
    return _sum_over(sep, axes, y_shape)

  if name in _PASS:
    return _scale(ct, _PASS[name]) if u_shape == y_shape else GENERAL
  if name in _ADD and len(eqn.invars) == 2:
    return unbroadcast(_scale(ct, _ADD[name][p]))
  if name in ("mul", "div") and len(eqn.invars) == 2 and not (name == "div" and p == 1):
    v = eqn.invars[1 - p]
    v_shape = tuple(v.aval.shape)
    if len(v_shape) not in (0, len(y_shape)):
      return GENERAL
    axes = tuple(a for a in range(len(v_shape)) if v_shape[a] == y_shape[a] != 1)
    squeeze = tuple(a for a in range(len(v_shape)) if a not in axes)

    def factor(env, v=v, squeeze=squeeze, inv=(name == "div")):
      x = jnp.asarray(_read(env, v))
      x = jnp.squeeze(x, squeeze) if squeeze and x.ndim else x
      return 1 / x if inv else x

    return unbroadcast(_times(ct, factor, axes, is_dep(v), y_shape))
  # An elementwise custom_vjp call's diagonal derivative cannot be taken by `jax.jvp`: GENERAL
  # keeps its cotangents from the VJP, which applies the call's own rule.
  if (name in _ELEMENTWISE or (name in interp.INLINE_PRIMITIVES
                               and name not in interp.REVERSE_ONLY_PRIMITIVES
                               and _elementwise_call(eqn))):
    if u_shape != y_shape:
      return GENERAL
    dependent = any(is_dep(v) for v in eqn.invars)
    return _times(ct, _derivative_fn(eqn, p), range(len(y_shape)), dependent, y_shape)
  if name == "dot_general" and len(eqn.invars) == 2:
    return _dot_general(eqn, p, ct, dep)
  if name == "reduce_sum":
    axes = tuple(a % len(u_shape) for a in eqn.params["axes"])
    kept = [a for a in range(len(u_shape)) if a not in axes]
    return _remap(ct, {i: a for i, a in enumerate(kept)})
  if name == "broadcast_in_dim" and len(eqn.invars) == 1:
    bd = eqn.params["broadcast_dimensions"]
    summed = [a for a in range(len(y_shape)) if a not in bd]
    summed += [bd[j] for j in range(len(u_shape)) if u_shape[j] != y_shape[bd[j]]]
    sep = _sum_over(ct, summed, y_shape)
    if sep is GENERAL:
      return GENERAL
    return _remap(sep, {bd[j]: j for j in range(len(u_shape))})
  if name == "transpose":
    perm = eqn.params["permutation"]
    return _remap(ct, {i: perm[i] for i in range(len(perm))})
  if name == "squeeze":
    dims = sorted(a % len(u_shape) for a in eqn.params["dimensions"])
    kept = [a for a in range(len(u_shape)) if a not in dims]
    return _remap(ct, {i: a for i, a in enumerate(kept)})
  if name == "reshape" and eqn.params.get("dimensions") is None:
    yi = [a for a in range(len(y_shape)) if y_shape[a] != 1]
    ui = [a for a in range(len(u_shape)) if u_shape[a] != 1]
    if [y_shape[a] for a in yi] == [u_shape[a] for a in ui]:
      sep = _drop_size1(ct, [a for a in range(len(y_shape)) if y_shape[a] == 1], y_shape)
      return _remap(sep, dict(zip(yi, ui)))
    if ct.b:
      return GENERAL
    a_fn, a_axes = ct.a_fn, ct.a_axes

    def a_new(env):
      a = _expand(a_fn(env), a_axes, tuple(range(len(y_shape))), lead=1)
      a = jnp.broadcast_to(a, a.shape[:1] + y_shape)
      return a.reshape(a.shape[:1] + u_shape)

    return Sep(a_new, tuple(range(len(u_shape))), ())
  return GENERAL


def _dot_general(eqn, p, ct, dep):
  """ct of operand p of y = dot_general(lhs, rhs) when the other operand does not depend
  on the example and B involves only axes y shares with operand p."""
  w = eqn.invars[1 - p]
  if not isinstance(w, jcore.Literal) and w in dep:
    return GENERAL
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  shapes = [tuple(v.aval.shape) for v in eqn.invars]
  contract, batch = (lc, rc), (lb, rb)
  # y axes: batch, lhs free, rhs free.
  free = [[a for a in range(len(shapes[i])) if a not in contract[i] + batch[i]]
          for i in (0, 1)]
  y_from = ([("b", i) for i in range(len(lb))] + [(0, a) for a in free[0]]
            + [(1, a) for a in free[1]])
  other = 1 - p
  for _, axes in ct.b:
    if any(y_from[a][0] == other for a in axes):
      return GENERAL
  # Labels for an einsum: A (o + a_axes of y) with W -> ct_u (o + axes of u).
  letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
  op_labels = [[None] * len(shapes[0]), [None] * len(shapes[1])]
  for i in range(len(lb)):
    l = next(letters)
    op_labels[0][lb[i]] = op_labels[1][rb[i]] = l
  for i in range(len(lc)):
    l = next(letters)
    op_labels[0][lc[i]] = op_labels[1][rc[i]] = l
  for i in (0, 1):
    for a in free[i]:
      op_labels[i][a] = next(letters)
  y_labels = ([op_labels[0][a] for a in lb] + [op_labels[0][a] for a in free[0]]
              + [op_labels[1][a] for a in free[1]])
  o = next(letters)
  a_in = o + "".join(y_labels[a] for a in ct.a_axes)
  w_labels = "".join(op_labels[other])
  u_labels = op_labels[p]
  present = set(a_in) | set(w_labels)
  u_axes = tuple(a for a in range(len(u_labels)) if u_labels[a] in present)
  spec = f"{a_in},{w_labels}->{o}{''.join(u_labels[a] for a in u_axes)}"
  a_fn = ct.a_fn

  def a_new(env):
    return jnp.einsum(spec, a_fn(env), jnp.asarray(_read(env, w)))

  mapping = {}
  for ya, (src, a) in enumerate(y_from):
    if src == "b":
      mapping[ya] = batch[p][a]
    elif src == p:
      mapping[ya] = a
  b = []
  for fn, axes in ct.b:
    moved = _remap(Sep(lambda env: None, (), ((fn, axes),)), mapping).b[0]
    b.append(moved)
  return Sep(a_new, u_axes, tuple(b))


# ----------------------------------------------------------------------- analysis


def example_dependent(jaxpr, data_invars) -> set:
  dep = set(data_invars)
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jcore.Literal) and v in dep for v in eqn.invars):
      dep.update(eqn.outvars)
  return dep


def analyse(jaxpr, n_params: int, k: int) -> dict:
  """Var -> Sep for the cotangents of output leaf k that factorise (top-level vars)."""
  dep = example_dependent(jaxpr, jaxpr.invars[n_params:])
  out = jaxpr.outvars[k]
  if isinstance(out, jcore.Literal) or sum(v is out for v in jaxpr.outvars) != 1:
    return {}
  shape = tuple(out.aval.shape)
  size = math.prod(shape)
  basis = Sep(lambda env: jnp.eye(size, dtype=out.aval.dtype).reshape((size,) + shape),
              tuple(range(len(shape))), ())
  contrib: dict = {out: [basis]}
  result: dict = {}

  def resolve(v):
    if v in result:
      return result[v]
    cs = contrib.get(v, [])
    r = None if not cs else (cs[0] if len(cs) == 1 else GENERAL)
    result[v] = r
    return r

  for eqn in reversed(jaxpr.eqns):
    cts = [resolve(v) for v in eqn.outvars]
    if all(c is None for c in cts):
      continue
    for p, u in enumerate(eqn.invars):
      if isinstance(u, jcore.Literal) or not jnp.issubdtype(u.aval.dtype, jnp.inexact):
        continue
      if len(eqn.outvars) != 1:
        c = GENERAL
      else:
        try:
          c = _transfer(eqn, p, cts[0], dep)
        except Exception:  # any doubt: not separable
          c = GENERAL
      if c is not None:
        contrib.setdefault(u, []).append(c)
  for v in contrib:
    resolve(v)
  return {v: s for v, s in result.items() if isinstance(s, Sep)}


def evaluate(sep: Sep, env) -> tuple:
  """(A, [B factors]) arrays for a separable cotangent."""
  return sep.a_fn(env), [fn(env) for fn, _ in sep.b]
