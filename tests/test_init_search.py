"""ntk_dynamics.init.search_init_scales: κ at fixed trace, gradient paths, GradInit."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from ntk_dynamics import init as ni  # noqa: E402
from ntk_dynamics.init import search as search_lib  # noqa: E402

from tests.init_common import JC, K, N, make_setup  # noqa: E402


@pytest.fixture(scope="module")
def setup():
  return make_setup()


# --- init-scale search ---

def test_search_lowers_condition_number_at_fixed_trace(setup):
  model, f, params, x = setup
  records = []
  res = ni.search_init_scales(model, params, x, steps=6, learning_rate=0.1, bounds=(0.1, 10.),
                              callback=lambda s, r: records.append(r), **JC)
  rep = res.report
  assert len(records) == 7 and rep["best_step"] > 0
  assert rep["condition_number_after"] < 0.8 * rep["condition_number_before"]
  assert rep["trace_after"] == pytest.approx(rep["trace_before"], rel=0.01)
  spec = ni.ntk_spectrum(res.f, res.params, x, **JC)
  assert spec.condition_number == pytest.approx(rep["condition_number_after"], rel=1e-8)
  for name, s in rep["scales"].items():
    m, leaf = name.split("/")
    np.testing.assert_allclose(res.params[m][leaf], s * params[m][leaf], rtol=1e-12)
    assert 0.1 <= s <= 10.


def test_search_eigvec_gradient_equals_autodiff(setup, monkeypatch):
  """One plain SGD step on log-scales with each gradient path lands on the same scales
  (soft extremes, every eigenpair kept: the Hellmann–Feynman gradient is then exact)."""
  model, _, params, x = setup
  monkeypatch.setattr(search_lib, "_WEIGHT_CUTOFF", 0.0)
  temperature = 0.1
  out = {}
  for grad in ("eigvec", "autodiff"):
    res = ni.search_init_scales(model, params, x, steps=1, gradient=grad, trace_target=None,
                                temperature=temperature, max_pairs=N,
                                optimizer=optax.sgd(1e-2), **JC)
    out[grad] = np.log(np.array(res.report["history"][1]["scales"]))
  assert np.abs(out["autodiff"]).max() > 1e-4  # a real step was taken
  np.testing.assert_allclose(out["eigvec"], out["autodiff"], rtol=1e-6, atol=1e-10)


def test_gradinit_objective_improves_lookahead(setup):
  model, f, params, x = setup
  y = jax.nn.one_hot(jnp.arange(N) % K, K)
  res = ni.search_init_scales(model, params, x, objective="gradinit", y=y, steps=4,
                              learning_rate=0.05, **JC)
  hist = res.report["history"]
  best = hist[res.report["best_step"]]
  assert best["objective"] <= hist[0]["objective"]
  assert best["grad_norm"] <= res.report["gradinit_max_grad_norm"] * (1 + 1e-6)
  with pytest.raises(ValueError, match="needs the targets"):
    ni.search_init_scales(model, params, x, objective="gradinit", steps=1)
  with pytest.raises(ValueError, match=r"`learning_rate` must be a finite number > 0, got -1"):
    ni.search_init_scales(model, params, x, steps=1, learning_rate=-1.)
  with pytest.raises(ValueError, match=r"`temperature` must be a finite number >= 0"):
    ni.search_init_scales(model, params, x, steps=1, temperature=-1.)


