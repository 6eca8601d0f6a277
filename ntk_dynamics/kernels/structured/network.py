"""Contraction of small tensor networks in the cheapest pairwise order.

Operands carry hashable labels, one per axis. A label shared by operands and absent from the
output is summed; a label in the output and in several operands is a batch axis. The order
is found by dynamic programming over subsets (exact for the ≤ 10 operands that occur here),
counting multiply-adds: a pairwise step costs the product of the sizes of all labels of its
two inputs. Each step is a single `lax.dot_general` (after summing labels that only one
input still needs, and with contiguous runs of batch, contracted and free axes merged into one
axis each where both inputs agree on them), so XLA sees plain matmuls.
"""
from __future__ import annotations

import functools
import math
from typing import Hashable, Sequence

import jax.numpy as jnp
from jax import lax

Labels = tuple


def _prod(labels, sizes) -> int:
  return math.prod(sizes[l] for l in labels)


@functools.lru_cache(maxsize=4096)
def _plan(label_sets: tuple, out: frozenset, size_items: tuple):
  """(cost, tree) of the cheapest contraction; tree = int (operand) or (tree, tree)."""
  sizes = dict(size_items)
  n = len(label_sets)
  sets = [frozenset(s) for s in label_sets]
  full = (1 << n) - 1
  union: dict = {0: frozenset()}
  for mask in range(1, full + 1):
    low = mask & -mask
    union[mask] = union[mask ^ low] | sets[low.bit_length() - 1]

  def result(mask):
    return union[mask] & (union[full ^ mask] | out)

  best: dict = {}
  for i in range(n):
    m = 1 << i
    reduce_cost = _prod(sets[i], sizes) if result(m) != sets[i] else 0
    best[m] = (reduce_cost, i)
  if n > 10:  # greedy: cheapest pair first (never needed by the rules in this package)
    trees = {1 << i: best[1 << i] for i in range(n)}
    while len(trees) > 1:
      keys = list(trees)
      c, A, B = min(((_prod(result(A) | result(B), sizes), A, B)
                     for i, A in enumerate(keys) for B in keys[i + 1:]), key=lambda t: t[0])
      (ca, ta), (cb, tb) = trees.pop(A), trees.pop(B)
      trees[A | B] = (ca + cb + c, (ta, tb))
    return trees[full]
  masks = sorted(range(1, full + 1), key=lambda m: bin(m).count("1"))
  for mask in masks:
    if mask in best:
      continue
    low = mask & -mask
    rest = mask ^ low
    choice = None
    sub = rest
    while True:   # A always holds the lowest operand: each split once
      A = low | sub
      B = mask ^ A
      if B:
        c = best[A][0] + best[B][0] + _prod(result(A) | result(B), sizes)
        if choice is None or c < choice[0]:
          choice = (c, (best[A][1], best[B][1]))
      if sub == 0:
        break
      sub = (sub - 1) & rest
    best[mask] = choice
  return best[full]


def cost(label_sets: Sequence[Sequence[Hashable]], out: Sequence[Hashable],
         sizes: dict) -> int:
  """Multiply-adds of the cheapest pairwise contraction."""
  outset = set(out)
  label_sets = [tuple(l for l in s if sizes[l] != 1 or l in outset) for s in label_sets]
  key = _key(label_sets, out)
  return _plan(key[0], key[1], _sized(key, sizes))[0]


