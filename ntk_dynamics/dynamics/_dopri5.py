"""Adaptive Dormand–Prince 5(4) integration of an autonomous ODE, written with lax loops.

Pure and jittable (no host callbacks); not reverse-mode differentiable (while loops).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Dormand & Prince (1980) tableau; the 5th-order solution is the last row of A (FSAL).
_A = np.array([
    [0, 0, 0, 0, 0, 0],
    [1 / 5, 0, 0, 0, 0, 0],
    [3 / 40, 9 / 40, 0, 0, 0, 0],
    [44 / 45, -56 / 15, 32 / 9, 0, 0, 0],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0],
    [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
])
# 5th- minus 4th-order weights over the 7 stages: the local error estimate.
_E = np.array([71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])


def _error_ratio(err, y_old, y_new, rtol, atol):
  scale = atol + rtol * jnp.maximum(jnp.abs(y_old), jnp.abs(y_new))
  return jnp.sqrt(jnp.mean((err / scale) ** 2))


def _initial_step(fun, y0, f0, rtol, atol):
  # Hairer, Nørsett & Wanner, Solving ODEs I, II.4: a step whose Euler error is ~1% of tol.
  scale = atol + rtol * jnp.abs(y0)
  d0 = jnp.sqrt(jnp.mean((y0 / scale) ** 2))
  d1 = jnp.sqrt(jnp.mean((f0 / scale) ** 2))
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.where(d1 > 0, d1, 1.))
  d2 = jnp.sqrt(jnp.mean(((fun(y0 + h0 * f0) - f0) / scale) ** 2)) / h0
  big = jnp.maximum(d1, d2)
  h1 = jnp.where(big <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.where(big > 0, big, 1.)) ** 0.2)
  return jnp.minimum(100 * h0, h1)


def odeint(fun: Callable[[jax.Array], jax.Array], y0: jax.Array, times: jax.Array, *,
           rtol: float, atol: float, max_steps: int) -> jax.Array:
  """Solves y' = fun(y), y(0) = y0 at non-decreasing `times` ≥ 0.

  Args:
    fun: the right-hand side, (D,) -> (D,).
    y0: (D,) initial state.
    times: (T,) sorted output times.
    rtol, atol: per-component tolerances on the local error (RMS norm, as in scipy).
    max_steps: cap on attempted steps over the whole integration.

  Returns:
    (T, D) states; NaN at times not reached within `max_steps` attempts.
  """
  dtype = y0.dtype
  a, e = jnp.asarray(_A, dtype), jnp.asarray(_E, dtype)
  f0 = fun(y0)

  def attempt(y, fy, h):
    def stage(i, k):  # rows of `a` beyond i are zero, so unfilled stages do not contribute
      return k.at[i].set(fun(y + h * jnp.tensordot(a[i], k[:6], 1)))

    # A loop rather than 6 inlined calls of `fun`: one copy of it to compile.
    k = jax.lax.fori_loop(1, 7, stage, jnp.zeros((7,) + y.shape, dtype).at[0].set(fy))
    return y + h * jnp.tensordot(a[6], k[:6], 1), k[6], h * jnp.tensordot(e, k, 1)

  def to_target(carry, target):
    def not_done(c):
      _, _, tau, _, n = c
      return (tau < target) & (n < max_steps)

    def step(c):
      y, fy, tau, h, n = c
      last = h >= target - tau
      h_try = jnp.where(last, target - tau, h)
      y_new, f_new, err = attempt(y, fy, h_try)
      ratio = _error_ratio(err, y, y_new, rtol, atol)
      accept = ratio <= 1.
      factor = jnp.clip(0.9 * jnp.where(ratio > 0, ratio, 1e-10) ** -0.2, 0.2, 10.)
      factor = jnp.where(jnp.isfinite(ratio), factor, 0.2)
      # A step shortened to land on `target` must not shrink the next proposal.
      h_next = jnp.where(accept & last, jnp.maximum(h, h_try * factor), h_try * factor)
      tau_new = jnp.where(last, target, tau + h_try)
      return (jnp.where(accept, y_new, y), jnp.where(accept, f_new, fy),
              jnp.where(accept, tau_new, tau), h_next, n + 1)

    carry = jax.lax.while_loop(not_done, step, carry)
    reached = carry[2] >= target
    return carry, jnp.where(reached, carry[0], jnp.nan)

  h0 = _initial_step(fun, y0, f0, rtol, atol)
  init = (y0, f0, jnp.zeros((), dtype), h0.astype(dtype), jnp.zeros((), jnp.int32))
  _, ys = jax.lax.scan(to_target, init, times.astype(dtype))
  return ys
