"""`max_learning_rate` / `largest_eigenvalue`: the formula, dense and matrix-free paths, and
that the bound is sharp for the closed-form discrete dynamics (float64)."""
from __future__ import annotations

import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ntk_dynamics import dynamics  # noqa: E402
from ntk_dynamics.dynamics import stability  # noqa: E402


def _jacobian(n=6, k=3, p=20, seed=0):
  return np.random.default_rng(seed).normal(size=(n, k, p)) / np.sqrt(p)


def _full_kernel(jac):
  return np.einsum("iap,jbp->ijab", jac, jac)


@pytest.mark.parametrize("momentum", [0., 0.5])
def test_formula_on_full_and_traced_kernels(momentum):
  jac = _jacobian()
  full = _full_kernel(jac)
  lam = np.linalg.eigvalsh(full.transpose(0, 2, 1, 3).reshape(18, 18))[-1]
  np.testing.assert_allclose(dynamics.max_learning_rate(full, 18, momentum),
                             2 * (1 + momentum) * 18 / lam, rtol=1e-10)
  traced = np.einsum("ijaa->ij", full) / 3  # Θ ⊗ I has the λ_max of Θ
  lam_t = np.linalg.eigvalsh(traced)[-1]
  np.testing.assert_allclose(dynamics.max_learning_rate(traced, 18, momentum),
                             2 * (1 + momentum) * 18 / lam_t, rtol=1e-10)


def test_matrix_free_and_lanczos_match_dense(monkeypatch):
  jac = _jacobian(n=30, k=2, p=50)
  full = _full_kernel(jac)
  dense = dynamics.largest_eigenvalue(full)

  def vp(v):  # v ↦ J (Jᵀ v), the shape of `ntk_dynamics.kernels.ntk_vp_fn`'s products
    return jnp.einsum("iap,p->ia", jac, jnp.einsum("iap,ia->p", jac, v))

  np.testing.assert_allclose(dynamics.largest_eigenvalue(vp, vector_shape=(30, 2)), dense,
                             rtol=1e-8)
  np.testing.assert_allclose(dynamics.max_learning_rate(vp, 60, vector_shape=(30, 2)),
                             2 * 60 / dense, rtol=1e-8)
  monkeypatch.setattr(stability, "DENSE_MAX_DIM", 10)  # force Lanczos on the dense kernel
  np.testing.assert_allclose(dynamics.largest_eigenvalue(full), dense, rtol=1e-8)


def test_with_ntk_vp_fn_from_a_model():
  from ntk_dynamics import kernels
  rng = np.random.default_rng(1)
  w1, w2 = rng.normal(size=(3, 16)) / np.sqrt(3), rng.normal(size=(16, 2)) / 4.
  f = lambda p, x: jnp.tanh(x @ p[0]) @ p[1]  # noqa: E731
  params, x = (jnp.asarray(w1), jnp.asarray(w2)), jnp.asarray(rng.normal(size=(7, 3)))
  jac = jax.jacrev(lambda q: f(q, x))(params)
  flat = np.concatenate([np.asarray(j).reshape(7, 2, -1) for j in jac], axis=-1)
  dense = np.linalg.eigvalsh(_full_kernel(flat).transpose(0, 2, 1, 3).reshape(14, 14))[-1]
  vp = kernels.ntk_vp_fn(f, x, None, params)
  np.testing.assert_allclose(dynamics.max_learning_rate(vp, 14, vector_shape=(7, 2)),
                             2 * 14 / dense, rtol=1e-8)


@pytest.mark.parametrize("momentum", [0., 0.8])
def test_bound_is_sharp_for_discrete_dynamics(momentum):
  jac = _jacobian()
  full = _full_kernel(jac)
  y = np.random.default_rng(2).normal(size=(6, 3))
  eta = float(dynamics.max_learning_rate(full, y.size, momentum))
  steps = np.array([4000])
  residual = []
  for factor in [0.98, 1.02]:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      predict = dynamics.gradient_descent_mse_steps(full, y, factor * eta, momentum=momentum,
                                                    trace_axes=())
    assert [w.category for w in caught] == ([RuntimeWarning] if factor > 1 else [])
    residual.append(np.max(np.abs(predict(steps, 0.) - y)))
  assert residual[0] < 1e-3 * np.max(np.abs(y))
  assert not residual[1] < 1e3  # diverged (possibly to inf/nan)


def test_bad_arguments():
  full = _full_kernel(_jacobian())
  with pytest.raises(ValueError, match="`y_train_size` must be a positive integer"):
    dynamics.max_learning_rate(full, 0)
  with pytest.raises(ValueError, match="`momentum` must be"):
    dynamics.max_learning_rate(full, 18, momentum=1.)
  with pytest.raises(ValueError, match="expected a square kernel"):
    dynamics.max_learning_rate(np.ones((6, 5)), 18)
  with pytest.raises(ValueError, match="`vector_shape`"):
    dynamics.largest_eigenvalue(lambda v: v)


def test_one_entry_matrix_free_kernel():
  # A single training point with a single output: ARPACK cannot run on a 1x1 operator.
  vp = lambda v: 2.5 * v  # noqa: E731
  assert float(dynamics.largest_eigenvalue(vp, vector_shape=(1, 1))) == 2.5
  np.testing.assert_allclose(dynamics.max_learning_rate(vp, 1, 0.5, vector_shape=(1, 1)),
                             2 * 1.5 / 2.5, rtol=1e-15)


@pytest.mark.parametrize("scale", [1., 1e-10, 1e-14])
def test_max_learning_rate_is_exact_in_any_kernel_units(scale):
  # η_max = 2(1+m)N/λ_max exactly, however small the kernel's units (not 2(1+m)N/(λ_max + eps)).
  full = scale * _full_kernel(_jacobian())
  lam = np.linalg.eigvalsh(full.transpose(0, 2, 1, 3).reshape(18, 18))[-1]
  np.testing.assert_allclose(dynamics.max_learning_rate(full, 18, 0.5), 3 * 18 / lam,
                             rtol=1e-12)
  # eps still stands in for λ_max of an all-zero kernel.
  np.testing.assert_allclose(dynamics.max_learning_rate(0. * full, 18, eps=1e-6), 2 * 18 / 1e-6,
                             rtol=1e-15)


def test_zero_matrix_free_kernel():
  # ARPACK raised "Starting vector is zero" on the zero operator.
  zero = lambda v: 0. * v  # noqa: E731
  assert float(dynamics.largest_eigenvalue(zero, vector_shape=(10, 3))) == 0.
  assert float(dynamics.max_learning_rate(zero, 30, vector_shape=(10, 3), eps=0.)) == np.inf


def test_matrix_free_largest_eigenvalue_is_deterministic():
  # ARPACK's default start vector is random: identical runs got λ_max (and the learning
  # rates derived from it) different in the 7th digit.
  a = np.random.default_rng(3).standard_normal((400, 400))
  sym = jnp.asarray(a @ a.T / 400 + np.diag(np.linspace(0, 1, 400)))
  vp = lambda v: sym @ v  # noqa: E731
  runs = {float(dynamics.largest_eigenvalue(vp, vector_shape=(400,), tol=1e-3))
          for _ in range(4)}
  assert len(runs) == 1
