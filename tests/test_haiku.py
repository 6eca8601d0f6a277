"""`from_haiku`: hk.transform with and without apply rng, transform_with_state, per-call
rng, wrapped and hand-made applies, linearization of Haiku models, errors."""
from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_dynamics import (NtkImplementation, empirical_ntk_fn, from_haiku, linearize,
                          ntk_vp_fn, taylor_expand)
from tests import zoo

X = np.random.default_rng(0).normal(size=(3, 4))
X2 = np.random.default_rng(1).normal(size=(4, 4))


def _mlp(x):
  return hk.Linear(3)(jnp.tanh(hk.Linear(5)(x)))


def _dropout_net(x):
  h = hk.Linear(5)(x)
  return hk.Linear(3)(hk.dropout(hk.next_rng_key(), 0.5, h))


def _bn_net(x, is_training):
  h = hk.Linear(5)(x)
  h = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.5)(h, is_training)
  return hk.Linear(3)(jnp.tanh(h))


def _counter_net(x):
  """Stateful without BatchNorm: the output reads the state, apply increments it."""
  count = hk.get_state("count", (), init=jnp.zeros)
  hk.set_state("count", count + 1.0)
  return hk.Linear(2)(x) * (1.0 + count)


def _init(transformed, *args):
  return transformed.init(jax.random.PRNGKey(0), *args)


def _assert_tree_equal(a, b, rtol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=0)


# ------------------------------------------------------------------ hk.transform


def test_transform_without_apply_rng():
  t = hk.without_apply_rng(hk.transform(_mlp))
  params = _init(t, X)
  f = from_haiku(t)
  _assert_tree_equal(f(params, X), t.apply(params, X))
  # An rng given for a transform that takes none is simply not passed.
  _assert_tree_equal(from_haiku(t, rng=jax.random.PRNGKey(3))(params, X), t.apply(params, X))


def test_transform_with_apply_rng_deterministic_model():
  t = hk.transform(_mlp)  # apply takes an rng, the model ignores it
  params = _init(t, X)
  _assert_tree_equal(from_haiku(t)(params, X), t.apply(params, None, X))


def test_transform_with_apply_rng_stochastic_model():
  t = hk.transform(_dropout_net)
  params = _init(t, X)
  key = jax.random.PRNGKey(7)
  f = from_haiku(t, rng=key)
  out = f(params, X)
  _assert_tree_equal(out, t.apply(params, key, X))
  _assert_tree_equal(f(params, X), out)  # same key every call: deterministic
  other = from_haiku(t, rng=jax.random.PRNGKey(8))(params, X)
  assert not np.allclose(other, out)
  # Differentiable with the mask fixed: the NTK matches the brute-force reference.
  got = empirical_ntk_fn(f, trace_axes=())(X, X2, params)
  zoo.assert_close(got, zoo.reference_ntk(f, params, X, X2, ()), 1e-10)


def test_transform_stochastic_model_without_rng_fails_in_haiku():
  t = hk.transform(_dropout_net)
  params = _init(t, X)
  with pytest.raises(ValueError, match="(?s)PRNGKey"):
    from_haiku(t)(params, X)


def test_transform_forwards_kwargs_and_jits():
  def net(x, scale):
    return _mlp(x) * scale

  t = hk.without_apply_rng(hk.transform(net))
  params = _init(t, X, 1.0)
  f = from_haiku(t)
  _assert_tree_equal(f(params, X, scale=2.0), t.apply(params, X, 2.0))
  np.testing.assert_allclose(jax.jit(f)(params, X, scale=2.0), t.apply(params, X, 2.0),
                             rtol=1e-12)
  g = jax.grad(lambda p: jnp.sum(f(p, X, scale=2.0) ** 2))(params)
  assert jax.tree.structure(g) == jax.tree.structure(params)


# ------------------------------------------------------------------ transform_with_state


def test_transform_with_state_eval_mode():
  t = hk.transform_with_state(_bn_net)
  params, state = _init(t, X, True)
  _, state = t.apply(params, state, None, X2 * 3 + 1, True)  # non-trivial statistics
  f = from_haiku(t, state=state)
  out, _ = t.apply(params, state, None, X, False)
  _assert_tree_equal(f(params, X, is_training=False), out)
  # The NTK of the stateful model (state fixed) against the reference.
  got = empirical_ntk_fn(f, vmap_axes=0)(X, X2, params, is_training=False)
  zoo.assert_close(got, zoo.reference_ntk(f, params, X, X2, kwargs={"is_training": False}),
                   1e-10)


