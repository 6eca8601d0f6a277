"""Bad input to the dynamics raises a ValueError naming the argument and the expectation;
steps beyond the stable one warn with the figures."""
from __future__ import annotations

import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ntk_dynamics import dynamics  # noqa: E402

N, K, N_TEST = 5, 2, 3
MSE = lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2)  # noqa: E731
FACTORIES = {
    "flow": dynamics.gradient_descent_mse,
    "steps": dynamics.gradient_descent_mse_steps,
    "momentum_flow": dynamics.momentum_flow_mse,
    "ode": lambda *a, **kw: dynamics.gradient_descent(MSE, *a, **kw),
}


def _data(seed=0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(N + N_TEST, 7))
  kernel = feats @ feats.T / 7
  return kernel[:N, :N], kernel[N:, :N], rng.normal(size=(N, K))


@pytest.fixture(params=sorted(FACTORIES))
def factory(request):
  return FACTORIES[request.param]


@pytest.mark.parametrize("shape", [(N, N + 1), (N, N, K, K), (N,)])
def test_kernel_shape_mismatch(factory, shape):
  _, _, y = _data()
  with pytest.raises(ValueError, match=r"`k_train_train` has shape .*expected \(5, 5\)"):
    factory(np.ones(shape), y)


def test_full_kernel_needs_trace_axes_matching(factory):
  k, _, y = _data()
  with pytest.raises(ValueError, match=r"expected \(5, 5, 2, 2\)"):
    factory(k, y, trace_axes=())
  with pytest.raises(ValueError, match="trace_axes"):
    factory(k, y, trace_axes=(5,))
  with pytest.raises(ValueError, match="traces every axis"):
    factory(np.ones(()), y, trace_axes=(0, 1))


def test_non_symmetric_or_non_finite_kernel(factory):
  k, _, y = _data()
  skew = k.copy()
  skew[0, 1] += 0.1
  with pytest.raises(ValueError, match="not symmetric"):
    factory(skew, y)
  bad = k.copy()
  bad[2, 2] = np.nan
  with pytest.raises(ValueError, match=r"`k_train_train` \(shape \(5, 5\)\) holds 1 non-finite"):
    factory(bad, y)
  with pytest.raises(ValueError, match="`y_train`.*non-finite"):
    factory(k, np.full((N, K), np.inf))


@pytest.mark.parametrize("kwargs,name", [({"learning_rate": -0.1}, "learning_rate"),
                                         ({"learning_rate": 0.}, "learning_rate"),
                                         ({"diag_reg": -1e-3}, "diag_reg"),
                                         ({"learning_rate": np.ones(2)}, "learning_rate")])
def test_bad_scalars(factory, kwargs, name):
  k, _, y = _data()
  with pytest.raises(ValueError, match=f"`{name}` must be"):
    factory(k, y, **kwargs)


@pytest.mark.parametrize("name", ["steps", "momentum_flow", "ode"])
@pytest.mark.parametrize("momentum", [1., -0.2, 1.5])
def test_bad_momentum(name, momentum):
  k, _, y = _data()
  with pytest.raises(ValueError, match=r"`momentum` must be a finite scalar >= 0 and < 1"):
    FACTORIES[name](k, y, momentum=momentum)


def test_bad_prediction_arguments(factory):
  k, k_te, y = _data()
  predict = factory(k, y)
  f0, ft0 = np.zeros((N, K)), np.zeros((N_TEST, K))
  with pytest.raises(ValueError, match=r"`t` .* must be finite and >= 0"):
    predict(np.array([1., -2.]), f0)
  with pytest.raises(ValueError, match=r"`fx_train_0` has shape \(5, 3\); expected"):
    predict(1., np.zeros((N, K + 1)))
  with pytest.raises(ValueError, match="`k_test_train` is None"):
    predict(1., f0, ft0)
  with pytest.raises(ValueError, match="both `fx_train_0` and `fx_test_0` are None"):
    predict(1., None)
  with pytest.raises(ValueError, match=r"`k_test_train` has shape \(3, 4\); expected \(M1, 5\)"):
    predict(1., f0, ft0, k_te[:, :4])
  with pytest.raises(ValueError, match=r"`fx_test_0` has shape \(4, 2\); expected \(3, 2\)"):
    predict(1., f0, np.zeros((N_TEST + 1, K)), k_te)
  with pytest.raises(ValueError, match="`fx_test_0`.*non-finite"):
    predict(1., f0, np.full((N_TEST, K), np.nan), k_te)


