"""ntk_dynamics.init tweaks: spectral learning rate, output centering, layer balancing."""
import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import ntk_dynamics as nd  # noqa: E402
from ntk_dynamics import dynamics  # noqa: E402
from ntk_dynamics import init as ni  # noqa: E402

from tests.init_common import JC, D, K, N, make_setup  # noqa: E402
from tests.init_common import dense_kernel as _dense_kernel  # noqa: E402
from tests.init_common import make_model as _model  # noqa: E402


@pytest.fixture(scope="module")
def setup():
  return make_setup()


# --- tweaks ----------------------------------------------------------------------------------

def test_spectral_learning_rate(setup):
  model, f, params, x = setup
  k = _dense_kernel(f, params, x, ())
  res = ni.spectral_learning_rate(model, params, x, factor=0.7)
  eta_max = float(dynamics.max_learning_rate(jnp.asarray(k), N * K))
  assert res.learning_rate == pytest.approx(0.7 * eta_max, rel=1e-10)
  assert res.report["eta_max"] == pytest.approx(2 * N * K / np.linalg.eigvalsh(k)[-1])
  assert res.report["regime"].startswith("lazy") and res.report["kernel"] == "full"
  assert res.params is params
  free = ni.spectral_learning_rate(model, params, x, factor=0.7, method="lanczos")
  assert free.learning_rate == pytest.approx(res.learning_rate, rel=1e-6)
  assert ni.learning_rate_regime(1.5).startswith("catapult")
  assert ni.learning_rate_regime(2.5).startswith("divergent")
  mom = ni.spectral_learning_rate(model, params, x, factor=1.0, momentum=0.9, kernel=k)
  assert mom.learning_rate == pytest.approx(1.9 * eta_max, rel=1e-10)
  with pytest.raises(ValueError, match="factor"):
    ni.spectral_learning_rate(model, params, x, factor=0.)


def test_spectral_learning_rate_arguments(setup):
  model, f, params, x = setup
  for bad in (0, 2.5):  # named as this function's argument, not max_learning_rate's
    with pytest.raises(ValueError, match=r"spectral_learning_rate: `y_size` must be a positive "
                       "integer"):
      ni.spectral_learning_rate(model, params, x, y_size=bad)
  k = _dense_kernel(f, params, x, ())
  eta_max = 2 * N * K / np.linalg.eigvalsh(k)[-1]
  res = ni.spectral_learning_rate(model, params, x, factor=np.float32(0.5), kernel=k)
  assert isinstance(res.learning_rate, float)
  assert res.learning_rate == pytest.approx(0.5 * eta_max, rel=1e-12)


