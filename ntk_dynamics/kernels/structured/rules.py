"""Structure rules: the derivative of one equation w.r.t. one parameter operand, as a Term.

A term writes the per-output-entry Jacobian of a parameter use as a small tensor network:

    J(o)[θ] = scale · Σ  ct(o)[ct_labels] · Π_f factor_f[labels_f]

summed over every label that is not one of θ's `groups`. `ct` is ∂f/∂y for the site output y
(optionally reshaped to split an axis, e.g. conv feature groups), factors are primal arrays
recorded during the forward pass (the other operand of a dot_general, conv patches, the
elementwise derivative, token ids). `groups[i]` lists the labels whose row-major flattening
is axis i of the *stop space*: θ itself when every structural step between θ and the use
could be pushed into labels (transpose, broadcast, size-1 reshapes, dtype casts), else the
output of the last step that could not (`prefix` maps the stop space back to θ).

Two terms whose stop spaces coincide (same `pair_key`) can be contracted against each other
without forming either Jacobian: the network of both sides, with their group labels
identified, is contracted in the cheapest order (network.py). Otherwise, and whenever it is
cheaper, each term is materialised as a per-entry Jacobian and those are contracted.

Factors of kind "index" are token ids of an embedding lookup: the one-hot matrix they stand
for is never formed when both sides are lookups (the pair becomes an ids1 == ids2 mask).

A primitive without a rule gets a *generic* term: its Jacobian is materialised exactly by the
primitive's own VJP, then pulled back through the chain to θ.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_dynamics.kernels.structured import interpreter as interp

# Float outputs that do not depend differentiably on their inputs.
ZERO_DERIVATIVE = frozenset({"stop_gradient", "sign", "floor", "ceil", "round",
                             "is_finite", "random_bits", "iota"})

# Elementwise primitives (operands of equal rank, size-1 axes broadcast, or scalars): the
# derivative w.r.t. one operand is a diagonal, obtained by one JVP with a ones tangent.
ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "neg", "mul", "div", "max", "min", "pow", "integer_pow",
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan",
    "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt",
    "cbrt", "abs", "square", "erf", "erfc", "erf_inv", "lgamma", "digamma", "atan2",
    "select_n", "clamp", "rem", "reduce_precision", "convert_element_type", "copy",
    "copy_p", "real", "imag", "conj",
})

# Structural or reduction primitives whose exact Jacobian is as cheap as it gets when
# materialised from their VJP: handled silently by the generic path.
MATERIALISED = frozenset({
    "concatenate", "pad", "slice", "dynamic_slice", "dynamic_update_slice", "rev",
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "cumsum", "cumprod", "cummax",
    "cummin", "cumlogsumexp", "gather", "scatter", "scatter-add", "scatter_add",
    "reshape", "transpose", "squeeze", "broadcast_in_dim", "expand_dims",
    "conv_general_dilated", "dot_general", "argmax", "argmin", "sort", "select_and_gather_add",
    "reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window",
    "split",
})


@dataclasses.dataclass(frozen=True)
class Factor:
  slot: int                     # index into the recorded auxiliary arrays
  labels: tuple
  kind: str = "dense"           # "dense" or "index"
  idx_labels: tuple = ()        # index: the θ labels the ids select (start_index_map order)
  bounds: tuple = ()            # index: θ's size along each of those axes
  clip: bool = True             # index: clip out-of-range ids (else they select nothing)


@dataclasses.dataclass(frozen=True)
class Generic:
  """Exact materialisation of one use through the primitive's VJP."""
  primitive: Any
  params: dict
  operands: tuple               # ("slot", i) for recorded arrays or ("lit", value)
  position: int
  out_positions: tuple
  steps: tuple                  # the whole chain θ -> operand


@dataclasses.dataclass
class Term:
  leaf: int
  site: int
  ct_shape: Optional[tuple]     # None: site output shapes (all perturbed outputs, generic)
  ct_labels: tuple
  factors: tuple
  scale: float
  groups: tuple                 # per stop-space axis: tuple of labels
  sizes: dict
  stop_shape: tuple
  prefix: tuple                 # chain steps θ -> stop space
  leaf_shape: tuple
  leaf_dtype: Any
  pair_key: Optional[tuple]     # terms with equal keys can be paired structurally
  generic: Optional[Generic] = None
  rule: str = ""

  @property
  def einsum(self) -> bool:
    return self.generic is None

  @property
  def group_labels(self) -> tuple:
    return tuple(l for g in self.groups for l in g)


