"""Jaxpr walk for structured derivatives: finds every use of a parameter and perturbs it.

`f` is traced to a jaxpr as a function of (parameter leaves, data leaves). The walk then
re-evaluates that jaxpr equation by equation while tracking, for every variable, whether it
is a *chain* of a parameter leaf: the leaf itself or the leaf passed only through structural,
linear, one-operand operations (convert_element_type, transpose, reshape, squeeze,
broadcast_in_dim, copy). Any other equation that consumes a chain is a *site*: its outputs
get an additive perturbation `delta` (zero in value) so that one `jax.vjp` with respect to all
deltas yields ∂f/∂y for every site at once, from a single forward pass. Each chain operand of
a site is a *use*; a rule (rules.py) turns the use into a `Term`, the structured form of
y's derivative with respect to the leaf, and records the primal arrays the term needs
(inputs, patches, token ids, ...) as auxiliary outputs of that same forward pass.

Calls (`jit`, `remat`) that receive a chain are inlined, so parameters used inside them are
seen structurally; so are `scan`s over parameters: a loop over constant weights (a
recurrence) or over weights stacked along their first axis (a stack of layers) stays a loop
whose sites are stacked along its steps; other short scans over parameters are unrolled.
`custom_jvp_call` / `custom_vjp_call` are never inlined: their rule may differ from the
derivative of their body (straight-through estimators), so a call that receives a chain is a
site whose derivative comes from the call's own rule (the generic rule, through `jax.vjp`);
calls that receive no chain are bound unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

# Call-like primitives with an inner jaxpr.
CUSTOM_RULE_PRIMITIVES = frozenset({"custom_jvp_call", "custom_vjp_call",
                                    "custom_vjp_call_jaxpr"})
# Their rule is reverse-mode only: `jax.jvp` through them fails, `jax.vjp` works.
REVERSE_ONLY_PRIMITIVES = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})
INLINE_PRIMITIVES = frozenset({
    "jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
}) | CUSTOM_RULE_PRIMITIVES
# Those walked when a parameter chain enters them: differentiating their body is exact.
_WALKED_CALLS = INLINE_PRIMITIVES - CUSTOM_RULE_PRIMITIVES
_INNER_JAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")

# Structural, linear, single-operand primitives: their outputs are still chains of the leaf.
# A slice (and each part of a split, e.g. a GRU's fused gate weights) or a reversal is a
# linear map too: its uses are terms in its output space, pulled back to θ by the transposed
# chain (a pad).
CHAIN_PRIMITIVES = frozenset({
    "convert_element_type", "copy", "copy_p", "transpose", "reshape", "squeeze",
    "broadcast_in_dim", "slice", "split", "rev",
})


@dataclasses.dataclass(frozen=True)
class Step:
  """One structural operation on the way from a parameter leaf to its use."""
  primitive: Any
  params: tuple            # sorted (name, value) pairs, for rebinding
  in_shape: tuple
  in_dtype: Any
  out_shape: tuple
  out_dtype: Any

  @property
  def name(self) -> str:
    return self.primitive.name

  def key(self) -> tuple:
    return (self.name, tuple((k, repr(v)) for k, v in self.params), self.in_shape,
            self.out_shape, str(self.out_dtype))

  def apply(self, v):
    return self.primitive.bind(v, **dict(self.params))


@dataclasses.dataclass(frozen=True)
class Chain:
  leaf: int
  steps: tuple = ()


def replay(steps: Sequence[Step], v):
  for st in steps:
    v = st.apply(v)
  return v


def chain_transpose(steps: Sequence[Step], leaf_shape, leaf_dtype) -> Callable:
  """The transpose of the (linear) chain θ -> v: maps a v-shaped cotangent to θ's shape."""
  if not steps:
    return lambda ct: ct
  aval = jax.ShapeDtypeStruct(tuple(leaf_shape), leaf_dtype)
  transpose = jax.linear_transpose(lambda t: replay(steps, t), aval)
  out_dtype = steps[-1].out_dtype
  return lambda ct: transpose(ct.astype(out_dtype))[0]


@dataclasses.dataclass
class Site:
  """A perturbed equation: its float outputs get a delta each."""
  index: int
  primitive: str
  out_avals: list          # (shape, dtype) of the perturbed outputs
  out_positions: list      # which eqn outputs are perturbed
  var: Any = None          # the first perturbed output variable, for sites of the top jaxpr