def _linearized_sgd_loss(f, params, x, lr, steps):
  """Training loss of the linearized model after `steps` of optax.sgd(lr) on fixed targets."""
  f_lin = nd.linearize(f, params)
  y = jax.random.normal(jax.random.PRNGKey(3), (N, K), jnp.float64)
  tx = optax.sgd(lr)

  def step(carry, _):
    p, s = carry
    g = jax.grad(lambda q: 0.5 * jnp.mean((f_lin(q, x) - y) ** 2))(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return float(0.5 * jnp.mean((f_lin(p, x) - y) ** 2))


def test_spectral_learning_rate_traced_kernel_is_only_a_bound(setup):
  # λ_max(Θ_tr) ≤ λ_max(Θ): a step from the traced kernel can exceed the stable one of the
  # linearized network, which is why the full kernel is the default (and a traced one warns).
  model, f, params, x = setup
  with pytest.warns(RuntimeWarning, match="lower bound"):
    traced = ni.spectral_learning_rate(model, params, x, factor=0.9, trace_axes=(-1,))
  with pytest.warns(RuntimeWarning, match="lower bound"):
    given = ni.spectral_learning_rate(model, params, x, factor=0.9,
                                      kernel=_dense_kernel(f, params, x))
  assert given.learning_rate == pytest.approx(traced.learning_rate, rel=1e-10)
  full = ni.spectral_learning_rate(model, params, x, factor=0.9)
  ratio = full.report["lambda_max"] / traced.report["lambda_max"]
  assert 0.9 * ratio > 1.05, ratio  # here 0.9·η_max(traced) is beyond η_max(full)
  loss0 = _linearized_sgd_loss(f, params, x, 1e-12, 1)
  assert _linearized_sgd_loss(f, params, x, full.learning_rate, 400) < loss0
  assert _linearized_sgd_loss(f, params, x, traced.learning_rate, 400) > 1e3 * loss0


@pytest.mark.parametrize("mode", ["antisymmetric", "subtract"])
def test_center_outputs_zero_f0_same_kernel(setup, mode):
  model, f, params, x = setup
  res = ni.center_outputs(model, params, x, mode=mode)
  x_other = jax.random.normal(jax.random.PRNGKey(7), (5, D), jnp.float64)
  for xx in (x, x_other):
    assert float(jnp.max(jnp.abs(res.f(res.params, xx)))) < 1e-14
  assert res.report["max_abs_f0_before"] > 0.1 and res.report["max_abs_f0_after"] < 1e-14
  # full (N·K, N·K) kernel; the traced one is its mean over matching logits
  k0 = _dense_kernel(f, params, x, ())
  k1 = _dense_kernel(res.f, res.params, x, ())
  np.testing.assert_allclose(k1, k0, rtol=1e-12, atol=1e-13 * np.abs(k0).max())
  if mode == "antisymmetric":
    assert res.report["num_params_after"] == 2 * res.report["num_params_before"]
    # the wrapped model is trainable: its gradient is not zero
    g = jax.grad(lambda p: jnp.sum(res.f(p, x)))(res.params)
    assert float(jnp.abs(g["theta"]["readout"]["w"]).max()) > 0
    assert set(res.params) == {"theta", "theta_prime"}


@pytest.mark.parametrize("mode", ["antisymmetric", "subtract"])
def test_center_outputs_keeps_float32_models_float32(mode):
  # jax_enable_x64 is on here: a float64 numpy scalar in the wrapper used to promote the
  # outputs of a float32 model to float64.
  x = jax.random.normal(jax.random.PRNGKey(1), (N, D), jnp.float32)
  model = _model()
  params = model.init(jax.random.PRNGKey(0), x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  res = ni.center_outputs(model, params, mode=mode)
  assert res.f(res.params, x).dtype == jnp.float32


def test_center_outputs_report_checks_kernel(setup):
  model, _, params, x = setup
  res = ni.center_outputs(model, params, x, mode="subtract", check_kernel=True, **JC)
  assert res.report["kernel_max_rel_change"] < 1e-12


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_balance_layers_weights_reach_equal_shares(activation):
  x = jax.random.normal(jax.random.PRNGKey(2), (N, D), jnp.float64)
  model = _model(activation, w_std=math.sqrt(2.) if activation == "relu" else 1.)
  params = model.init(jax.random.PRNGKey(3), x)
  before = ni.layer_shares(model, params, x, by="group", **JC)
  res = ni.balance_layers(model, params, x, tol=0.01, **JC)
  after = ni.layer_shares(res.f, res.params, x, by="group", **JC)
  assert max(abs(v - 1 / 3) for v in after.values()) <= 0.01 / 3 + 1e-12
  assert max(abs(v - 1 / 3) for v in before.values()) > 0.02
  assert res.report["max_rel_error"] <= 0.01
  scales = res.report["scales"]
  assert math.prod(scales.values()) == pytest.approx(1.0, rel=1e-9)
  # weights scaled, zero biases untouched
  for g, s in scales.items():
    np.testing.assert_allclose(res.params[g]["w"], s * params[g]["w"], rtol=1e-12)
    np.testing.assert_array_equal(res.params[g]["b"], params[g]["b"])
  if activation == "relu":  # zero biases, ReLU: f(αW) = Πα·f(W) = f(W) with Π α = 1
    assert res.report["iterations"] <= 4
    np.testing.assert_allclose(res.f(res.params, x), model.apply(params, x), rtol=1e-10,
                               atol=1e-12)


def test_balance_layers_learning_rate_target(setup):
  model, f, params, x = setup
  target = {"dense_0": 0.2, "dense_1": 0.3, "readout": 0.5}
  res = ni.balance_layers(model, params, x, target=target, method="learning_rate", **JC)
  assert res.params is params and res.lr_multipliers is not None
  f_eff, phi0 = ni.effective_model(f, params, res.lr_multipliers)
  shares = ni.layer_shares(f_eff, phi0, x, by="group", **JC)
  for g, t in target.items():
    assert shares[g] == pytest.approx(t, rel=1e-9)
  # same trace as before
  assert res.report["trace_after"] == pytest.approx(res.report["trace_before"], rel=1e-12)
  assert np.trace(_dense_kernel(f_eff, phi0, x)) == pytest.approx(
      np.trace(_dense_kernel(f, params, x)), rel=1e-9)
  # the optax multipliers and the reparameterised model take the same step
  y = jnp.ones((N, K))
  loss = lambda ff, p: 0.5 * jnp.mean((ff(p, x) - y) ** 2)
  tx = res.optimizer(0.3)
  up, _ = tx.update(jax.grad(lambda p: loss(f, p))(params), tx.init(params), params)
  theta1 = optax.apply_updates(params, up)
  phi1 = jax.tree.map(lambda p, g: p - 0.3 * g, phi0, jax.grad(lambda p: loss(f_eff, p))(phi0))
  np.testing.assert_allclose(f(theta1, x), f_eff(phi1, x), rtol=1e-10)