class _Labels:
  def __init__(self):
    self._it = itertools.count()
    self.sizes: dict = {}

  def new(self, size) -> int:
    l = next(self._it)
    self.sizes[l] = int(size)
    return l


# ------------------------------------------------------------------ pushing chain steps


def _push_step(step: interp.Step, groups: list, sizes: dict) -> Optional[list]:
  """Groups of the step's input axes given those of its output, or None if not pushable."""
  name, params = step.name, dict(step.params)
  if name in ("convert_element_type", "copy", "copy_p"):
    return list(groups)
  if name == "transpose":
    perm = params["permutation"]
    out = [None] * len(perm)
    for i, p in enumerate(perm):
      out[p] = groups[i]
    return out
  if name == "broadcast_in_dim":
    bd = params["broadcast_dimensions"]
    out = []
    for j, d in enumerate(bd):
      if step.in_shape[j] == step.out_shape[d]:
        out.append(groups[d])
      else:  # size-1 axis broadcast: its labels are summed
        out.append(())
    return out
  if name == "squeeze":
    dims = sorted(a % len(step.in_shape) for a in params["dimensions"])
    out, it = [], iter(groups)
    for a in range(len(step.in_shape)):
      out.append(() if a in dims else next(it))
    return out
  if name == "reshape":
    if params.get("dimensions") is not None:
      return None
    ins = [a for a, s in enumerate(step.in_shape) if s != 1]
    outs = [a for a, s in enumerate(step.out_shape) if s != 1]
    if [step.in_shape[a] for a in ins] != [step.out_shape[a] for a in outs]:
      return None
    out = [()] * len(step.in_shape)
    for a, b in zip(ins, outs):
      out[a] = groups[b]
    return out
  return None


_BIJECTIVE = frozenset({"convert_element_type", "copy", "copy_p", "transpose", "reshape",
                        "squeeze"})


def _finish(term_args: dict, steps: tuple, groups: list, leaf_shape, leaf_dtype,
            push: bool = True) -> dict:
  """Pushes the chain into the groups; fills stop space, prefix and pair key."""
  sizes = term_args["sizes"]
  i = len(steps)
  while push and i > 0:
    new = _push_step(steps[i - 1], groups, sizes)
    if new is None:
      break
    groups = new
    i -= 1
  prefix = tuple(steps[:i])
  stop_shape = tuple(steps[i - 1].out_shape) if i > 0 else tuple(leaf_shape)
  groups = tuple(tuple(g) for g in groups)
  for g, s in zip(groups, stop_shape):
    assert math.prod(sizes[l] for l in g) == s, (groups, stop_shape)
  if push and all(st.name in _BIJECTIVE for st in prefix):
    key = (tuple(st.key() for st in prefix),
           tuple(tuple(sizes[l] for l in g) for g in groups))
  else:
    key = None
  term_args.update(groups=groups, prefix=prefix, stop_shape=stop_shape, pair_key=key,
                   leaf_shape=tuple(leaf_shape), leaf_dtype=leaf_dtype)
  return term_args


# ------------------------------------------------------------------ the rules


class Rules:
  """Callable used by the walk: adds the term(s) of one use to the walk state."""

  def __call__(self, state, eqn, site, pos, chain, invals, chains):
    name = eqn.primitive.name
    if name in ZERO_DERIVATIVE:
      return
    shape, dtype = state.leaf_avals[chain.leaf]
    out = None
    try:
      if name == "dot_general":
        out = _dot_general(state, eqn, site, pos, invals)
      elif name == "conv_general_dilated" and pos == 1:
        out = _conv(state, eqn, site, invals)
      elif name in ELEMENTWISE and len(eqn.outvars) == 1:
        out = _elementwise(state, eqn, site, pos, invals)
      elif name == "gather" and pos == 0:
        out = _gather(state, eqn, site, invals)
    except _NoRule:
      out = None
    if out is None:
      if (name not in MATERIALISED and name not in ELEMENTWISE
          and name not in interp.CUSTOM_RULE_PRIMITIVES):
        state.fallbacks.append(name)
      out = _generic(state, eqn, site, pos, invals)
    if out is None:
      return
    args, groups = out
    args.setdefault("rule", name)
    args = _finish(args, chain.steps, groups, shape, dtype,
                   push=args.get("generic") is None)
    state.terms.append(Term(leaf=chain.leaf, site=site.index, **args))

  def identity(self, state, value, chain):
    """A chain returned as an output: y = v, J = ct."""
    shape, dtype = state.leaf_avals[chain.leaf]
    vshape = tuple(np.shape(value))
    site = interp.Site(len(state.sites), "identity", [(vshape, jnp.result_type(value))], [0])
    state.sites.append(site)
    if state.deltas is not None:
      value = value + state.deltas[site.index][0].astype(jnp.result_type(value))
    lab = _Labels()
    ls = [lab.new(s) for s in vshape]
    args = dict(ct_shape=vshape, ct_labels=tuple(ls), factors=(), scale=1.0,
                sizes=lab.sizes, rule="identity")
    args = _finish(args, chain.steps, [(l,) for l in ls], shape, dtype)
    state.terms.append(Term(leaf=chain.leaf, site=site.index, **args))
    return value


