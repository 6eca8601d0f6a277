"""QA of ntk_dynamics.init against brute-force float64 figures: one-dimensional and 3-D outputs,
small matrix-free spectra, half precision, precomputed kernels, unused layers, argument edges."""
import math
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ntk_dynamics as nd  # noqa: E402
from ntk_dynamics import init as ni  # noqa: E402
from ntk_dynamics.init import search as search_lib  # noqa: E402

N, D, H, K = 6, 3, 5, 2
JC = dict(implementation=nd.NtkImplementation.JACOBIAN_CONTRACTION)


def _params(k_out=K):
  w1 = jax.random.normal(jax.random.PRNGKey(1), (D, H), jnp.float64)
  w2 = jax.random.normal(jax.random.PRNGKey(2), (H, k_out), jnp.float64)
  return {"l1": {"w": w1}, "l2": {"w": w2}}


def _mlp(p, x):
  return jnp.tanh(x @ p["l1"]["w"]) @ p["l2"]["w"]


def _x(n=N, dtype=jnp.float64):
  return jax.random.normal(jax.random.PRNGKey(0), (n, D), dtype)


def _jacobian(f, params, x):
  """J (A, P) over all A output entries of f(params, x), float64."""
  out = f(params, x)
  leaves = jax.tree.leaves(jax.jacrev(f)(params, x))
  return np.concatenate([np.asarray(l, np.float64).reshape(out.size, -1) for l in leaves], 1)


def _leaf_sq_norms(f, params, x):
  """Σ_{n,k} ‖∂f_k(x_n)/∂θ_l‖² per leaf "l1/w", from jax.jacrev."""
  jac = jax.jacrev(f)(params, x)
  return {f"{m}/{p}": float(jnp.sum(jac[m][p] ** 2)) for m in jac for p in jac[m]}


# --- outputs of unusual rank -----------------------------------------------------------------

def _f1(p, x):  # one output per example, shape (N,)
  return _mlp(p, x)[:, 0]


def test_one_dimensional_outputs_have_a_kernel_and_shares():
  # Before: trace_axes=(-1,) traced the batch axis of an (N,) output: ntk_spectrum raised
  # "kernel of shape () is not a square zipped kernel", layer_shares a kernels overlap error.
  p, x = _params(), _x()
  lam = np.linalg.eigvalsh(_jacobian(_f1, p, x) @ _jacobian(_f1, p, x).T)
  spec = ni.ntk_spectrum(_f1, p, x, **JC)
  assert spec.dim == N
  np.testing.assert_allclose(spec.eigenvalues, lam, rtol=1e-10, atol=1e-12 * lam[-1])
  norms = _leaf_sq_norms(_f1, p, x)
  shares = ni.layer_shares(_f1, p, x, **JC)
  for name, v in norms.items():
    assert shares[name] == pytest.approx(v / sum(norms.values()), rel=1e-10)
  res = ni.spectral_learning_rate(_f1, p, x, trace_axes=(-1,), factor=1.)
  assert res.report["lambda_max"] == pytest.approx(lam[-1], rel=1e-10)


def test_batch_axis_or_out_of_range_trace_axes_are_refused():
  # Before: trace_axes=(0,) traced the examples away and returned a (K, K) spectrum.
  p, x = _params(), _x()
  for call in (lambda: ni.ntk_spectrum(_mlp, p, x, trace_axes=(0,)),
               lambda: ni.spectral_learning_rate(_mlp, p, x, trace_axes=(0,)),
               lambda: ni.layer_traces(_mlp, p, x, trace_axes=(-2,))):
    with pytest.raises(ValueError, match=r"`trace_axes`=\((0|-2),\) for outputs of shape "
                       r"\(6, 2\).*batch axis"):
      call()


def _f3(p, x):  # outputs (N, 4, 2)
  return _mlp(p, x).reshape(-1, 4, 2)


def test_three_dimensional_outputs_full_kernel_trace():
  # Before: the per-example diagonal (N, 4, 4, 2, 2) was read as (N, 16, 16): Lanczos and
  # layer_traces with trace_axes=() raised "cannot reshape array of size 384".
  p = _params(k_out=8)
  x = _x()
  jac = _jacobian(_f3, p, x)
  lam = np.linalg.eigvalsh(jac @ jac.T)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # rank 40 < 48 rows: λ_min ≈ 0
    free = ni.ntk_spectrum(_f3, p, x, method="lanczos", trace_axes=(), top_k=3)
  assert free.trace == pytest.approx(lam.sum(), rel=1e-10)
  np.testing.assert_allclose(free.top_eigenvalues, lam[::-1][:3], rtol=1e-8)
  traces = ni.layer_traces(_f3, p, x, trace_axes=(), **JC)
  for name, v in _leaf_sq_norms(_f3, p, x).items():
    assert traces[name] == pytest.approx(v, rel=1e-10)


# --- matrix-free spectra of small kernels ----------------------------------------------------