def test_steps_must_be_integers():
  k, _, y = _data()
  predict = dynamics.gradient_descent_mse_steps(k, y)
  with pytest.raises(ValueError, match="`t` counts gradient steps and must be integer-valued"):
    predict(np.array([1., 2.5]), 0.)
  np.testing.assert_allclose(predict(np.array([3.]), 0.), predict(np.array([3]), 0.))


def test_times_beyond_the_integer_dtype_are_refused_or_taken_as_floats():
  # Counts the step dtype cannot hold used to saturate silently (1e19 steps: the initial
  # outputs) or, without x64, wrap around ("must be >= 0; got [-1294967296]" for 3e9).
  k, _, y = _data()
  predict = dynamics.gradient_descent_mse_steps(k, y, 0.1)
  with pytest.raises(ValueError, match=r"`t` \(shape \(2,\)\) counts up to 1e\+19 steps, "
                     r"beyond the largest int64"):
    predict(np.array([1., 1e19]), 0.)
  with jax.enable_x64(False):
    k32, y32 = k.astype(np.float32), y.astype(np.float32)
    predict = dynamics.gradient_descent_mse_steps(k32, y32, 0.1)
    for t in (np.int64(3_000_000_000), 2 ** 31, 3e9):
      with pytest.raises(ValueError, match=r"`t` \(shape \(\)\) counts up to .* steps, beyond "
                         r"the largest int32 \(2147483647\); enable jax_enable_x64"):
        predict(t, 0.)
    assert np.all(np.isfinite(predict(2 ** 31 - 1, 0.)))
    for factory in (dynamics.gradient_descent_mse, dynamics.momentum_flow_mse):
      flow = factory(k32, y32, 1e-9)  # ηt = 3: not yet converged
      np.testing.assert_array_equal(flow(np.int64(3_000_000_000), 0.), flow(3e9, 0.))


def test_ode_specific_errors():
  k, _, y = _data()
  with pytest.raises(ValueError, match="must return a scalar"):
    dynamics.gradient_descent(lambda fx, yy: (fx - yy) ** 2, k, y)
  with pytest.raises(ValueError, match="`t` must be given"):
    dynamics.gradient_descent(MSE, k, y)(None, 0.)
  with pytest.raises(ValueError, match="`max_steps` must be a positive integer"):
    dynamics.gradient_descent(MSE, k, y, max_steps=0)
  with pytest.raises(ValueError, match="`rtol` must be"):
    dynamics.gradient_descent(MSE, k, y, rtol=-1.)