class WalkState:
  """Shared bookkeeping of one walk (discovery or evaluation)."""

  def __init__(self, leaf_avals, deltas: Optional[list], rule_fn: Callable):
    self.leaf_avals = leaf_avals          # [(shape, dtype)] per parameter leaf
    self.deltas = deltas                  # None in discovery; per site list of arrays
    self.sites: list[Site] = []
    self.terms: list = []
    self.aux: list = []
    self.rule_fn = rule_fn
    self.fallbacks: list[str] = []        # primitives handled by the dense fallback
    self.top_jaxpr = None
    self.env: dict = {}                   # values of the top jaxpr's variables

  def record(self, value) -> int:
    self.aux.append(value)
    return len(self.aux) - 1

  def site_like(self, eqn) -> Site:
    """A site description that gets no delta of its own (resolved to another site)."""
    positions = [i for i, v in enumerate(eqn.outvars)
                 if jnp.issubdtype(v.aval.dtype, jnp.inexact)]
    return Site(-1, eqn.primitive.name,
                [(tuple(eqn.outvars[i].aval.shape), eqn.outvars[i].aval.dtype)
                 for i in positions], positions)

  def new_site(self, eqn, outvals, top: bool = False) -> tuple[Site, list]:
    positions = [i for i, v in enumerate(eqn.outvars)
                 if jnp.issubdtype(v.aval.dtype, jnp.inexact)]
    site = Site(len(self.sites), eqn.primitive.name,
                [(tuple(eqn.outvars[i].aval.shape), eqn.outvars[i].aval.dtype)
                 for i in positions], positions,
                eqn.outvars[positions[0]] if top else None)
    self.sites.append(site)
    if self.deltas is not None:
      outvals = list(outvals)
      for j, i in enumerate(positions):
        outvals[i] = outvals[i] + self.deltas[site.index][j].astype(outvals[i].dtype)
    return site, outvals


def inner_jaxpr(eqn):
  """(jaxpr, consts) of a call-like equation's inner jaxpr, or None."""
  for k in _INNER_JAXPR_KEYS:
    if k in eqn.params:
      j = eqn.params[k]
      if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
      if isinstance(j, jcore.Jaxpr):
        return j, []
  return None


def bind_primitive(primitive, params: dict, invals):
  """`primitive.bind(*invals, **params)`, except for `custom_linear_solve` (below)."""
  if primitive.name == "custom_linear_solve":
    out = _linear_solve(params, invals)
    if out is not None:
      return out
  return primitive.bind(*invals, **params)


def _linear_solve(params: dict, invals) -> Optional[list]:
  """x = A⁻¹ b with custom_linear_solve's derivative dx = A⁻¹(db − dA x), solver operands held
  constant, written with differentiable primitives: x₀ + solve(b − A x₀), x₀ = solve(b) held
  constant (one refinement step, equal to x₀ up to round-off). JAX's own rule fails when the
  matrix operands (parameter chains, not perturbed here) and b both have symbolic-zero
  tangents while the solver's (LU factors downstream of a perturbed site) do not."""
  lengths, jaxprs = params["const_lengths"], params["jaxprs"]
  start = lengths.matvec + lengths.vecmat
  matvec_consts = invals[:lengths.matvec]
  solver = [jax.lax.stop_gradient(c) for c in invals[start:start + lengths.solve]]
  rhs = list(invals[sum(lengths):])
  solve, matvec = jcore.jaxpr_as_fun(jaxprs.solve), jcore.jaxpr_as_fun(jaxprs.matvec)
  x0 = [jax.lax.stop_gradient(v) for v in solve(*solver, *rhs)]
  if len(x0) != len(rhs):  # auxiliary outputs: keep the primitive
    return None
  residual = [b - ax for b, ax in zip(rhs, matvec(*matvec_consts, *x0))]
  return [a + d for a, d in zip(x0, solve(*solver, *residual))]


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  ctx = getattr(eqn, "ctx", None)
  manager = getattr(ctx, "manager", None)
  if manager is not None:
    with manager:
      out = bind_primitive(eqn.primitive, params, invals)
  else:
    out = bind_primitive(eqn.primitive, params, invals)
  return list(out) if eqn.primitive.multiple_results else [out]


