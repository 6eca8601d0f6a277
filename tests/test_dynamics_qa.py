"""QA of the dynamics on unusual but legitimate input: half-precision kernels, float32 kernels
with float64 targets, extreme times, and errors that name the function and the argument.
References are independent float64 computations (pseudo-inverse, explicit iteration)."""
from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ntk_dynamics import dynamics  # noqa: E402
from ntk_dynamics.dynamics import _inputs  # noqa: E402
from tests.test_dynamics_inputs import FACTORIES  # noqa: E402
HALF = [jnp.bfloat16, jnp.float16]


def _problem(n=8, rank=8, seed=0):
  rng = np.random.default_rng(seed)
  jac, jac_test = rng.normal(size=(n, rank)), rng.normal(size=(3, rank))
  return jac @ jac.T / rank, jac_test @ jac.T / rank, rng.normal(size=(n, 2))


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_tolerances_use_the_dtypes_own_eps(dtype):
  eps = float(jnp.finfo(dtype).eps)
  assert _inputs.psd_tolerance(4, dtype) == pytest.approx(max(40 * eps, np.sqrt(eps)))
  # J₁J₂ᵀ and J₂J₁ᵀ rounded at half precision differ by ~eps relative, beyond √eps₃₂.
  kernel, _, _ = _problem()
  skew = np.triu(np.full_like(kernel, 3 * eps * np.abs(kernel).max()), 1)
  _inputs.check_symmetric("f", "k", jnp.asarray(kernel + skew, dtype), kernel.shape)
  with pytest.raises(ValueError, match=r"f: `k` .* not symmetric"):
    _inputs.check_symmetric("f", "k", jnp.asarray(kernel + skew * 10 / np.sqrt(eps), dtype),
                            kernel.shape)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_kernels_give_the_float32_answers(dtype):
  kernel, k_test, y = _problem()
  # Well conditioned (λ_min/λ_max > 0.1): no mode below the cutoff √A·eps·λ_max, which at
  # half precision drops modes under ~2% of λ_max as rounding noise.
  kernel = kernel + np.eye(len(kernel))
  k_half, kt_half, y_half = (jnp.asarray(a, dtype) for a in (kernel, k_test, y))
  # The reference: the same (rounded) numbers in float64.
  k64, kt64, y64 = (np.asarray(a, np.float64) for a in (k_half, kt_half, y_half))
  lam = np.linalg.eigvalsh(k64)[-1]
  eta = dynamics.max_learning_rate(k_half, y.size)
  assert eta.dtype == jnp.float32
  np.testing.assert_allclose(float(eta), 2 * y.size / lam, rtol=1e-5)
  np.testing.assert_allclose(float(dynamics.largest_eigenvalue(k_half)), lam, rtol=1e-5)
  lr = 0.5 * float(eta)
  for name, factory in FACTORIES.items():
    t = np.array([0, 3, 40])
    train, test = factory(k_half, y_half, lr)(t, 0., 0., kt_half)
    want_train, want_test = factory(k64, y64, lr)(t, 0., 0., kt64)
    assert train.dtype == dtype and test.dtype == dtype, name
    scale = np.abs(want_train).max()
    np.testing.assert_allclose(np.asarray(train, np.float64), want_train, atol=2e-2 * scale)
    np.testing.assert_allclose(np.asarray(test, np.float64), want_test, atol=2e-2 * scale)