class _NoRule(Exception):
  pass


def _single_out(eqn, site):
  if len(site.out_avals) != 1 or len(eqn.outvars) != 1:
    raise _NoRule
  return tuple(site.out_avals[0][0])


def _dot_general(state, eqn, site, pos, invals):
  y_shape = _single_out(eqn, site)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs_shape, rhs_shape = np.shape(invals[0]), np.shape(invals[1])
  lab = _Labels()
  L = [lab.new(s) for s in lhs_shape]
  R = [None] * len(rhs_shape)
  for a, b in zip(lc, rc):
    R[b] = L[a]
  for a, b in zip(lb, rb):
    R[b] = L[a]
  for b in range(len(rhs_shape)):
    if R[b] is None:
      R[b] = lab.new(rhs_shape[b])
  y_labels = ([L[a] for a in lb] + [L[a] for a in range(len(lhs_shape)) if a not in lc + lb]
              + [R[b] for b in range(len(rhs_shape)) if b not in rc + rb])
  assert tuple(lab.sizes[l] for l in y_labels) == y_shape
  other = 1 - pos
  slot = state.record(invals[other])
  factors = (Factor(slot, tuple(L if other == 0 else R)),)
  groups = [(l,) for l in (L if pos == 0 else R)]
  return dict(ct_shape=y_shape, ct_labels=tuple(y_labels), factors=factors, scale=1.0,
              sizes=lab.sizes), groups


