"""Θ by structured derivatives (Novak, Sohl-Dickstein & Schoenholz, ICML 2022, Sec. 4).

For every parameter leaf θ with uses u (sites y_u = op(θ, inputs), see interpreter.py),

    Θ_θ(x1, x2) = Σ_{u, v} (∂f/∂y_u ∂y_u/∂θ)(x1) · (∂f/∂y_v ∂y_v/∂θ)(x2)ᵀ.

One side's data: a single forward pass (per example under `vmap_axes`) records what the rules
need, and one VJP with respect to additive perturbations of all sites, vmapped over the
output entries, gives every cotangent ∂f/∂y_u. Each leaf then picks the cheaper of

  A. materialise each side's per-entry Jacobian J(o) = Σ_u term_u(o) (one small einsum per
     use, e.g. patches ⊗ cotangents for a conv kernel) and contract J1 J2ᵀ; or
  B. contract the two sides' term networks directly, e.g. for a dense layer
     (x1 x2ᵀ) ∘ (ct1 ct2ᵀ), never forming a Jacobian,

by estimating the time of the exact contraction order each would use (`_time`). Output axes are
labels of those networks: traced axes are shared and summed, diagonal axes shared and kept,
so no O×O block is formed that the requested kernel does not need.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dynamics.kernels import axes as axes_lib
from ntk_dynamics.kernels import batching
from ntk_dynamics.kernels.structured import interpreter as interp
from ntk_dynamics.kernels.structured import network
from ntk_dynamics.kernels.structured import rules as rules_lib
from ntk_dynamics.kernels.structured import separable

PyTree = Any
RULES = rules_lib.Rules()


# --------------------------------------------------------------------------- one side


@dataclasses.dataclass
class _Prepared:
  """A traced side: the function of (param leaves, data leaves), its sites and terms."""
  traced: interp.Traced
  sites: list
  terms: list
  fallbacks: list
  data: list                 # data leaves (whole batch)
  data_axes: Optional[list]  # batch axis per data leaf (vmap), None when not batched
  batched: bool
  n: int                     # batch size (batched) or 1
  seps: list = dataclasses.field(default_factory=list)  # [output leaf] {site: Sep}


def _kwargs_leaf_axes(kwargs: dict, kwargs_axes: dict) -> list:
  missing = -(10**9)
  tree = {k: jax.tree.map(lambda _, a=kwargs_axes.get(k): missing if a is None else a, v)
          for k, v in kwargs.items()}
  return [None if a == missing else a for a in jax.tree.leaves(tree)]


def _prepare(f: Callable, param_leaves, p_def, x, kwargs: dict,
             vmap_axes: Optional[batching.VmapAxes], fx) -> _Prepared:
  kw_leaves, kw_def = jax.tree.flatten(kwargs)
  dyn = [i for i, l in enumerate(kw_leaves) if isinstance(l, (jax.Array, np.ndarray))]
  x_leaves, x_def = jax.tree.flatten(x)
  nx = len(x_leaves)

  def kw_from(values):
    leaves = list(kw_leaves)
    for i, v in zip(dyn, values):
      leaves[i] = v
    return kw_def.unflatten(leaves)

  data = list(x_leaves) + [kw_leaves[i] for i in dyn]
  if vmap_axes is None:
    def fn(pl, dl):
      out = f(p_def.unflatten(pl), x_def.unflatten(dl[:nx]), **kw_from(dl[nx:]))
      return jax.tree.leaves(out)
    data_axes, examples, n = None, [interp.aval(d) for d in data], 1
  else:
    g = batching.single_example_fn(f, vmap_axes, x, fx)

    def fn(pl, dl):
      out = g(p_def.unflatten(pl), x_def.unflatten(dl[:nx]), **kw_from(dl[nx:]))
      return jax.tree.leaves(out)
    kw_axes = _kwargs_leaf_axes(kwargs, vmap_axes.kwargs_axes)
    data_axes = list(vmap_axes.leaf_in_axes(x)) + [
        None if kw_axes[i] is None else kw_axes[i] % np.ndim(kw_leaves[i]) for i in dyn]
    examples = []
    for d, a in zip(data, data_axes):
      av = interp.aval(d)
      shape = av.shape if a is None else av.shape[:a] + av.shape[a + 1:]
      examples.append(jax.ShapeDtypeStruct(shape, av.dtype))
    n = vmap_axes.batch_size(x)

  traced = interp.trace(fn, param_leaves, examples)
  holder = {}

  def discover(pl, dl):
    outs, state = traced.run(pl, dl, None, RULES)
    holder["state"] = state
    return outs

  jax.eval_shape(discover, [interp.aval(p) for p in param_leaves], examples)
  st = holder["state"]
  seps = []
  if vmap_axes is not None:
    for k in range(len(traced.out_avals)):
      found = separable.analyse(traced.jaxpr, traced.n_params, k)
      seps.append({site.index: found[site.var] for site in st.sites
                   if site.var is not None and len(site.out_avals) == 1
                   and site.var in found})
  return _Prepared(traced, st.sites, st.terms, st.fallbacks, data, data_axes,
                   vmap_axes is not None, n, seps)


@dataclasses.dataclass
class _Side:
  prep: _Prepared
  cts: list        # [output leaf][site][perturbed output] -> (lead..., site shape)
  aux: list
  lead_shapes: list  # per output leaf: (N,) + per-example shape, or the output shape
  sep_a: dict = dataclasses.field(default_factory=dict)   # (k, site) -> A (O_k, ...)
  sep_b: dict = dataclasses.field(default_factory=dict)   # (k, site) -> [B (N, ...)]
  batch_axes: Optional[list] = None   # per output leaf: the batch axis (batched sides)


def _evaluate(prep: _Prepared, param_leaves, data: Optional[list] = None,
              n: Optional[int] = None) -> _Side:
  """One side's cotangents and recorded arrays, for `data` (default: the whole batch) of
  `n` examples."""
  traced, sites = prep.traced, prep.sites
  data = prep.data if data is None else data
  n = prep.n if n is None else n

  def side_fn(pl, dl):
    def run(deltas):
      outs, state = traced.run(pl, dl, deltas, RULES)
      sep_a, sep_b = {}, {}
      for k, found in enumerate(prep.seps):
        for site, sep in found.items():
          sep_a[(k, site)], sep_b[(k, site)] = separable.evaluate(sep, state.env)
      return outs, (state.aux, sep_a, sep_b)

    zeros = [[jnp.zeros(s, d) for s, d in site.out_avals] for site in sites]
    outs, vjp_fn, (aux, sep_a, sep_b) = jax.vjp(run, zeros, has_aux=True)
    cts = []
    for k, o in enumerate(outs):
      basis = jnp.eye(o.size, dtype=o.dtype).reshape((o.size,) + o.shape)

      def one(e, k=k):
        cot = [jnp.zeros(oo.shape, oo.dtype) for oo in outs]
        cot[k] = e
        return vjp_fn(cot)[0]

      cts.append(jax.vmap(one)(basis))
    shapes = [o.shape for o in outs]
    return cts, aux, sep_a, sep_b, shapes

  if prep.batched:
    shapes_holder = {}

    def side_example(pl, dl):
      cts, aux, sep_a, sep_b, shapes = side_fn(pl, dl)
      shapes_holder["s"] = shapes
      return cts, aux, sep_a, sep_b

    cts, aux, sep_a, sep_b = jax.vmap(side_example, in_axes=(None, prep.data_axes),
                                      out_axes=(0, 0, None, 0))(param_leaves, data)
    lead = [(n,) + tuple(s) for s in shapes_holder["s"]]
  else:
    cts, aux, sep_a, sep_b, shapes = side_fn(param_leaves, data)
    lead = [tuple(s) for s in shapes]
  return _Side(prep, cts, aux, lead, sep_a, sep_b)


# Per-example intermediates (every site's cotangent for every output entry, conv patches)
# can be far larger than the per-example Jacobians they are reduced to. A batched side is
# therefore evaluated in chunks of examples: each chunk's Jacobians are formed while its
# cotangents are alive, and only the (smaller) Jacobians are concatenated. Chunks are
# unrolled slices rather than a `lax.map` loop: XLA:CPU runs convolutions inside a while
# loop on one thread.
CHUNK_BYTES = 4 * 2**20
MAX_CHUNKS = 8   # unrolled chunks: compile time grows with their number


def _num_chunks(prep: _Prepared, fx) -> int:
  """Chunks of examples such that one chunk's cotangents take about CHUNK_BYTES; one chunk
  when no site's whole-batch cotangent exceeds CHUNK_BYTES (no Jacobian is then worth
  forming chunk by chunk: chunks would only add compile time and buffers)."""
  if not prep.batched or prep.n <= 1:
    return 1
  entries = sum(int(np.size(o)) for o in jax.tree.leaves(fx)) // prep.n
  per_site = [sum(math.prod(sh) * np.dtype(dt).itemsize for sh, dt in site.out_avals)
              * entries * prep.n for site in prep.sites]
  if not per_site or max(per_site) <= CHUNK_BYTES:
    return 1
  return int(min(prep.n, MAX_CHUNKS, math.ceil(sum(per_site) / CHUNK_BYTES)))


def _evaluate_chunks(prep: _Prepared, param_leaves, n_chunks: int) -> list:
  """`_evaluate` on consecutive slices of the batch (sizes differ by at most one)."""
  if n_chunks == 1:
    return [_evaluate(prep, param_leaves)]
  bounds = np.linspace(0, prep.n, n_chunks + 1).round().astype(int)
  out = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    data = [d if a is None else jax.lax.slice_in_dim(d, int(lo), int(hi), axis=a)
            for d, a in zip(prep.data, prep.data_axes)]
    out.append(_evaluate(prep, param_leaves, data, int(hi - lo)))
  return out


def _concat_sides(chunks: list) -> _Side:
  """The whole-batch side of chunked evaluations (example axis first on batched arrays).
  Concatenations no plan reads are dropped by XLA."""
  if len(chunks) == 1:
    return chunks[0]
  cat = lambda *xs: jnp.concatenate(xs, axis=0)
  first = chunks[0]
  return _Side(first.prep, jax.tree.map(cat, *[c.cts for c in chunks]),
               jax.tree.map(cat, *[c.aux for c in chunks]),
               [(sum(c.lead_shapes[k][0] for c in chunks),) + tuple(sh[1:])
                for k, sh in enumerate(first.lead_shapes)],
               first.sep_a, jax.tree.map(cat, *[c.sep_b for c in chunks]))


# --------------------------------------------------------------------------- operands


class _Op:
  """A network operand known by its labels and shape, built on demand. `ident` names its
  array (equal idents: equal arrays) so that shared products can be reused."""

  def __init__(self, labels, shape, thunk, ident=None):
    self.labels, self.shape, self.thunk = tuple(labels), tuple(shape), thunk
    self.ident = ident

  def sizes(self):
    return dict(zip(self.labels, self.shape))


def _cost(ops, out) -> int:
  sizes = {}
  for o in ops:
    sizes.update(o.sizes())
  return network.cost([o.labels for o in ops], out, sizes)


# What one element read or written by a pairwise product costs, in multiply-adds: a product
# with a small dimension (a sum over 12 steps, 10 outputs kept) is bound by moving its
# operands and result, through XLA:CPU's transposes, not by arithmetic. Measured on two
# cores: the structured pair of a 12-step LSTM's recurrent weight needs 3.4x fewer
# multiply-adds than its Jacobians but moves 8M-element intermediates and ran 1.3x slower.
# On the benchmark sweeps only that LSTM and a transformer change plans between 16 and 128
# (both faster at 64). Used for choosing only: reported costs stay multiply-adds.
MACS_PER_ELEMENT = 64


def _time(ops, out) -> int:
  """Σ over the contraction's pairwise products of max(multiply-adds, MACS_PER_ELEMENT ×
  elements read and written): a roofline estimate in multiply-add units."""
  sizes = {}
  for o in ops:
    sizes.update(o.sizes())
  return sum(max(macs, MACS_PER_ELEMENT * moved)
             for macs, moved in network.steps([o.labels for o in ops], out, sizes))


def _is_output_label(l) -> bool:
  return isinstance(l, tuple) and len(l) > 0 and l[0] == "o"


def _contract(ops, out, cache=None):
  return network.contract([(o.thunk(), o.labels) for o in ops], out,
                          idents=[o.ident for o in ops], cache=cache,
                          is_global=_is_output_label)


def _align(x, labels, target):
  """x (axes `labels`) transposed and expanded to the axis order `target`."""
  labels = list(labels)
  present = [l for l in target if l in labels]
  x = jnp.transpose(x, [labels.index(l) for l in present])
  shape = [x.shape[present.index(l)] if l in present else 1 for l in target]
  return x.reshape(shape)


def _effective_ids(ids, bounds, clip):
  bounds_arr = jnp.asarray(bounds, ids.dtype)
  if clip:
    return jnp.clip(ids, 0, bounds_arr - 1), None
  valid = jnp.all((ids >= 0) & (ids < bounds_arr), axis=-1)
  return ids, valid


def _one_hot(ids, bounds, clip, dtype):
  eff, valid = _effective_ids(ids, bounds, clip)
  out = None
  for c, b in enumerate(bounds):
    oh = jax.nn.one_hot(eff[..., c], b, dtype=dtype)
    if out is None:
      out = oh
    else:
      out = out[..., None] * oh.reshape(oh.shape[:-1] + (1,) * c + (b,))
  if valid is not None:
    out = out * valid.reshape(valid.shape + (1,) * len(bounds)).astype(dtype)
  return out


@dataclasses.dataclass
class _Ctx:
  """Labels and shapes of one (output leaf, parameter leaf) kernel."""
  k: int
  sides: tuple              # (side1, side2)
  out_labels: tuple
  lead_labels: tuple        # per side
  factor_lead: tuple        # per side: labels of the batch axis on recorded arrays
  dtype: Any
  cache: Optional[dict] = None   # shared products, per trace


def _make_ctx(k, side1, side2, output_axes, fx1, fx2) -> _Ctx:
  o1 = jax.tree.leaves(fx1)[k]
  ndim = o1.ndim
  trace, diag = output_axes.for_rank(ndim)

  def olab(a, s):
    return ("o", a) if (a in trace or a in diag) else ("o", a, s)

  out = []
  for a in range(ndim):
    if a in diag:
      out.append(("o", a))
    elif a not in trace:
      out += [("o", a, 1), ("o", a, 2)]
  leads, flead = [], []
  for s, side in ((1, side1), (2, side2)):
    prep = side.prep
    if prep.batched:
      b = side.batch_axes[k]
      leads.append((olab(b, s),) + tuple(olab(a, s) for a in range(ndim) if a != b))
      flead.append((olab(b, s),))
    else:
      leads.append(tuple(olab(a, s) for a in range(ndim)))
      flead.append(())
  return _Ctx(k, (side1, side2), tuple(out), tuple(leads), tuple(flead), o1.dtype)


class _Naming:
  """Global names for one term instance's local labels; group labels may be redirected."""

  def __init__(self, s, uid, redirect=None):
    self.s, self.uid, self.redirect = s, uid, redirect or {}

  def __call__(self, l):
    return self.redirect.get(l, ("t", self.s, self.uid, l))


