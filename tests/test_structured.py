"""STRUCTURED_DERIVATIVES against a float64 brute-force reference (jacrev + explicit products).

Every kernel must match `tests.zoo.reference_ntk`-style references to a relative error below
1e-10, over the trace/diagonal/vmap/x2 settings, on the zoo models and on models built here
to reach each structure rule: strided/dilated/padded/grouped/depthwise/batch-grouped and
transposed convolutions, weight sharing, calls inside jit / custom_jvp / custom_vjp /
checkpoint, embedding lookups (all gather modes, tied embeddings), parameters returned as
outputs, concatenate/pad/reshape of parameters, scans over parameters (unrolled, and
the dense fallback for those that are not).
"""
from __future__ import annotations

import functools
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402

from ntk_dynamics import NtkImplementation, empirical_ntk_fn  # noqa: E402
from ntk_dynamics.kernels import axes as axes_lib  # noqa: E402
from ntk_dynamics.kernels import batching  # noqa: E402
from ntk_dynamics.kernels import structured  # noqa: E402
from ntk_dynamics.kernels.structured import core as structured_core  # noqa: E402
from ntk_dynamics.kernels.structured import network  # noqa: E402
from tests import zoo  # noqa: E402

SD = NtkImplementation.STRUCTURED_DERIVATIVES
TOL = 1e-10


# ----------------------------------------------------------------------- references


@functools.lru_cache(maxsize=None)
def _zoo_jacobians(name: str, x2_kind: str):
  e = zoo.ZOO[name]
  x2 = {"none": None, "other": e.x2, "same": e.x2_same_batch}[x2_kind]
  j1 = zoo.flat_jacobian(e.f, e.params, e.x1, e.kwargs)
  j2 = j1 if x2 is None else zoo.flat_jacobian(e.f, e.params, x2, e.kwargs)
  return j1, j2


def _reference_from(j1, j2, trace_axes, diagonal_axes, per_parameter=False, params=None):
  def kernels(cols=None):
    blocks = zoo.reference_full_blocks(j1, j2, cols)
    return j1.out_def.unflatten([zoo.apply_axes(b, len(s), trace_axes, diagonal_axes)
                                 for b, s in zip(blocks, j1.out_shapes)])
  if not per_parameter:
    return kernels()
  return jax.tree.structure(params).unflatten([kernels(c) for c in j1.col_slices()])


def reference(f, params, x1, x2, trace_axes, diagonal_axes, kwargs=None):
  j1 = zoo.flat_jacobian(f, params, x1, kwargs)
  j2 = j1 if x2 is None else zoo.flat_jacobian(f, params, x2, kwargs)
  return _reference_from(j1, j2, trace_axes, diagonal_axes)


def sd(f, params, x1, x2, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None, kwargs=None,
       per_parameter=False):
  fn = empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, SD, per_parameter)
  return fn(x1, x2, params, **(kwargs or {}))


def sd_whole_batch(f, params, x1, x2, trace_axes, diagonal_axes, kwargs=None):
  """The path without any per-example promise (the API may prove one and skip it)."""
  kwargs = kwargs or {}
  oa = axes_lib.OutputAxes.create(trace_axes, diagonal_axes)
  fx1 = jax.eval_shape(functools.partial(f, **kwargs), params, x1)
  fx2 = fx1 if x2 is None else jax.eval_shape(functools.partial(f, **kwargs), params, x2)

  @jax.jit
  def run(p, a, b):
    parts = structured.ntk(f, p, a, b, kwargs, oa, None, fx1, fx2)
    return jax.tree.map(lambda *k: functools.reduce(jnp.add, k), *parts)

  return run(params, x1, x2)


def check(f, params, x1, x2, trace_axes, diagonal_axes, vmap_axes, kwargs=None):
  got = sd(f, params, x1, x2, trace_axes, diagonal_axes, vmap_axes, kwargs)
  zoo.assert_close(got, reference(f, params, x1, x2, trace_axes, diagonal_axes, kwargs), TOL)


# ----------------------------------------------------------------------- zoo models

# (trace_axes, diagonal_axes, vmap_axes, x2 is None)
FULL_GRID = [(t, d, v, s) for t in ((), (-1,)) for d in ((), (0,)) for v in (None, 0)
             for s in (False, True)]
SPREAD = [((), (), 0, False), ((-1,), (0,), 0, True), ((-1,), (), None, False),
          ((), (0,), None, True)]


def _zoo_case(name, trace_axes, diagonal_axes, vmap_axes, symmetric):
  e = zoo.ZOO[name]
  x2_kind = "none" if symmetric else ("same" if diagonal_axes == (0,) else "other")
  x2 = {"none": None, "other": e.x2, "same": e.x2_same_batch}[x2_kind]
  got = sd(e.f, e.params, e.x1, x2, trace_axes, diagonal_axes, vmap_axes, e.kwargs)
  j1, j2 = _zoo_jacobians(name, x2_kind)
  zoo.assert_close(got, _reference_from(j1, j2, trace_axes, diagonal_axes), TOL)


