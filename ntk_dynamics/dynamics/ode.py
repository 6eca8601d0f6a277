"""Linearized training dynamics for any differentiable loss, by adaptive ODE integration.

The linearized model trained by gradient descent moves its outputs along the kernel:
one `optax.sgd(η)` step on `loss(f(x_train), y_train)` changes outputs on any x by
−η Θ(x, x_train) ∇_f loss. In the small-step limit, with t counted in steps,

  d f_train/dt = −η Θ_train,train ∇_f loss(f_train, y),   d f_test/dt = −η Θ_test,train ∇_f loss,

integrated jointly with an adaptive Dormand–Prince 5(4) solver. With momentum m the limit is
neural-tangents' heavy-ball ODE f'' + (1 − m) f' = −η Θ ∇_f loss (derivatives in steps t,
f'(0) = 0), i.e. τ = √η t and damping (1 − m)/√η in NT's time units.

The loss fixes the normalisation: `lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2)` reproduces
`gradient_descent_mse`; `lambda fx, y: optax.softmax_cross_entropy(fx, y).mean()` averages
cross-entropy over examples only (not over classes).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from ntk_dynamics.dynamics import _dopri5
from ntk_dynamics.dynamics import _inputs
from ntk_dynamics.dynamics import spectral

Axes = Union[int, Sequence[int]]
Loss = Callable[[jax.Array, jax.Array], jax.Array]
Prediction = Union[jax.Array, tuple[jax.Array, jax.Array]]


def gradient_descent(loss: Loss, k_train_train: Any, y_train: Any, learning_rate: float = 1.,
                     momentum: Optional[float] = None, diag_reg: float = 0.,
                     diag_reg_absolute_scale: bool = False, trace_axes: Axes = (-1,), *,
                     rtol: float = 1e-8, atol: float = 1e-10,
                     max_steps: int = 100_000) -> Callable[..., Prediction]:
  """Continuous-time (heavy-ball) gradient descent on an arbitrary loss, by ODE integration.

  Argument-compatible with `neural_tangents.predict.gradient_descent`, plus `diag_reg` (as in
  `gradient_descent_mse`: Θ + ρI on the train-train block only) and solver tolerances.

  Args:
    loss: `loss(fx_train, y_train) -> scalar`, differentiable in `fx_train` (any optax-style
      loss reduced as you train it; its gradient sets the units, see the module doc).
    k_train_train: Θ(x_train, x_train) in the zipped layout: (n, n) for `y_train` (n, k) with
      `trace_axes=(-1,)` (meaning Θ ⊗ I), (n, n, k, k) with `trace_axes=()`.
    y_train: training targets (for cross-entropy: one-hot or probabilities, shape of fx).
    learning_rate: η > 0.
    momentum: None for gradient flow, or m in [0, 1) for the heavy-ball limit.
    diag_reg: ρ ≥ 0 added to the train-train kernel's diagonal.
    diag_reg_absolute_scale: if False (default) ρ = `diag_reg` × mean(diag Θ).
    trace_axes: axes of `y_train` traced out (averaged) in the kernels.
    rtol, atol: local error tolerances of the solver, relative and in output units.
    max_steps: cap on solver steps per call; times not reached come back as NaN.

  Raises:
    ValueError: for a concrete `k_train_train` that is not symmetric or not positive
      semi-definite up to rounding (as `gradient_descent_mse`: λ_min < −max(10·A·eps, √eps)·λ_max,
      or λ_max ≤ 0 for a nonzero kernel; checked on Θ, before `diag_reg`), among other bad
      arguments. Under `jax.jit` the kernel is traced and these two checks are skipped.

  Returns:
    `predict(t, fx_train_0=0., fx_test_0=None, k_test_train=None)`, jittable, with `t` a
    scalar or array (any shape, any order) of times in steps, flow time τ = η t (τ = √η t
    with momentum); finite only (t=None raises: use the closed forms for t → ∞). Returns
    `fx_train_t`, `fx_test_t` (when `fx_train_0` is None) or `(fx_train_t, fx_test_t)` with
    leading axes `t.shape`, in the dtype of the kernel and targets (float16/bfloat16 outputs
    are integrated in float32).
  """
  fn = "gradient_descent"
  _inputs.check_scalar(fn, "learning_rate", learning_rate, positive=True)
  if momentum is not None:
    _inputs.check_scalar(fn, "momentum", momentum, upper=1.)
  _inputs.check_scalar(fn, "rtol", rtol, positive=True)
  _inputs.check_scalar(fn, "atol", atol, positive=True)
  max_steps = _inputs.check_int(fn, "max_steps", max_steps)
  layout = _inputs.Layout.create(fn, y_train, trace_axes)
  k_matrix = layout.train_kernel(fn, "k_train_train", k_train_train)  # checks symmetry
  if _inputs.is_concrete(k_matrix) and k_matrix.size:
    # As in `gradient_descent_mse`: Θ itself must be PSD (diag_reg does not excuse it), at the
    # kernel's own precision; skipped under `jax.jit`, where the kernel is traced.
    wide = k_matrix.astype(_inputs.compute_dtype(k_matrix.dtype))  # no half-precision eigh
    sym = (wide + wide.T) / 2
    _inputs.check_psd(fn, "k_train_train", tuple(jnp.shape(k_train_train)),
                      jnp.linalg.eigvalsh(sym), k_matrix.dtype)
  # Outputs come back in `dtype`; float16/bfloat16 ones are integrated in float32.
  dtype = jnp.result_type(k_matrix.dtype, jnp.asarray(y_train).dtype, float)
  y = jnp.asarray(y_train, _inputs.compute_dtype(dtype))
  _inputs.check_finite(fn, "y_train", y)
  k_matrix = k_matrix.astype(y.dtype)
  rho = spectral.regularizer(fn, k_matrix, diag_reg, diag_reg_absolute_scale)
  k_reg = k_matrix + rho * jnp.eye(k_matrix.shape[0], dtype=y.dtype)
  loss_shape = jax.eval_shape(loss, y, y).shape
  if loss_shape != ():
    raise ValueError(f"{fn}: `loss(fx_train, y_train)` must return a scalar, got shape "
                     f"{loss_shape}.")

  def predict(t: Any, fx_train_0: Any = 0., fx_test_0: Any = None,
              k_test_train: Any = None) -> Prediction:
    if t is None:
      raise ValueError(f"{fn}: `t` must be given (finite times in steps); the ODE is not "
                       "integrated to infinity. For the MSE loss use "
                       "`gradient_descent_mse(...)(None, ...)`.")
    t = _inputs.check_times(fn, "t", t, integer=False)
    test_shape = _inputs.check_prediction_inputs(fn, layout, fx_train_0, fx_test_0,
                                                 k_test_train)
    fx_train_t, fx_test_t = _integrate(
        layout, test_shape, loss, momentum is None, learning_rate,
        0. if momentum is None else momentum, k_reg, y, t, fx_train_0, fx_test_0,
        None if fx_test_0 is None else k_test_train, rtol, atol, max_steps)
    fx_train_t = fx_train_t.astype(dtype)
    if fx_test_t is None:
      return fx_train_t
    fx_test_t = fx_test_t.astype(dtype)
    return fx_test_t if fx_train_0 is None else (fx_train_t, fx_test_t)

  return predict


@functools.partial(jax.jit, static_argnames=("layout", "test_shape", "loss", "flow"))
def _integrate(layout: _inputs.Layout, test_shape: Optional[tuple], loss: Loss, flow: bool,
               learning_rate: jax.Array, momentum: jax.Array, k_reg: jax.Array, y: jax.Array,
               t: jax.Array, fx_train_0: Any, fx_test_0: Any, k_test_train: Any,
               rtol: jax.Array, atol: jax.Array, max_steps: jax.Array):
  """Integrates train (and test) outputs to times `t` (any shape, any order)."""
  f0, ft0 = _inputs.initial_outputs(y, fx_train_0, fx_test_0, test_shape)
  # One kernel for both blocks: rows [train; test] against the training columns.
  k_rows, outputs0 = k_reg, layout.to_matrix(f0)
  if ft0 is not None:
    k_test = _inputs.zipped_to_matrix(k_test_train).astype(y.dtype)
    k_rows = jnp.concatenate([k_reg, k_test])
    outputs0 = jnp.concatenate([outputs0, layout.to_matrix(ft0)])
  n_train, shape, size = k_reg.shape[0], outputs0.shape, outputs0.size

  def force(flat):  # −η Θ ∇_f loss for the stacked outputs, flattened
    fx = layout.from_matrix(flat.reshape(shape)[:n_train], layout.shape)
    return -learning_rate * (k_rows @ layout.to_matrix(jax.grad(loss)(fx, y))).ravel()

  def heavy_ball(state):  # state (f, f'), derivatives in steps
    f, v = state[:size], state[size:]
    return jnp.concatenate([v, force(f) - (1. - momentum) * v])

  state0 = outputs0.ravel()
  if not flow:
    state0 = jnp.concatenate([state0, jnp.zeros_like(state0)])
  order = jnp.argsort(t.ravel())
  states = _dopri5.odeint(force if flow else heavy_ball, state0,
                          t.ravel()[order].astype(y.dtype), rtol=rtol, atol=atol,
                          max_steps=max_steps)
  outputs = states[jnp.argsort(order), :size].reshape((-1,) + shape)
  fx_train_t = layout.from_matrix(outputs[:, :n_train], layout.shape, t.shape)
  if ft0 is None:
    return fx_train_t, None
  return fx_train_t, layout.from_matrix(outputs[:, n_train:], test_shape, t.shape)