def _chain_steps(eqn, chains) -> Optional[list]:
  """One Step per output if `eqn` keeps its (single) chain operand a chain, else None."""
  if not _is_chain_step(eqn, [c is not None for c in chains]):
    return None
  a = eqn.invars[0].aval
  if eqn.primitive.name != "split":
    out = eqn.outvars[0].aval
    return [Step(eqn.primitive, tuple(sorted(eqn.params.items())), tuple(a.shape), a.dtype,
                 tuple(out.shape), out.dtype)]
  axis, steps, start = eqn.params["axis"], [], 0
  for v in eqn.outvars:   # each part as the slice it is
    out = v.aval
    lo = [0] * len(a.shape)
    lo[axis] = start
    hi = list(a.shape)
    hi[axis] = start + out.shape[axis]
    start = hi[axis]
    params = (("limit_indices", tuple(hi)), ("start_indices", tuple(lo)), ("strides", None))
    steps.append(Step(lax.slice_p, params, tuple(a.shape), a.dtype, tuple(out.shape),
                      out.dtype))
  return steps


def _is_chain_step(eqn, in_chain: list) -> bool:
  return (eqn.primitive.name in CHAIN_PRIMITIVES and len(eqn.invars) == 1 and in_chain[0]
          and all(jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.outvars))


def static_chains(jaxpr, in_chain: Sequence[bool]) -> tuple[set, list]:
  """Which variables of `jaxpr` the walk will find to be chains (structure only), and which
  outputs are chains."""
  chains = {v for v, c in zip(jaxpr.invars, in_chain) if c}
  is_chain = lambda v: not isinstance(v, jcore.Literal) and v in chains
  for eqn in jaxpr.eqns:
    flags = [is_chain(v) for v in eqn.invars]
    if not any(flags):
      continue
    inner = inner_jaxpr(eqn) if eqn.primitive.name in _WALKED_CALLS else None
    if inner is not None and len(eqn.invars) >= len(inner[0].invars):
      extra = len(eqn.invars) - len(inner[0].invars)
      _, out_flags = static_chains(inner[0], flags[extra:])
      chains |= {v for v, c in zip(eqn.outvars, out_flags) if c}
    elif _is_chain_step(eqn, flags):
      chains |= set(eqn.outvars)
  return chains, [is_chain(v) for v in jaxpr.outvars]


_PASS_THROUGH = {"add": (1.0, 1.0), "add_any": (1.0, 1.0), "sub": (1.0, -1.0)}


def _aliases(jaxpr, chains: set) -> dict:
  """eqn index -> (consumer eqn index, sign) when the eqn's only output flows, unchanged in
  shape, into a single add/sub with a parameter chain: both then share one cotangent."""
  uses: dict = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for pos, v in enumerate(eqn.invars):
      if not isinstance(v, jcore.Literal):
        uses.setdefault(v, []).append((i, pos))
  outs = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
  alias = {}
  for i, eqn in enumerate(jaxpr.eqns):
    if len(eqn.outvars) != 1:
      continue
    y = eqn.outvars[0]
    if y in outs or len(uses.get(y, ())) != 1:
      continue
    j, pos = uses[y][0]
    c = jaxpr.eqns[j]
    if c.primitive.name not in _PASS_THROUGH or len(c.invars) != 2:
      continue
    other = c.invars[1 - pos]
    if isinstance(other, jcore.Literal) or other not in chains or other is y:
      continue
    if tuple(c.outvars[0].aval.shape) != tuple(y.aval.shape):
      continue
    if c.outvars[0].aval.dtype != y.aval.dtype:
      continue
    alias[i] = (j, _PASS_THROUGH[c.primitive.name][pos])
  return alias


