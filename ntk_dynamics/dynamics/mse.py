"""Closed-form training dynamics of the linearized model on the MSE loss.

Conventions (identical to neural-tangents' `nt.predict.gradient_descent_mse`):

* Loss: L = ‖f(x_train) − y_train‖² / (2N) with N = `y_train.size`, i.e.
  `0.5 * jnp.mean((fx - y) ** 2)`, averaged over examples *and* outputs.
* Kernel: Θ = J Jᵀ over all output entries (zipped layout (N1, N2, K1, K2, ...)); a kernel
  with `trace_axes` has those output axes averaged out and stands for Θ ⊗ I on them.
* One step of `optax.sgd(η)` changes the linearized predictions by −(η/N) Θ (f − y), so
  f_k − y = (I − ηΘ/N)^k (f_0 − y). The gradient flow df/dτ = −Θ (f − y)/N is evaluated at
  τ = η t: `t` is measured in steps (fractional allowed), `learning_rate` and `t` are
  interchangeable, and t steps of the flow approximate t discrete steps while ηλ_max/N ≪ 1.
* Test points move with the train residual: f_test(t) = f_test(0) − Θ_test,train a_t, where
  θ_t − θ₀ = −Jᵀ a_t.
* `diag_reg` ρ (times the mean diagonal of Θ unless `diag_reg_absolute_scale`) replaces Θ by
  Θ + ρI on the training set only. For the test predictions this is exactly training with
  the L2 term (ρ/(2N))‖θ − θ₀‖² added to the loss; the returned *train* predictions follow
  neural-tangents (they converge to y_train), which is the same as giving each training
  output a free offset parameter of scale √ρ. The training-set outputs of the network trained
  with that L2 term are the test predictions with x_test = x_train:
  `predict(t, fx_train_0, fx_train_0, k_train_train)`.

Every factory eigendecomposes Θ + ρI once, when it is called; the returned `predict` takes an
array of times and returns whole curves (leading axes = `t.shape`) in one call.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from ntk_dynamics.dynamics import _inputs
from ntk_dynamics.dynamics import modes
from ntk_dynamics.dynamics import spectral
from ntk_dynamics.dynamics import stability

Axes = Union[int, Sequence[int]]
Prediction = Union[jax.Array, tuple[jax.Array, jax.Array]]
PredictFn = Callable[..., Prediction]
# g(s, t, *args) -> (T, A) per-mode responses; see `modes`.
Response = Callable[..., jax.Array]


@functools.partial(jax.jit, static_argnames=("layout", "test_shape", "response"))
def _predict_finite(layout: _inputs.Layout, test_shape: Optional[tuple], response: Response,
                    response_args: tuple, gain_scale: jax.Array, rates: jax.Array,
                    spectrum: spectral.Spectrum, y: jax.Array, t: jax.Array, fx_train_0: Any,
                    fx_test_0: Any, k_test_train: Optional[jax.Array]):
  # Compiled once per (layout, shapes, response) and shared by every `predict` (and every
  # momentum or learning rate, which are traced).
  f0, ft0 = _inputs.initial_outputs(y, fx_train_0, fx_test_0, test_shape)
  gains = gain_scale * response(rates, t.reshape(-1), *response_args)
  k_test = None if ft0 is None else _inputs.zipped_to_matrix(k_test_train).astype(y.dtype)
  d_train, d_test = spectrum.finite_time(gains, layout.to_matrix(f0 - y), k_test)
  fx_train_t = f0 + layout.from_matrix(d_train, layout.shape, t.shape)
  if ft0 is None:
    return fx_train_t, None
  return fx_train_t, ft0 + layout.from_matrix(d_test, test_shape, t.shape)


@functools.partial(jax.jit, static_argnames=("layout", "test_shape"))
def _predict_infinite(layout: _inputs.Layout, test_shape: Optional[tuple],
                      spectrum: spectral.Spectrum, y: jax.Array, fx_train_0: Any,
                      fx_test_0: Any, k_test_train: Optional[jax.Array]):
  f0, ft0 = _inputs.initial_outputs(y, fx_train_0, fx_test_0, test_shape)
  fx_train_t = layout.from_matrix(spectrum.limit(layout.to_matrix(f0), layout.to_matrix(y)),
                                  layout.shape)
  if ft0 is None:
    return fx_train_t, None
  k_test = _inputs.zipped_to_matrix(k_test_train).astype(y.dtype)
  dual = spectrum.solve(layout.to_matrix(y - f0))
  return fx_train_t, ft0 + layout.from_matrix(k_test @ dual, test_shape)


def _closed_form(fn: str, k_train_train: Any, y_train: Any, learning_rate: float,
                 diag_reg: float, diag_reg_absolute_scale: bool, trace_axes: Axes,
                 response: Response, momentum: Optional[float] = None,
                 discrete: bool = False) -> PredictFn:
  """Builds `predict` from a per-mode response g(s, t[, momentum]) (see `modes`).

  `discrete`: times are step counts (integers) and steps beyond the stable one warn.
  """
  response_args = () if momentum is None else (momentum,)
  _inputs.check_scalar(fn, "learning_rate", learning_rate, positive=True)
  layout = _inputs.Layout.create(fn, y_train, trace_axes)
  k_matrix = layout.train_kernel(fn, "k_train_train", k_train_train)
  kernel_dtype = k_matrix.dtype
  # Predictions come back in `dtype`; float16/bfloat16 ones are computed in float32.
  dtype = jnp.result_type(kernel_dtype, jnp.asarray(y_train).dtype, float)
  y = jnp.asarray(y_train, _inputs.compute_dtype(dtype))
  _inputs.check_finite(fn, "y_train", y)
  k_matrix = k_matrix.astype(y.dtype)
  rho = spectral.regularizer(fn, k_matrix, diag_reg, diag_reg_absolute_scale)
  k_reg = k_matrix + rho * jnp.eye(k_matrix.shape[0], dtype=y.dtype)
  evals, evecs = spectral.eigh(k_reg)
  if _inputs.is_concrete(evals) and _inputs.is_concrete(rho):
    # Θ's own eigenvalues are those of Θ + ρI shifted back by ρ (to rounding of ρ).
    _inputs.check_psd(fn, "k_train_train", tuple(jnp.shape(k_train_train)),
                      evals - rho, kernel_dtype,
                      absolute_error=evals.size * _inputs.eps_of(y.dtype) * abs(float(rho)))
  spectrum = spectral.Spectrum.create(k_reg, evals, evecs, _inputs.eps_of(kernel_dtype))
  if discrete:
    stability.warn_if_unstable(fn, learning_rate, momentum or 0., spectrum.evals[-1],
                               layout.size)
  rates = learning_rate * spectrum.evals / layout.size  # s = ηλ/N per mode

  def predict(t: Optional[Any] = None, fx_train_0: Any = 0., fx_test_0: Any = None,
              k_test_train: Any = None) -> Prediction:
    test_shape = _inputs.check_prediction_inputs(fn, layout, fx_train_0, fx_test_0,
                                                 k_test_train)
    if fx_test_0 is None:
      k_test_train = None
    if t is None:
      fx_train_t, fx_test_t = _predict_infinite(layout, test_shape, spectrum, y, fx_train_0,
                                                fx_test_0, k_test_train)
    else:
      t = _inputs.check_times(fn, "t", t, integer=discrete)
      if not discrete:  # as the ODE: float64 times must not turn float32 predictions float64
        t = t.astype(y.dtype)
      fx_train_t, fx_test_t = _predict_finite(
          layout, test_shape, response, response_args, learning_rate / layout.size, rates,
          spectrum, y, t, fx_train_0, fx_test_0, k_test_train)
    fx_train_t = fx_train_t.astype(dtype)
    fx_test_t = None if fx_test_t is None else fx_test_t.astype(dtype)
    if fx_test_t is None:
      return fx_train_t
    if fx_train_0 is None:
      return fx_test_t
    return fx_train_t, fx_test_t

  return predict


def gradient_descent_mse(k_train_train: Any, y_train: Any, learning_rate: float = 1.,
                         diag_reg: float = 0., diag_reg_absolute_scale: bool = False,
                         trace_axes: Axes = (-1,)) -> PredictFn:
  """Continuous-time gradient descent on the MSE loss, in closed form.

  Drop-in for `neural_tangents.predict.gradient_descent_mse`: the flow
  df/dτ = −Θ (f − y)/N (N = `y_train.size`) at τ = η t, so
  f_train(t) − y = exp(−ηtΘ/N)(f_train(0) − y). Θ + ρI is eigendecomposed once, here.

  Args:
    k_train_train: Θ(x_train, x_train) in the zipped layout: (n, n) for `y_train` (n, k) with
      `trace_axes=(-1,)`, (n, n, k, k) with `trace_axes=()`.
    y_train: training targets.
    learning_rate: η > 0; only the product η t matters.
    diag_reg: ρ ≥ 0 added to the diagonal of the train-train kernel (see the module doc).
    diag_reg_absolute_scale: if False (default) ρ = `diag_reg` × mean(diag Θ), as in NT.
    trace_axes: axes of `y_train` traced out (averaged) in the kernels.

  Raises:
    ValueError: for a concrete `k_train_train` that is not symmetric or not positive
      semi-definite up to rounding (λ_min < −max(10·A·eps, √eps)·λ_max, or λ_max ≤ 0 for a
      nonzero kernel), among other bad arguments.

  Returns:
    `predict(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)`, jittable:
      t: scalar or array of any shape, in steps (flow time τ = η t, fractional allowed);
        None is t → ∞ by a Cholesky solve: train predictions = `y_train`, test predictions
        = f_test(0) + Θ_test,train (Θ + ρI)⁻¹ (y_train − f_train(0)). If Θ + ρI is singular
        (eigenvalues below √A·eps·λ_max) the inverse is the pseudo-inverse and train outputs
        keep their initial null-space component, matching large finite t (those modes are
        dropped at every t). Under `jax.jit` singularity is a traced predicate.
      fx_train_0: outputs on x_train at t = 0, shaped like `y_train`, or a scalar; None: no
        train predictions (the residual then uses 0).
      fx_test_0: outputs on x_test at t = 0 (or a scalar); None: no test predictions.
      k_test_train: Θ(x_test, x_train), zipped, same `trace_axes`; needed with `fx_test_0`.
    It returns `fx_train_t`, `fx_test_t` (when `fx_train_0` is None) or
    `(fx_train_t, fx_test_t)`, each with leading axes `t.shape` (none for t=None), in the
    dtype of the kernel and targets (float16/bfloat16 predictions are computed in float32).
  """
  return _closed_form("gradient_descent_mse", k_train_train, y_train, learning_rate, diag_reg,
                      diag_reg_absolute_scale, trace_axes, modes.flow)


def gradient_descent_mse_steps(k_train_train: Any, y_train: Any, learning_rate: float = 1.,
                               momentum: float = 0., diag_reg: float = 0.,
                               diag_reg_absolute_scale: bool = False,
                               trace_axes: Axes = (-1,)) -> PredictFn:
  """Discrete gradient descent, optionally with heavy-ball momentum, in closed form.

  Exact for k steps of `optax.sgd(learning_rate, momentum)` (v ← m v + ∇L, θ ← θ − η v,
  v₀ = 0) on the linearized model with L = ‖f − y‖²/(2N). With m = 0:
  f_k − y = (I − ηΘ/N)^k (f_0 − y) and
  f_test,k = f_test,0 − Θ_test,train Σ_{j<k} (η/N)(I − ηΘ/N)^j (f_0 − y), with no division by
  eigenvalues, so zero modes are exact. With m > 0 each eigenmode follows a 2x2 linear
  recurrence, powered in O(log k) products. For m = 0 and ηλ_max/N ≪ 1 the result approaches
  `gradient_descent_mse` at t = k (flow time τ = η k). Warns (RuntimeWarning) when
  η ≥ 2(1 + m) N / λ_max(Θ + ρI), where the top modes no longer converge.

  Args:
    k_train_train: Θ(x_train, x_train), zipped: (n, n) traced or (n, n, k, k) full.
    y_train: training targets.
    learning_rate: η > 0, the step size.
    momentum: m in [0, 1).
    diag_reg: ρ ≥ 0 added to the diagonal of the train-train kernel (see the module doc).
    diag_reg_absolute_scale: if False (default) ρ = `diag_reg` × mean(diag Θ), as in NT.
    trace_axes: axes of `y_train` traced out (averaged) in the kernels.

  Returns:
    `predict(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)` as for
    `gradient_descent_mse`, with `t` the number of steps (non-negative integers, any array
    shape; at most 2³¹ − 1 without `jax_enable_x64`, else ValueError); t=None is the fixed
    point of the iteration (meaningful only below the stable step).
  """
  fn = "gradient_descent_mse_steps"
  _inputs.check_scalar(fn, "momentum", momentum, upper=1.)
  return _closed_form(fn, k_train_train, y_train, learning_rate, diag_reg,
                      diag_reg_absolute_scale, trace_axes,
                      modes.steps, momentum, discrete=True)


def momentum_flow_mse(k_train_train: Any, y_train: Any, learning_rate: float = 1.,
                      momentum: float = 0.9, diag_reg: float = 0.,
                      diag_reg_absolute_scale: bool = False,
                      trace_axes: Axes = (-1,)) -> PredictFn:
  """Continuous-time limit of heavy-ball momentum on the MSE loss, in closed form.

  neural-tangents' convention (`nt.predict.gradient_descent(..., momentum=m)`): with
  τ = √η t and γ = (1 − m)/√η, f'' + γ f' = −Θ (f − y)/N, f(0) = f_train(0), f'(0) = 0 —
  the limit of `optax.sgd(η, m)` for small η at fixed t√η (the discrete iterates differ by
  O(√η)). Each eigenmode is a damped oscillator, evaluated in the form that is well
  conditioned for its regime (see `modes.heavy_ball_flow`): float32 stays accurate (~1e-5
  relative) for over-, under- and critically damped modes at any t.

  Args:
    k_train_train: Θ(x_train, x_train), zipped: (n, n) traced or (n, n, k, k) full.
    y_train: training targets.
    learning_rate: η > 0.
    momentum: m in [0, 1).
    diag_reg: ρ ≥ 0 added to the diagonal of the train-train kernel (see the module doc).
    diag_reg_absolute_scale: if False (default) ρ = `diag_reg` × mean(diag Θ), as in NT.
    trace_axes: axes of `y_train` traced out (averaged) in the kernels.

  Returns:
    `predict(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)` as for
    `gradient_descent_mse`, with `t` in steps (τ = √η t, fractional allowed).
  """
  fn = "momentum_flow_mse"
  _inputs.check_scalar(fn, "momentum", momentum, upper=1.)
  return _closed_form(fn, k_train_train, y_train, learning_rate, diag_reg,
                      diag_reg_absolute_scale, trace_axes,
                      modes.heavy_ball_flow, momentum)