def test_transform_with_state_keeps_state_fixed():
  t = hk.transform_with_state(_counter_net)
  params, state = _init(t, X)
  f = from_haiku(t, state=state)
  first = f(params, X)
  _assert_tree_equal(f(params, X), first)  # the state apply returns is discarded
  out, new_state = t.apply(params, state, None, X)
  _assert_tree_equal(first, out)
  f_new = from_haiku(t, state=new_state)  # a different fixed state changes the function
  np.testing.assert_allclose(f_new(params, X), 2 * np.asarray(first), rtol=1e-12)


def test_transform_with_state_training_mode_is_stable():
  # Training-mode BatchNorm uses batch statistics and would update the state; from_haiku
  # discards the update, so repeated calls agree.
  t = hk.transform_with_state(_bn_net)
  params, state = _init(t, X, True)
  f = from_haiku(t, state=state)
  _assert_tree_equal(f(params, X, is_training=True), f(params, X, is_training=True))
  # ... and it mixes the batch: example 0's output depends on example 1's input.
  x_other = X.copy()
  x_other[1] += 1.0
  assert not np.allclose(f(params, X, is_training=True)[0],
                         f(params, x_other, is_training=True)[0])


def test_transform_with_state_without_apply_rng():
  t = hk.without_apply_rng(hk.transform_with_state(_bn_net))
  params, state = _init(t, X, True)
  f = from_haiku(t, state=state)
  _assert_tree_equal(f(params, X, is_training=False), t.apply(params, state, X, False)[0])


def test_transform_with_state_and_rng():
  def net(x, is_training):
    h = hk.BatchNorm(True, True, 0.9)(hk.Linear(5)(x), is_training=is_training)
    return hk.Linear(3)(hk.dropout(hk.next_rng_key(), 0.5, h))

  t = hk.transform_with_state(net)
  params, state = _init(t, X, True)
  key = jax.random.PRNGKey(5)
  f = from_haiku(t, state=state, rng=key)
  _assert_tree_equal(f(params, X, is_training=False),
                     t.apply(params, state, key, X, False)[0])


def test_transform_with_state_under_jit():
  t = hk.transform_with_state(_bn_net)
  params, state = _init(t, X, True)
  f = from_haiku(t, state=state)
  np.testing.assert_allclose(jax.jit(lambda p, x: f(p, x, is_training=False))(params, X),
                             f(params, X, is_training=False), rtol=1e-12)


# ------------------------------------------------------------------ errors


def test_state_missing_for_transform_with_state():
  t = hk.transform_with_state(_bn_net)
  with pytest.raises(ValueError, match=r"(?s)`state` is required"):
    from_haiku(t)
  with pytest.raises(ValueError, match=r"(?s)`state` is required"):
    from_haiku(hk.without_apply_rng(t))


def test_state_given_for_stateless_transform():
  t = hk.transform(_mlp)
  params = _init(t, X)
  with pytest.raises(ValueError, match=r"(?s)`state` was given"):
    from_haiku(t, state={"bn": params})


@pytest.mark.parametrize("bad", [lambda p, x: x, "transform", None])
def test_not_a_transform(bad):
  with pytest.raises(TypeError, match=r"(?s)hk\.Transformed"):
    from_haiku(bad)


def test_apply_of_a_transform_is_not_a_transform():
  t = hk.without_apply_rng(hk.transform(_mlp))
  with pytest.raises(TypeError, match=r"(?s)hk\.Transformed"):
    from_haiku(t.apply)


def test_from_haiku_kernel_all_implementations():
  t = hk.without_apply_rng(hk.transform(_mlp))
  params = _init(t, X)
  f = from_haiku(t)
  want = zoo.reference_ntk(f, params, X, X2, ())
  for impl in (NtkImplementation.JACOBIAN_CONTRACTION, NtkImplementation.NTK_VECTOR_PRODUCTS):
    got = empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl)(X, X2, params)
    zoo.assert_close(got, want, 1e-10)


# ------------------------------------------------------------------ per-call rng


