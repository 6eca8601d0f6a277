"""Predicted against actual training curves (`ntk_dynamics.dynamics.curves`), float64.

The pipeline check: the *linearized* network trained by optax must follow the closed form
exactly (MSE, discrete steps with and without momentum), since both are the same linear
dynamics; anything else would be a wiring error (kernel layout, loss normalisation, step
count, learning-rate units).
"""
from __future__ import annotations

import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from ntk_dynamics import models  # noqa: E402
from ntk_dynamics.dynamics import curves  # noqa: E402

N_TRAIN, N_TEST, K, D = 12, 8, 3, 5


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(N_TRAIN, D)), rng.integers(0, K, N_TRAIN),
          rng.normal(size=(N_TEST, D)), rng.integers(0, K, N_TEST))


@pytest.fixture(scope="module")
def model():
  return models.mlp([16], K, parameterization="ntk")


def _compare(model, data, **kw):
  kw = {"steps": 60, "log_points": 8, "progress": False, **kw}
  return curves.compare_curves(model, data, **kw)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_linearized_training_equals_closed_form(model, data, momentum):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a trusted configuration raises no warning at all
    c = _compare(model, data, lr_fraction=0.5, momentum=momentum, linearized=True)
  m = c.metrics
  assert m["method"] == "gradient_descent_mse_steps" and m["kernel"] == "full"
  assert m["lr_ratio"] == pytest.approx(0.5)
  assert m["lr_max"] == pytest.approx(2 * (1 + momentum) * N_TRAIN * K / m["lambda_max"])
  np.testing.assert_array_equal(c.predicted.steps, c.actual.steps)
  assert c.predicted.steps[0] == 0 and c.predicted.steps[-1] == 60
  # The loss actually decreased a lot, so agreement is not trivial.
  assert c.actual.train_loss[-1] < 0.2 * c.actual.train_loss[0]
  for split in ("train", "test"):
    np.testing.assert_allclose(getattr(c.predicted, f"{split}_loss"),
                               getattr(c.actual, f"{split}_loss"), rtol=1e-9)
    np.testing.assert_allclose(getattr(c.predicted, f"fx_{split}"),
                               getattr(c.actual, f"fx_{split}"), atol=1e-9)
    np.testing.assert_array_equal(getattr(c.predicted, f"{split}_accuracy"),
                                  getattr(c.actual, f"{split}_accuracy"))
    assert m[f"max_{split}_loss_deviation"] < 1e-10
    assert m[f"{split}_output_rmse"] < 1e-9
  assert m["ntk_drift"] < 1e-10  # the linearized network's kernel is constant
  assert c.trusted and m["trusted"] and m["warnings"] == []


def test_optimizer_argument_matches_learning_rate(model, data):
  by_lr = _compare(model, data, learning_rate=0.7, momentum=0.5, linearized=True)
  by_opt = _compare(model, data, optimizer=optax.sgd(0.7, momentum=0.5), linearized=True)
  assert by_opt.metrics["lr"] == pytest.approx(0.7) and by_opt.metrics["momentum"] == 0.5
  np.testing.assert_allclose(by_opt.actual.train_loss, by_lr.actual.train_loss, rtol=1e-12)
  np.testing.assert_allclose(by_opt.predicted.test_loss, by_lr.predicted.test_loss,
                             rtol=1e-12)


def test_linearized_xent_follows_the_ode(model, data):
  # The ODE is the flow of the linearized dynamics: it matches discrete steps up to O(η).
  deviations = []
  for fraction in (0.05, 0.0125):
    c = _compare(model, data, loss="xent", lr_fraction=fraction, steps=400,
                 linearized=True)
    assert c.metrics["method"] == "gradient_descent"
    assert c.actual.train_loss[-1] < 0.7 * c.actual.train_loss[0]
    deviations.append(c.metrics["max_train_loss_deviation"])
  assert deviations[0] < 2e-3
  assert deviations[1] < deviations[0] / 3  # first order in η


def test_network_curves_close_for_small_steps(model, data):
  # A real (non-linearized) narrow network: a few percent, and the traced kernel also runs.
  for trace_axes in ((), (-1,)):
    c = _compare(model, data, lr_fraction=0.2, trace_axes=trace_axes, drift_threshold=10.)
    assert c.metrics["kernel"] == ("full" if trace_axes == () else "traced (-1,)")
    assert c.metrics["max_train_loss_deviation"] < 0.1
    assert np.isfinite(c.metrics["ntk_drift"]) and c.metrics["ntk_drift"] > 0