def steps(label_sets: Sequence[Sequence[Hashable]], out: Sequence[Hashable],
          sizes: dict) -> list:
  """[(multiply-adds, elements read and written)] of each step of the cheapest contraction."""
  outset = set(out)
  label_sets = [tuple(l for l in s if sizes[l] != 1 or l in outset) for s in label_sets]
  key = _key(label_sets, out)
  _, tree = _plan(key[0], key[1], _sized(key, sizes))
  sz = dict(_sized(key, sizes))
  sets = [frozenset(s) for s in key[0]]
  prod = lambda ls: math.prod(sz[l] for l in ls)
  found = []

  def leaves(t):
    return [t] if isinstance(t, int) else leaves(t[0]) + leaves(t[1])

  def result(idx):
    need = set(key[1]).union(*(sets[j] for j in range(len(sets)) if j not in idx))
    return frozenset(set().union(*(sets[i] for i in idx)) & need)

  def run(t):
    if isinstance(t, int):
      r = result({t})
      if r != sets[t]:
        found.append((prod(sets[t]), prod(sets[t]) + prod(r)))
      return r
    a, b = run(t[0]), run(t[1])
    r = result(set(leaves(t)))
    found.append((prod(a | b), prod(a) + prod(b) + prod(r)))
    return r

  run(tree)
  return found


def _key(label_sets, out):
  names: dict = {}
  canon = lambda l: names.setdefault(l, len(names))
  ls = tuple(tuple(canon(l) for l in s) for s in label_sets)
  return ls, frozenset(canon(l) for l in out), names


def _sized(key, sizes):
  names = key[2]
  return tuple(sorted((i, sizes[l]) for l, i in names.items()))


def _sum_out(x, labels, keep):
  axes = tuple(i for i, l in enumerate(labels) if l not in keep)
  if axes:
    x = jnp.sum(x, axis=axes)
    labels = tuple(l for l in labels if l in keep)
  return x, labels


def pairwise(a, la: Labels, b, lb: Labels, keep) -> tuple:
  """a · b summed over shared labels not in `keep`; labels only one side has and `keep`
  lacks are summed first. Returns (array, labels): batch, then a's free, then b's free."""
  a, la = _sum_out(a, la, set(keep) | set(lb))
  b, lb = _sum_out(b, lb, set(keep) | set(la))
  batch = [l for l in la if l in lb and l in keep]
  contract = [l for l in la if l in lb and l not in keep]
  labels = tuple(batch) + tuple(l for l in la if l not in lb) + tuple(
      l for l in lb if l not in la)
  dtype = jnp.result_type(a, b)
  a, b = a.astype(dtype), b.astype(dtype)
  merged = _merged_operands(a, la, b, lb, batch, contract)
  if merged is not None:
    (a2, (ca, ba)), (b2, (cb, bb)) = merged
    res = lax.dot_general(a2, b2, ((ca, cb), (ba, bb)))
    sizes = dict(zip(la, a.shape))
    sizes.update(zip(lb, b.shape))
    return res.reshape([sizes[l] for l in labels]), labels
  dims = (([la.index(l) for l in contract], [lb.index(l) for l in contract]),
          ([la.index(l) for l in batch], [lb.index(l) for l in batch]))
  return lax.dot_general(a, b, dims), labels


def _merged_operands(a, la, b, lb, batch, contract):
  """Both operands reshaped so that each holds at most one batch, one contracted and one
  free axis, with the dot_general dimension numbers of each: possible when every kind of
  axis is one contiguous run and the shared runs list their labels in the same order.
  XLA:CPU canonicalises a dot with several contracted or free axes by transposing an
  operand into a copy; on merged operands it reads a transposed layout in place."""
  def runs(x, labels):
    kind = ["b" if l in batch else "c" if l in contract else "f" for l in labels]
    order = [k for i, k in enumerate(kind) if i == 0 or kind[i - 1] != k]
    if len(order) != len(set(order)):
      return None
    sub = lambda k: [l for l, kk in zip(labels, kind) if kk == k]
    if sub("b") != batch or sub("c") != contract:
      return None
    shape = [math.prod(x.shape[i] for i, kk in enumerate(kind) if kk == k) for k in order]
    return x.reshape(shape), (([order.index("c")] if "c" in order else []),
                              ([order.index("b")] if "b" in order else []))

  ra, rb = runs(a, la), runs(b, lb)
  if ra is None or rb is None or (a.ndim == ra[0].ndim and b.ndim == rb[0].ndim):
    return None
  return ra, rb