def test_per_call_rng_overrides_the_fixed_one():
  t = hk.transform(_dropout_net)
  params = _init(t, X)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  for f in (from_haiku(t, rng=k1), from_haiku(t)):
    _assert_tree_equal(f(params, X, rng=k2), t.apply(params, k2, X))
    # Compiled and eager arithmetic may differ in the last bit (fusion).
    _assert_tree_equal(jax.jit(f)(params, X, rng=k2), t.apply(params, k2, X), rtol=1e-12)
  _assert_tree_equal(from_haiku(t, rng=k1)(params, X), t.apply(params, k1, X))
  _assert_tree_equal(from_haiku(t, rng=k1)(params, X, rng=None), t.apply(params, k1, X))


def _side_jacobian(apply, params, x):
  return zoo.flat_jacobian(lambda p, x: apply(p, x), params, x)


@pytest.mark.parametrize("fixed", [None, jax.random.PRNGKey(9)])
def test_per_call_rng_in_empirical_ntk(fixed):
  """`ntk_fn(x1, x2, params, rng=k)` gives x1 the key k and x2 `fold_in(k, 1)`, as in
  neural-tangents; the reference contracts float64 Jacobians taken with those keys."""
  t = hk.transform(_dropout_net)
  params = _init(t, X)
  key = jax.random.PRNGKey(5)
  f = from_haiku(t, rng=fixed)
  got = empirical_ntk_fn(f, trace_axes=())(X, X2, params, rng=key)
  j1 = _side_jacobian(lambda p, x: t.apply(p, key, x), params, X)
  j2 = _side_jacobian(lambda p, x: t.apply(p, jax.random.fold_in(key, 1), x), params, X2)
  want = zoo.apply_axes(zoo.reference_full_blocks(j1, j2)[0], 2, (), ())
  assert got.dtype == jnp.float64
  zoo.assert_close(got, want, 1e-12)
  # The x2 key matters: the same key on both sides gives another kernel.
  j2_same = _side_jacobian(lambda p, x: t.apply(p, key, x), params, X2)
  other = zoo.apply_axes(zoo.reference_full_blocks(j1, j2_same)[0], 2, (), ())
  assert zoo.max_rel_err(got, other) > 1e-3


def test_per_call_rng_for_rng_free_transform_is_an_error():
  for t in (hk.without_apply_rng(hk.transform(_mlp)),
            hk.without_apply_rng(hk.transform_with_state(_mlp))):
    params, state = (_init(t, X), None) if isinstance(t, hk.Transformed) else _init(t, X)
    f = from_haiku(t, state=state)
    with pytest.raises(TypeError, match=r"(?s)per-call `rng`.*takes no rng"):
      f(params, X, rng=jax.random.PRNGKey(0))
  ti = hk.without_apply_rng(hk.transform(_mlp))
  p = _init(ti, X)
  with pytest.raises(ValueError, match=r"(?s)`params`.*int32"):
    empirical_ntk_fn(from_haiku(ti))(X, X2, jax.tree.map(lambda a: a.astype(jnp.int32), p))


# ------------------------------------------------------------------ rng detection


def test_hand_made_apply_with_another_rng_name():
  t = hk.transform(_dropout_net)
  params = _init(t, X)
  key = jax.random.PRNGKey(3)
  custom = hk.Transformed(t.init, lambda params, key, x: t.apply(params, key, x))
  _assert_tree_equal(from_haiku(custom, rng=key)(params, X), t.apply(params, key, X))
  _assert_tree_equal(from_haiku(custom)(params, X, rng=key), t.apply(params, key, X))
  plain = hk.Transformed(t.init, lambda params, x: _mlp_apply(params, x))
  mlp_params = _init(hk.transform(_mlp), X)
  _assert_tree_equal(from_haiku(plain, rng=key)(mlp_params, X), _mlp_apply(mlp_params, X))


def _mlp_apply(params, x):
  return hk.without_apply_rng(hk.transform(_mlp)).apply(params, x)


def _two_inputs(x, y):
  return hk.Linear(3)(x) + hk.Linear(3)(y)


def test_multiple_inputs_with_and_without_rng():
  # (params, x, y) must not be read as (params, rng, x): the call decides.
  tw = hk.without_apply_rng(hk.transform(_two_inputs))
  params = _init(tw, X, X)
  _assert_tree_equal(from_haiku(tw)(params, X, 2 * X), tw.apply(params, X, 2 * X))
  t = hk.transform(_two_inputs)
  _assert_tree_equal(from_haiku(t)(params, X, 2 * X), t.apply(params, None, X, 2 * X))
  tws = hk.without_apply_rng(hk.transform_with_state(_two_inputs))
  _, state = _init(tws, X, X)
  _assert_tree_equal(from_haiku(tws, state=state)(params, X, 2 * X),
                     tws.apply(params, state, X, 2 * X)[0])


