"""`linearize` and `taylor_expand` on edge cases: mixed precision (p wider than θ₀), integer
and boolean parameter leaves, integer outputs, empty and scalar parameters, any positional
arguments, bad leaves, `degree` types, and θ₀ passed as an argument under jit. References
are computed in float64."""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_dynamics import linearize, taylor_expand

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 5))


def _taylor_ref(f64, p0, p, x, degree):
  """Σ_k g⁽ᵏ⁾(0)/k! for g(t) = f64(p0 + t(p − p0)), all in float64 (jacfwd in t)."""
  p0 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p0)
  d = jax.tree.map(lambda a, b: jnp.asarray(a, jnp.float64) - b, p, p0)
  g = lambda t: f64(jax.tree.map(lambda a, b: a + t * b, p0, d), x)
  out, gk = 0.0, g
  for k in range(degree + 1):
    out = out + gk(jnp.float64(0.0)) / math.factorial(k)
    gk = jax.jacfwd(gk)
  return np.asarray(out)


# ------------------------------------------------------------------ mixed precision


def _mlp_f32_compute(p, x):
  """Stores parameters in any dtype, computes in float32 (bfloat16 storage, f32 math)."""
  w, v = p["w"].astype(jnp.float32), p["v"].astype(jnp.float32)
  return jnp.tanh(x.astype(jnp.float32) @ w) @ v + p["b"]


def _mlp_f64(p, x):
  return jnp.tanh(jnp.asarray(x, jnp.float64) @ p["w"]) @ p["v"] + p["b"]


def _bf16_point():
  rng = np.random.default_rng(1)
  return {"w": jnp.asarray(rng.normal(size=(5, 16)) / 2, jnp.bfloat16),
          "v": jnp.asarray(rng.normal(size=(16, 3)) / 4, jnp.bfloat16),
          "b": jnp.zeros(3, jnp.float32)}


@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("scale", [1e-2, 1e-3])
def test_f32_p_around_bf16_params(degree, scale):
  """A float32 p around a bfloat16 θ₀: the step p − θ₀ is not rounded to bfloat16 (which
  made steps below bfloat16's spacing vanish and others lose 2e-3 of their size)."""
  p0 = _bf16_point()
  rng = np.random.default_rng(2)
  p = jax.tree.map(lambda a: a.astype(jnp.float32) +
                   jnp.asarray(scale * rng.normal(size=a.shape), jnp.float32), p0)
  want = _taylor_ref(_mlp_f64, p0, p, X, degree)
  change = np.max(np.abs(want - _taylor_ref(_mlp_f64, p0, p, X, 0)))
  fns = [taylor_expand(_mlp_f32_compute, p0, degree)]
  if degree == 1:
    fns.append(linearize(_mlp_f32_compute, p0))
  for fn in fns:
    got = fn(p, X)
    assert got.dtype == jnp.float32  # outputs keep f(θ₀)'s dtype
    # Float32 arithmetic of f: ~1e-7 absolute on outputs of size ~1.
    np.testing.assert_allclose(np.asarray(got, np.float64), want,
                               rtol=0, atol=5e-5 * change + 1e-6)


def test_step_below_bf16_spacing_is_kept():
  p0 = {"w": jnp.ones((5, 1), jnp.bfloat16)}
  p = {"w": jnp.full((5, 1), 1.0 + 1e-3, jnp.float32)}  # bfloat16 spacing at 1 is 2^-7
  f = lambda q, x: x @ q["w"].astype(jnp.float32)
  want = X @ np.full((5, 1), 1.0 + 1e-3, np.float32).astype(np.float64)
  for fn in (linearize(f, p0), taylor_expand(f, p0, 1), taylor_expand(f, p0, 2)):
    np.testing.assert_allclose(np.asarray(fn(p, X), np.float64), want, rtol=1e-6)


def test_f64_p_around_f32_params():
  p0 = {"a": jnp.asarray(0.7, jnp.float32)}
  p = {"a": jnp.asarray(0.7, jnp.float32).astype(jnp.float64) + 1e-9}
  f = lambda q, x: jnp.sin(q["a"].astype(jnp.float64) * x)
  f64 = lambda q, x: jnp.sin(q["a"] * x)
  for degree in (1, 2):
    want = _taylor_ref(f64, p0, p, X, degree)
    change = np.max(np.abs(want - _taylor_ref(f64, p0, p, X, 0)))
    assert change > 1e-10
    got = taylor_expand(f, p0, degree)(p, X)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7 * change + 1e-15)
  np.testing.assert_allclose(linearize(f, p0)(p, X), _taylor_ref(f64, p0, p, X, 1),
                             rtol=0, atol=1e-15)