def _conv(state, eqn, site, invals):
  y_shape = _single_out(eqn, site)
  p = eqn.params
  lhs, rhs = invals
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  G, B = p["feature_group_count"], p["batch_group_count"]
  if G > 1 and B > 1:
    raise _NoRule
  rhs_shape = np.shape(rhs)
  filt = tuple(rhs_shape[d] for d in rhs_spec[2:])
  # Patches, channels last: (N, out spatial..., prod(filt), C_in).
  x = jnp.transpose(lhs, (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))
  patches = _patches(x, filt, p["window_strides"], p["padding"], p["lhs_dilation"],
                     p["rhs_dilation"])
  n_l, cin = x.shape[0], x.shape[-1]
  cout = rhs_shape[rhs_spec[0]]
  out_sp = tuple(patches.shape[1:-2])
  lab = _Labels()
  S = [lab.new(s) for s in out_sp]
  K = [lab.new(s) for s in filt]
  if G > 1:
    g, cig, cog = lab.new(G), lab.new(cin // G), lab.new(cout // G)
    nb = lab.new(n_l)
    pshape = (n_l,) + out_sp + filt + (G, cin // G)
    plabels = (nb,) + tuple(S) + tuple(K) + (g, cig)
    feat_ct, feat_k, cin_k = (g, cog), (g, cog), (cig,)
  elif B > 1:
    g, cob, ci = lab.new(B), lab.new(cout // B), lab.new(cin)
    nb = lab.new(n_l // B)
    pshape = (B, n_l // B) + out_sp + filt + (cin,)
    plabels = (g, nb) + tuple(S) + tuple(K) + (ci,)
    feat_ct, feat_k, cin_k = (g, cob), (g, cob), (ci,)
  else:
    co, ci, nb = lab.new(cout), lab.new(cin), lab.new(n_l)
    pshape = (n_l,) + out_sp + filt + (cin,)
    plabels = (nb,) + tuple(S) + tuple(K) + (ci,)
    feat_ct, feat_k, cin_k = (co,), (co,), (ci,)
  slot = state.record(patches.reshape(pshape))
  # ct: site output axes in out_spec layout; the feature axis split into its groups.
  ct_shape, ct_labels = [], []
  for a in range(len(y_shape)):
    if a == out_spec[0]:
      ct_shape.append(y_shape[a])
      ct_labels.append(nb)
    elif a == out_spec[1]:
      ct_shape += [lab.sizes[l] for l in feat_ct]
      ct_labels += list(feat_ct)
    else:
      i = out_spec.index(a) - 2
      ct_shape.append(y_shape[a])
      ct_labels.append(S[i])
  groups = []
  for a in range(len(rhs_shape)):
    if a == rhs_spec[0]:
      groups.append(feat_k)
    elif a == rhs_spec[1]:
      groups.append(cin_k)
    else:
      groups.append((K[rhs_spec.index(a) - 2],))
  return dict(ct_shape=tuple(ct_shape), ct_labels=tuple(ct_labels),
              factors=(Factor(slot, plabels),), scale=1.0, sizes=lab.sizes), groups


def _patches(x, filt, strides, padding, lhs_dilation, rhs_dilation):
  """Image patches of a channels-last input (N, spatial..., C) as the conv sees them:
  (N, out spatial..., prod(filt), C), filter offsets row-major. Padding (possibly negative)
  and input dilation are one `lax.pad`; each filter offset is one strided slice."""
  nsp = len(filt)
  if isinstance(padding, str):
    raise _NoRule
  lhs_dilation = tuple(lhs_dilation or (1,) * nsp)
  rhs_dilation = tuple(rhs_dilation or (1,) * nsp)
  strides = tuple(strides)
  cfg = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)] + [
      (0, 0, 0)]
  xp = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  out_sp = [(xp.shape[1 + i] - (filt[i] - 1) * rhs_dilation[i] - 1) // strides[i] + 1
            for i in range(nsp)]
  cols = []
  for offs in itertools.product(*[range(f) for f in filt]):
    start = [0] + [o * d for o, d in zip(offs, rhs_dilation)] + [0]
    limit = [xp.shape[0]] + [start[1 + i] + (out_sp[i] - 1) * strides[i] + 1
                             for i in range(nsp)] + [xp.shape[-1]]
    cols.append(lax.slice(xp, start, limit, (1,) + strides + (1,)))
  return jnp.stack(cols, axis=-2)


def _broadcast_labels(shape, y_labels, y_shape):
  """Labels of an operand broadcast to y (equal rank with size-1 axes, or a scalar): the
  broadcast axes are squeezed. Returns (squeeze axes, labels)."""
  if len(shape) == 0:
    return (), ()
  if len(shape) != len(y_shape):
    raise _NoRule
  sq = tuple(a for a in range(len(shape)) if shape[a] != y_shape[a])
  if any(shape[a] != 1 for a in sq):
    raise _NoRule
  return sq, tuple(y_labels[a] for a in range(len(shape)) if a not in sq)


def _elementwise(state, eqn, site, pos, invals):
  y_shape = _single_out(eqn, site)
  name = eqn.primitive.name
  lab = _Labels()
  Y = [lab.new(s) for s in y_shape]
  p_shape = tuple(np.shape(invals[pos]))
  _, _ = _broadcast_labels(p_shape, Y, y_shape)   # validates the broadcast
  if len(p_shape) == 0:
    groups = []
  else:
    groups = [(Y[a],) if p_shape[a] == y_shape[a] else () for a in range(len(p_shape))]
  scale, factors = 1.0, ()
  if name in ("add", "add_any", "convert_element_type", "copy", "copy_p", "real", "conj"):
    pass
  elif name == "sub":
    scale = 1.0 if pos == 0 else -1.0
  elif name == "neg":
    scale = -1.0
  elif name == "mul" and len(invals) == 2:
    other = invals[1 - pos]
    sq, labels = _broadcast_labels(tuple(np.shape(other)), Y, y_shape)
    slot = state.record(jnp.squeeze(jnp.asarray(other), sq) if sq else jnp.asarray(other))
    factors = (Factor(slot, labels),)
  elif name == "div" and pos == 0:
    other = jnp.asarray(invals[1])
    sq, labels = _broadcast_labels(tuple(np.shape(other)), Y, y_shape)
    slot = state.record(1 / (jnp.squeeze(other, sq) if sq else other))
    factors = (Factor(slot, labels),)
  else:
    if any(not jnp.issubdtype(jnp.result_type(v), jnp.inexact) for i, v in enumerate(invals)
           if i == pos):
      raise _NoRule
    args = list(invals)
    prim, params = eqn.primitive, eqn.primitive.get_bind_params(eqn.params)

    def op(v):
      a = list(args)
      a[pos] = v
      return prim.bind(*a, **params)

    v0 = jnp.asarray(invals[pos])
    _, d = jax.jvp(op, (v0,), (jnp.ones_like(v0),))
    if tuple(np.shape(d)) != y_shape:
      d = jnp.broadcast_to(d, y_shape)
    slot = state.record(d)
    factors = (Factor(slot, tuple(Y)),)
  return dict(ct_shape=y_shape, ct_labels=tuple(Y), factors=factors, scale=scale,
              sizes=lab.sizes), groups


def _gather(state, eqn, site, invals):
  y_shape = _single_out(eqn, site)
  p = eqn.params
  dn = p["dimension_numbers"]
  operand, ids = invals
  o_shape = tuple(np.shape(operand))
  if getattr(dn, "operand_batching_dims", ()) or getattr(dn, "start_indices_batching_dims", ()):
    raise _NoRule
  collapsed, sim = tuple(dn.collapsed_slice_dims), tuple(dn.start_index_map)
  if sorted(collapsed) != sorted(sim) or len(set(sim)) != len(sim):
    raise _NoRule
  ss = p["slice_sizes"]
  if any(ss[a] != 1 for a in collapsed) or any(
      ss[a] != o_shape[a] for a in range(len(o_shape)) if a not in collapsed):
    raise _NoRule
  mode = str(p.get("mode", ""))
  clip = "FILL" not in mode.upper()
  lab = _Labels()
  Y = [lab.new(s) for s in y_shape]
  offset = tuple(dn.offset_dims)
  kept = [a for a in range(len(o_shape)) if a not in collapsed]
  if len(kept) != len(offset):
    raise _NoRule
  batch_axes = [a for a in range(len(y_shape)) if a not in offset]
  ids_shape = tuple(np.shape(ids))
  if tuple(ids_shape[:-1]) != tuple(y_shape[a] for a in batch_axes) or ids_shape[-1] != len(sim):
    raise _NoRule
  idx_label = {a: lab.new(o_shape[a]) for a in collapsed}
  groups = []
  for a in range(len(o_shape)):
    groups.append((idx_label[a],) if a in collapsed else (Y[offset[kept.index(a)]],))
  slot = state.record(ids)
  factor = Factor(slot, tuple(Y[a] for a in batch_axes), kind="index",
                  idx_labels=tuple(idx_label[a] for a in sim),
                  bounds=tuple(o_shape[a] for a in sim), clip=clip)
  return dict(ct_shape=y_shape, ct_labels=tuple(Y), factors=(factor,), scale=1.0,
              sizes=lab.sizes), groups


def _generic(state, eqn, site, pos, invals):
  """Exact Jacobian through the primitive's own VJP (materialised per output entry)."""
  if not jnp.issubdtype(jnp.result_type(invals[pos]), jnp.inexact):
    return None
  operands = []
  for v in invals:
    if not isinstance(v, jax.Array):   # literals and numpy constants
      operands.append(("lit", v))
    else:
      operands.append(("slot", state.record(v)))
  shape = tuple(np.shape(invals[pos]))
  lab = _Labels()
  ls = [lab.new(s) for s in shape]
  gen = Generic(eqn.primitive, eqn.primitive.get_bind_params(eqn.params), tuple(operands),
                pos, tuple(site.out_positions), ())
  return dict(ct_shape=None, ct_labels=(), factors=(), scale=1.0, sizes=lab.sizes,
              generic=gen), [(l,) for l in ls]


def warn_fallbacks(names) -> None:
  for name in sorted(set(names)):
    warnings.warn(
        f"STRUCTURED_DERIVATIVES: no structure rule for primitive '{name}' applied to a "
        "parameter; its exact Jacobian is materialised instead (correct, but can be slow).",
        stacklevel=4)