def test_wrapped_haiku_applies():
  t = hk.transform(_dropout_net)
  params = _init(t, X)
  key = jax.random.PRNGKey(4)
  want = t.apply(params, key, X)
  tws = hk.transform_with_state(_dropout_net)
  variants = [
      hk.Transformed(t.init, jax.jit(t.apply)),
      hk.Transformed(t.init, functools.partial(t.apply)),
      hk.without_state(tws),
  ]
  for v in variants:
    np.testing.assert_allclose(from_haiku(v, rng=key)(params, X), want, rtol=1e-14)
    np.testing.assert_allclose(from_haiku(v)(params, X, rng=key), want, rtol=1e-14)
  empty = hk.with_empty_state(t)
  np.testing.assert_allclose(from_haiku(empty, state={})(params, X, rng=key), want,
                             rtol=1e-14)
  tw = hk.without_apply_rng(hk.transform(_mlp))
  mlp_params = _init(tw, X)
  jitted = hk.Transformed(tw.init, jax.jit(tw.apply))
  np.testing.assert_allclose(from_haiku(jitted, rng=key)(mlp_params, X),
                             tw.apply(mlp_params, X), rtol=1e-14)


def test_takes_rng_override():
  t = hk.transform(_dropout_net)
  params = _init(t, X)
  key = jax.random.PRNGKey(6)
  # Both (params, key, x) and (params, x) bind this signature: the name decides (no rng).
  ambiguous = hk.Transformed(t.init, lambda params, key, x=None: t.apply(params, key, x))
  with pytest.raises(ValueError, match="(?s)Apply must be called with an RNG"):
    from_haiku(ambiguous, rng=key)(params, X)  # X went to the key slot
  f = from_haiku(ambiguous, rng=key, takes_rng=True)
  _assert_tree_equal(f(params, X), t.apply(params, key, X))
  tw = hk.without_apply_rng(hk.transform(_mlp))
  mlp_params = _init(tw, X)
  _assert_tree_equal(from_haiku(tw, takes_rng=False)(mlp_params, X), tw.apply(mlp_params, X))
  with pytest.raises(TypeError, match=r"`takes_rng` must be None, True or False"):
    from_haiku(t, takes_rng="yes")


# ------------------------------------------------------------------ linearizing Haiku models


def test_linearize_with_positional_model_argument():
  t = hk.transform_with_state(_bn_net)
  params, state = _init(t, X, True)
  f = from_haiku(t, state=state)
  p = jax.tree.map(lambda a: a + 0.05, params)
  # Reference: f(θ₀) + J·(p − θ₀) by jax.jvp of the evaluation-mode apply.
  apply = lambda q: t.apply(q, state, None, X, False)[0]
  f0, df = jax.jvp(apply, (params,), (jax.tree.map(lambda a, b: a - b, p, params),))
  want = f0 + df
  np.testing.assert_allclose(linearize(f, params)(p, X, is_training=False), want, rtol=1e-14)
  np.testing.assert_allclose(linearize(f, params)(p, X, False), want, rtol=1e-14)
  np.testing.assert_allclose(taylor_expand(f, params, 1)(p, X, False), want, rtol=1e-12)


def _int_param_net(x):
  n = hk.get_parameter("n", (), jnp.int32, init=lambda s, d: jnp.array(3, d))
  return jnp.tanh(hk.Linear(2)(x)) * n


