"""A zoo of tiny float64 models for kernel tests.

Every entry is an `f(params, x, **kwargs)` with its params and two example inputs x1 (N1 = 3)
and x2 (N2 = 4), sized so that each kernel takes milliseconds. `per_example` records whether
output i depends only on input i along axis 0 of every input and output leaf, i.e. whether
`vmap_axes=0` is a valid promise for the model.

Usage from any test file:

    from tests.zoo import ZOO, ZOO_NAMES, PER_EXAMPLE_NAMES
    entry = ZOO["mlp"]
    entry.f(entry.params, entry.x1)

Entries are built on first access (and then cached), so importing the module is cheap.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import itertools
import math
from typing import Any, Callable

import jax

jax.config.update("jax_enable_x64", True)

import haiku as hk  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ntk_dynamics import NtkImplementation, from_haiku  # noqa: E402

PyTree = Any
N1, N2 = 3, 4


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  name: str
  f: Callable[..., PyTree]
  params: PyTree
  x1: PyTree
  x2: PyTree
  per_example: bool
  kwargs: dict = dataclasses.field(default_factory=dict)
  description: str = ""

  @property
  def x2_same_batch(self) -> PyTree:
    """x2 cut to x1's batch size: a second input usable with `diagonal_axes=(0,)`."""
    n = jax.tree.leaves(self.x1)[0].shape[0]
    return jax.tree.map(lambda a: a[:n], self.x2)

  def x2_for(self, diagonal_batch: bool) -> PyTree:
    return self.x2_same_batch if diagonal_batch else self.x2

  def apply(self, params, x):
    return self.f(params, x, **self.kwargs)

  def __repr__(self):  # short ids in pytest output
    return f"ZooEntry({self.name})"


def _rng(seed: int) -> np.random.Generator:
  return np.random.default_rng(seed)


def _dense(rng, fan_in, fan_out, scale=1.0):
  return rng.normal(size=(fan_in, fan_out)) * scale / math.sqrt(fan_in)


def _inputs(rng, shape):
  return rng.normal(size=(N1,) + shape), rng.normal(size=(N2,) + shape)


def _smooth(x):  # smooth nonlinearity with non-vanishing higher derivatives
  return jnp.tanh(x) + 0.1 * x


# ------------------------------------------------------------------ plain-JAX models


def _mlp():
  rng = _rng(0)
  params = {"w1": _dense(rng, 5, 6), "b1": rng.normal(size=6) * 0.1,
            "w2": _dense(rng, 6, 3), "b2": rng.normal(size=3) * 0.1}

  def f(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]

  x1, x2 = _inputs(rng, (5,))
  return ZooEntry("mlp", f, params, x1, x2, per_example=True,
                  description="2-layer tanh MLP, dict params, (N, 5) -> (N, 3)")


def _plain_tuple_params():
  rng = _rng(1)
  # Params as tuples/lists (no dicts): ((w1, b1), [w2]).
  params = ((_dense(rng, 3, 4), rng.normal(size=4) * 0.1), [_dense(rng, 4, 2)])

  def f(p, x):
    (w1, b1), (w2,) = p
    h = jax.nn.softplus(jnp.einsum("nij,jk->nik", x, w1) + b1)  # (N, 2, 4)
    return h.sum(axis=1) @ w2

  x1, x2 = _inputs(rng, (2, 3))
  return ZooEntry("plain_tuple_params", f, params, x1, x2, per_example=True,
                  description="plain JAX, tuple/list params, rank-3 inputs, softplus")


def _conv(x, w, **kw):
  return jax.lax.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


def _conv_strided():
  rng = _rng(2)
  params = {"w": rng.normal(size=(3, 3, 2, 3)) / math.sqrt(18), "b": rng.normal(size=3) * 0.1}
  conv_kw = dict(window_strides=(2, 1), padding=((1, 0), (2, 1)), rhs_dilation=(1, 2))

  def f(p, x):
    return _smooth(_conv(x, p["w"], **conv_kw) + p["b"])  # spatial outputs (N, 3, 4, 3)

  x1, x2 = _inputs(rng, (6, 5, 2))
  return ZooEntry("conv_strided", f, params, x1, x2, per_example=True,
                  description="lax conv, stride (2,1), asymmetric padding, rhs dilation; "
                              "rank-4 outputs (N, H, W, C)")