@pytest.mark.parametrize("trace_axes,diagonal_axes,vmap_axes,symmetric", FULL_GRID)
@pytest.mark.parametrize("name", ["mlp"])
def test_full_grid(name, trace_axes, diagonal_axes, vmap_axes, symmetric):
  _zoo_case(name, trace_axes, diagonal_axes, vmap_axes, symmetric)


_OTHERS = [n for n in zoo.ZOO_NAMES if n != "mlp"]


@pytest.mark.parametrize("trace_axes,diagonal_axes,vmap_axes,symmetric", SPREAD)
@pytest.mark.parametrize("name", _OTHERS)
def test_zoo(name, trace_axes, diagonal_axes, vmap_axes, symmetric):
  if vmap_axes is not None and not zoo.is_per_example(name):
    vmap_axes = None
  _zoo_case(name, trace_axes, diagonal_axes, vmap_axes, symmetric)


def _chunk_counts_with_tiny_chunks(monkeypatch) -> list:
  """Sets a 1-byte chunk budget; returns the list that records every side's chunk count."""
  monkeypatch.setattr(structured_core, "CHUNK_BYTES", 1)
  counts = []
  evaluate_chunks = structured_core._evaluate_chunks
  monkeypatch.setattr(structured_core, "_evaluate_chunks",
                      lambda prep, pl, n: counts.append(n) or evaluate_chunks(prep, pl, n))
  return counts


@pytest.mark.parametrize("name", ["conv_grouped", "conv_depthwise", "token_pool",
                                  "batchnorm_state"])
def test_examples_in_chunks(name, monkeypatch):
  """A batched side evaluated in chunks of examples (Jacobians formed chunk by chunk and
  concatenated) gives the same kernel."""
  counts = _chunk_counts_with_tiny_chunks(monkeypatch)
  for case in SPREAD:
    if case[2] is not None:
      _zoo_case(name, *case)
  assert max(counts) > 1


def test_no_chunks_when_structured_networks_dominate(monkeypatch):
  """An MLP's dense layers keep their networks (only the biases would take Jacobians), so
  its sides are not chunked, however small the chunk budget."""
  counts = _chunk_counts_with_tiny_chunks(monkeypatch)
  _zoo_case("mlp", (), (), 0, False)
  assert counts == [1, 1]


@pytest.mark.parametrize("name", ["mlp", "attention", "embedding", "conv_depthwise"])
def test_whole_batch_path(name):
  e = zoo.ZOO[name]
  for trace_axes, diagonal_axes, symmetric in (((), (), False), ((-1,), (0,), True)):
    x2 = None if symmetric else (e.x2_same_batch if diagonal_axes else e.x2)
    got = sd_whole_batch(e.f, e.params, e.x1, x2, trace_axes, diagonal_axes, e.kwargs)
    zoo.assert_close(got, reference(e.f, e.params, e.x1, x2, trace_axes, diagonal_axes,
                                    e.kwargs), TOL)


@pytest.mark.parametrize("name,vmap_axes", [("pytree_io", 0), ("attention", None),
                                            ("conv_grouped", 0)])
def test_per_parameter_parts(name, vmap_axes):
  e = zoo.ZOO[name]
  parts = sd(e.f, e.params, e.x1, e.x2, (), (), vmap_axes, e.kwargs, per_parameter=True)
  total = sd(e.f, e.params, e.x1, e.x2, (), (), vmap_axes, e.kwargs)
  j1, j2 = _zoo_jacobians(name, "other")
  zoo.assert_close(parts, _reference_from(j1, j2, (), (), True, e.params), TOL)
  summed = jax.tree.map(lambda *k: functools.reduce(jnp.add, k), *jax.tree.leaves(
      parts, is_leaf=lambda t: jax.tree.structure(t) == jax.tree.structure(total)))
  zoo.assert_close(summed, total, TOL)


# ----------------------------------------------------------------------- rule coverage

rng = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale)


def _conv(x, w, **kw):
  return lax.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


def test_conv_batch_group_count():
  # batch_group_count=2: example groups {0, 1} meet output-feature groups: not per example.
  params = {"w": _normal(2, 2, 3, 4, scale=0.3), "v": _normal(3 * 3 * 4, 2, scale=0.2)}

  def f(p, x):
    h = jnp.tanh(_conv(x, p["w"], window_strides=(1, 1), padding="VALID",
                       batch_group_count=2))
    return h.reshape(h.shape[0], -1) @ p["v"]

  x1, x2 = _normal(4, 4, 4, 3), _normal(6, 4, 4, 3)
  for trace_axes, diagonal_axes, x2_ in (((), (), x2), ((-1,), (), None)):
    check(f, params, x1, x2_, trace_axes, diagonal_axes, None)


