"""`linearize` and `taylor_expand`: exactness at the expansion point, agreement with JVPs,
convergence orders, Haiku models, jit, and the NTK of the linearized model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_dynamics import NtkImplementation, empirical_ntk_fn, linearize, taylor_expand
from tests import zoo
from tests.zoo import ZOO

# Plain JAX, pytree in/out, Haiku (no state), Haiku with state + kwargs, integer inputs.
MODELS = ["mlp", "pytree_io", "cnn_haiku", "batchnorm_state", "embedding"]


def _direction(params, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([scale * rng.normal(size=np.shape(p)) for p in leaves])


def _add(params, delta, t=1.0):
  return jax.tree.map(lambda p, d: p + t * d, params, delta)


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_tree_close(a, b, rtol=1e-13, atol=1e-13):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", MODELS)
def test_linearize_equals_f_at_params(name):
  e = ZOO[name]
  f_lin = linearize(e.f, e.params)
  for x in (e.x1, e.x2):
    _assert_tree_close(f_lin(e.params, x, **e.kwargs), e.apply(e.params, x))


@pytest.mark.parametrize("name", MODELS)
def test_linearize_equals_f_plus_jvp(name):
  e = ZOO[name]
  f_lin = linearize(e.f, e.params)
  delta = _direction(e.params, scale=0.3)
  p = _add(e.params, delta)
  f0, df = jax.jvp(lambda q: e.apply(q, e.x1), (e.params,), (delta,))
  want = jax.tree.map(jnp.add, f0, df)
  _assert_tree_close(f_lin(p, e.x1, **e.kwargs), want)
  # Affine in p: doubling the step doubles the change.
  p2 = _add(e.params, delta, 2.0)
  _assert_tree_close(jax.tree.map(jnp.subtract, f_lin(p2, e.x1, **e.kwargs), f0),
                     jax.tree.map(lambda d: 2 * d, df), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn_haiku", "batchnorm_state"])
def test_linearize_and_taylor_under_jit(name):
  e = ZOO[name]
  delta = _direction(e.params, seed=1, scale=0.2)
  p = _add(e.params, delta)
  for fn in (linearize(e.f, e.params), taylor_expand(e.f, e.params, 2)):
    jitted = jax.jit(lambda q, x: fn(q, x, **e.kwargs))
    _assert_tree_close(jitted(p, e.x1), fn(p, e.x1, **e.kwargs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_taylor_degree_0_is_f_at_params(name):
  e = ZOO[name]
  f0 = taylor_expand(e.f, e.params, 0)
  p = _add(e.params, _direction(e.params, scale=0.5))
  _assert_tree_close(f0(p, e.x1, **e.kwargs), e.apply(e.params, e.x1))


@pytest.mark.parametrize("name", MODELS)
def test_taylor_degree_1_is_linearize(name):
  e = ZOO[name]
  p = _add(e.params, _direction(e.params, seed=2, scale=0.3))
  _assert_tree_close(taylor_expand(e.f, e.params, 1)(p, e.x1, **e.kwargs),
                     linearize(e.f, e.params)(p, e.x1, **e.kwargs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["pytree_io", "batchnorm_state"])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_taylor_at_params_is_f(name, degree):
  e = ZOO[name]
  _assert_tree_close(taylor_expand(e.f, e.params, degree)(e.params, e.x1, **e.kwargs),
                     e.apply(e.params, e.x1))


def _slope(f, params, x, kwargs, degree, hs):
  """log-log slope of |f(θ₀ + h d) - T_degree(θ₀ + h d)| against h."""
  expand = jax.jit(lambda q: taylor_expand(f, params, degree)(q, x, **kwargs))
  exact = jax.jit(lambda q: f(q, x, **kwargs))
  d = _direction(params, seed=3)
  errs = [_max_abs_diff(exact(_add(params, d, h)), expand(_add(params, d, h))) for h in hs]
  return np.polyfit(np.log(hs), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("name", ["mlp", "pytree_io", "cnn_haiku", "batchnorm_state"])
@pytest.mark.parametrize("degree", [1, 2, 3])
def test_taylor_error_order(name, degree):
  """The remainder of the degree-d expansion shrinks as h^(d+1)."""
  e = ZOO[name]
  hs = np.geomspace(0.04, 0.005, 4)
  slope, errs = _slope(e.f, e.params, e.x1, e.kwargs, degree, hs)
  assert abs(slope - (degree + 1)) < 0.25, (slope, errs)


@pytest.mark.parametrize("name", ["mlp", "batchnorm_state", "pytree_io"])
def test_ntk_of_linearized_model_is_ntk_at_params(name):
  e = ZOO[name]
  f_lin = linearize(e.f, e.params)
  ntk_f = empirical_ntk_fn(e.f, trace_axes=(),
                           implementation=NtkImplementation.JACOBIAN_CONTRACTION)
  ntk_lin = empirical_ntk_fn(f_lin, trace_axes=(),
                             implementation=NtkImplementation.JACOBIAN_CONTRACTION)
  want = ntk_f(e.x1, e.x2, e.params, **e.kwargs)
  for seed in (0, 1):
    p = _add(e.params, _direction(e.params, seed=seed, scale=0.5))
    zoo.assert_close(ntk_lin(e.x1, e.x2, p, **e.kwargs), want, 1e-10)
  # ... and it differs from f's own NTK at p (the test would be vacuous otherwise).
  moved = ntk_f(e.x1, e.x2, p, **e.kwargs)
  assert zoo.max_rel_err(moved, want) > 1e-6


def test_linearize_params_mismatch():
  e = ZOO["mlp"]
  f_lin = linearize(e.f, e.params)
  with pytest.raises(ValueError, match=r"`p` does not have the pytree structure of `params`, "
                                      r"the expansion point: it lacks \['b1'\] \(got"):
    f_lin({k: v for k, v in e.params.items() if k != "b1"}, e.x1)
  with pytest.raises(ValueError, match=r"(?s)`p` leaf \['b1'\] has shape \(2,\)"):
    f_lin(dict(e.params, b1=np.zeros(2)), e.x1)
  with pytest.raises(ValueError, match=r"(?s)`p` leaf \['b1'\]"):
    taylor_expand(e.f, e.params, 2)(dict(e.params, b1=np.zeros(2)), e.x1)


def test_structure_mismatch_names_the_differing_leaves():
  """The error leads with the leaf paths `p` lacks or adds: before, it showed only both full
  structures (thousands of characters for a deep model) that differ in one key."""
  params = {f"layer_{i}": {"b": jnp.zeros(2), "w": jnp.ones((2, 2))} for i in range(40)}
  f = lambda q, x: sum(x @ v["w"] + v["b"] for v in q.values())
  x = jnp.ones((3, 2))
  renamed = dict(params, layer_7={"W": params["layer_7"]["w"], "b": params["layer_7"]["b"]})
  dropped = {k: v for k, v in params.items() if k != "layer_3"}
  for fn in (linearize(f, params), taylor_expand(f, params, 2)):
    with pytest.raises(ValueError, match=r"it lacks \['layer_7'\]\['w'\]; it has "
                                         r"\['layer_7'\]\['W'\], which `params` lacks \(got"):
      fn(renamed, x)
    with pytest.raises(ValueError, match=r"it lacks \['layer_3'\]\['b'\], "
                                         r"\['layer_3'\]\['w'\] \(got") as e:
      fn(dropped, x)
    assert len(str(e.value)) < 1200