def test_predict_and_train_separately_agree_with_compare(model, data):
  c = _compare(model, data, learning_rate=0.5, linearized=True)
  p = curves.predict_curves(model, data, steps=60, log_points=8, learning_rate=0.5,
                            kernel_batch_size=5)  # blocked kernels: same prediction
  t = curves.train_curves(model, data, steps=60, log_points=8, learning_rate=0.5,
                          linearized=True, progress=False)
  np.testing.assert_allclose(p.curves.train_loss, c.predicted.train_loss, rtol=1e-12)
  np.testing.assert_allclose(t.curves.test_loss, c.actual.test_loss, rtol=1e-12)
  assert p.lr_ratio == pytest.approx(c.metrics["lr_ratio"])


def test_f_and_params_and_float_targets(model, data):
  x_tr, l_tr, x_te, l_te = data
  params = model.init(jax.random.PRNGKey(3), x_tr[:1])
  y_tr = np.eye(K)[l_tr]
  c = _compare(model.apply, (x_tr, y_tr, x_te, np.eye(K)[l_te]), params=params,
               lr_fraction=0.5, linearized=True)
  assert c.metrics["max_train_loss_deviation"] < 1e-10
  assert c.metrics["num_params"] == sum(np.size(p) for p in jax.tree.leaves(params))


def test_minibatch_runs_and_is_flagged(model, data):
  c = _compare(model, data, lr_fraction=0.2, batch_size=4, drift_threshold=10.)
  assert c.metrics["batch_size"] == 4 and c.metrics["minibatch_noise_modelled"] is False
  assert np.all(np.isfinite(c.actual.train_loss))


def test_callback_sees_growing_partial_curves(model, data):
  seen = []
  _compare(model, data, lr_fraction=0.5, linearized=True,
           callback=lambda p, a: seen.append((len(p), len(a))))
  assert [a for _, a in seen] == list(range(1, len(seen) + 1))
  assert all(p == seen[-1][1] for p, _ in seen)


# ----------------------------------------------------------------------------- warnings


def test_learning_rate_beyond_stable_step_warns(model, data):
  with pytest.warns(curves.UntrustedPredictionWarning, match="largest stable step") as rec:
    c = _compare(model, data, lr_fraction=1.5, steps=20, linearized=True)
  assert c.metrics["lr_ratio"] == pytest.approx(1.5)
  assert not c.trusted and any("stable step" in w for w in c.warnings)
  # The closed form's own RuntimeWarning is folded into ours, not repeated.
  assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
  with pytest.warns(curves.UntrustedPredictionWarning, match="largest stable step"):
    curves.predict_curves(model, data, steps=20, loss="xent", lr_fraction=2.0)


def test_traced_kernel_takes_its_step_limit_from_the_full_kernel(model, data):
  # λ_max of the logit-traced kernel is only a lower bound on the full kernel's, so the step
  # limit comes from the full kernel (matrix-free) and the linearized network converges at
  # 0.9·η_max, which the traced kernel's larger limit would push past η_max.
  full = _compare(model, data, lr_fraction=0.9, linearized=True)
  traced = _compare(model, data, lr_fraction=0.9, linearized=True, trace_axes=(-1,))
  assert traced.metrics["kernel"].startswith("traced")
  assert traced.metrics["lambda_max"] == pytest.approx(full.metrics["lambda_max"], rel=1e-6)
  assert traced.actual.train_loss[-1] < traced.actual.train_loss[0]


def test_divergent_training_is_flagged(model, data):
  with pytest.warns(curves.UntrustedPredictionWarning, match="training diverged: the "
                    "training loss rose"):
    c = _compare(model, data, lr_fraction=1.5, steps=30, linearized=True)
  assert not c.trusted and any("rose from" in w for w in c.metrics["warnings"])


def test_drift_above_threshold_warns(model, data):
  with pytest.warns(curves.UntrustedPredictionWarning, match="NTK moved"):
    c = _compare(model, data, lr_fraction=0.5, drift_threshold=1e-6)
  assert c.metrics["ntk_drift"] > 1e-6 and not c.metrics["trusted"]