@pytest.mark.parametrize("n, trace_axes, top_k", [(1, (), 10), (2, (-1,), 1), (4, (), 11)])
def test_lanczos_small_kernels_are_exact(n, trace_axes, top_k):
  # Before: with top_k ≥ A ARPACK returned A − 1 eigenvalues (λ_min missing from
  # top_eigenvalues) and the effective rank was estimated although the rest of Σλ² was
  # known (3.11 for the exact 2.98 at A = 3); for A ≤ 2 and top_k < A it left λ₂² out.
  p, x = _params(k_out=3), _x(n)
  jac = _jacobian(_mlp, p, x)
  full = jac @ jac.T
  k = full if trace_axes == () else np.einsum("aibi->ab", full.reshape(n, 3, n, 3)) / 3
  lam = np.linalg.eigvalsh(k)[::-1]
  spec = ni.ntk_spectrum(_mlp, p, x, method="lanczos", trace_axes=trace_axes, top_k=top_k)
  np.testing.assert_allclose(spec.top_eigenvalues, lam[:top_k], rtol=1e-8)
  r = lam.sum() ** 2 / np.sum(lam ** 2)
  assert spec.effective_rank == pytest.approx(r, rel=1e-8)
  assert spec.effective_rank_bounds[0] <= r * (1 + 1e-8)
  assert spec.effective_rank_bounds[1] >= r * (1 - 1e-8)


# --- half precision --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_parameters(dtype):
  # Before (bfloat16): "data type bfloat16 not inexact" (np.finfo) from ntk_spectrum and
  # kernel_spectrum, NotImplementedError (no half-precision eigensolver) from
  # spectral_learning_rate; the kernel's own rounding failed the float32 symmetry test.
  p64, x64 = _params(), _x()
  jac = _jacobian(_mlp, p64, x64)
  lam_full = np.linalg.eigvalsh(jac @ jac.T)[-1]
  lam_tr = np.linalg.eigvalsh(np.einsum("aibi->ab", (jac @ jac.T).reshape(N, K, N, K)) / K)
  p = jax.tree.map(lambda a: a.astype(dtype), p64)
  x = x64.astype(dtype)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # κ not reliable at this precision
    for method in ("eigh", "lanczos"):
      spec = ni.ntk_spectrum(_mlp, p, x, method=method)
      assert spec.lambda_max == pytest.approx(lam_tr[-1], rel=0.05), method
      assert spec.trace == pytest.approx(lam_tr.sum(), rel=0.05), method
    res = ni.spectral_learning_rate(_mlp, p, x, factor=1.)
  assert res.report["lambda_max"] == pytest.approx(lam_full, rel=0.05)
  assert ni.kernel_spectrum(jnp.diag(jnp.asarray([3., 1.], dtype))).condition_number == 3.


# --- spectral learning rate with a given kernel ----------------------------------------------

def test_spectral_learning_rate_checks_a_given_kernel():
  p, x = _params(), _x()
  jac = _jacobian(_mlp, p, x)
  full = jac @ jac.T
  lam = np.linalg.eigvalsh(full)[-1]
  # Before: a kernel of another batch was used silently (read as a traced kernel).
  other = _jacobian(_mlp, p, _x(4))
  with pytest.raises(ValueError, match=r"spectral_learning_rate: `kernel` has shape \(8, 8\), "
                     r"but f\(params, x\) has shape \(6, 2\).*\(6, 6, 2, 2\)"):
    ni.spectral_learning_rate(_mlp, p, x, kernel=other @ other.T)
  with pytest.raises(ValueError, match=r"`kernel` has shape \(6, 2, 6, 2\)"):
    ni.spectral_learning_rate(_mlp, p, x, kernel=full.reshape(N, K, N, K))
  # Before: a flat full (N·K, N·K) kernel with y_size ≠ N·K was taken for a traced one.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    res = ni.spectral_learning_rate(_mlp, p, x, kernel=full, y_size=N, factor=1.)
  assert res.report["kernel"] == "full"
  assert res.learning_rate == pytest.approx(2 * N / lam, rel=1e-12)


def test_spectral_learning_rate_zero_kernel_and_momentum():
  p, x = _params(), _x()

  def frozen(q, x):  # no parameter reaches the outputs
    return jnp.tanh(x[:, :K]) + 0. * jax.lax.stop_gradient(q["l1"]["w"]).sum()

  # Before: λ_max = 0 was replaced by 1e-12 and η = 1.2e13 returned.
  for method in ("eigh", "lanczos"):
    with pytest.raises(ValueError, match=r"spectral_learning_rate: the kernel Θ\(x, x\) is "
                       "zero"):
      ni.spectral_learning_rate(frozen, p, x, method=method)
  # Before: named as max_learning_rate's argument.
  with pytest.raises(ValueError, match=r"spectral_learning_rate: `momentum` must be a finite "
                     r"scalar >= 0 and < 1.0, got 1.5"):
    ni.spectral_learning_rate(_mlp, p, x, momentum=1.5)