def _ct_ops(ctx, s, term, name):
  """The cotangent of the term's site: one array, or A ⊙ B factors when separable."""
  side = ctx.sides[s - 1]
  lead = tuple(side.lead_shapes[ctx.k])
  labels = ctx.lead_labels[s - 1]
  key = (ctx.k, term.site)
  site = side.prep.sites[term.site]
  if key in side.sep_a and tuple(term.ct_shape) == tuple(site.out_avals[0][0]):
    sep = side.prep.seps[ctx.k][term.site]
    a = side.sep_a[key]
    ops = [_Op(labels[1:] + tuple(name(term.ct_labels[i]) for i in sep.a_axes),
               lead[1:] + tuple(a.shape[1:]),
               lambda: side.sep_a[key].reshape(lead[1:] + side.sep_a[key].shape[1:]),
               ident=("A", id(side), ctx.k, term.site))]
    for j, (_, axes) in enumerate(sep.b):
      b = side.sep_b[key][j]
      ops.append(_Op(labels[:1] + tuple(name(term.ct_labels[i]) for i in axes), b.shape,
                     lambda j=j: side.sep_b[key][j], ident=("B", id(side), ctx.k, term.site, j)))
    if not sep.b and not term.factors:   # nothing depends on the example: broadcast
      ops.append(_Op(labels[:1], lead[:1], lambda: jnp.ones(lead[:1], ctx.dtype),
                     ident=("ones", lead[0])))
    # An axis of y held by neither A, B nor a factor (the cotangent is constant along it,
    # e.g. a bias broadcast over tokens before a mean-pool) must still be summed over: without
    # an operand carrying its label the network would drop the factor of its size.
    held = set(sep.a_axes).union(*(axes for _, axes in sep.b))
    held_labels = {l for f in term.factors for l in f.labels + tuple(f.idx_labels)}
    for i, l in enumerate(term.ct_labels):
      if i not in held and l not in held_labels:
        size = int(term.ct_shape[i])
        ops.append(_Op((name(l),), (size,), lambda size=size: jnp.ones((size,), ctx.dtype),
                       ident=("ones", size)))
    return ops
  shape = lead + tuple(term.ct_shape)
  return [_Op(labels + tuple(name(l) for l in term.ct_labels), shape,
              lambda: side.cts[ctx.k][term.site][0].reshape(shape),
              ident=("ct", id(side), ctx.k, term.site, shape))]