def test_single_training_point_with_one_output():
  # The step limit comes from a matrix-free λ_max, here of a 1x1 kernel, on which ARPACK
  # cannot run (this raised scipy's TypeError).
  rng = np.random.default_rng(3)
  data = (rng.normal(size=(1, D)), np.full((1, 1), 2.), rng.normal(size=(2, D)),
          rng.normal(size=(2, 1)))
  p = curves.predict_curves(models.mlp([16], 1, parameterization="ntk"), data, steps=10,
                            log_points=3)
  theta = float(np.asarray(p.k_train_train).ravel()[0])
  assert p.max_learning_rate == pytest.approx(2 / theta, rel=1e-12)
  # η = η_max/2 = N/Θ: one step lands on the target.
  assert p.curves.train_loss[0] > 0.5 and np.all(p.curves.train_loss[1:] < 1e-25)


def test_zero_kernel_is_refused(data):
  # No parameter moves the outputs: Θ = 0. The step limit used to come out as N·1e12
  # (λ_max + eps) and the prediction ran on it.
  w = np.random.default_rng(1).normal(size=(D, K))

  def f(p, x):
    return x @ w + 0. * p["b"]

  for call in (curves.predict_curves, _compare):
    with pytest.raises(ValueError, match="λ_max = 0; nothing trains"):
      call(f, data, params={"b": np.ones(K)}, steps=5)


def test_bad_inputs_raise_clear_errors(model, data):
  with pytest.raises(ValueError, match="`loss` must be one of"):
    _compare(model, data, loss="hinge")
  with pytest.raises(ValueError, match="at most one of"):
    _compare(model, data, learning_rate=0.1, lr_fraction=0.5)
  with pytest.raises(ValueError, match="`params` is required"):
    _compare(model.apply, data)
  with pytest.raises(ValueError, match="labels from"):
    x_tr, l_tr, x_te, l_te = data
    _compare(model, (x_tr, l_tr + K, x_te, l_te))
  with pytest.raises(ValueError, match="trace_axes"):
    _compare(model, data, trace_axes=(0,))
  with pytest.raises(ValueError, match="batch_size"):
    _compare(model, data, batch_size=N_TRAIN + 1)
  with pytest.raises(ValueError, match="`learning_rate` must be"):
    _compare(model, data, learning_rate=-1.0)
  with pytest.raises(TypeError, match="`data` must have"):
    _compare(model, {"x": 1})
  with pytest.raises(ValueError, match=r"optax.sgd\(learning_rate, momentum\) only"):
    _compare(model, data, optimizer=optax.adam(1e-3))
  # Initial losses, the divergence test and L(0) of the deviations are read at log_at[0].
  for call in (_compare, curves.predict_curves, curves.train_curves):
    with pytest.raises(ValueError, match=r"`log_at` must start at step 0 .* first steps are "
                       r"\[5, 10\]"):
      call(model, data, log_at=[5, 10], learning_rate=0.1)
  with pytest.raises(ValueError, match="give `learning_rate` .* or `optimizer`, not both"):
    curves.train_curves(model, data, steps=5, learning_rate=0.1, optimizer=optax.sgd(0.2),
                        progress=False)


@pytest.mark.parametrize("opt, expected", [
    (optax.sgd(0.3), (0.3, 0.0)),
    (optax.sgd(0.3, momentum=0.8), (0.3, 0.8)),
    (optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.5), (0.05, 0.5)),
    (optax.chain(optax.trace(decay=0.7), optax.scale(-2.0)), (2.0, 0.7)),
])
def test_sgd_hyperparameters_reads_sgd(opt, expected):
  lr, m = curves.sgd_hyperparameters(opt, {"w": np.zeros(3), "b": np.zeros(())})
  assert (lr, m) == pytest.approx(expected)


@pytest.mark.parametrize("opt", [
    optax.sgd(0.3, momentum=0.8, nesterov=True), optax.adam(0.1),
    optax.sgd(optax.exponential_decay(0.1, 1, 0.5)),
    optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1)),
    # schedules that change only after the probe's steps, and clipping that small gradients
    # never trigger
    optax.sgd(optax.exponential_decay(0.1, 100, 0.5, staircase=True)),
    optax.sgd(optax.piecewise_constant_schedule(0.1, {50: 0.1})),
    optax.sgd(optax.join_schedules([optax.constant_schedule(0.1),
                                    optax.cosine_decay_schedule(0.1, 100)], [20])),
    optax.inject_hyperparams(optax.sgd)(learning_rate=optax.exponential_decay(0.1, 100, 0.5)),
    optax.chain(optax.clip_by_global_norm(100.), optax.sgd(0.1))])