@pytest.mark.parametrize("momentum", [0., 0.9])
def test_unstable_step_warns_with_figures(momentum):
  k, _, y = _data()
  lam = np.linalg.eigvalsh(k)[-1]
  limit = 2 * (1 + momentum) * y.size / lam
  with pytest.warns(RuntimeWarning, match=rf"largest stable step .* = {limit:.6g}"):
    dynamics.gradient_descent_mse_steps(k, y, 1.01 * limit, momentum=momentum)
  with pytest.warns(RuntimeWarning, match="stable step"):  # diag_reg raises λ_max
    dynamics.gradient_descent_mse_steps(k, y, 0.99 * limit, momentum=momentum, diag_reg=0.5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    dynamics.gradient_descent_mse_steps(k, y, 0.99 * limit, momentum=momentum)
    dynamics.gradient_descent_mse(k, y, 100 * limit)  # the flow has no stability limit


def _float32_ntk(n=64, p=16, seed=0):
  """A rank-deficient float32 kernel J Jᵀ: its null-space eigenvalues are rounding noise, some
  of them negative."""
  jac = np.random.default_rng(seed).normal(size=(n, p)).astype(np.float32)
  return jnp.asarray(jac) @ jnp.asarray(jac).T


@pytest.mark.parametrize("name", ["flow", "steps", "momentum_flow"])
def test_indefinite_kernel_is_rejected(name):
  k, _, y = _data()
  lam = np.linalg.eigvalsh(k)
  shifted = k - (lam[-1] + lam[0]) / 2 * np.eye(N)  # eigenvalues of both signs
  with pytest.raises(ValueError, match=r"`k_train_train` \(shape \(5, 5\)\) is not positive "
                     r"semi-definite: its eigenvalues range from -\d.*tol = "):
    FACTORIES[name](shifted, y)
  with pytest.raises(ValueError, match=r"largest eigenvalue .* <= 0 although the kernel is "
                     "nonzero"):
    FACTORIES[name](-k, y)
  # diag_reg does not hide it: the check is on Θ itself.
  with pytest.raises(ValueError, match="not positive semi-definite"):
    FACTORIES[name](shifted, y, diag_reg=10., diag_reg_absolute_scale=True)
  # Rounding noise of a float32 J Jᵀ (λ_min ~ -1e-7 λ_max) passes, as does the zero kernel.
  kernel = _float32_ntk()
  assert np.linalg.eigvalsh(np.asarray(kernel))[0] < 0
  FACTORIES[name](kernel, np.ones((64, 1), np.float32), 0.1)(3., 0.)
  FACTORIES[name](np.zeros((N, N)), y)
  # Under jit the kernel is not concrete and is not checked.
  predict = lambda kk: FACTORIES[name](kk, y)(2., 0.)  # noqa: E731
  assert jax.jit(predict)(shifted).shape == y.shape


def test_indefinite_or_asymmetric_kernel_in_max_learning_rate_and_kernel_spectrum():
  from ntk_dynamics import init
  k, _, _ = _data()
  with pytest.raises(ValueError, match=r"max_learning_rate: `k_train_train` \(shape \(5, 5\)\) "
                     "is not positive semi-definite"):
    dynamics.max_learning_rate(-k, 10)
  with pytest.raises(ValueError, match="not positive semi-definite"):
    dynamics.max_learning_rate(k - 2 * np.eye(N), 10)
  with pytest.raises(ValueError, match=r"kernel_spectrum: `kernel` \(shape \(4, 4\)\) is not "
                     r"positive semi-definite: its eigenvalues range from -1 to -1"):
    init.kernel_spectrum(-jnp.eye(4))
  skew = np.array(k)
  skew[0, 1] += 0.1
  with pytest.raises(ValueError, match=r"`kernel` \(shape \(5, 5\)\) is not symmetric"):
    init.kernel_spectrum(skew)
  with pytest.raises(ValueError, match="not symmetric"):
    dynamics.max_learning_rate(skew, 10)
  kernel = _float32_ntk(n=1024, p=100)  # rounding noise of a float32 kernel passes
  assert np.isfinite(float(dynamics.max_learning_rate(kernel, 1024)))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # λ_min ≤ 0: κ undefined (warned)
    assert init.kernel_spectrum(kernel).lambda_min < 0


def test_messages_for_non_finite_steps_and_scalar_targets():
  k, _, y = _data()
  with pytest.raises(ValueError, match=r"`t` \(shape \(\)\) must be finite and >= 0; got \[inf\]"):
    dynamics.gradient_descent_mse_steps(k, y)(float("inf"), 0.)
  with pytest.raises(ValueError, match=r"`t` \(shape \(2,\)\) must be finite .* got \[nan\]"):
    dynamics.gradient_descent_mse_steps(k, y)(np.array([1., np.nan]), 0.)
  for name in FACTORIES:
    with pytest.raises(ValueError, match=r"`y_train` must have at least one axis .* got shape "
                       r"\(\)"):
      FACTORIES[name](np.ones((1, 1)), 1.)


@pytest.mark.parametrize("size", [10, np.int64(10), np.int32(10), jnp.int32(10), np.array(10),
                                  jnp.array(10)])
def test_integral_scalars_are_accepted(size):
  k, _, y = _data()
  expected = 2 * 10 / np.linalg.eigvalsh(k)[-1]
  np.testing.assert_allclose(dynamics.max_learning_rate(k, size), expected, rtol=1e-10)
  dynamics.gradient_descent(MSE, k, y, max_steps=size)(1., 0.)


@pytest.mark.parametrize("bad", [10., np.float64(10.), True, np.array([10]), jnp.array(10.), 0,
                                 -3])
def test_non_integral_sizes_are_rejected(bad):
  k, _, y = _data()
  with pytest.raises(ValueError, match="`y_train_size` must be a positive integer"):
    dynamics.max_learning_rate(k, bad)
  with pytest.raises(ValueError, match="`max_steps` must be a positive integer"):
    dynamics.gradient_descent(MSE, k, y, max_steps=bad)


def test_negative_kernel_rejected_on_the_lanczos_path(monkeypatch):
  from ntk_dynamics.dynamics import stability
  monkeypatch.setattr(stability, "DENSE_MAX_DIM", 3)  # 5 rows: Lanczos for λ_max
  k, _, _ = _data()
  with pytest.raises(ValueError, match=r"largest eigenvalue -.* <= 0 although the kernel is "
                     "nonzero"):
    dynamics.max_learning_rate(-k, 10)
  np.testing.assert_allclose(dynamics.max_learning_rate(k, 10),
                             2 * 10 / np.linalg.eigvalsh(k)[-1], rtol=1e-8)