def _factor_op(ctx, s, f, name):
  side = ctx.sides[s - 1]
  lead = ctx.factor_lead[s - 1]
  arr_shape = tuple(np.shape(side.aux[f.slot]))
  if f.kind == "index":
    labels = lead + tuple(name(l) for l in f.labels) + tuple(name(l) for l in f.idx_labels)
    shape = arr_shape[:-1] + tuple(f.bounds)
    return _Op(labels, shape, lambda: _one_hot(side.aux[f.slot], f.bounds, f.clip, ctx.dtype),
               ident=("onehot", id(side), f.slot, f.bounds, f.clip))
  return _Op(lead + tuple(name(l) for l in f.labels), arr_shape,
             lambda: side.aux[f.slot].astype(ctx.dtype), ident=("aux", id(side), f.slot))


def _pair_index_op(ctx, f1, n1, f2, n2):
  """The one-hot product of two lookups, summed over the table rows: ids1 == ids2."""
  s1, s2 = ctx.sides
  l1 = ctx.factor_lead[0] + tuple(n1(l) for l in f1.labels)
  l2 = ctx.factor_lead[1] + tuple(n2(l) for l in f2.labels)
  target = tuple(dict.fromkeys(l1 + l2))
  sh1 = np.shape(s1.aux[f1.slot])[:-1]
  sh2 = np.shape(s2.aux[f2.slot])[:-1]
  sizes = dict(zip(l1, sh1))
  sizes.update(zip(l2, sh2))
  kdim = ("k-index",)

  def build():
    e1, v1 = _effective_ids(s1.aux[f1.slot], f1.bounds, f1.clip)
    e2, v2 = _effective_ids(s2.aux[f2.slot], f2.bounds, f2.clip)
    a = _align(e1, l1 + kdim, target + kdim)
    b = _align(e2, l2 + kdim, target + kdim)
    eq = jnp.all(a == b, axis=-1)
    if v1 is not None:
      eq = eq & _align(v1, l1, target) & _align(v2, l2, target)
    return eq.astype(ctx.dtype)

  return _Op(target, tuple(sizes[l] for l in target), build,
             ident=("eq", id(s1), f1.slot, f1.bounds, f1.clip, id(s2), f2.slot, f2.clip))