def test_mixed_precision_under_jit_and_grad():
  p0 = _bf16_point()
  p = jax.tree.map(lambda a: a.astype(jnp.float32) + 1e-3, p0)
  f_lin = linearize(_mlp_f32_compute, p0)
  np.testing.assert_allclose(jax.jit(f_lin)(p, X), f_lin(p, X), rtol=1e-6, atol=1e-6)
  # The gradient of f_lin is J(θ₀)ᵀ·1, taken at the bfloat16 expansion point: exactly f's
  # gradient there (in θ₀'s dtype), whatever the wider p.
  g = jax.grad(lambda q: jnp.sum(f_lin(q, X)))(p)
  g0 = jax.grad(lambda q: jnp.sum(_mlp_f32_compute(q, X)))(p0)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


# ------------------------------------------------------------------ integer / bool leaves


def _f_counter(p, x):
  return jnp.tanh(x @ p["w"]) * p["n"] + jnp.where(p["mask"], 1.0, 0.0)


def _counter_point():
  rng = np.random.default_rng(3)
  return {"w": jnp.asarray(rng.normal(size=(5, 2))), "n": jnp.array(3, jnp.int32),
          "mask": jnp.array([True, False])}


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_integer_and_bool_leaves_are_constants(degree):
  p0 = _counter_point()
  p = dict(p0, w=p0["w"] + 0.1)
  # Reference: the expansion in the float leaf only, integer and bool leaves fixed.
  f64 = lambda q, x: _f_counter(dict(p0, w=q), x)
  want = _taylor_ref(f64, p0["w"], p["w"], X, degree)
  np.testing.assert_allclose(taylor_expand(_f_counter, p0, degree)(p, X), want,
                             rtol=1e-13, atol=1e-13)
  if degree == 1:
    np.testing.assert_allclose(linearize(_f_counter, p0)(p, X), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("make", [lambda f, p0: linearize(f, p0),
                                  lambda f, p0: taylor_expand(f, p0, 2),
                                  lambda f, p0: taylor_expand(f, p0, 0)])
def test_changed_integer_leaf_is_an_error(make):
  p0 = _counter_point()
  fn = make(_f_counter, p0)
  with pytest.raises(ValueError, match=r"`p` leaf \['n'\].*differs from its value in "
                                       r"`params`"):
    fn(dict(p0, n=jnp.array(5, jnp.int32)), X)
  with pytest.raises(ValueError, match=r"`p` leaf \['mask'\]"):
    fn(dict(p0, mask=jnp.array([True, True])), X)


def test_integer_leaf_under_jit_uses_params_value():
  """Traced integer leaves cannot be compared: the expansion point's value is used."""
  p0 = _counter_point()
  fn = jax.jit(linearize(_f_counter, p0))
  moved = dict(p0, w=p0["w"] + 0.1)
  np.testing.assert_allclose(fn(dict(moved, n=jnp.array(5, jnp.int32)), X),
                             linearize(_f_counter, p0)(moved, X), rtol=1e-14)


def test_integer_leaf_gradient_is_float0():
  p0 = _counter_point()
  g = jax.grad(lambda q: jnp.sum(linearize(_f_counter, p0)(q, X)), allow_int=True)(p0)
  assert g["n"].dtype == jax.dtypes.float0 and g["mask"].dtype == jax.dtypes.float0
  want = jax.grad(lambda w: jnp.sum(_f_counter(dict(p0, w=w), X)))(p0["w"])
  np.testing.assert_allclose(g["w"], want, rtol=1e-14)


def test_all_integer_params():
  f = lambda p, x: x * p
  for fn in (linearize(f, jnp.array(2)), taylor_expand(f, jnp.array(2), 2)):
    np.testing.assert_array_equal(fn(jnp.array(2), X), 2 * X)


# ------------------------------------------------------------------ integer outputs


def _f_int_out(p, x):
  y = x @ p
  return {"y": y, "idx": jnp.argmax(y, -1).astype(jnp.int32), "pos": y > 0}


@pytest.mark.parametrize("degree", [0, 1, 2, None])
def test_integer_outputs_are_f_at_params(degree):
  """Integer and bool outputs have zero derivative: they are f(θ₀)'s (as neural-tangents'
  degree 0), with their dtype, even where f(p)'s would differ."""
  p0 = jnp.asarray(np.random.default_rng(4).normal(size=(5, 3)))
  p = -p0  # flips every sign and argmax
  fn = linearize(_f_int_out, p0) if degree is None else taylor_expand(_f_int_out, p0, degree)
  got, at_p0 = fn(p, X), _f_int_out(p0, X)
  assert got["idx"].dtype == jnp.int32 and got["pos"].dtype == jnp.bool_
  np.testing.assert_array_equal(got["idx"], at_p0["idx"])
  np.testing.assert_array_equal(got["pos"], at_p0["pos"])
  assert not np.array_equal(_f_int_out(p, X)["idx"], at_p0["idx"])
  want = _taylor_ref(lambda q, x: x @ q, p0, p, X, 1 if degree is None else degree)
  np.testing.assert_allclose(got["y"], want, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------ empty and scalar params


@pytest.mark.parametrize("params", [{}, None, (), {"unused": None}])
def test_empty_params(params):
  f = lambda p, x: jnp.sin(x)
  for fn in (linearize(f, params), *(taylor_expand(f, params, d) for d in range(3))):
    np.testing.assert_array_equal(fn(params, X), np.sin(X))


def test_python_and_numpy_scalar_leaves():
  f = lambda p, x: jnp.sin(p["a"] * x) * p["b"]
  p0, p = {"a": 0.5, "b": np.float64(2.0)}, {"a": 0.6, "b": 2.0}
  for degree in (1, 2, 3):
    want = _taylor_ref(f, p0, p, X, degree)
    np.testing.assert_allclose(taylor_expand(f, p0, degree)(p, X), want, rtol=1e-13,
                               atol=1e-13)
  np.testing.assert_allclose(linearize(f, p0)(p, X), _taylor_ref(f, p0, p, X, 1),
                             rtol=1e-13, atol=1e-13)


def test_numpy_float64_leaves_without_x64_do_not_warn():
  f = lambda p, x: jnp.sin(p["a"] * x) * p["b"]
  with jax.enable_x64(False):
    x = jnp.ones(3)
    fn = taylor_expand(f, {"a": np.float64(0.5), "b": np.array(2.0)}, 2)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      for _ in range(2):
        out = fn({"a": np.float64(0.6), "b": np.array(2.0)}, x)
    assert out.dtype == jnp.float32
    # Degree 2 in a around 0.5, step 0.1: 2·(sin .5 + .1·cos .5 − .005·sin .5) at x = 1.
    want = 2 * (np.sin(0.5) + 0.1 * np.cos(0.5) - 0.005 * np.sin(0.5))
    np.testing.assert_allclose(np.asarray(out), np.full(3, want), rtol=1e-6)


# ------------------------------------------------------------------ signature


def test_any_positional_arguments():
  rng = np.random.default_rng(5)
  p0 = jnp.asarray(rng.normal(size=(5, 2)))
  p = p0 + 0.1
  f0 = lambda q: jnp.sum(jnp.tanh(q))                       # no argument after params
  f2 = lambda q, x, y, *, s=1.0: s * jnp.tanh(x @ q) + y     # two positional and a keyword
  for degree in (1, 2):
    np.testing.assert_allclose(taylor_expand(f0, p0, degree)(p),
                               _taylor_ref(lambda q, _: f0(q), p0, p, None, degree),
                               rtol=1e-13)
    want = _taylor_ref(lambda q, x: f2(q, x, 1.0, s=2.0), p0, p, X, degree)
    np.testing.assert_allclose(taylor_expand(f2, p0, degree)(p, X, 1.0, s=2.0), want,
                               rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(linearize(f0, p0)(p),
                             _taylor_ref(lambda q, _: f0(q), p0, p, None, 1), rtol=1e-13)
  np.testing.assert_allclose(linearize(f2, p0)(p, X, 1.0, s=2.0),
                             _taylor_ref(lambda q, x: f2(q, x, 1.0, s=2.0), p0, p, X, 1),
                             rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------ bad leaves and errors


@pytest.mark.parametrize("bad, kind", [("abc", "str"), (object(), "object")])
def test_non_array_params_leaf(bad, kind):
  f = lambda q, x: x @ q["w"]
  for make in (lambda p0: linearize(f, p0), lambda p0: taylor_expand(f, p0, 2)):
    with pytest.raises(TypeError, match=rf"`params` leaf \['name'\] has type {kind}"):
      make({"w": jnp.ones((5, 2)), "name": bad})
  fn = linearize(f, {"w": jnp.ones((5, 2)), "name": 1.0})
  with pytest.raises(TypeError, match=rf"`p` leaf \['name'\] has type {kind}"):
    fn({"w": jnp.ones((5, 2)), "name": bad}, X)


def test_complex_p_around_real_params():
  f = lambda q, x: jnp.real(x * q["a"])
  for fn in (linearize(f, {"a": jnp.array(1.0)}), taylor_expand(f, {"a": jnp.array(1.0)}, 2)):
    with pytest.raises(TypeError, match=r"`p` leaf \['a'\] is complex \(complex128\).*"
                                        r"real dtype float64"):
      fn({"a": jnp.array(1.0 + 2.0j)}, X)


def test_complex_params_are_expanded():
  f = lambda q, x: jnp.exp(q * x)
  p0, p = jnp.array(0.3 + 0.2j), jnp.array(0.35 + 0.1j)
  np.testing.assert_allclose(linearize(f, p0)(p, X), np.exp(p0 * X) * (1 + (p - p0) * X),
                             rtol=1e-13)


def test_shape_mismatch_names_the_leaf():
  f = lambda q, x: jnp.tanh(x @ q["layer"][0]) @ q["layer"][1]
  p0 = {"layer": (jnp.ones((5, 4)), jnp.ones((4, 2)))}
  for fn in (linearize(f, p0), taylor_expand(f, p0, 2)):
    with pytest.raises(ValueError, match=r"`p` leaf \['layer'\]\[1\] has shape \(2, 4\), "
                                         r"expected \(4, 2\)"):
      fn({"layer": (jnp.ones((5, 4)), jnp.ones((2, 4)))}, X)
    with pytest.raises(ValueError, match=r"`p` does not have the pytree structure of "
                                         r"`params`, the expansion point: it has the same leaf "
                                         r"paths in other containers"):
      fn({"layer": [jnp.ones((5, 4)), jnp.ones((4, 2))]}, X)


def test_not_callable():
  with pytest.raises(TypeError, match=r"`f` must be callable"):
    linearize(3, {})
  with pytest.raises(TypeError, match=r"`f` must be callable"):
    taylor_expand(3, {}, 1)


def test_custom_vjp_is_a_clear_jax_error():
  """Documented limitation: forward mode cannot go through a custom_vjp function."""
  @jax.custom_vjp
  def clip_grad(y):
    return y
  clip_grad.defvjp(lambda y: (y, None), lambda _, g: (jnp.clip(g, -1, 1),))
  f = lambda q, x: clip_grad(x @ q)
  with pytest.raises(TypeError, match="custom_vjp"):
    linearize(f, jnp.ones((5, 2)))(jnp.ones((5, 2)), X)


# ------------------------------------------------------------------ degree


@pytest.mark.parametrize("degree", [np.int64(2), np.int32(2), jnp.array(2), np.array(2),
                                    jnp.array(2, jnp.uint8)])
def test_degree_numpy_and_jax_integers(degree):
  f = lambda q, x: jnp.sin(x @ q)
  p0 = jnp.asarray(np.random.default_rng(6).normal(size=(5, 2)))
  np.testing.assert_array_equal(taylor_expand(f, p0, degree)(p0 + 0.1, X),
                                taylor_expand(f, p0, 2)(p0 + 0.1, X))


@pytest.mark.parametrize("degree", [1.5, 2.0, "2", None, True, np.bool_(True),
                                    jnp.array(2.0), np.array([2]), jnp.array([1, 2])])
def test_degree_wrong_type(degree):
  with pytest.raises(TypeError, match=r"`degree` must be a non-negative integer"):
    taylor_expand(lambda q, x: x, {}, degree)


@pytest.mark.parametrize("degree", [-1, np.int64(-2), jnp.array(-1)])
def test_degree_negative(degree):
  with pytest.raises(ValueError, match=r"`degree` must be a non-negative integer, got -"):
    taylor_expand(lambda q, x: x, {}, degree)


# ------------------------------------------------------------------ jit without constants


def _const_bytes(jaxpr) -> int:
  return sum(int(np.size(c)) * np.dtype(getattr(c, "dtype", np.float64)).itemsize
             for c in jaxpr.consts if hasattr(c, "shape"))


@pytest.mark.parametrize("degree", [None, 2])
def test_params_as_argument_under_jit_has_no_constants(degree):
  """The documented jit form takes θ₀ as an argument, so it is not embedded as constants."""
  rng = np.random.default_rng(7)
  p0 = [jnp.asarray(rng.normal(size=(64, 64))) for _ in range(2)]
  f = lambda q, x: jnp.tanh(x @ q[0]) @ q[1]
  x = jnp.ones((3, 64))
  make = (lambda q0: linearize(f, q0)) if degree is None else (
      lambda q0: taylor_expand(f, q0, degree))
  size = 2 * 64 * 64 * 8
  closure = jax.make_jaxpr(make(p0))(p0, x)
  assert _const_bytes(closure) >= size  # the pitfall the docstring warns about
  explicit = jax.make_jaxpr(lambda q0, q, x: make(q0)(q, x))(p0, p0, x)
  assert _const_bytes(explicit) < size / 100
  jitted = jax.jit(lambda q0, q, x: make(q0)(q, x))
  q = [a + 0.01 for a in p0]
  np.testing.assert_allclose(jitted(p0, q, x), make(p0)(q, x), rtol=1e-12)