def _conv_grouped():
  rng = _rng(3)
  # feature_group_count=2: 4 input channels in 2 groups of 2, 4 output channels.
  params = {"w": rng.normal(size=(2, 2, 2, 4)) / math.sqrt(8),
            "head": _dense(rng, 3 * 3 * 4, 3)}

  def f(p, x):
    h = _smooth(_conv(x, p["w"], window_strides=(1, 1), padding="VALID",
                      feature_group_count=2))
    return h.reshape(h.shape[0], -1) @ p["head"]

  x1, x2 = _inputs(rng, (4, 4, 4))
  return ZooEntry("conv_grouped", f, params, x1, x2, per_example=True,
                  description="grouped conv (feature_group_count=2) + dense head")


def _conv_depthwise():
  rng = _rng(4)
  # Depthwise: feature_group_count = in channels = 3, channel multiplier 2.
  params = {"w": rng.normal(size=(3, 3, 1, 6)) / 3.0, "b": rng.normal(size=6) * 0.1,
            "head": _dense(rng, 6, 2)}

  def f(p, x):
    h = _smooth(_conv(x, p["w"], window_strides=(2, 2), padding="SAME",
                      feature_group_count=3) + p["b"])
    return h.mean(axis=(1, 2)) @ p["head"]

  x1, x2 = _inputs(rng, (5, 5, 3))
  return ZooEntry("conv_depthwise", f, params, x1, x2, per_example=True,
                  description="depthwise conv (feature_group_count=C_in), SAME, stride 2, "
                              "global average pool")


def _residual_block():
  rng = _rng(5)
  params = {"w1": _dense(rng, 4, 6), "b1": rng.normal(size=6) * 0.1,
            "w2": _dense(rng, 6, 4), "ln_scale": 1.0 + 0.1 * rng.normal(size=4),
            "out": _dense(rng, 4, 3)}

  def f(p, x):
    h = x + jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"]
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-3)
    return (h * p["ln_scale"]) @ p["out"]

  x1, x2 = _inputs(rng, (4,))
  return ZooEntry("residual_block", f, params, x1, x2, per_example=True,
                  description="x + MLP(x), layer norm, dense readout")


def _shared_weight():
  rng = _rng(6)
  params = {"w": _dense(rng, 4, 4), "b": rng.normal(size=4) * 0.1, "v": _dense(rng, 4, 3)}

  def f(p, x):
    h = jnp.tanh(x @ p["w"])
    h = jnp.tanh(h @ p["w"] + p["b"])  # the same weight used a second time
    return h @ p["v"]

  x1, x2 = _inputs(rng, (4,))
  return ZooEntry("shared_weight", f, params, x1, x2, per_example=True,
                  description="one weight matrix applied twice")


def _pytree_io():
  rng = _rng(7)
  params = {"wa": _dense(rng, 4, 5), "wb": _dense(rng, 3, 5), "h1": _dense(rng, 5, 3),
            "h2": rng.normal(size=(5, 2, 2)) / math.sqrt(5)}

  def f(p, x):
    h = jnp.tanh(x["a"] @ p["wa"] + (x["b"] @ p["wb"]).mean(axis=1))
    return h @ p["h1"], jnp.einsum("nf,fij->nij", h, p["h2"])

  a1, a2 = _inputs(rng, (4,))
  b1, b2 = _inputs(rng, (2, 3))
  return ZooEntry("pytree_io", f, params, {"a": a1, "b": b1}, {"a": a2, "b": b2},
                  per_example=True,
                  description="dict inputs {a: (N,4), b: (N,2,3)}; tuple outputs "
                              "((N,3), (N,2,2))")


def _batch_mixing():
  rng = _rng(8)
  params = {"w": _dense(rng, 4, 5), "v": _dense(rng, 5, 2)}

  def f(p, x):
    h = x @ p["w"]
    return jnp.tanh(h - h.mean(axis=0, keepdims=True)) @ p["v"]  # mixes the batch

  x1, x2 = _inputs(rng, (4,))
  return ZooEntry("batch_mixing", f, params, x1, x2, per_example=False,
                  description="subtracts the batch mean: outputs depend on every example")


