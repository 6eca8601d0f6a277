"""The ODE path (`gradient_descent`): MSE against the closed forms, cross-entropy against
small-step training of the linearized model and against scipy's DOP853 (float64)."""
from __future__ import annotations

import dataclasses

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

from ntk_dynamics import dynamics  # noqa: E402
from tests.test_dynamics_closed_forms import (LOSSES, PROBLEMS, assert_close,  # noqa: E402
                                              random_features_problem, sgd_trajectory,
                                              stable_lr)

TIGHT = dict(rtol=1e-12, atol=1e-14)
TIMES = np.array([7., 0., 1.5, 40.])  # unsorted on purpose


def _call(predict, problem, t):
  return predict(t, problem.fx_train_0, problem.fx_test_0, problem.k_test_train)


@pytest.mark.parametrize("name,momentum,diag_reg", [("traced", None, 0.2), ("full", None, 0.),
                                                    ("full", 0.8, 0.1)])
def test_mse_matches_closed_form(name, momentum, diag_reg):
  problem = PROBLEMS[name]()
  lr = stable_lr(problem, 0.3)
  kw = dict(learning_rate=lr, diag_reg=diag_reg, trace_axes=problem.trace_axes)
  ode = dynamics.gradient_descent(LOSSES["mse"], problem.k_train_train, problem.y_train,
                                  momentum=momentum, **kw, **TIGHT)
  if momentum is None:
    closed = dynamics.gradient_descent_mse(problem.k_train_train, problem.y_train, **kw)
  else:
    closed = dynamics.momentum_flow_mse(problem.k_train_train, problem.y_train,
                                        momentum=momentum, **kw)
  for a, b in zip(_call(ode, problem, TIMES), _call(closed, problem, TIMES)):
    assert_close(a, b)


def _classification(problem):
  labels = np.arange(problem.y_train.shape[0]) % problem.y_train.shape[1]
  return dataclasses.replace(problem, y_train=jax.nn.one_hot(labels, problem.y_train.shape[1],
                                                            dtype=jnp.float64))


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_cross_entropy_matches_small_step_training(name):
  """k steps of size η vs the flow at t = k: first-order error, removed to O(η²) by
  Richardson extrapolation over (η, k) and (η/2, 2k)."""
  problem = _classification(PROBLEMS[name]())
  lr, k = 0.5 * stable_lr(problem, 0.02), 100
  ode = dynamics.gradient_descent(LOSSES["cross_entropy"], problem.k_train_train,
                                  problem.y_train, lr, trace_axes=problem.trace_axes, **TIGHT)
  flow = _call(ode, problem, float(k))
  # Both runs have 2k steps so that one compiled trainer serves them.
  coarse = [out[k] for out in sgd_trajectory(problem, lr, 2 * k, loss="cross_entropy")]
  fine = [out[-1] for out in sgd_trajectory(problem, lr / 2, 2 * k, loss="cross_entropy")]
  start = (problem.fx_train_0, problem.fx_test_0)
  for f, c, h, s in zip(flow, coarse, fine, start):
    moved = np.max(np.abs(f - s))
    assert moved > 0.05  # the outputs really train
    assert np.max(np.abs(c - f)) / moved < 2e-2  # first order in η
    assert np.max(np.abs(2 * h - c - f)) / moved < 2e-5  # extrapolated: second order


def test_cross_entropy_matches_scipy_dop853():
  problem = _classification(PROBLEMS["full"]())
  lr = stable_lr(problem, 0.3)
  ode = dynamics.gradient_descent(LOSSES["cross_entropy"], problem.k_train_train,
                                  problem.y_train, lr, trace_axes=(), **TIGHT)
  train, test = _call(ode, problem, TIMES)
  n, k = problem.y_train.shape
  kernel = np.asarray(problem.k_train_train).transpose(0, 2, 1, 3).reshape(n * k, n * k)
  k_test = np.asarray(problem.k_test_train)
  k_test = k_test.transpose(0, 2, 1, 3).reshape(k_test.shape[0] * k, n * k)
  grad = jax.jit(jax.grad(LOSSES["cross_entropy"]))

  def rhs(_, state):
    g = np.asarray(grad(state[:n * k].reshape(n, k), problem.y_train)).ravel()
    return -lr * np.concatenate([kernel @ g, k_test @ g])

  state0 = np.concatenate([np.ravel(problem.fx_train_0), np.ravel(problem.fx_test_0)])
  order = np.argsort(TIMES)
  sol = solve_ivp(rhs, (0., TIMES.max()), state0, method="DOP853", t_eval=TIMES[order],
                  rtol=1e-12, atol=1e-14)
  states = np.empty((TIMES.size, state0.size))
  states[order] = sol.y.T
  assert_close(train, states[:, :n * k].reshape((-1, n, k)))
  assert_close(test, states[:, n * k:].reshape((-1,) + test.shape[1:]))


def test_curves_shape_zero_time_and_step_cap():
  problem = PROBLEMS["traced"]()
  ode = dynamics.gradient_descent(LOSSES["mse"], problem.k_train_train, problem.y_train,
                                  stable_lr(problem, 0.3))
  t = jnp.array([[0., 2.], [5., 1.]])
  train, test = _call(ode, problem, t)
  assert train.shape == (2, 2) + problem.y_train.shape
  assert test.shape == (2, 2) + problem.fx_test_0.shape
  np.testing.assert_array_equal(train[0, 0], problem.fx_train_0)
  assert ode(t, problem.fx_train_0).shape == train.shape
  capped = dynamics.gradient_descent(LOSSES["mse"], problem.k_train_train, problem.y_train,
                                     stable_lr(problem, 0.3), max_steps=3)
  far = capped(jnp.array([0., 1e4]), problem.fx_train_0)
  assert np.all(np.isfinite(far[0])) and np.all(np.isnan(far[1]))