def walk(jaxpr, consts, invals, inchains, state: WalkState, top: bool = False):
  """Evaluates `jaxpr`, perturbing sites; returns (outvals, outchains)."""
  env: dict = {}
  chain_of: dict = {}
  chains, _ = static_chains(jaxpr, [c is not None for c in inchains])
  alias = _aliases(jaxpr, chains)
  pending: dict = {}    # consumer eqn index -> [(term, sign)] waiting for its site

  def read(v):
    if isinstance(v, jcore.Literal):
      return v.val
    return env[v]

  def chain(v):
    if isinstance(v, jcore.Literal):
      return None
    return chain_of.get(v)

  for v, val in zip(jaxpr.constvars, consts):
    env[v] = val
  for v, val, c in zip(jaxpr.invars, invals, inchains):
    env[v] = val
    if c is not None:
      chain_of[v] = c

  for i_eqn, eqn in enumerate(jaxpr.eqns):
    invals_e = [read(v) for v in eqn.invars]
    chains_e = [chain(v) for v in eqn.invars]
    if all(c is None for c in chains_e):
      outs = _bind(eqn, invals_e)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
      continue

    name = eqn.primitive.name
    inner = inner_jaxpr(eqn) if name in _WALKED_CALLS else None
    if inner is not None:
      ijaxpr, iconsts = inner
      n_extra = len(invals_e) - len(ijaxpr.invars)
      if n_extra >= 0:   # leading operands beyond the inner invars are not expected
        outs, ochains = walk(ijaxpr, iconsts, invals_e[n_extra:], chains_e[n_extra:], state)
        for v, o, c in zip(eqn.outvars, outs, ochains):
          env[v] = o
          if c is not None:
            chain_of[v] = c
        continue

    if name == "scan":
      outs = _looped_scan(eqn, invals_e, chains_e, state)
      if outs is None:
        outs = _unrolled_scan(eqn, invals_e, chains_e, state)
      if outs is not None:
        for v, o in zip(eqn.outvars, outs):
          env[v] = o
        continue

    steps = _chain_steps(eqn, chains_e)
    if steps is not None:
      c = chains_e[0]
      for v, out, step in zip(eqn.outvars, _bind(eqn, invals_e), steps):
        env[v] = out
        chain_of[v] = Chain(c.leaf, c.steps + (step,))
      continue

    # A site: the derivative of this equation w.r.t. each chain operand is a term.
    outs = _bind(eqn, invals_e)
    if not any(jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.outvars):
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
      continue
    if i_eqn in alias:
      # The output only feeds `y + chain`: reuse that site's cotangent, no delta here.
      site = state.site_like(eqn)
    else:
      site, outs = state.new_site(eqn, outs, top=jaxpr is state.top_jaxpr)
    first = len(state.terms)
    for pos, c in enumerate(chains_e):
      if c is not None:
        state.rule_fn(state, eqn, site, pos, c, invals_e, chains_e)
    waiting = [(t, 1.0) for t in state.terms[first:]] + pending.pop(i_eqn, [])
    if i_eqn in alias:   # chains of aliases move on to the next consumer
      j, sign = alias[i_eqn]
      pending.setdefault(j, []).extend((t, s * sign) for t, s in waiting)
    else:
      for t, sign in waiting:
        t.site = site.index
        t.scale = t.scale * sign
    for v, o in zip(eqn.outvars, outs):
      env[v] = o

  assert not pending, "aliased site without its consumer"
  if jaxpr is state.top_jaxpr:
    state.env = env
  outvals = [read(v) for v in jaxpr.outvars]
  outchains = [chain(v) for v in jaxpr.outvars]
  if top:
    # A chain returned as an output is used by the identity.
    for i, (v, c) in enumerate(zip(jaxpr.outvars, outchains)):
      if c is not None:
        outvals[i] = state.rule_fn.identity(state, outvals[i], c)
    outchains = [None] * len(outchains)
  return outvals, outchains