def _canonical(entries, keep, is_global):
  """Key of a sub-network: its operands' identities and wiring, and the kept labels."""
  entries = sorted(entries, key=lambda e: repr(e[0]))
  fwd: dict = {}

  def name(l):
    if is_global(l):
      return ("g", l)
    return fwd.setdefault(l, ("c", len(fwd)))

  key = tuple((ident, tuple(name(l) for l in labels)) for ident, labels in entries)
  kept = frozenset(name(l) for l in keep)
  return (key, kept), fwd


def contract(operands: Sequence[tuple], out: Sequence[Hashable], *, idents=None,
             cache: dict | None = None, is_global=lambda l: False):
  """Contracts [(array, labels), ...] into an array with axes `out`.

  With `cache` (a dict shared by several calls) and `idents` (a hashable per operand naming
  its array, or None), every intermediate whose operands all have identities is looked up
  and stored by a canonical key, so that one product (e.g. the Gram matrix of the cotangents
  of a layer, needed by its weight and by its bias) is computed once per trace.
  `is_global(label)` marks labels whose names mean the same in every call (output axes).
  """
  out = tuple(out)
  outset = set(out)
  ops = []
  for x, l in operands:   # size-1 labels carry nothing: drop them unless requested
    l = tuple(l)
    drop = [i for i, (lab, sz) in enumerate(zip(l, x.shape)) if sz == 1 and lab not in outset]
    if drop:
      x = x.reshape([sz for i, sz in enumerate(x.shape) if i not in drop])
      l = tuple(lab for i, lab in enumerate(l) if i not in drop)
    ops.append((x, l))
  idents = list(idents) if idents is not None else [None] * len(ops)
  label_sets = [l for _, l in ops]
  sizes = {}
  for x, l in ops:
    for sz, lab in zip(x.shape, l):
      sizes[lab] = sz
  key = _key(label_sets, out)
  _, tree = _plan(key[0], key[1], _sized(key, sizes))
  all_sets = [set(l) for l in label_sets]
  rank = {l: i for i, l in enumerate(out)}

  def leaves(t):
    return [t] if isinstance(t, int) else leaves(t[0]) + leaves(t[1])

  def needed_outside(idx):
    inside = set(idx)
    s = set(outset)
    for j, ls in enumerate(all_sets):
      if j not in inside:
        s |= ls
    return s

  def first_rank(labels):
    ranks = sorted(rank.get(l, len(rank)) for l in labels)
    return ranks[0] if ranks else len(rank), -sum(r < len(rank) for r in ranks)

  def run(t):
    if isinstance(t, int):
      x, l = ops[t]
      return _sum_out(x, tuple(l), needed_outside([t]))
    idx = leaves(t)
    keep = needed_outside(idx)
    ckey = None
    if cache is not None and all(idents[i] is not None for i in idx):
      ckey, fwd = _canonical([(idents[i], label_sets[i]) for i in idx], keep & set().union(
          *(all_sets[i] for i in idx)), is_global)
      if ckey in cache:
        inv = {v: k for k, v in fwd.items()}
        x, names = cache[ckey]
        return x, tuple(n[1] if n[0] == "g" else inv[n] for n in names)
    a, la = run(t[0])
    b, lb = run(t[1])
    if first_rank(lb) < first_rank(la):   # the operand holding leading outputs first
      a, la, b, lb = b, lb, a, la
    x, l = pairwise(a, la, b, lb, keep)
    if ckey is not None:
      names = tuple(("g", lab) if is_global(lab) else fwd[lab] for lab in l)
      cache[ckey] = (x, names)
    return x, l

  x, l = run(tree)
  x, l = _sum_out(x, l, outset)
  assert set(l) == outset, (l, out)
  return jnp.transpose(x, [l.index(o) for o in out]) if l != out else x
