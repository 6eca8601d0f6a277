"""`from_haiku`: hk.transform with and without apply rng, transform_with_state, errors."""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_dynamics import NtkImplementation, empirical_ntk_fn, from_haiku
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


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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