# ------------------------------------------------------------------ Haiku models


def _haiku_params(transformed, x, seed):
  params = jax.jit(transformed.init)(jax.random.PRNGKey(seed), x)  # jit: faster than eager
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)


def _cnn_haiku():
  rng = _rng(9)

  def net(x):
    h = hk.Conv2D(3, kernel_shape=3, stride=2, padding="VALID")(x)
    h = _smooth(h)
    h = hk.Conv2D(2, kernel_shape=(2, 1), rate=(1, 1), padding="SAME")(h)
    return hk.Linear(3)(_smooth(h).reshape(h.shape[0], -1))

  transformed = hk.without_apply_rng(hk.transform(net))
  x1, x2 = _inputs(rng, (5, 5, 2))
  params = _haiku_params(transformed, x1, 9)
  return ZooEntry("cnn_haiku", from_haiku(transformed), params, x1, x2, per_example=True,
                  description="Haiku CNN (strided VALID conv, SAME conv, linear head)")


def _attention():
  rng = _rng(10)
  d, heads, dh, k = 4, 2, 2, 2
  params = {"ln_scale": 1.0 + 0.1 * rng.normal(size=d), "ln_offset": 0.1 * rng.normal(size=d),
            "qkv": rng.normal(size=(d, 3, heads, dh)) / math.sqrt(d),
            "wo": rng.normal(size=(heads, dh, d)) / math.sqrt(heads * dh),
            "out": _dense(rng, d, k)}

  def f(p, x):  # x: (N, T, D); attention over T within each example, never across N
    mu = x.mean(-1, keepdims=True)
    h = (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    h = h * p["ln_scale"] + p["ln_offset"]
    q, kk, v = jnp.einsum("ntd,dchk->cnthk", h, p["qkv"])
    logits = jnp.einsum("nthk,nshk->nhts", q, kk) / math.sqrt(dh)
    o = jnp.einsum("nhts,nshk->nthk", jax.nn.softmax(logits, axis=-1), v)
    h = x + jnp.einsum("nthk,hkd->ntd", o, p["wo"])
    return jnp.tanh(h) @ p["out"]

  x1, x2 = _inputs(rng, (3, d))
  return ZooEntry("attention", f, params, x1, x2, per_example=True,
                  description="layer norm + 2-head self-attention over the sequence axis "
                              "(plain JAX); outputs (N, T, 2)")


def _token_pool():
  rng = _rng(12)
  d, k = 4, 3
  params = {"embed": _dense(rng, 2, d), "pos": 0.1 * rng.normal(size=(3, d)),
            "ln_scale": 1.0 + 0.1 * rng.normal(size=d), "ln_offset": 0.1 * rng.normal(size=d),
            "head": _dense(rng, d, k), "head_bias": 0.1 * rng.normal(size=k)}

  def f(p, x):  # x: (N, T, 2) -> (N, K): ViT-style layer norm, mean over tokens, dense head
    h = x @ p["embed"] + p["pos"]
    mu = h.mean(-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    h = h * p["ln_scale"] + p["ln_offset"]   # offset: cotangent constant over tokens
    return h.mean(1) @ p["head"] + p["head_bias"]

  x1, x2 = _inputs(rng, (3, 2))
  return ZooEntry("token_pool", f, params, x1, x2, per_example=True,
                  description="token embedding + position table, layer norm, mean over "
                              "tokens, dense head (plain JAX); outputs (N, 3)")


def _embedding():
  rng = _rng(11)

  def net(tokens):  # tokens: int32 (N, T)
    e = hk.Embed(vocab_size=7, embed_dim=4)(tokens)
    return hk.Linear(3)(jnp.tanh(e).mean(axis=1))

  transformed = hk.without_apply_rng(hk.transform(net))
  x1 = jnp.asarray(rng.integers(0, 7, size=(N1, 5)), jnp.int32)
  x2 = jnp.asarray(rng.integers(0, 7, size=(N2, 5)), jnp.int32)
  params = _haiku_params(transformed, x1, 11)
  return ZooEntry("embedding", from_haiku(transformed), params, x1, x2, per_example=True,
                  description="embedding lookup of int32 token ids, mean over tokens")


def _batchnorm_state():
  rng = _rng(12)

  def net(x, is_training):
    h = hk.Linear(5)(x)
    h = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.5)(h, is_training)
    return hk.Linear(3)(jnp.tanh(h))

  transformed = hk.transform_with_state(net)
  x1, x2 = _inputs(rng, (4,))
  params, state = jax.jit(transformed.init, static_argnums=2)(jax.random.PRNGKey(12), x1, True)
  # A few training steps so that the moving statistics are not the trivial (0, 1).
  train_step = jax.jit(lambda s, x: transformed.apply(params, s, None, x, True)[1])
  for _ in range(3):
    state = train_step(state, rng.normal(size=(8, 4)) * 2 + 1)
  f = from_haiku(transformed, state=state)
  return ZooEntry("batchnorm_state", f, params, x1, x2, per_example=True,
                  kwargs={"is_training": False},
                  description="hk.transform_with_state, BatchNorm in eval mode (state "
                              "fixed), is_training=False passed as a kwarg")


def _dropout_rng():
  rng = _rng(13)

  def net(x):
    h = hk.Linear(6)(x)
    h = hk.dropout(hk.next_rng_key(), 0.3, h)
    return hk.Linear(3)(jnp.tanh(h))

  transformed = hk.transform(net)
  x1, x2 = _inputs(rng, (4,))
  params = _haiku_params(transformed, x1, 13)
  f = from_haiku(transformed, rng=jax.random.PRNGKey(42))
  # The dropout mask is drawn for the whole batch shape, so example i's output depends on the
  # batch size: vmap_axes=0 would change the function.
  return ZooEntry("dropout_rng", f, params, x1, x2, per_example=False,
                  description="hk.transform with an apply rng (dropout with a fixed key)")


_BUILDERS: dict[str, Callable[[], ZooEntry]] = {
    "mlp": _mlp,
    "plain_tuple_params": _plain_tuple_params,
    "conv_strided": _conv_strided,
    "conv_grouped": _conv_grouped,
    "conv_depthwise": _conv_depthwise,
    "residual_block": _residual_block,
    "shared_weight": _shared_weight,
    "pytree_io": _pytree_io,
    "batch_mixing": _batch_mixing,
    "cnn_haiku": _cnn_haiku,
    "attention": _attention,
    "token_pool": _token_pool,
    "embedding": _embedding,
    "batchnorm_state": _batchnorm_state,
    "dropout_rng": _dropout_rng,
}

# Known statically so that test parametrization needs no model to be built.
_PER_EXAMPLE = {name: name not in ("batch_mixing", "dropout_rng") for name in _BUILDERS}


class _LazyZoo(collections.abc.Mapping):
  """name -> ZooEntry, each built (and its params cast to float64) on first access."""

  def __init__(self, builders):
    self._builders = builders
    self._cache: dict[str, ZooEntry] = {}

  def __getitem__(self, name: str) -> ZooEntry:
    if name not in self._cache:
      entry = self._builders[name]()
      as64 = lambda a: (jnp.asarray(a, jnp.float64)
                        if jnp.issubdtype(jnp.result_type(a), jnp.floating) else jnp.asarray(a))
      entry = dataclasses.replace(entry, params=jax.tree.map(as64, entry.params),
                                  x1=jax.tree.map(as64, entry.x1),
                                  x2=jax.tree.map(as64, entry.x2))
      assert entry.per_example == _PER_EXAMPLE[name], name
      self._cache[name] = entry
    return self._cache[name]

  def __iter__(self):
    return iter(self._builders)

  def __len__(self):
    return len(self._builders)


ZOO: collections.abc.Mapping = _LazyZoo(_BUILDERS)
ZOO_NAMES: tuple[str, ...] = tuple(_BUILDERS)
PER_EXAMPLE_NAMES: tuple[str, ...] = tuple(n for n in ZOO_NAMES if _PER_EXAMPLE[n])


def is_per_example(name: str) -> bool:
  return _PER_EXAMPLE[name]


# ------------------------------------------------------------------ brute-force reference
#
# Written independently of ntk_dynamics/kernels/axes.py: jax.jacrev of the whole batch w.r.t.
# all params, flattened into one (all output entries) x (all parameter entries) matrix, an
# explicit product, then trace (mean) / diagonal applied one axis at a time with np.trace /
# np.diagonal and an explicit bookkeeping of which axis is where.


@dataclasses.dataclass(frozen=True)
class FlatJacobian:
  """J as a matrix: rows = output entries (leaves concatenated), cols = parameter entries."""
  matrix: np.ndarray
  out_shapes: list       # shape of each output leaf, in jax.tree.leaves order
  out_def: Any           # output treedef
  param_sizes: list      # size of each parameter leaf, in jax.tree.leaves order

  def row_slices(self):
    offs = np.cumsum([0] + [math.prod(s) for s in self.out_shapes])
    return [slice(a, b) for a, b in zip(offs[:-1], offs[1:])]

  def col_slices(self):
    offs = np.cumsum([0] + list(self.param_sizes))
    return [slice(a, b) for a, b in zip(offs[:-1], offs[1:])]


def flat_jacobians(f: Callable, params: PyTree, xs: list, kwargs: dict | None = None
                   ) -> list[FlatJacobian]:
  """`flat_jacobian` of several inputs (one compilation for all of them)."""
  kwargs = kwargs or {}
  # jit only to cut the op-by-op dispatch cost; the computation is plain reverse mode of the
  # whole batch.
  jacs = jax.jit(lambda p, xs: [jax.jacrev(lambda q: f(q, x, **kwargs))(p) for x in xs])(
      params, list(xs))
  return [_flatten_jacobian(jax.eval_shape(lambda q: f(q, x, **kwargs), params), jac, params)
          for x, jac in zip(xs, jacs)]


def flat_jacobian(f: Callable, params: PyTree, x: PyTree, kwargs: dict | None = None
                  ) -> FlatJacobian:
  return flat_jacobians(f, params, [x], kwargs)[0]


def _flatten_jacobian(out, jac, params) -> FlatJacobian:
  out_leaves, out_def = jax.tree.flatten(out)
  per_out = out_def.flatten_up_to(jac)  # one params-structured tree per output leaf
  p_leaves = jax.tree.leaves(params)
  rows = []
  for o, jtree in zip(out_leaves, per_out):
    blocks = jax.tree.leaves(jtree)
    assert len(blocks) == len(p_leaves)
    rows.append(np.concatenate(
        [np.asarray(b, np.float64).reshape(o.size, np.size(p)) for b, p in zip(blocks, p_leaves)],
        axis=1))
  return FlatJacobian(np.concatenate(rows, axis=0), [tuple(o.shape) for o in out_leaves],
                      out_def, [int(np.size(p)) for p in p_leaves])


_JACOBIAN_CACHE: dict[str, dict[str, FlatJacobian]] = {}


def zoo_jacobians(name: str) -> dict[str, FlatJacobian]:
  """Cached reference Jacobians of a zoo model at its x1 ('x1'), x2 ('x2') and x2 cut to
  x1's batch size ('x2_same_batch')."""
  if name not in _JACOBIAN_CACHE:
    e = ZOO[name]
    j = flat_jacobians(e.f, e.params, [e.x1, e.x2, e.x2_same_batch], e.kwargs)
    _JACOBIAN_CACHE[name] = dict(zip(("x1", "x2", "x2_same_batch"), j))
  return _JACOBIAN_CACHE[name]


def zoo_reference_ntk(name: str, x2_mode: str, trace_axes, diagonal_axes, cols=None):
  """Reference NTK of zoo model `name` between x1 and x2_mode ('none': x1 itself, 'x2',
  'x2_same_batch'); `cols` restricts to some parameter entries (see FlatJacobian)."""
  jacs = zoo_jacobians(name)
  j1 = jacs["x1"]
  j2 = j1 if x2_mode == "none" else jacs[x2_mode]
  blocks = reference_full_blocks(j1, j2, cols)
  return j1.out_def.unflatten([apply_axes(b, len(s), trace_axes, diagonal_axes)
                               for b, s in zip(blocks, j1.out_shapes)])


def _canon(axes, ndim):
  if axes is None:
    axes = ()
  if isinstance(axes, int):
    axes = (axes,)
  return sorted({a % ndim for a in axes})


def apply_axes(full: np.ndarray, ndim: int, trace_axes, diagonal_axes) -> np.ndarray:
  """`full` has axes (x1's output axes 0..ndim-1, then x2's). Returns the NT kernel layout:
  per output axis in order, traced -> gone (mean), diagonal -> one axis, else (x1's, x2's)."""
  trace = _canon(trace_axes, ndim)
  diag = _canon(diagonal_axes, ndim)
  assert not set(trace) & set(diag)
  labels = [("1", a) for a in range(ndim)] + [("2", a) for a in range(ndim)]
  k = np.asarray(full)
  for a in trace:
    i, j = labels.index(("1", a)), labels.index(("2", a))
    assert k.shape[i] == k.shape[j]
    size = k.shape[i]
    k = np.trace(k, axis1=i, axis2=j) / size
    labels = [l for l in labels if l not in (("1", a), ("2", a))]
  for a in diag:
    i, j = labels.index(("1", a)), labels.index(("2", a))
    k = np.diagonal(k, axis1=i, axis2=j)  # the diagonal becomes the last axis
    labels = [l for l in labels if l not in (("1", a), ("2", a))] + [("d", a)]
  order = []
  for a in range(ndim):
    if a in diag:
      order.append(("d", a))
    elif a not in trace:
      order += [("1", a), ("2", a)]
  assert sorted(order) == sorted(labels)
  return np.transpose(k, [labels.index(l) for l in order]) if order else k


def reference_full_blocks(j1: FlatJacobian, j2: FlatJacobian, cols=None) -> list[np.ndarray]:
  """Full kernel (out1 axes + out2 axes) of each output leaf with itself; `cols` restricts
  the parameter entries summed over (for per-parameter references)."""
  cols = slice(None) if cols is None else cols
  theta = j1.matrix[:, cols] @ j2.matrix[:, cols].T
  blocks = []
  for s1, s2, r1, r2 in zip(j1.out_shapes, j2.out_shapes, j1.row_slices(), j2.row_slices()):
    blocks.append(theta[r1, r2].reshape(s1 + s2))
  return blocks


def reference_ntk(f, params, x1, x2, trace_axes=(-1,), diagonal_axes=(), kwargs=None,
                  per_parameter=False):
  """NT-semantics empirical NTK by brute force; pytree of kernels like f's output (or, with
  per_parameter, a params-structured pytree of those)."""
  j1 = flat_jacobian(f, params, x1, kwargs)
  j2 = j1 if x2 is None else flat_jacobian(f, params, x2, kwargs)

  def kernels(cols=None):
    blocks = reference_full_blocks(j1, j2, cols)
    return j1.out_def.unflatten(
        [apply_axes(b, len(s), trace_axes, diagonal_axes)
         for b, s in zip(blocks, j1.out_shapes)])

  if not per_parameter:
    return kernels()
  return jax.tree.structure(params).unflatten([kernels(c) for c in j1.col_slices()])


def reference_nngp(f, params, x1, x2, trace_axes=(-1,), diagonal_axes=(), kwargs=None):
  kwargs = kwargs or {}
  out1 = f(params, x1, **kwargs)
  out2 = out1 if x2 is None else f(params, x2, **kwargs)
  return jax.tree.map(
      lambda a, b: apply_axes(np.multiply.outer(np.asarray(a), np.asarray(b)), np.ndim(a),
                              trace_axes, diagonal_axes), out1, out2)


def reference_ntk_vp(f, params, x1, x2, v, kwargs=None):
  """(Θ v)[i] = Σ_j Θ[i, j] v[j] over all output entries of all leaves (no trace)."""
  j1 = flat_jacobian(f, params, x1, kwargs)
  j2 = j1 if x2 is None else flat_jacobian(f, params, x2, kwargs)
  v_flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(v)])
  out = j1.matrix @ (j2.matrix.T @ v_flat)
  return j1.out_def.unflatten([out[r].reshape(s)
                               for r, s in zip(j1.row_slices(), j1.out_shapes)])


