"""Thin adapter between the inner loops and `ntk_dynamics.dynamics`' closed forms.

The inner loops need the closed forms *inside* `jax.grad` (meta-gradients). Gradient flow
(`gradient_descent_mse`, finite t and t=None) is reverse-differentiable as it is.
`gradient_descent_mse_steps` is not: `modes.steps` powers the step matrix in a
`lax.while_loop` whose trip count is traced, and reverse mode does not go through
`while_loop`. Until dynamics powers it with a static trip count, `steps_predictor` builds the
same predictor from dynamics' own `_closed_form` and step matrix, powering with a Python loop
over the bits of the (static) step count: the same O(log k) products, reverse-differentiable.
No formula is written here; only the loop over the bits is.

Query predictions. The closed forms give f_q(t) = f_q(0) + Θ_qs c_t, linear in the test-train
kernel, with dual coefficients c_t (n, K) that depend on the support set only. With the
logit-traced kernel the inner loops pass the explicit Θ_qs (cheap with structured derivatives)
straight to dynamics. For the full kernel, Θ_qs is (m, n, K, K); there `dual_coefficients`
reads c_t off dynamics' own `predict` by passing the identity as the "test-train kernel"
(every formula there is linear in it), and `query_kernel_product` applies Θ_qs matrix-free with
`ntk_vp_fn` (one VJP on the support set and one JVP on the query set), so the query set costs a
few forward passes.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp

from ntk_dynamics.dynamics import gradient_descent_mse
from ntk_dynamics.kernels import ntk_vp_fn
from ntk_dynamics.dynamics import mse as _mse
from ntk_dynamics.dynamics import modes as _modes

Axes = Union[int, Sequence[int]]

__all__ = ["dual_coefficients", "flow_predictor", "query_kernel_product", "steps_predictor"]


def flow_predictor(k_train_train: Any, y_train: Any, learning_rate: float, diag_reg: float,
                   trace_axes: Axes):
  """`dynamics.gradient_descent_mse` (gradient flow; `predict(None, ...)` is the ridge limit)."""
  return gradient_descent_mse(k_train_train, y_train, learning_rate=learning_rate,
                              diag_reg=diag_reg, trace_axes=trace_axes)


@dataclasses.dataclass(frozen=True)
class _StaticSteps:
  """Per-mode response of `num_steps` plain GD steps, `modes.steps` with a static trip count.

  Hashable by value: dynamics jits its spectral core with the response as a static argument.
  """
  num_steps: int

  def __call__(self, s: jax.Array, t: jax.Array) -> jax.Array:
    # Same state and step matrix as `modes.steps`: g_k is the first entry of M^k (0, 0, 1).
    power = _modes._step_matrix(s, 0.)
    state = jnp.zeros(s.shape + (3,), s.dtype).at[..., 2].set(1.)
    k = self.num_steps
    while k:
      if k & 1:
        state = jnp.einsum("aij,aj->ai", power, state)
      k >>= 1
      if k:
        power = power @ power
    return jnp.broadcast_to(state[None, :, 0], t.shape + s.shape)


def steps_predictor(k_train_train: Any, y_train: Any, learning_rate: float, num_steps: int,
                    diag_reg: float, trace_axes: Axes):
  """`dynamics.gradient_descent_mse_steps` (momentum 0) for a static step count, with a
  reverse-differentiable matrix power. Call the result as `predict(num_steps, ...)`."""
  num_steps = operator.index(num_steps)
  if num_steps < 0:
    raise ValueError(f"`num_steps` must be a non-negative int, got {num_steps}.")
  return _mse._closed_form("gradient_descent_mse_steps", k_train_train, y_train,
                           learning_rate, diag_reg, False, trace_axes,
                           _StaticSteps(num_steps), None, True)


def dual_coefficients(predict, t: Any, fx_train_0: jax.Array, trace_axes: Axes) -> jax.Array:
  """c_t with f_test(t) = f_test(0) + Θ_test,train c_t, for a `predict` of dynamics.

  Args:
    predict: a closed-form predictor built on the support kernel.
    t: its time argument (None for t → ∞).
    fx_train_0: (n, K) support outputs at t = 0.
    trace_axes: `(-1,)` (kernel (n, n), standing for Θ ⊗ I) or `()` (kernel (n, n, K, K)).

  Returns:
    (n, K) coefficients: `predict` evaluated with f_test(0) = 0 and the identity as the
    test-train kernel.
  """
  n, k = fx_train_0.shape
  eye = jnp.eye(n, dtype=fx_train_0.dtype)
  if tuple(trace_axes) == ():
    eye = eye[:, :, None, None] * jnp.eye(k, dtype=fx_train_0.dtype)[None, None]
  _, coef = predict(t, fx_train_0, jnp.zeros_like(fx_train_0), eye)
  return coef


def query_kernel_product(f, params, query_x: jax.Array, support_x: jax.Array,
                         coef: jax.Array, *, traced: bool) -> jax.Array:
  """Θ(query, support) applied to coefficients (n, K), without forming Θ or a Jacobian.

  `traced=False`: the full kernel over all outputs (`trace_axes=()`). `traced=True`: the
  logit-traced kernel Θ_tr = (1/K) Σ_j J_j J_jᵀ acting as Θ_tr ⊗ I (as in
  `empirical_ntk_fn(trace_axes=(-1,))`), i.e. K output-restricted products per column.
  """
  k = coef.shape[-1]
  if not traced or k == 1:
    return ntk_vp_fn(f, query_x, support_x, params)(coef)
  total = 0.
  for j in range(k):
    f_j = lambda p, x, j=j: f(p, x)[:, j]
    vp_j = ntk_vp_fn(f_j, query_x, support_x, params)
    total = total + jax.vmap(vp_j, in_axes=1, out_axes=1)(coef)
  return total / k