def test_haiku_integer_parameter_linearizes():
  t = hk.without_apply_rng(hk.transform(_int_param_net))
  params = _init(t, X)
  f = from_haiku(t)
  p = jax.tree.map(lambda a: a + 0.1 if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
  # Reference: JVP in the float leaves only, in float64.
  lin = params["linear"]
  g = lambda q: t.apply(dict(params, linear=q), X)
  f0, df = jax.jvp(g, (lin,), (jax.tree.map(lambda a, b: a - b, p["linear"], lin),))
  np.testing.assert_allclose(linearize(f, params)(p, X), f0 + df, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(taylor_expand(f, params, 1)(p, X), f0 + df, rtol=1e-13,
                             atol=1e-13)
  moved_counter = jax.tree.map(lambda a: a if jnp.issubdtype(a.dtype, jnp.floating) else a + 1,
                               p)
  with pytest.raises(ValueError, match=r"`p` leaf \['~'\]\['n'\].*differs"):
    linearize(f, params)(moved_counter, X)


def test_haiku_integer_parameter_is_a_constant_of_the_ntk():
  # As in `linearize`: the int32 leaf has no derivative and contributes nothing to Θ.
  t = hk.without_apply_rng(hk.transform(_int_param_net))
  params = _init(t, X)
  f = from_haiku(t)
  x2 = X[:2] * 0.5
  g = lambda lin, x: t.apply(dict(params, linear=lin), x)
  j1, j2 = (jax.jacrev(g)(params["linear"], x) for x in (X, x2))
  want = sum(jnp.einsum("nk...,ml...->nmkl", a, b)
             for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2)))
  for impl in NtkImplementation:
    for vmap_axes in (None, 0):
      fn = empirical_ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes, implementation=impl)
      np.testing.assert_allclose(fn(X, x2, params), want, rtol=1e-12, atol=1e-12)
    parts = empirical_ntk_fn(f, trace_axes=(), implementation=impl, per_parameter=True)(
        X, x2, params)
    assert not np.any(parts["~"]["n"]) and parts["~"]["n"].shape == want.shape
    np.testing.assert_allclose(sum(jax.tree.leaves(parts)), want, rtol=1e-12, atol=1e-12)
  v = jnp.ones((2, 2))
  np.testing.assert_allclose(ntk_vp_fn(f, X, x2, params)(v), jnp.einsum("nmkl,ml->nk", want, v),
                             rtol=1e-12, atol=1e-12)


def test_haiku_bf16_params_with_f32_p():
  """bfloat16 parameters, float32 compute, float32 `p`: the step is not rounded to bf16."""
  def net(x):
    lin = hk.Linear(2, w_init=hk.initializers.Constant(0.5))
    return lin(x.astype(jnp.float32))
  t = hk.without_apply_rng(hk.transform(net))
  x = X.astype(np.float32)
  pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), t.init(None, x))
  f = from_haiku(t)
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32) + 1e-3, pb)
  want = x.astype(np.float64) @ np.full((4, 2), 0.5 + 1e-3) + 1e-3  # f is affine in params
  for fn in (linearize(f, pb), taylor_expand(f, pb, 2)):
    got = fn(p32, x)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ ntk_dynamics.models


def test_models_refuse_sizes_and_inputs_they_cannot_use():
  """Before: a zero width built a network with constant outputs, `widths="64"` one layer per
  character, and uint8 pixels or flat inputs to a CNN failed deep inside JAX ("dtype argument
  to `normal` must be a float", "convolution requires lhs and rhs ndim to be equal")."""
  from ntk_dynamics import models
  for make, message in (
      (lambda: models.mlp([16, 0], 3), r"`widths` must be a sequence of positive ints, got "
                                       r"\[16, 0\]"),
      (lambda: models.mlp("64", 3), "`widths` must be a sequence of positive ints, got '64'"),
      (lambda: models.mlp([8], 0), "`num_outputs` must be a positive int, got 0"),
      (lambda: models.cnn([4, -1], 3), "`channels` must be a sequence of positive ints"),
      (lambda: models.resnet(0, 1, 3), "`channels` must be a positive int, got 0"),
      (lambda: models.resnet(4, -1, 3), "`num_blocks` must be an int >= 0, got -1")):
    with pytest.raises(ValueError, match=message):
      make()
  images = np.ones((2, 4, 4, 1), np.uint8)
  with pytest.raises(TypeError, match=r"mlp: the input `x` has dtype uint8; a floating-point "
                                      r"input is expected .* / 255"):
    models.mlp([8], 3).init(jax.random.PRNGKey(0), images)
  for model in (models.cnn([4], 3), models.resnet(4, 1, 3)):
    with pytest.raises(ValueError, match=r"the input `x` has shape \(2, 16\); NHWC images"):
      model.init(jax.random.PRNGKey(0), images.reshape(2, 16).astype(np.float32))
  # What they accept still builds: no hidden layers, no residual blocks, numpy ints.
  x = images.astype(np.float32)
  for model in (models.mlp([], 3), models.resnet(4, 0, 3), models.cnn([np.int64(2)], 3)):
    assert model.apply(model.init(jax.random.PRNGKey(0), x), x).shape == (2, 3)