def max_rel_err(actual: PyTree, expected: PyTree, scale: float | None = None) -> float:
  """max |actual - expected| / max |expected| over all leaves (structures must match).

  `scale` replaces max |expected| (e.g. the whole kernel's scale for one parameter leaf's
  contribution, which may be exactly zero, like a key bias under softmax).
  """
  if jax.tree.structure(actual) != jax.tree.structure(expected):
    raise AssertionError(f"structure {jax.tree.structure(actual)} != "
                         f"{jax.tree.structure(expected)}")
  a_leaves, e_leaves = jax.tree.leaves(actual), jax.tree.leaves(expected)
  if scale is None:
    scale = max(float(np.max(np.abs(e))) if np.size(e) else 0.0 for e in e_leaves)
  err = 0.0
  for a, e in zip(a_leaves, e_leaves):
    a, e = np.asarray(a), np.asarray(e)
    if a.shape != e.shape:
      raise AssertionError(f"shape {a.shape} != expected {e.shape}")
    if a.size:
      err = max(err, float(np.max(np.abs(a - e))))
  return err / max(scale, 1e-300)


def assert_close(actual: PyTree, expected: PyTree, tol: float = 1e-10,
                 scale: float | None = None) -> None:
  err = max_rel_err(actual, expected, scale)
  assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"