# --- layer balancing and multipliers ---------------------------------------------------------

def _with_unused(p):
  return dict(p, unused={"w": jnp.ones((2, 2))})


@pytest.mark.parametrize("method", ["weights", "learning_rate"])
def test_balance_layers_leaves_an_unused_layer_out(method):
  # Before: "math domain error" (weights: log 0), or multiplier 0 for the unused layer while
  # the report claimed its target share, and effective_model turned θ₀/√0 into ±inf.
  p, x = _with_unused(_params()), _x()
  with pytest.warns(RuntimeWarning, match=r"\['unused'\] carry no share of Tr Θ"):
    res = ni.balance_layers(_mlp, p, x, method=method, tol=1e-3, **JC)
  assert set(res.report["relative_shares_after"]) == {"l1", "l2"}
  if method == "weights":
    f_eff, phi0 = res.f, res.params
    np.testing.assert_array_equal(res.params["unused"]["w"], p["unused"]["w"])
  else:
    assert res.report["multipliers"] == pytest.approx(
        {"l1": res.report["multipliers"]["l1"], "l2": res.report["multipliers"]["l2"]})
    assert float(res.lr_multipliers["unused"]["w"]) == 1.
    f_eff, phi0 = ni.effective_model(_mlp, p, res.lr_multipliers)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(phi0))
  norms = _leaf_sq_norms(f_eff, phi0, x)
  assert norms["l1/w"] / (norms["l1/w"] + norms["l2/w"]) == pytest.approx(0.5, rel=2e-3)
  with pytest.raises(ValueError, match=r"unknown \['unused'\].*\['unused'\] have no share"), \
      pytest.warns(RuntimeWarning, match="no share"):
    ni.balance_layers(_mlp, p, x, target={"l1": 1., "l2": 1., "unused": 1.}, **JC)


def test_balance_layers_bounds_and_effective_model_multipliers():
  p, x = _params(), _x()
  # Before: (2, 3) silently broke Π α = 1 (both scales 2), (0, 2) raised "math domain error".
  for bounds in ((2., 3.), (0., 2.), (0.5,)):
    with pytest.raises(ValueError, match=r"balance_layers: `bounds` must"):
      ni.balance_layers(_mlp, p, x, bounds=bounds)
  # Before: φ₀ = θ₀/√0 = ±inf, passed along.
  zero = jax.tree.map(lambda a: 0. if a.shape == (D, H) else 1., p)
  with pytest.raises(ValueError, match=r"effective_model: `lr_multipliers` must be finite and "
                     r"> 0.*'l1/w' \(0\)"):
    ni.effective_model(_mlp, p, zero)


# --- init-scale search arguments -------------------------------------------------------------

def test_soft_log_condition_with_tiny_temperature():
  # Before: a/τ overflowed for τ = 1e-310: value inf, NaN weights (the search's gradient was
  # then zeroed and it never moved).
  lam = np.array([0.5, 1., 2., 8.])
  value, grad = search_lib.soft_log_condition(lam, 1e-310, 8)
  exact, exact_grad = search_lib.soft_log_condition(lam, 0., 8)
  assert value == pytest.approx(math.log(16.), rel=1e-12) and exact == pytest.approx(value)
  np.testing.assert_allclose(grad, exact_grad, rtol=1e-12)
  # τ > 0 unchanged: τ·log Σ exp(±a/τ) by brute force
  a = np.log(lam)
  tau = 0.3
  brute = tau * (np.log(np.sum(np.exp(a / tau))) + np.log(np.sum(np.exp(-a / tau))))
  assert search_lib.soft_log_condition(lam, tau, 8)[0] == pytest.approx(brute, rel=1e-12)


def test_search_accepts_numpy_scalars_and_names_bad_arguments():
  p, x = _params(), _x()
  kw = dict(steps=1, **JC)
  # Before: np.float32 is no Python float: "`learning_rate` must be a finite number > 0, got
  # np.float32(0.1)".
  a = ni.search_init_scales(_mlp, p, x, learning_rate=np.float32(0.25),
                            temperature=np.float32(0.5), **kw)
  b = ni.search_init_scales(_mlp, p, x, learning_rate=float(np.float32(0.25)),
                            temperature=float(np.float32(0.5)), **kw)
  assert a.report["history"][1]["scales"] == pytest.approx(b.report["history"][1]["scales"])
  assert a.report["history"][1]["scales"] != pytest.approx([1., 1.])
  # Before: "not enough values to unpack", "could not convert string to float", True = 1 step.
  for bad, match in ((dict(bounds=(0.5,)), r"`bounds` must be a pair \(lo, hi\) of numbers"),
                     (dict(trace_target="init"), r"`trace_target` must be 'initial', None or "
                      "a number > 0, got 'init'"),
                     (dict(steps=True), r"`steps` must be a non-negative int, got True")):
    with pytest.raises(ValueError, match=r"search_init_scales: " + match):
      ni.search_init_scales(_mlp, p, x, **{**kw, **bad})