# --------------------------------------------------------------------------- Jacobians


def _theta_labels(term):
  return tuple(("θ", i) for i in range(len(term.leaf_shape)))


def _pull_back(prefix, term, x, n_lead):
  """Maps (lead..., stop space) to (lead..., θ) through the transposed prefix chain."""
  if not prefix:
    return x.reshape(x.shape[:n_lead] + tuple(term.leaf_shape))
  back = interp.chain_transpose(prefix, term.leaf_shape, term.leaf_dtype)
  lead = x.shape[:n_lead]
  flat = x.reshape((-1,) + x.shape[n_lead:])
  return jax.vmap(back)(flat).reshape(lead + tuple(term.leaf_shape))


class _Jacobian:
  """Per-output-entry Jacobian of one term on one side, with its cost."""

  def __init__(self, ctx, s, term, uid):
    self.ctx, self.s, self.term = ctx, s, term
    side = ctx.sides[s - 1]
    self.lead = ctx.lead_labels[s - 1]
    self.lead_shape = tuple(side.lead_shapes[ctx.k])
    self.labels = self.lead + _theta_labels(term)
    n_entries = math.prod(self.lead_shape)
    if term.einsum:
      name = _Naming(s, uid)
      self.ops = _ct_ops(ctx, s, term, name) + [_factor_op(ctx, s, f, name)
                                                for f in term.factors]
      self.out = self.lead + tuple(name(l) for l in term.group_labels)
      self.cost = _cost(self.ops, self.out)
    else:
      site = side.prep.sites[term.site]
      outs = sum(math.prod(sh) for sh, _ in site.out_avals)
      self.cost = n_entries * (outs + math.prod(term.stop_shape))

  def value(self):
    if self.term.einsum:
      return self.finish(_contract(self.ops, self.out, self.ctx.cache))
    return self.finish(self._generic())

  def finish(self, x):
    """The contracted network (lead..., stop space) mapped to (lead..., θ)."""
    term = self.term
    x = x.reshape(self.lead_shape + tuple(term.stop_shape))
    x = _pull_back(term.prefix, term, x, len(self.lead_shape))
    if term.scale != 1.0:
      x = x * term.scale
    return x.astype(self.ctx.dtype)

  def stack_key(self):
    """Equal for uses whose networks differ only in their arrays (a weight applied at every
    step of a recurrence): their Jacobians can be summed by one contraction over the uses."""
    term = self.term
    if not term.einsum:
      return None
    names: dict = {}
    canon = lambda l: l if _is_output_label(l) else names.setdefault(l, len(names))
    return (tuple((tuple(canon(l) for l in op.labels), op.shape) for op in self.ops),
            tuple(canon(l) for l in self.out), tuple(st.key() for st in term.prefix),
            term.scale, tuple(term.stop_shape))

  def _generic(self):
    term, ctx = self.term, self.ctx
    side = ctx.sides[self.s - 1]
    gen = term.generic
    cts = [c for c in side.cts[ctx.k][term.site]]
    slots = [i for i, (kind, _) in enumerate(gen.operands) if kind == "slot"]
    slot_vals = [side.aux[gen.operands[i][1]] for i in slots]
    prim, params = gen.primitive, gen.params

    def per_entry(ct_list, vals):
      args = [v for _, v in gen.operands]
      for i, v in zip(slots, vals):
        args[i] = v

      def op(v):
        a = list(args)
        a[gen.position] = v
        outs = interp.bind_primitive(prim, params, a)
        outs = list(outs) if prim.multiple_results else [outs]
        return [outs[i] for i in gen.out_positions]

      _, vjp = jax.vjp(op, args[gen.position])
      return vjp([c.astype(o.dtype) for c, o in zip(ct_list, op(args[gen.position]))])[0]

    batched = side.prep.batched
    flat_cts = []
    for c in cts:
      lead = c.shape[:1] if batched else ()
      flat_cts.append(c.reshape(lead + (-1,) + c.shape[len(lead) + 1:]))
    fn = jax.vmap(per_entry, in_axes=(0, None))
    if batched:
      fn = jax.vmap(fn, in_axes=(0, 0))
    return fn(flat_cts, slot_vals)