# ------------------------------------------------------------------ shared parametrization

# Relative error (to the reference's max abs) allowed against the float64 reference.
REFERENCE_TOL = 1e-10
# `implementation` parameters: every member of NtkImplementation.
IMPLEMENTATIONS = [pytest.param(impl, id=impl.name) for impl in NtkImplementation]

# (trace_axes, diagonal_axes, x2 given?): the full grid of variants ...
VARIANTS = list(itertools.product([(), (-1,)], [(), (0,)], [True, False]))
# ... and a pairwise-covering half of it (an L4 orthogonal array: every pair of values of any
# two of the three factors occurs once), used where the full grid runs on the same code path
# already (see `_variants` in test_kernels_reference.py).
PAIRWISE_VARIANTS = [((), (), True), ((), (0,), False), ((-1,), (), False),
                     ((-1,), (0,), True)]
# ... and two variants that still take every value of every factor once.
MINIMAL_VARIANTS = [((), (), True), ((-1,), (0,), False)]


def variant_name(trace_axes, diagonal_axes, with_x2):
  return f"trace_axes={trace_axes} diagonal_axes={diagonal_axes} x2={'x2' if with_x2 else None}"


def x2_mode(with_x2: bool, diagonal_axes) -> str:
  """Which x2 a variant uses: None, or x2 (cut to x1's batch size when the batch axis is
  diagonal, which needs equal batch sizes)."""
  if not with_x2:
    return "none"
  return "x2_same_batch" if 0 in diagonal_axes else "x2"


def x2_input(entry, mode):
  return {"none": None, "x2": entry.x2, "x2_same_batch": entry.x2_same_batch}[mode]


def call_variants(entry, fns: dict) -> dict:
  """{variant: kernel_fn} -> {variant: kernel} on the entry's inputs, all in one jit (one
  compilation per test instead of one per variant)."""
  @jax.jit
  def all_variants(params, inputs):
    return {v: fn(inputs["x1"], inputs[x2_mode(v[2], v[1])], params, **entry.kwargs)
            for v, fn in fns.items()}

  inputs = {"x1": entry.x1, "none": None, "x2": entry.x2,
            "x2_same_batch": entry.x2_same_batch}
  return all_variants(entry.params, inputs)


def check_variants(got: dict, want: dict):
  errors = {k: max_rel_err(got[k], want[k]) for k in want}
  bad = {k: v for k, v in errors.items() if not v < REFERENCE_TOL}
  assert not bad, "relative errors >= {:.0e}:\n  ".format(REFERENCE_TOL) + "\n  ".join(
      f"{variant_name(*k)}: {v:.3e}" for k, v in bad.items())