@pytest.mark.parametrize("name", ["flow", "steps", "momentum_flow"])
def test_float32_rank_deficient_kernel_with_float64_targets(name):
  """The kernel's float32 rounding noise (~1e-7·λ_max) must be dropped, not inverted because
  the targets made the eigensolver run in float64."""
  rng = np.random.default_rng(4)
  jac, jac_test = rng.normal(size=(20, 5)), rng.normal(size=(3, 5))
  kernel, k_test, y = jac @ jac.T, jac_test @ jac.T, rng.normal(size=(20, 1))
  want = k_test @ np.linalg.pinv(kernel) @ y  # exact kernel regression on the true kernel
  predict = FACTORIES[name](jnp.asarray(kernel, jnp.float32), y, 0.1)
  for t in [None, np.array([10**9])]:
    _, test = predict(t, np.zeros_like(y), 0., jnp.asarray(k_test, jnp.float32))
    assert test.dtype == jnp.float64
    np.testing.assert_allclose(np.reshape(test, want.shape), want, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", ["flow", "momentum_flow"])
def test_times_near_the_largest_float_reach_the_limit(dtype, name):
  kernel, k_test, y = _problem()
  kernel, k_test, y = (jnp.asarray(a, dtype) for a in (kernel, k_test, y))
  # Top rates s = ηλ/N near 2: s·t overflows at the largest times (underdamped with momentum).
  predict = FACTORIES[name](kernel, y, 0.9 * float(dynamics.max_learning_rate(kernel, y.size)))
  big = float(jnp.finfo(dtype).max)
  train, test = predict(jnp.asarray([1e6, big / 10, big], dtype), 0., 0., k_test)
  want_train, want_test = predict(None, 0., 0., k_test)
  assert np.all(np.isfinite(train)) and np.all(np.isfinite(test))
  tol = 1e-4 if dtype == jnp.float32 else 1e-9
  np.testing.assert_allclose(train, np.broadcast_to(want_train, train.shape), atol=tol)
  np.testing.assert_allclose(test, np.broadcast_to(want_test, test.shape), atol=tol)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_errors_name_the_function_and_argument(name):
  kernel, k_test, y = _problem()
  factory, fn = FACTORIES[name], "gradient_descent" if name == "ode" else None
  fn = fn or factory.__name__
  with pytest.raises(ValueError, match=rf"{fn}: `k_train_train` .* non-finite"):
    factory(np.where(np.eye(8) > 0, np.nan, kernel), y, 0.1)
  with pytest.raises(ValueError, match=rf"{fn}: `y_train` .* non-finite"):
    factory(kernel, np.full_like(y, np.inf), 0.1)
  predict = factory(kernel, y, 0.1)
  with pytest.raises(ValueError, match=rf"{fn}: `k_test_train` .* non-finite"):
    predict(np.array([1]), 0., 0., k_test * np.nan)
  with pytest.raises(ValueError, match=rf"{fn}: `y_train` has shape \(0, 2\), with no entries"):
    factory(np.zeros((0, 0)), np.zeros((0, 2)), 0.1)
  with pytest.raises(ValueError, match=rf"{fn}: `k_train_train` .* real numbers.*complex"):
    factory(kernel.astype(complex), y, 0.1)
  with pytest.raises(ValueError, match=rf"{fn}: `learning_rate` must be a real scalar"):
    factory(kernel, y, "0.1")
  with pytest.raises(ValueError, match=rf"{fn}: `t` must hold real numbers.*complex"):
    predict(1j)  # was silently taken as t = 0


def test_max_learning_rate_errors():
  with pytest.raises(ValueError, match=r"max_learning_rate: `k_train_train` has shape \(0, 0\)"):
    dynamics.max_learning_rate(np.zeros((0, 0)), 1)
  with pytest.raises(ValueError, match=r"max_learning_rate: `k_train_train` .* non-finite"):
    dynamics.max_learning_rate(np.full((2, 2), np.nan), 2)
  with pytest.raises(ValueError, match=r"max_learning_rate: `k_train_train` .* complex"):
    dynamics.max_learning_rate(np.eye(2, dtype=complex), 2)
  # A boolean kernel is a valid (exact) kernel: it used to fail in numpy's subtraction.
  assert float(dynamics.max_learning_rate(np.eye(3, dtype=bool), 3)) == pytest.approx(6.)


def test_step_counts_at_the_int32_limit_are_refused_without_x64():
  kernel, _, y = _problem()
  with jax.enable_x64(False):
    predict = dynamics.gradient_descent_mse_steps(jnp.asarray(kernel, jnp.float32),
                                                  jnp.asarray(y, jnp.float32), 0.1)
    # float32(2³¹) compared with 2³¹ − 1 in float32 rounds equal: 2³¹ steps slipped through.
    with pytest.raises(ValueError, match=r"beyond the largest int32"):
      predict(np.float32(2. ** 31))