def _stacked_jacobian(jacs: list):
  """Σ of the Jacobians of uses with equal `stack_key`, as one network whose operands are
  stacked along a summed use axis. Summing per-use outer products instead (a dense weight's
  Jacobian at one step is x ⊗ ct) leaves XLA an elementwise loop: 380 ms against 10 ms for a
  128-wide recurrent weight used at 16 steps, N·O = 320."""
  first = jacs[0]
  return first.finish(_contract(_stacked_ops(jacs), first.out, first.ctx.cache))


def _stacked_ops(jacs: list) -> list:
  """The operands of equal-`stack_key` uses stacked along one summed use label."""
  first = jacs[0]
  use = ("use", first.s, first.term.leaf, first.term.site)
  ops = []
  for p, op in enumerate(first.ops):
    members = [j.ops[p] for j in jacs]
    idents = [m.ident for m in members]
    ops.append(_Op((use,) + op.labels, (len(jacs),) + op.shape,
                   lambda members=members: jnp.stack([m.thunk() for m in members]),
                   ident=None if None in idents else ("stack",) + tuple(idents)))
  return ops


def _use_groups(jacs: list) -> list:
  """The uses of one leaf grouped by `stack_key` (a group of one: a use on its own)."""
  groups: dict = {}
  for i, jac in enumerate(jacs):
    key = jac.stack_key()
    groups.setdefault(i if key is None else key, []).append(jac)
  return list(groups.values())