def test_conv_transposed_and_nchw_layouts():
  params = {"w": _normal(3, 2, 3, 2, scale=0.3), "v": _normal(4, 2, 3, 3, scale=0.3)}

  def f(p, x):  # x: (N, H, W, C)
    h = jnp.tanh(_conv(x, p["w"], window_strides=(1, 2), padding=((2, 1), (0, 2)),
                       lhs_dilation=(2, 1), rhs_dilation=(1, 2)))
    # Second conv in NCHW / OIHW / NCHW layouts with a negative padding.
    h = lax.conv_general_dilated(jnp.transpose(h, (0, 3, 1, 2)), p["v"], (2, 1),
                                 ((0, -1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return jnp.sin(h).sum(axis=(2, 3))

  x1, x2 = _normal(2, 5, 6, 3), _normal(3, 5, 6, 3)
  check(f, params, x1, x2, (), (), 0)
  check(f, params, x1, None, (-1,), (0,), None)


def test_parameter_inside_and_outside_jit_custom_rules_and_checkpoint():
  params = {"w": _normal(4, 4, scale=0.5), "u": _normal(4, 3, scale=0.5),
            "s": _normal(4, scale=0.5), "c": _normal(3, scale=0.5)}

  @jax.jit
  def inner(w, h):
    return jnp.tanh(h @ w)

  @jax.custom_jvp
  def scaled_tanh(a, h):  # a parameter used inside a custom_jvp function
    return jnp.tanh(a * h)

  @scaled_tanh.defjvp
  def _(primals, tangents):
    a, h = primals
    da, dh = tangents
    y = jnp.tanh(a * h)
    return y, (1 - y ** 2) * (da * h + a * dh)

  @jax.custom_vjp
  def shift(c, h):
    return h + jnp.sin(c)

  shift.defvjp(lambda c, h: (h + jnp.sin(c), c),
               lambda c, g: (jnp.sum(g * jnp.cos(c), axis=0), g))

  def f(p, x):
    h = inner(p["w"], x)                      # w inside jit ...
    h = jax.nn.gelu(h @ p["w"])               # ... and outside it
    h = scaled_tanh(p["s"], h)
    h = jax.checkpoint(lambda h: jax.nn.softplus(h @ p["w"]) @ p["u"])(h)
    h = jax.nn.relu(h) + jax.nn.softplus(p["c"])   # custom_jvp on a parameter
    return shift(p["c"], h)

  x1, x2 = _normal(3, 4), _normal(2, 4)
  check(f, params, x1, x2, (), (), 0)
  check(f, params, x1, None, (-1,), (), None)
  zoo.assert_close(sd_whole_batch(f, params, x1, x2, (), ()),
                   reference(f, params, x1, x2, (), ()), TOL)


def test_custom_rules_that_differ_from_the_body_are_respected():
  # A straight-through estimator (custom_vjp) and a custom_jvp whose rule is not the body's
  # derivative: the kernel must use the rules, as jax.jacrev (the reference) does.
  @jax.custom_vjp
  def quantize(z):
    return jnp.round(4 * z) / 4

  quantize.defvjp(lambda z: (quantize(z), None), lambda _, g: (g,))

  @jax.custom_jvp
  def clipped_scale(a, h):
    return jnp.clip(a, 0.5, 2.0) * h

  @clipped_scale.defjvp
  def _(primals, tangents):
    (a, h), (da, dh) = primals, tangents
    return clipped_scale(a, h), 0.5 * da * h + jnp.clip(a, 0.5, 2.0) * dh

  params = {"w": _normal(4, 5, scale=0.7), "a": _normal(5, scale=2.0), "v": _normal(5, 3)}

  def f(p, x):
    h = jnp.tanh(x @ quantize(p["w"]))
    return clipped_scale(p["a"], h) @ p["v"]

  x1, x2 = _normal(3, 4), _normal(2, 4)
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # the rule's derivative is exact: no fallback warning
    check(f, params, x1, x2, (), (), 0)
    check(f, params, x1, None, (-1,), (), None)


def test_custom_vjp_activations_away_from_parameters():
  # Elementwise custom_vjp calls on activations (no parameter enters them), also inside a jit,
  # where the output cotangents factorise (separable path): forward mode cannot differentiate
  # them, so their cotangents come from the VJP, with their own rule, as in jax.jacrev.
  @jax.custom_vjp
  def hard_tanh_ste(z):  # straight-through: clip forward, identity backward
    return jnp.clip(z, -1.0, 1.0)

  hard_tanh_ste.defvjp(lambda z: (hard_tanh_ste(z), None), lambda _, g: (g,))

  @jax.jit
  def block(h):
    return hard_tanh_ste(2.0 * h)

  params = {"w": _normal(4, 6, scale=0.7), "v": _normal(6, 6, scale=0.7), "u": _normal(6, 3)}

  def f(p, x):
    h = hard_tanh_ste(x @ p["w"])
    return block(jnp.tanh(h @ p["v"])) @ p["u"]

  x1, x2 = _normal(3, 4), _normal(2, 4)
  for trace_axes, vmap_axes in (((), 0), ((-1,), None), ((), None)):
    check(f, params, x1, x2, trace_axes, (), vmap_axes)
  zoo.assert_close(empirical_ntk_fn(f)(x1, x2, params), reference(f, params, x1, x2, (-1,), ()),
                   TOL)
  # AUTO never proposes NTK-vector products, which need a JVP.
  from ntk_dynamics.kernels import choice
  oa = axes_lib.OutputAxes.create((-1,), ())
  fx = jax.eval_shape(f, params, x1)
  costs = choice.estimate_flops(f, params, x1, None, {}, oa, batching.VmapAxes.create(0), fx,
                                fx)
  assert NtkImplementation.NTK_VECTOR_PRODUCTS not in costs and SD in costs


def test_fallback_through_linear_solve():
  w = jnp.eye(3) * 2.0 + _normal(3, 3, scale=0.3)

  def f(p, x):
    return jnp.linalg.solve(p, x.T).T

  x1, x2 = _normal(2, 3), _normal(4, 3)
  with pytest.warns(UserWarning, match="STRUCTURED_DERIVATIVES"):
    got = sd(f, w, x1, x2, (), (), 0)
  zoo.assert_close(got, reference(f, w, x1, x2, (), ()), TOL)


def test_parameter_used_twice_in_one_equation_and_through_reshapes():
  params = {"w": _normal(4, 6, scale=0.5), "a": _normal(6, scale=0.5),
            "m": _normal(2, 3, 4, scale=0.5)}

  def f(p, x):
    h = x @ (p["w"] * p["w"])                          # mul(θ, θ)
    h = h * p["a"] * p["a"] + p["a"] / 3.0 - 2.0 * p["a"]
    k = p["m"].reshape(6, 4)                           # a reshape that is not pushable
    h = jnp.tanh(h) @ k + jnp.tanh(h) @ p["m"].transpose(1, 0, 2).reshape(6, 4)
    return jnp.concatenate([h, jnp.broadcast_to(p["a"][:2], (h.shape[0], 2))], axis=-1)

  x1, x2 = _normal(3, 4), _normal(4, 4)
  check(f, params, x1, x2, (), (), 0)
  check(f, params, x1, None, (-1,), (0,), None)


def test_recurrent_weight_jacobians_are_summed_over_stacked_uses(monkeypatch):
  # W_h and W_x are used at every step with the same structure: their per-example Jacobians
  # are one contraction over a stacked use axis (the kernels must not change).
  params = {"w_x": _normal(3, 5, scale=0.5), "w_h": _normal(5, 5, scale=0.4),
            "b": _normal(5, scale=0.1), "out": _normal(5, 2)}

  def f(p, x):                       # x: (N, T, 3)
    h = jnp.zeros((x.shape[0], 5))
    for t in range(x.shape[1]):
      h = jnp.tanh(x[:, t] @ p["w_x"] + h @ p["w_h"] + p["b"])
    return h @ p["out"]

  stacked = []
  original = structured_core._stacked_jacobian
  monkeypatch.setattr(structured_core, "_stacked_jacobian",
                      lambda jacs: stacked.append(len(jacs)) or original(jacs))
  x1, x2 = _normal(3, 4, 3), _normal(2, 4, 3)
  for trace_axes, diagonal_axes, vmap_axes, x2_ in (((), (), 0, x2), ((-1,), (), 0, None),
                                                     ((), (0,), None, x1)):
    check(f, params, x1, x2_, trace_axes, diagonal_axes, vmap_axes)
  assert stacked and max(stacked) >= 3, stacked


def test_sliced_and_split_parameters_are_chains(monkeypatch):
  # A GRU-style cell: fused gate weights split, a bias sliced, all reused at every step.
  # Slices are linear chains: every use is a structured term (none through the primitive's
  # own VJP, which took 18 s to compile for a 12-step hk.GRU), pulled back to θ by a pad.
  def no_generic(self):
    raise AssertionError(f"generic Jacobian for {self.term.rule}")
  monkeypatch.setattr(structured_core._Jacobian, "_generic", no_generic)
  params = {"w_i": _normal(3, 9, scale=0.5), "w_h": _normal(3, 9, scale=0.5),
            "b": _normal(9, scale=0.2), "out": _normal(3, 2)}

  def f(p, x):                       # x: (N, T, 3)
    w_zr, w_a = jnp.split(p["w_h"], [6], axis=1)
    h = jnp.zeros((x.shape[0], 3))
    for t in range(x.shape[1]):
      g = x[:, t] @ p["w_i"]
      zr = jax.nn.sigmoid(g[:, :6] + h @ w_zr + p["b"][:6])
      z, r = jnp.split(zr, 2, axis=1)
      a = jnp.tanh(g[:, 6:] + (r * h) @ w_a + p["b"][6:])
      h = (1 - z) * h + z * a
    return h @ p["out"][:, ::-1][:, ::-1]

  x1, x2 = _normal(3, 4, 3), _normal(2, 4, 3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for trace_axes, diagonal_axes, vmap_axes, x2_ in (((), (), 0, x2), ((-1,), (), 0, None),
                                                       ((), (0,), None, x1)):
      check(f, params, x1, x2_, trace_axes, diagonal_axes, vmap_axes)


def test_parameters_as_outputs_concatenate_and_pad():
  params = {"cls": _normal(1, 1, 3), "pos": _normal(5, 3), "w": _normal(2, 3),
            "bias": _normal(3)}

  def f(p, x):  # x: (N, 4, 2) tokens
    h = x @ p["w"]
    cls = jnp.broadcast_to(p["cls"], (x.shape[0], 1, 3))
    h = jnp.concatenate([cls, h], axis=1) + p["pos"]
    h = jnp.pad(h, ((0, 0), (1, 0), (0, 0)))
    return {"tokens": jnp.tanh(h), "bias": jnp.broadcast_to(p["bias"], (x.shape[0], 3))}

  x1, x2 = _normal(2, 4, 2), _normal(3, 4, 2)
  check(f, params, x1, x2, (), (), 0)
  check(f, params, x1, None, (-1,), (0,), None)


def _embed_model(mode):
  params = {"emb": _normal(7, 3), "w": _normal(3, 3, scale=0.5)}

  def f(p, tokens):
    e = jnp.take(p["emb"], tokens, axis=0, mode=mode)
    e = jnp.nan_to_num(e) if mode == "fill" else e
    h = jnp.tanh(e @ p["w"])                     # (N, T, 3)
    logits = h @ p["emb"].T                      # tied output embedding (N, T, 7)
    return logits.mean(axis=1)

  return f, params


@pytest.mark.parametrize("mode", ["clip", "fill", None])
def test_embedding_modes_and_tied_weights(mode):
  f, params = _embed_model(mode)
  x1 = jnp.asarray([[0, 3, 9, 3], [6, 6, -1, 2]])      # out of range in both directions
  x2 = jnp.asarray([[3, 0, 0, 8], [1, 2, 6, 5], [4, 4, 4, 4]])
  if mode is None:
    x1, x2 = jnp.clip(x1, 0, 6), jnp.clip(x2, 0, 6)
  check(f, params, x1, x2, (), (), 0)
  check(f, params, x1, None, (-1,), (0,), None)


def test_gather_without_embedding_pattern():
  params = {"w": _normal(3, 3, scale=0.5), "t": _normal(4, 3)}

  def f(p, x):
    h = jnp.tanh(x @ p["w"])
    pts = p["t"][jnp.array([1, 3, 3]), jnp.array([0, 2, 2])]     # 2-d point lookups
    rows = p["t"][jnp.array([1, 3]), 1:]                          # partial-row gather
    return (h + p["t"][jnp.array([1, 3])].sum(0) + pts.sum() * h + rows.sum()
            + lax.dynamic_slice(p["t"], (1, 1), (2, 2)).sum(0).sum())

  x1, x2 = _normal(2, 3), _normal(3, 3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = sd(f, params, x1, x2, (), (), 0)
  zoo.assert_close(got, reference(f, params, x1, x2, (), ()), TOL)


def _check_without_fallback(f, params, x1, x2):
  """SD equals the reference, per example against x2 and whole-batch symmetric, and no use
  falls back to a dense Jacobian (that would warn)."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = sd(f, params, x1, x2, (), (), 0)
    got_sym = sd(f, params, x1, None, (-1,), (0,), None)
  zoo.assert_close(got, reference(f, params, x1, x2, (), ()), TOL)
  zoo.assert_close(got_sym, reference(f, params, x1, None, (-1,), (0,)), TOL)


def _scan_rnn_params():
  return {"w": _normal(3, 3, scale=0.5), "u": _normal(3, 3, scale=0.5), "b": _normal(3),
          "layers": _normal(4, 3, 3, scale=0.4), "out": _normal(3, 2)}


def _scan_rnn(p, x):
  """Parameters enter scans as constants (a recurrence, forwards and reversed), as scanned
  inputs (a stack of layers, directly and reshaped first: the latter is unrolled) and outside
  them (`u` is also used after the loops)."""
  def step(h, x_t):
    h = jnp.tanh(h @ p["w"] + x_t @ p["u"] + p["b"])
    return h, h * x_t
  seq = jnp.stack([x, jnp.sin(x), x * x])               # (time, features)
  h, ys = lax.scan(step, jnp.zeros_like(x), seq)
  g, _ = lax.scan(step, h, ys, reverse=True)

  def layer(z, w):
    return jnp.tanh(z @ w), None
  z, _ = lax.scan(layer, g, p["layers"])
  z, _ = lax.scan(lambda z, w: layer(z, w.reshape(3, 3)), z, p["layers"].reshape(4, 9))
  return (z + ys.sum(0) @ p["u"]) @ p["out"]


@pytest.mark.parametrize("trace_axes,diagonal_axes,vmap_axes,symmetric", SPREAD)
def test_scan_structured(trace_axes, diagonal_axes, vmap_axes, symmetric):
  """Scans over parameters get structured uses, no dense fallback: loops over constant
  weights stay loops, a scan over stacked layer weights is unrolled."""
  params = _scan_rnn_params()
  x1, x2 = _normal(2, 3), (None if symmetric else _normal(3 if not diagonal_axes else 2, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = sd(lambda p, x: jax.vmap(_scan_rnn, (None, 0))(p, x), params, x1, x2,
             trace_axes, diagonal_axes, vmap_axes)
  zoo.assert_close(got, reference(lambda p, x: jax.vmap(_scan_rnn, (None, 0))(p, x), params,
                                  x1, x2, trace_axes, diagonal_axes), TOL)
  leaves = jax.tree.leaves(params)
  prep = structured_core._prepare(
      _scan_rnn, leaves, jax.tree.structure(params), x1[0], {}, None,
      jax.eval_shape(_scan_rnn, params, x1[0]))
  assert not prep.fallbacks
  assert all(s.primitive != "scan" for s in prep.sites)


def test_long_recurrence_stays_a_loop():
  """A recurrence far beyond the unroll budget is structured all the same: its body's sites
  are stacked along the steps, so their number does not grow with the length."""
  params = {"w": _normal(3, 3, scale=0.5), "u": _normal(2, 3), "out": _normal(3, 2)}

  def f(p, x):                       # x: (N, T, 2)
    def step(h, x_t):
      h = jnp.tanh(h @ p["w"] + x_t @ p["u"])
      return h, h.sum(-1)
    h, ys = lax.scan(step, jnp.zeros((x.shape[0], 3)), jnp.swapaxes(x, 0, 1))
    return h @ p["out"] + ys.mean(0)[:, None]

  from ntk_dynamics.kernels.structured import interpreter
  counts = []
  for length in (60, 300):
    assert length * 5 > interpreter.SCAN_UNROLL_EQUATIONS
    x1, x2 = _normal(2, length, 2, scale=0.3), _normal(3, length, 2, scale=0.3)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      got = sd(f, params, x1, x2, (), (), 0)
    zoo.assert_close(got, reference(f, params, x1, x2, (), ()), TOL)
    leaves = jax.tree.leaves(params)
    prep = structured_core._prepare(f, leaves, jax.tree.structure(params), x1, {}, None,
                                    jax.eval_shape(f, params, x1))
    assert not prep.fallbacks
    counts.append(len(prep.sites))
  assert counts[0] == counts[1]


def test_deep_layer_stack_stays_a_loop():
  """Weights stacked along a first axis of any depth and scanned (one layer per step) keep
  their structure: the step is the label of that axis, and the sites do not multiply."""
  def f(p, x):
    z, _ = lax.scan(lambda z, wb: (jnp.tanh(z @ wb[0] + wb[1][0]), None), x,
                    (p["w"], p["b"]))
    return z @ p["out"]

  counts = []
  for depth in (3, 100):
    params = {"w": _normal(depth, 3, 3, scale=0.5), "b": _normal(depth, 1, 3, scale=0.1),
              "out": _normal(3, 2)}
    x1 = _normal(2, 3)
    _check_without_fallback(f, params, x1, _normal(3, 3))
    prep = structured_core._prepare(f, jax.tree.leaves(params), jax.tree.structure(params),
                                    x1, {}, None, jax.eval_shape(f, params, x1))
    assert not prep.fallbacks
    counts.append(len(prep.sites))
  assert counts[0] == counts[1]


def test_nested_and_reversed_layer_stacks():
  """Stacks of stacks (a scan over groups of layers, each a scan over its layers), a reversed
  stack, per-layer scalar gains, and a stacked weight also used outside its loop."""
  params = {"w": _normal(2, 3, 3, 3, scale=0.5), "g": _normal(4, scale=0.5),
            "v": _normal(4, 3, 3, scale=0.5), "out": _normal(3, 2)}

  def f(p, x):
    def group(z, w_group):
      z, _ = lax.scan(lambda z, w: (jnp.tanh(z @ w), None), z, w_group)
      return z, None
    z, _ = lax.scan(group, x, p["w"])
    z, _ = lax.scan(lambda z, gv: (jnp.sin(gv[0] * z @ gv[1]), None), z, (p["g"], p["v"]),
                    reverse=True)
    return z @ p["out"] + (p["v"] ** 2).sum() * z[..., :2]

  _check_without_fallback(f, params, _normal(2, 3), _normal(3, 3))


@pytest.mark.parametrize("reverse", [False, True])
def test_learned_initial_state(reverse):
  """A carry that starts as a parameter: the first step is walked on its own (the parameter
  used structurally there), the loop runs over the other steps."""
  params = _scan_rnn_params()

  def f(p, x):
    h, ys = lax.scan(lambda h, x_t: (jnp.tanh(h @ p["w"] + x_t), h * x_t), p["b"],
                     jnp.stack([x, x * x, jnp.sin(x)]), reverse=reverse)
    return (h + ys[0] - ys[-1]) @ p["out"]

  _check_without_fallback(lambda p, x: jax.vmap(f, (None, 0))(p, x), params, _normal(2, 3),
                          _normal(3, 3))


def test_scan_fallbacks(monkeypatch):
  """Scans the walk does not unroll are sites of their own: exact, with one warning."""
  params = _scan_rnn_params()
  x1, x2 = _normal(2, 3), _normal(3, 3)

  def carried_parameter(p, x):       # a parameter that stays in the carry at every step
    (h, _), _ = lax.scan(lambda c, x_t: ((jnp.tanh(c[0] @ c[1] + x_t), c[1].T), None),
                         (x, p["w"]), jnp.stack([x, x * x]))
    return h @ p["out"]

  def parameter_as_output(p, x):     # a chain among the per-step outputs
    h, ws = lax.scan(lambda h, x_t: (jnp.tanh(h @ p["w"] + x_t), p["u"]), x,
                     jnp.stack([x, x * x]))
    return (h @ ws.sum(0)) @ p["out"]

  def check_fallback(f):
    batched = lambda p, x: jax.vmap(f, (None, 0))(p, x)
    with pytest.warns(UserWarning, match="'scan'") as record:
      got = sd(batched, params, x1, x2, (), (), 0)
    assert sum("STRUCTURED_DERIVATIVES" in str(w.message) for w in record) == 1
    zoo.assert_close(got, reference(batched, params, x1, x2, (), ()), TOL)

  check_fallback(carried_parameter)
  check_fallback(parameter_as_output)
  from ntk_dynamics.kernels.structured import interpreter
  monkeypatch.setattr(interpreter, "SCAN_UNROLL_EQUATIONS", 1)   # too long to unroll
  check_fallback(_scan_rnn)


def test_no_warning_for_ruled_primitives():
  e = zoo.ZOO["attention"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sd(e.f, e.params, e.x1, e.x2, (-1,), (), 0)


def test_unused_parameter_and_float32():
  params = {"w": jnp.ones((3, 2), jnp.float32) * 0.3, "unused": jnp.ones(5, jnp.float32)}

  def f(p, x):
    return jnp.tanh(x @ p["w"])

  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  parts = sd(f, params, x, None, (), (), 0, per_parameter=True)
  assert parts["unused"].shape == (4, 4, 2, 2) and not np.any(np.asarray(parts["unused"]))
  assert parts["w"].dtype == jnp.float32
  ref = reference(f, jax.tree.map(lambda a: a.astype(jnp.float64), params),
                  x.astype(jnp.float64), None, (), ())
  np.testing.assert_allclose(parts["w"], ref, rtol=1e-5, atol=1e-6)


def test_estimate_flops_names_a_plan_per_leaf():
  e = zoo.ZOO["mlp"]
  oa = axes_lib.OutputAxes.create((), ())
  vm = batching.VmapAxes.create(0)
  fx = jax.eval_shape(e.f, e.params, e.x1)
  fx2 = jax.eval_shape(e.f, e.params, e.x2)
  est = structured.estimate_flops(e.f, e.params, e.x1, e.x2, {}, oa, vm, fx, fx2)
  assert est["total"] > est["contraction"] > 0
  assert {p[0] for p in est["plans"]} == set(range(len(jax.tree.leaves(e.params))))
  assert all(p[2] in ("structured", "jacobian") for p in est["plans"])


def test_network_steps_add_up_to_the_cost():
  """The per-product breakdown `_time` reads is that of the order `cost` counts."""
  rng = np.random.default_rng(0)
  for _ in range(20):
    labels = "abcdefg"
    sizes = {l: int(rng.integers(1, 9)) for l in labels}
    ops = [tuple(rng.choice(list(labels), size=int(rng.integers(1, 4)), replace=False))
           for _ in range(int(rng.integers(2, 6)))]
    used = sorted(set().union(*ops))
    out = tuple(rng.choice(used, size=int(rng.integers(0, min(3, len(used)) + 1)),
                           replace=False))
    steps = network.steps(ops, out, sizes)
    assert sum(m for m, _ in steps) == network.cost(ops, out, sizes)
    assert all(moved > 0 for _, moved in steps)


def _lstm(p, x):                     # x: (T, 16) for one example
  def step(carry, x_t):
    h, c = carry
    i, f, g, o = jnp.split(jnp.concatenate([x_t, h]) @ p["w"] + p["b"], 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), None
  (h, _), _ = lax.scan(step, (jnp.zeros(64), jnp.zeros(64)), x)
  return h @ p["out"]


def test_plan_choice_counts_elements_moved(monkeypatch):
  """A 12-step LSTM's recurrent weight (80x256, N=16, 10 outputs): its structured pair needs
  3.4x fewer multiply-adds than its Jacobians but moves 8M-element intermediates, and ran
  1.3x slower (whole kernel). The choice counts both; the reported cost stays multiply-adds."""
  params = {"w": jax.ShapeDtypeStruct((80, 256), jnp.float32),
            "b": jax.ShapeDtypeStruct((256,), jnp.float32),
            "out": jax.ShapeDtypeStruct((64, 10), jnp.float32)}
  x = jax.ShapeDtypeStruct((16, 12, 16), jnp.float32)
  oa = axes_lib.OutputAxes.create((), ())
  vm = batching.VmapAxes.create(0)
  f = jax.vmap(_lstm, (None, 0))
  fx = jax.eval_shape(f, params, x)
  w_leaf = [k for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]].index(
      (jax.tree_util.DictKey("w"),))

  def plan_of_w():
    est = structured.estimate_flops(f, params, x, x, {}, oa, vm, fx, fx)
    return {p[0]: p for p in est["plans"]}[w_leaf]

  chosen = plan_of_w()
  monkeypatch.setattr(structured_core, "MACS_PER_ELEMENT", 0)   # multiply-adds only
  by_macs = plan_of_w()
  assert chosen[2] == "jacobian" and by_macs[2] == "structured"
  assert by_macs[3] * 3 < chosen[3]


def test_chains_of_additions_share_one_cotangent():
  # dot -> + b -> + pos -> - d: the cotangent of each intermediate is that of the last sum.
  params = {"w": _normal(3, 4), "b": _normal(4), "pos": _normal(2, 4), "d": _normal(4),
            "v": _normal(4, 2)}

  def f(p, x):  # x: (N, 2, 3)
    h = x @ p["w"] + p["b"] + p["pos"] - p["d"]
    h = p["d"] - jnp.tanh(h)
    return (h - x.sum(-1, keepdims=True)) @ p["v"]

  x1, x2 = _normal(2, 2, 3), _normal(3, 2, 3)
  check(f, params, x1, x2, (), (), 0)
  check(f, params, x1, None, (-1,), (0,), None)


def test_separable_cotangents_near_the_output():
  # Conv -> relu -> residual -> global average pool -> dense: the cotangents of the last
  # layers factorise as A[o, c] · B[example, ...]; also a token-wise dense pair without a
  # nonlinearity, a flatten head and a scale applied by an example-independent factor.
  params = {"c0": _normal(3, 3, 2, 3, scale=0.4), "c1": _normal(3, 3, 3, 2, scale=0.4),
            "b1": _normal(2), "s": _normal(2), "w1": _normal(2, 4, scale=0.5),
            "w2": _normal(4, 3, scale=0.5), "h": _normal(3, 2, scale=0.5),
            "f": _normal(4 * 4 * 2, 2, scale=0.3)}

  def f(p, x):  # x: (N, 4, 4, 2)
    h = jax.nn.relu(_conv(x, p["c0"], window_strides=(1, 1), padding="SAME"))
    h = _conv(h, p["c1"], window_strides=(1, 1), padding="SAME") + p["b1"]
    h = jax.nn.gelu(x + h) * (2.0 * p["s"])
    flat = h.reshape(h.shape[0], -1) @ p["f"]                     # flatten head
    t = jnp.tanh(h.reshape(h.shape[0], 16, 2) @ p["w1"]) ** 2      # tokens
    t = (t @ p["w2"]).mean(axis=1)
    return t @ p["h"] - flat

  x1, x2 = _normal(3, 4, 4, 2), _normal(2, 4, 4, 2)
  from ntk_dynamics.kernels.structured import core
  leaves, treedef = jax.tree.flatten(params)
  fx = jax.eval_shape(f, params, x1)
  prep = core._prepare(f, leaves, treedef, x1, {}, batching.VmapAxes.create(0), fx)
  assert len(prep.seps[0]) >= 4, prep.seps
  for trace_axes, diagonal_axes, x2_ in (((), (), x2), ((-1,), (0,), None),
                                         ((-1,), (), x2), ((), (0,), x1[:, ::-1])):
    check(f, params, x1, x2_, trace_axes, diagonal_axes, 0)
  # The residual block of a wide ResNet: the last conv's cotangent is A[o, c] · mask.
  params = {"c0": _normal(3, 3, 2, 2, scale=0.4), "c1": _normal(3, 3, 2, 2, scale=0.4),
            "b1": _normal(2), "h": _normal(2, 3, scale=0.5), "hb": _normal(3)}

  def wrn(p, x):
    h = _conv(jax.nn.relu(x), p["c0"], window_strides=(1, 1), padding="SAME")
    h = _conv(jax.nn.relu(h), p["c1"], window_strides=(1, 1), padding="SAME") + p["b1"]
    return jnp.mean(jax.nn.relu(x + h), axis=(1, 2)) @ p["h"] + p["hb"]

  leaves, treedef = jax.tree.flatten(params)
  prep = core._prepare(wrn, leaves, treedef, x1, {}, batching.VmapAxes.create(0),
                       jax.eval_shape(wrn, params, x1))
  assert len(prep.seps[0]) == 2   # the last conv (+ bias) and the head (+ bias)
  check(wrn, params, x1, x2, (), (), 0)
  check(wrn, params, x1, None, (-1,), (0,), 0)


@pytest.mark.parametrize("la, lb, keep, merged", [
    ("abij", "cdij", "abcd", True),    # per-example Jacobians' Gram: contracted runs merge
    ("noj", "moj", "nm", True),        # traced cotangent Gram
    ("bnoj", "bmoj", "bnm", True),     # with a batch axis
    ("abc", "d", "abcd", True),        # outer product
    ("ijab", "cdji", "abcd", False),   # contracted labels in another order
    ("aibj", "cidj", "abcd", False),   # interleaved free and contracted axes
    ("ab", "bc", "ac", False),         # already one axis of each kind: nothing to merge
])
def test_pairwise_products_equal_einsum(la, lb, keep, merged):
  """Every arrangement of batch, contracted and free axes (merged into one axis of each kind
  where they are contiguous runs in the same order, else contracted as they are) gives
  einsum's product, labelled batch, then a's free, then b's free."""
  sizes = dict(a=2, b=3, c=4, d=5, i=6, j=7, n=3, m=4, o=2)
  rng = np.random.default_rng(0)
  a = rng.standard_normal([sizes[l] for l in la])
  b = rng.standard_normal([sizes[l] for l in lb])
  batch = [l for l in la if l in lb and l in keep]
  contract = [l for l in la if l in lb and l not in keep]
  assert (network._merged_operands(jnp.asarray(a), tuple(la), jnp.asarray(b), tuple(lb),
                                   batch, contract) is not None) == merged
  x, labels = network.pairwise(jnp.asarray(a), tuple(la), jnp.asarray(b), tuple(lb), set(keep))
  want = np.einsum(f"{la},{lb}->{''.join(labels)}", a, b)
  np.testing.assert_allclose(np.asarray(x), want, rtol=1e-12)
  assert list(labels) == batch + [l for l in la if l not in lb] + [l for l in lb if l not in la]