def _looped_scan(eqn, invals, chains, state: WalkState) -> Optional[list]:
  """The outputs of a `scan` over parameters walked inside a scan of the same length, or
  None when the loop cannot be: a chain among the outputs (or in the carry after the first
  step), a scanned input that is a chain of a leaf passed through other operations first, or
  a body use without a structure rule (or, for a scanned leaf, one that is not purely
  structural). A carry that starts as a parameter has its first step walked on its own.

  Each site of the body becomes one site of the loop whose outputs (and deltas) are stacked
  along a new leading step axis, and so do the arrays its terms record: a body term becomes a
  term with one more label, the step. For a weight that is a constant of the loop (a
  recurrence) the step is summed with the other unshared labels: its Jacobian is
  Σ_t x_t ⊗ ct_t in one contraction, and the structured pair of two sides sums all pairs of
  steps. A leaf scanned along its first axis (a stack of layers) enters the body as a leaf of
  its own with one layer's shape, and the step becomes the label of that first axis. The loop
  stays a loop for XLA: compile time does not depend on its length."""
  p = eqn.params
  body, length = p["jaxpr"], int(p["length"])
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  x_chains = list(chains[n_consts + n_carry:])
  carry_chains = list(chains[n_consts:n_consts + n_carry])
  # A carry that starts as a parameter (a learned initial state): the first step is walked on
  # its own and the loop runs over the others, provided that step's outputs are no chains.
  peel = any(c is not None for c in carry_chains)
  if length < 1 or (peel and (length < 2 or any(c is not None for c in x_chains))):
    return None
  if any(c is not None and c.steps for c in x_chains):
    return None
  flags = [c is not None for c in chains]
  if any(static_chains(body.jaxpr, flags)[1]):
    return None
  flags[n_consts:n_consts + n_carry] = [False] * n_carry
  if peel and any(static_chains(body.jaxpr, flags)[1]):
    return None
  consts, const_chains = list(invals[:n_consts]), list(chains[:n_consts])
  init, xs = list(invals[n_consts:n_consts + n_carry]), list(invals[n_consts + n_carry:])
  if peel:
    first = length - 1 if p["reverse"] else 0
    x_first = [lax.index_in_dim(x, first, 0, keepdims=False) for x in xs]
    xs = [lax.slice_in_dim(x, 0, length - 1) if p["reverse"] else lax.slice_in_dim(x, 1, length)
          for x in xs]
    length -= 1
  # Scanned leaves become leaves of the body with one step's shape, numbered after the others.
  leaf_avals, scanned = list(state.leaf_avals), {}
  body_x_chains = []
  for c in x_chains:
    if c is not None:
      shape, dtype = state.leaf_avals[c.leaf]
      scanned[len(leaf_avals)] = c.leaf
      c = Chain(len(leaf_avals))
      leaf_avals.append((tuple(shape[1:]), dtype))
    body_x_chains.append(c)
  body_chains = const_chains + [None] * n_carry + body_x_chains

  def step_walk(inner, carry, x_t):
    return walk(body.jaxpr, list(body.consts), consts + list(carry) + list(x_t), body_chains,
                inner)[0]

  # The body's sites and terms, from shapes alone; both passes of the walk find the same.
  probe = WalkState(leaf_avals, None, state.rule_fn)
  jax.eval_shape(lambda carry, x_t: step_walk(probe, carry, x_t), [aval(c) for c in init],
                 [jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)) for x in xs])
  if probe.fallbacks or not all(t.einsum for t in probe.terms):
    return None
  if any(t.leaf in scanned and (t.prefix or t.pair_key is None) for t in probe.terms):
    return None
  if peel:
    outs, _ = walk(body.jaxpr, list(body.consts), consts + init + x_first,
                   const_chains + carry_chains + [None] * len(xs), state)
    init, y_first = list(outs[:n_carry]), outs[n_carry:]
  sites = []
  for site in probe.sites:
    sites.append(Site(len(state.sites), site.primitive,
                      [((length,) + tuple(sh), dt) for sh, dt in site.out_avals],
                      site.out_positions))
    state.sites.append(sites[-1])
  deltas = None if state.deltas is None else [state.deltas[s.index] for s in sites]

  def step(carry, inputs):
    x_t, deltas_t = inputs
    inner = WalkState(leaf_avals, deltas_t, state.rule_fn)
    outs = step_walk(inner, carry, x_t)
    return outs[:n_carry], (outs[n_carry:], inner.aux)

  carry, (ys, aux) = lax.scan(step, init, (xs, deltas), length=length,
                              reverse=p["reverse"], unroll=p["unroll"])
  if peel:
    ys = [jnp.concatenate([y, y0[None]] if p["reverse"] else [y0[None], y])
          for y, y0 in zip(ys, y_first)]
  slots = [state.record(a) for a in aux]
  for t in probe.terms:
    labels = set(t.sizes) | set(t.ct_labels) | {l for f in t.factors
                                                for l in f.labels + tuple(f.idx_labels)}
    u = 1 + max(labels, default=-1)
    sizes = {**t.sizes, u: length}
    stacked = {}
    if t.leaf in scanned:   # the step is the leaf's first axis
      leaf = scanned[t.leaf]
      groups = ((u,),) + tuple(t.groups)
      stacked = dict(leaf=leaf, groups=groups, stop_shape=(length,) + tuple(t.stop_shape),
                     leaf_shape=tuple(state.leaf_avals[leaf][0]),
                     pair_key=((), tuple(tuple(sizes[l] for l in g) for g in groups)))
    state.terms.append(dataclasses.replace(
        t, site=sites[t.site].index, ct_shape=(length,) + tuple(t.ct_shape),
        ct_labels=(u,) + tuple(t.ct_labels), sizes=sizes,
        factors=tuple(dataclasses.replace(f, slot=slots[f.slot], labels=(u,) + tuple(f.labels))
                      for f in t.factors), **stacked))
  return list(carry) + list(ys)