def _jacobian_time(jacs: list) -> int:
  """`_time` of forming one side's Jacobian of a leaf (as `_leaf_jacobian` does)."""
  total = 0
  for g in _use_groups(jacs):
    if not g[0].term.einsum:
      total += sum(j.cost for j in g)
    else:
      total += _time(g[0].ops if len(g) == 1 else _stacked_ops(g), g[0].out)
  return total


# --------------------------------------------------------------------------- one kernel


def _pair_ops(ctx, t1, uid1, t2, uid2):
  """The network of term t1 (side 1) against t2 (side 2), their group labels identified."""
  n1 = _Naming(1, uid1)
  redirect = {l2: n1(l1) for l1, l2 in zip(t1.group_labels, t2.group_labels)}
  n2 = _Naming(2, uid2, redirect)
  ops = _ct_ops(ctx, 1, t1, n1) + _ct_ops(ctx, 2, t2, n2)
  idx1 = [f for f in t1.factors if f.kind == "index"]
  idx2 = [f for f in t2.factors if f.kind == "index"]
  paired = set()
  for f1 in idx1:
    for f2 in idx2:
      if id(f2) not in paired and tuple(n2(l) for l in f2.idx_labels) == tuple(
          n1(l) for l in f1.idx_labels):
        ops.append(_pair_index_op(ctx, f1, n1, f2, n2))
        paired |= {id(f1), id(f2)}
        break
  for f in t1.factors:
    if id(f) not in paired:
      ops.append(_factor_op(ctx, 1, f, n1))
  for f in t2.factors:
    if id(f) not in paired:
      ops.append(_factor_op(ctx, 2, f, n2))
  return ops, t1.scale * t2.scale


def _swap_sides(x, out_labels):
  swap = lambda l: (l[0], l[1], 3 - l[2]) if len(l) == 3 else l
  perm = [out_labels.index(swap(l)) for l in out_labels]
  return jnp.transpose(x, perm) if perm != list(range(len(perm))) else x


@dataclasses.dataclass
class _Plan:
  method: str      # "structured": run(); "jacobian": run(J1, J2) from `_leaf_jacobian`
  cost: int
  run: Callable


def _cotangent_bytes(ctx: _Ctx, terms: list) -> int:
  """Bytes of the largest whole-batch cotangent, on side 1, of the sites these terms use."""
  cts = ctx.sides[0].cts[ctx.k]
  return max(sum(math.prod(c.shape) * c.dtype.itemsize for c in cts[t.site]) for t in terms)


def _leaf_jacobian(ctx: _Ctx, terms: list):
  """Side 1's per-output-entry Jacobian (lead..., θ) of one parameter leaf: Σ over uses."""
  groups = _use_groups([_Jacobian(ctx, 1, t, i) for i, t in enumerate(terms)])
  values = [g[0].value() if len(g) == 1 else _stacked_jacobian(g) for g in groups]
  return values[0] if len(values) == 1 else sum(values)


