"""ntk_dynamics.init: spectrum, layer shares and bad input (float64)."""
import math
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import haiku as hk  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ntk_dynamics import init as ni  # noqa: E402

from tests.init_common import JC, D, K, N, make_setup  # noqa: E402
from tests.init_common import dense_kernel as _dense_kernel  # noqa: E402


@pytest.fixture(scope="module")
def setup():
  return make_setup()


# --- spectrum --------------------------------------------------------------------------------

@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_matrix_free_matches_eigh(setup, trace_axes):
  model, _, params, x = setup
  dense = ni.ntk_spectrum(model, params, x, method="eigh", top_k=4, trace_axes=trace_axes)
  free = ni.ntk_spectrum(model, params, x, method="lanczos", top_k=4, trace_axes=trace_axes)
  assert dense.method == "eigh" and free.method == "lanczos" and free.eigenvalues is None
  assert free.matvecs > 0
  for a in ("lambda_max", "lambda_min", "trace", "condition_number"):
    assert getattr(free, a) == pytest.approx(getattr(dense, a), rel=1e-6), a
  np.testing.assert_allclose(free.top_eigenvalues, dense.top_eigenvalues, rtol=1e-6)
  lo, hi = free.effective_rank_bounds
  assert lo - 1e-9 <= dense.effective_rank <= hi + 1e-9
  assert lo <= free.effective_rank <= hi
  # definitions
  lam = dense.eigenvalues
  assert dense.effective_rank == pytest.approx(lam.sum() ** 2 / np.sum(lam ** 2))
  assert dense.dim == (N if trace_axes else N * K)


def test_kernel_spectrum_matches_numpy(setup):
  _, f, params, x = setup
  k = _dense_kernel(f, params, x)
  spec = ni.kernel_spectrum(k, top_k=3)
  lam = np.linalg.eigvalsh(k)
  assert spec.lambda_max == pytest.approx(lam[-1]) and spec.lambda_min == pytest.approx(lam[0])
  assert spec.condition_number == pytest.approx(lam[-1] / lam[0])
  assert spec.trace == pytest.approx(np.trace(k))
  assert spec.as_dict()["top_eigenvalues"] == pytest.approx(list(lam[::-1][:3]))


def test_layer_shares_sum_to_one_and_match_jacobians(setup):
  model, f, params, x = setup
  shares = ni.layer_shares(model, params, x, **JC)
  assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
  assert all(v >= 0 for v in shares.values())
  # Tr Θ_l = (1/K) Σ_{n,k} ‖∂f_k(x_n)/∂θ_l‖², from the per-leaf Jacobians
  jac = jax.jacrev(f)(params, x)  # leaves (N, K, *leaf)
  traces = {f"{m}/{p}": float(jnp.sum(jac[m][p] ** 2)) / K
            for m in jac for p in jac[m]}
  total = sum(traces.values())
  assert set(shares) == set(traces)
  for name, v in traces.items():
    assert shares[name] == pytest.approx(v / total, rel=1e-9, abs=1e-15), name
  groups = ni.layer_shares(model, params, x, by="group", **JC)
  assert set(groups) == {"dense_0", "dense_1", "readout"}
  assert groups["dense_1"] == pytest.approx(shares["dense_1/w"] + shares["dense_1/b"])
  # Tr Θ from the shares' traces equals the kernel's trace
  raw = ni.layer_traces(model, params, x, **JC)
  assert sum(raw.values()) == pytest.approx(np.trace(_dense_kernel(f, params, x)), rel=1e-10)


# --- bad input -------------------------------------------------------------------------------

def test_empty_batch(setup):
  model, _, params, _ = setup
  empty = jnp.zeros((0, D))
  for call in (lambda: ni.ntk_spectrum(model, params, empty),
               lambda: ni.layer_shares(model, params, empty),
               lambda: ni.spectral_learning_rate(model, params, empty),
               lambda: ni.balance_layers(model, params, empty),
               lambda: ni.search_init_scales(model, params, empty, steps=1)):
    with pytest.raises(ValueError, match="empty batch"):
      call()


def test_no_trainable_parameters(setup):
  x = setup[3]
  frozen = hk.without_apply_rng(hk.transform(lambda x: jnp.tanh(x[:, :K])))
  params = frozen.init(jax.random.PRNGKey(0), x)
  assert params == {}
  for call in (lambda: ni.ntk_spectrum(frozen, params, x),
               lambda: ni.layer_shares(frozen, params, x),
               lambda: ni.center_outputs(frozen, params, x),
               lambda: ni.balance_layers(frozen, params, x),
               lambda: ni.search_init_scales(frozen, params, x, steps=1)):
    with pytest.raises(ValueError, match="no trainable parameters"):
      call()


def test_non_finite_params(setup):
  model, _, params, x = setup
  bad = jax.tree.map(lambda a: a, params)
  bad["dense_1"]["w"] = bad["dense_1"]["w"].at[0, 0].set(jnp.nan)
  for call in (lambda: ni.ntk_spectrum(model, bad, x),
               lambda: ni.spectral_learning_rate(model, bad, x),
               lambda: ni.balance_layers(model, bad, x),
               lambda: ni.search_init_scales(model, bad, x, steps=1)):
    with pytest.raises(ValueError, match=r"non-finite.*dense_1/w"):
      call()


def test_non_positive_lambda_min_warns_with_figure():
  k = np.diag([2.0, 1.0, -1e-9])   # negative by rounding only (tolerance 2·√eps·λ_max)
  with pytest.warns(RuntimeWarning, match=r"λ_min = -1e-09 ≤ 0.*undefined"):
    spec = ni.kernel_spectrum(k)
  assert spec.condition_number == math.inf
  with pytest.raises(ValueError, match="not positive semi-definite"):
    ni.kernel_spectrum(np.diag([2.0, 1.0, -1e-3]))   # beyond rounding: not an NTK
  with pytest.warns(RuntimeWarning, match="within rounding"):
    ni.kernel_spectrum(np.diag([1.0, 1e-18]))
  with pytest.raises(ValueError, match="non-finite"):
    ni.kernel_spectrum(np.array([[1.0, np.nan], [np.nan, 1.0]]))


def test_singular_kernel_is_refused_by_search(setup):
  model, _, params, x = setup
  dup = jnp.concatenate([x[:4], x[:4]])  # duplicated inputs: Θ is singular
  with pytest.raises(ValueError, match="singular"):
    ni.search_init_scales(model, params, dup, steps=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(RuntimeWarning, match="λ_min"):
      ni.ntk_spectrum(model, params, dup)


def test_bad_options(setup):
  model, _, params, x = setup
  with pytest.raises(ValueError, match="method"):
    ni.ntk_spectrum(model, params, x, method="svd")
  with pytest.raises(ValueError, match="bounds"):
    ni.search_init_scales(model, params, x, bounds=(2., 3.))
  with pytest.raises(ValueError, match="target"):
    ni.balance_layers(model, params, x, target={"dense_0": 1.0})
  with pytest.raises(ValueError, match="mode"):
    ni.center_outputs(model, params, x, mode="mean")
  with pytest.raises(TypeError, match="model"):
    ni.ntk_spectrum(3, params, x)
  for top_k in (0, -1):  # used to slice silently: () or all eigenvalues but the smallest
    with pytest.raises(ValueError, match=r"kernel_spectrum: `top_k` must be a positive int"):
      ni.kernel_spectrum(np.diag([1., 2., 3.]), top_k=top_k)