# A scan over parameters that `_looped_scan` cannot keep a loop (weights reshaped before the
# loop or sliced inside it) is walked one step at a time (its body inlined `length` times)
# when the unrolled body has at most this many equations; beyond it, or with a parameter
# kept in the carry, the scan stays a site of its own, exact but dense.
# Unrolled compile time grows faster than the length: a 64-unit hk.LSTM (15 body equations)
# compiled in 3.3 s at 12 steps, 13 s at 24 and 50 s at 48 (2 CPU cores).
SCAN_UNROLL_EQUATIONS = 256


def _index_step(shape, dtype, i: int) -> tuple:
  """Steps taking element i of axis 0 (a scanned-over parameter's slice at step i)."""
  rest = tuple(shape[1:])
  lo, hi = (i,) + (0,) * len(rest), (i + 1,) + rest
  sliced = Step(lax.slice_p, (("limit_indices", hi), ("start_indices", lo), ("strides", None)),
                tuple(shape), dtype, (1,) + rest, dtype)
  squeezed = Step(lax.squeeze_p, (("dimensions", (0,)),), (1,) + rest, dtype, rest, dtype)
  return sliced, squeezed


def _unrolled_scan(eqn, invals, chains, state: WalkState) -> Optional[list]:
  """The outputs of a `scan` that receives parameter chains, walked one step at a time, or
  None when it is left to the dense rule: a chain in the carry (here: a parameter that may
  stay in it from step to step), a chain among the per-step outputs, or a body too long to
  unroll."""
  p = eqn.params
  body, length = p["jaxpr"], int(p["length"])
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  if length * len(body.jaxpr.eqns) > SCAN_UNROLL_EQUATIONS or length < 1:
    return None
  if any(c is not None for c in chains[n_consts:n_consts + n_carry]):
    return None
  _, out_flags = static_chains(body.jaxpr, [c is not None for c in chains])
  if any(out_flags):
    return None
  consts, carry = invals[:n_consts], list(invals[n_consts:n_consts + n_carry])
  xs, x_chains = invals[n_consts + n_carry:], chains[n_consts + n_carry:]
  const_chains = list(chains[:n_consts])
  ys = [[None] * length for _ in body.jaxpr.outvars[n_carry:]]
  for i in (reversed(range(length)) if p["reverse"] else range(length)):
    x_i, c_i = [], []
    for x, c in zip(xs, x_chains):
      if c is None:
        x_i.append(lax.index_in_dim(x, i, 0, keepdims=False))
        c_i.append(None)
      else:
        steps = _index_step(np.shape(x), jnp.result_type(x), i)
        x_i.append(replay(steps, x))
        c_i.append(Chain(c.leaf, c.steps + steps))
    outs, _ = walk(body.jaxpr, list(body.consts), list(consts) + carry + x_i,
                   const_chains + [None] * n_carry + c_i, state)
    carry = list(outs[:n_carry])
    for slot, y in zip(ys, outs[n_carry:]):
      slot[i] = y
  return carry + [jnp.stack(slot) for slot in ys]


@dataclasses.dataclass
class Traced:
  """`f` as a jaxpr of (param leaves, data leaves) with a way to walk it."""
  jaxpr: Any
  consts: list
  n_params: int
  leaf_avals: list
  out_avals: list

  def run(self, param_leaves, data_leaves, deltas, rule_fn):
    state = WalkState(self.leaf_avals, deltas, rule_fn)
    state.top_jaxpr = self.jaxpr
    chains = [Chain(i) for i in range(self.n_params)] + [None] * len(data_leaves)
    outs, _ = walk(self.jaxpr, self.consts, list(param_leaves) + list(data_leaves), chains,
                   state, top=True)
    return outs, state


def aval(x) -> jax.ShapeDtypeStruct:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(tuple(np.shape(x)), jnp.result_type(x))


def trace(fn: Callable, param_leaves, data_leaves) -> Traced:
  """`fn(param_leaves, data_leaves) -> output leaves` as a jaxpr (shapes only are used)."""
  closed = jax.make_jaxpr(fn)([aval(p) for p in param_leaves], [aval(x) for x in data_leaves])
  return Traced(closed.jaxpr, list(closed.consts), len(param_leaves),
                [(tuple(aval(p).shape), aval(p).dtype) for p in param_leaves],
                [(tuple(v.aval.shape), v.aval.dtype) for v in closed.jaxpr.outvars])