def _plan_leaf(ctx: _Ctx, terms1: list, terms2: list, symmetric: bool,
               chunked: bool = False) -> _Plan:
  """The faster by `_time` of Jacobians (A) and the structured network (B); the plan's
  `cost` counts multiply-adds. On a tie with chunked sides, A when a site's whole-batch
  cotangent exceeds a chunk: A forms its Jacobians chunk by chunk, B would hold that
  cotangent whole (small ones are cheaper in B's layouts)."""
  out = ctx.out_labels
  # A: materialised Jacobians.
  jac1 = [_Jacobian(ctx, 1, t, i) for i, t in enumerate(terms1)]
  jac2 = jac1 if symmetric else [_Jacobian(ctx, 2, t, i) for i, t in enumerate(terms2)]
  side_labels = [ctx.lead_labels[0] + _theta_labels(terms1[0]),
                 ctx.lead_labels[1] + _theta_labels(terms1[0])]
  shape1 = jac1[0].lead_shape + tuple(terms1[0].leaf_shape)
  shape2 = jac2[0].lead_shape + tuple(terms2[0].leaf_shape)
  sizes = dict(zip(side_labels[0], shape1))
  sizes.update(zip(side_labels[1], shape2))
  cost_a = (sum(j.cost for j in jac1) + (0 if symmetric else sum(j.cost for j in jac2))
            + network.cost(side_labels, out, sizes))

  def run_a(j1, j2):
    return network.contract([(j1, side_labels[0]), (j2, side_labels[1])], out)

  plan = _Plan("jacobian", cost_a, run_a)
  keys = {t.pair_key for t in terms1} | {t.pair_key for t in terms2}
  if None in keys or len(keys) != 1 or not all(t.einsum for t in terms1 + terms2):
    return plan
  # B: structured pairs.
  n = len(terms1)
  pairs = [(i, j) for i in range(n) for j in range(n) if not symmetric or i <= j]
  nets = []
  for i, j in pairs:
    ops, scale = _pair_ops(ctx, terms1[i], i, terms2[j], j)
    nets.append((i, j, ops, scale))
  gram = [_Op(side_labels[0], shape1, None), _Op(side_labels[1], shape2, None)]
  time_a = (_jacobian_time(jac1) + (0 if symmetric else _jacobian_time(jac2))
            + _time(gram, out))
  time_b = sum(_time(ops, out) for _, _, ops, _ in nets)
  if time_b > time_a or (chunked and time_b == time_a
                         and _cotangent_bytes(ctx, terms1) > CHUNK_BYTES):
    return plan
  cost_b = sum(_cost(ops, out) for _, _, ops, _ in nets)

  def run_b():
    total = None
    for i, j, ops, scale in nets:
      x = _contract(ops, out, ctx.cache)
      if scale != 1.0:
        x = x * scale
      if symmetric and i != j:
        x = x + _swap_sides(x, out)
      total = x if total is None else total + x
    return total

  return _Plan("structured", cost_b, run_b)


def _kernel_shape(ctx, fx1, fx2, output_axes):
  o1, o2 = jax.tree.leaves(fx1)[ctx.k], jax.tree.leaves(fx2)[ctx.k]
  return output_axes.kernel_shape(o1.shape, o2.shape), o1.shape


# --------------------------------------------------------------------------- entry points


def _setup(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2) -> "_Setting":
  param_leaves, p_def = jax.tree.flatten(params)
  batched = vmap_axes is not None and all(
      a is not None for a in vmap_axes.leaf_out_axes(fx1))
  vm = vmap_axes if batched else None
  prep1 = _prepare(f, param_leaves, p_def, x1, kwargs, vm, fx1)
  prep2 = prep1 if x2 is None else _prepare(f, param_leaves, p_def, x2, kwargs, vm, fx2)
  return _Setting(param_leaves, prep1, prep2, output_axes, fx1, fx2, x2 is None,
                  [vm.leaf_out_axes(fx) if vm is not None else None for fx in (fx1, fx2)])


def ntk(f: Callable, params: PyTree, x1: PyTree, x2: Optional[PyTree], kwargs: dict,
        output_axes: axes_lib.OutputAxes, vmap_axes: Optional[batching.VmapAxes],
        fx1: PyTree, fx2: PyTree) -> list[PyTree]:
  """Per-parameter-leaf NTK contributions (list over leaves of output-structured kernels),
  the signature of `jacobian_contraction.ntk`. `x2=None` computes each factor once."""
  setting = _setup(f, params, x1, x2, kwargs, output_axes, vmap_axes, fx1, fx2)
  param_leaves, prep1, prep2 = setting.param_leaves, setting.prep1, setting.prep2
  rules_lib.warn_fallbacks(prep1.fallbacks + (prep2.fallbacks if x2 is not None else []))
  n1, n2, _ = _chunk_counts(setting)
  chunks1 = _evaluate_chunks(prep1, param_leaves, n1)
  chunks2 = chunks1 if x2 is None else _evaluate_chunks(prep2, param_leaves, n2)
  side1 = _concat_sides(chunks1)
  side2 = side1 if x2 is None else _concat_sides(chunks2)
  for side, chunks, axes in ((side1, chunks1, setting.batch_axes[0]),
                             (side2, chunks2, setting.batch_axes[1])):
    for sd in [side] + chunks:
      sd.batch_axes = axes
  cache: dict = {}   # products shared between leaves (whole-batch sides)
  plans = _plans(setting, side1, side2, n1 > 1 or n2 > 1, cache)
  jacobians = [_chunked_jacobians(plans, chunks1, 0, output_axes, fx1, cache)]
  jacobians.append(jacobians[0] if x2 is None else
                   _chunked_jacobians(plans, chunks2, 1, output_axes, fx2, cache))
  out_def = jax.tree.structure(fx1)
  parts = []
  for leaf in range(len(param_leaves)):
    kernels = []
    for k in range(out_def.num_leaves):
      ctx = _make_ctx(k, side1, side2, output_axes, fx1, fx2)
      shape, o_shape = _kernel_shape(ctx, fx1, fx2, output_axes)
      if (leaf, k) not in plans:
        kernels.append(jnp.zeros(shape, ctx.dtype))
        continue
      plan = plans[(leaf, k)][0]
      theta = (plan.run(jacobians[0][(leaf, k)], jacobians[1][(leaf, k)])
               if plan.method == "jacobian" else plan.run())
      theta = theta / axes_lib.trace_size(o_shape, output_axes)
      kernels.append(theta.astype(ctx.dtype).reshape(shape))
    parts.append(out_def.unflatten(kernels))
  return parts