def _ode(kernel, y, **kw):
  return dynamics.gradient_descent(LOSSES["mse"], kernel, y, **kw)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_non_symmetric_kernel_is_rejected(name):
  problem = PROBLEMS[name]()
  skew = np.array(problem.k_train_train)
  skew[(0, 1) + (0,) * (skew.ndim - 2)] += 0.1 * np.max(np.abs(skew))
  with pytest.raises(ValueError, match=rf"gradient_descent: `k_train_train` \(shape "
                     rf"\({', '.join(map(str, skew.shape))}\)\) is not symmetric"):
    _ode(skew, problem.y_train, trace_axes=problem.trace_axes)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_indefinite_kernel_is_rejected_like_the_closed_form(name):
  """Same check and message as `gradient_descent_mse`: on Θ itself, so diag_reg does not hide
  an indefinite kernel."""
  problem = PROBLEMS[name]()
  mat = problem.kernel_matrix()
  lam = np.linalg.eigvalsh(mat)
  shift = (lam[-1] + lam[0]) / 2  # eigenvalues of both signs
  if problem.trace_axes:
    shifted = problem.k_train_train - shift * np.eye(mat.shape[0])
  else:
    n, k = problem.y_train.shape
    shifted = problem.k_train_train - shift * np.einsum("ij,ab->ijab", np.eye(n), np.eye(k))
  kw = dict(trace_axes=problem.trace_axes)
  pattern = (rf"`k_train_train` \(shape \({', '.join(map(str, shifted.shape))}\)\) is not "
             r"positive semi-definite: its eigenvalues range from -\d.*tol = ")
  with pytest.raises(ValueError, match="gradient_descent: " + pattern):
    _ode(shifted, problem.y_train, **kw)
  with pytest.raises(ValueError, match="gradient_descent_mse: " + pattern):
    dynamics.gradient_descent_mse(shifted, problem.y_train, **kw)
  for momentum in (None, 0.5):
    with pytest.raises(ValueError, match="not positive semi-definite"):
      _ode(shifted, problem.y_train, momentum=momentum, diag_reg=10 * lam[-1],
           diag_reg_absolute_scale=True, **kw)
  with pytest.raises(ValueError, match=r"largest eigenvalue .* <= 0 although the kernel is "
                     "nonzero"):
    _ode(-problem.k_train_train, problem.y_train, **kw)


def test_singular_and_rounding_noise_kernels_are_accepted():
  """A rank-deficient PSD kernel (zero eigenvalues, some rounding to tiny negatives) passes and
  integrates like the closed form; so do a float32 J Jᵀ and the zero kernel."""
  problem = random_features_problem(width=3)
  lam = np.linalg.eigvalsh(problem.kernel_matrix())
  assert lam[0] < 1e-12 * lam[-1]
  kw = dict(learning_rate=stable_lr(problem, 0.3), trace_axes=problem.trace_axes)
  ode = _ode(problem.k_train_train, problem.y_train, **kw, **TIGHT)
  closed = dynamics.gradient_descent_mse(problem.k_train_train, problem.y_train, **kw)
  for a, b in zip(_call(ode, problem, TIMES), _call(closed, problem, TIMES)):
    assert_close(a, b)
  jac = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
  kernel = jnp.asarray(jac) @ jnp.asarray(jac).T
  assert np.linalg.eigvalsh(np.asarray(kernel))[0] < 0
  out = _ode(kernel, np.ones((64, 1), np.float32), learning_rate=0.1)(3., 0.)
  assert np.all(np.isfinite(out))
  y = problem.y_train
  np.testing.assert_array_equal(_ode(np.zeros((len(y),) * 2), y)(2., 0.), np.zeros_like(y))


def test_kernel_checks_under_jit_match_the_closed_form():
  """Under `jax.jit` the kernel is traced: like `gradient_descent_mse`, the factory skips the
  symmetry and PSD checks (no error) and still runs; a valid kernel gives the eager result."""
  problem = PROBLEMS["traced"]()
  k, y = problem.k_train_train, problem.y_train
  lam = np.linalg.eigvalsh(k)
  shifted = k - (lam[-1] + lam[0]) / 2 * np.eye(len(k))
  skew = np.array(k)
  skew[0, 1] += 0.1 * np.max(np.abs(k))
  lr = stable_lr(problem, 0.3)
  ode = jax.jit(lambda kk: _ode(kk, y, learning_rate=lr)(2., 0.))
  closed = jax.jit(lambda kk: dynamics.gradient_descent_mse(kk, y, learning_rate=lr)(2., 0.))
  for bad in (shifted, skew):
    for factory in (_ode, dynamics.gradient_descent_mse):
      with pytest.raises(ValueError, match="`k_train_train`"):
        factory(bad, y, learning_rate=lr)
    assert ode(bad).shape == closed(bad).shape == y.shape
  assert_close(ode(k), _ode(k, y, learning_rate=lr)(2., 0.), 1e-6)
  assert_close(ode(k), closed(k), 1e-6)