def test_sgd_hyperparameters_rejects_other_optimizers(opt):
  with pytest.raises(ValueError, match=r"optax.sgd\(learning_rate, momentum\) only"):
    curves.sgd_hyperparameters(opt, {"w": np.zeros(3)})


# ----------------------------------------------------------------------------- metrics


def _curves(train, test, acc_train, acc_test, fx_train, fx_test, steps=None):
  steps = np.arange(len(train)) if steps is None else steps
  return curves.Curves(np.asarray(steps), np.asarray(train, float), np.asarray(test, float),
                       np.asarray(acc_train, float), np.asarray(acc_test, float),
                       np.asarray(fx_train, float), np.asarray(fx_test, float))


def test_agreement_metrics_on_synthetic_curves():
  actual = _curves([2.0, 1.0, 0.5], [4.0, 2.0, 2.0], [0.1, 0.5, 0.9], [0.1, 0.4, 0.6],
                   [[1.0, 1.0]], [[0.0, 2.0], [2.0, 0.0]])
  predicted = _curves([2.0, 1.1, 0.4], [4.0, 2.4, 1.9], [0.1, 0.6, 0.9], [0.1, 0.4, 0.8],
                      [[1.0, 4.0]], [[1.0, 2.0], [2.0, 1.0]])
  m = curves.agreement_metrics(predicted, actual, fx_train_0=np.zeros((1, 2)),
                               fx_test_0=np.zeros((2, 2)))
  np.testing.assert_allclose(m["train_loss_rel_error"], [0.0, 0.1, 0.2])
  np.testing.assert_allclose(m["test_loss_rel_error"], [0.0, 0.2, 0.05])
  assert m["max_train_loss_rel_error"] == pytest.approx(0.2)
  assert m["final_test_loss_rel_error"] == pytest.approx(0.05)
  assert m["max_train_loss_deviation"] == pytest.approx(0.1 / 2.0)  # |Δ| 0.1 at both steps
  assert m["max_test_loss_deviation"] == pytest.approx(0.4 / 4.0)
  assert m["train_output_rmse"] == pytest.approx(np.sqrt(9 / 2))
  assert m["test_output_rmse"] == pytest.approx(np.sqrt(2 / 4))
  assert m["train_output_rmse_relative"] == pytest.approx(np.sqrt(9 / 2) / 1.0)
  assert m["test_output_rmse_relative"] == pytest.approx(np.sqrt(0.5) / np.sqrt(2.0))
  assert m["final_train_accuracy_diff"] == pytest.approx(0.0)
  assert m["max_train_accuracy_diff"] == pytest.approx(0.1)
  assert m["final_test_accuracy_diff"] == pytest.approx(0.2)
  rows = curves.curve_rows(predicted, actual)
  assert len(rows) == 3 and len(rows[0]) == len(curves.CURVE_COLUMNS)
  assert rows[1][:3] == [1, 1.1, 1.0] and rows[2][-1] == pytest.approx(0.05)
  partial = _curves([2.0], [4.0], [0.1], [0.1], [[1.0, 1.0]], [[0.0, 2.0], [2.0, 0.0]])
  rows = curves.curve_rows(predicted, partial)
  assert rows[0][2] == 2.0 and np.isnan(rows[1][2]) and np.isnan(rows[2][-1])
  with pytest.raises(ValueError, match="different steps"):
    curves.agreement_metrics(predicted, _curves([1.0] * 3, [1.0] * 3, [0] * 3, [0] * 3,
                                                [[0.0]], [[0.0]], steps=[0, 2, 4]))


def test_kernel_drift_and_log_steps():
  k0 = np.eye(3) * 2.0
  assert curves.kernel_drift(k0, k0) == 0.0
  assert curves.kernel_drift(k0, k0 * 1.1) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="different shapes"):
    curves.kernel_drift(k0, np.eye(2))
  s = curves.log_steps(1000, 10)
  assert s[0] == 0 and s[1] == 1 and s[-1] == 1000 and np.all(np.diff(s) > 0)
  assert len(s) == 11
  np.testing.assert_array_equal(curves.log_steps(3, 10), [0, 1, 2, 3])
  with pytest.raises(ValueError, match="positive integer"):
    curves.log_steps(0)