@dataclasses.dataclass
class _Setting:
  """What every plan of one kernel call depends on."""
  param_leaves: list
  prep1: _Prepared
  prep2: _Prepared
  output_axes: axes_lib.OutputAxes
  fx1: PyTree
  fx2: PyTree
  symmetric: bool
  batch_axes: list   # per side: output leaves' batch axes, or None


def _plans(setting: _Setting, side1: _Side, side2: _Side, chunked: bool,
           cache: Optional[dict] = None) -> dict:
  """{(parameter leaf, output leaf): (plan, terms1, terms2)} for every used parameter leaf."""
  cache = {} if cache is None else cache
  plans = {}
  for leaf in range(len(setting.param_leaves)):
    terms1 = [t for t in setting.prep1.terms if t.leaf == leaf]
    terms2 = [t for t in setting.prep2.terms if t.leaf == leaf]
    for k in range(jax.tree.structure(setting.fx1).num_leaves) if terms1 else ():
      ctx = _make_ctx(k, side1, side2, setting.output_axes, setting.fx1, setting.fx2)
      ctx.cache = cache
      plans[(leaf, k)] = (_plan_leaf(ctx, terms1, terms2, setting.symmetric, chunked),
                          terms1, terms2)
  return plans


def _abstract_plans(setting: _Setting, chunked: bool) -> dict:
  """`_plans` on whole-batch sides evaluated for shapes only (one abstract trace)."""
  holder = {}

  def run(pl):
    side1 = _evaluate(setting.prep1, pl)
    side2 = side1 if setting.symmetric else _evaluate(setting.prep2, pl)
    side1.batch_axes, side2.batch_axes = setting.batch_axes
    holder["plans"] = _plans(setting, side1, side2, chunked)
    return 0

  jax.eval_shape(run, [interp.aval(p) for p in setting.param_leaves])
  return holder["plans"]


def _chunk_counts(setting: _Setting) -> tuple:
  """(chunks of side 1, chunks of side 2, the chunked abstract plans or None).

  Chunking pays when most of the contraction then works from Jacobians formed chunk by chunk
  (conv kernels); when the bulk stays in structured networks (an MLP's dense layers, whose
  biases alone would take Jacobians), those read whole-batch cotangents and chunks only add
  work: 170 ms -> 300 ms on a 512-wide MLP with N=256. The plans that decided it are returned
  when chunking is kept (`estimate_flops` reports them)."""
  n1 = _num_chunks(setting.prep1, setting.fx1)
  n2 = n1 if setting.symmetric else _num_chunks(setting.prep2, setting.fx2)
  if max(n1, n2) == 1:
    return 1, 1, None
  plans = _abstract_plans(setting, True)
  jacobian = sum(p.cost for p, _, _ in plans.values() if p.method == "jacobian")
  if 2 * jacobian <= sum(p.cost for p, _, _ in plans.values()):
    return 1, 1, None
  return n1, n2, plans


def _chunked_jacobians(plans: dict, chunks: list, side: int, output_axes, fx,
                       cache: dict) -> dict:
  """{(leaf, k): Jacobian} of one side for every plan that contracts Jacobians, formed
  chunk by chunk (products shared between leaves within a chunk; with one chunk, `cache`,
  shared with the structured plans) and concatenated."""
  wanted = [key for key, (plan, _, _) in plans.items() if plan.method == "jacobian"]
  per_chunk = []
  for chunk in chunks:
    chunk_cache = cache if len(chunks) == 1 else {}
    values = {}
    for leaf, k in wanted:
      ctx = _make_ctx(k, chunk, chunk, output_axes, fx, fx)
      ctx.cache = chunk_cache
      values[(leaf, k)] = _leaf_jacobian(ctx, plans[(leaf, k)][1 + side])
    per_chunk.append(values)
  if len(per_chunk) == 1:
    return per_chunk[0]
  return {key: jnp.concatenate([v[key] for v in per_chunk], axis=0) for key in wanted}
