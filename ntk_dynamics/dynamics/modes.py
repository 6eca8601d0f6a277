"""Closed-form response of one eigenmode of the linearized MSE dynamics.

Let Θ (train-train, + ρI) have eigenpairs (λ, v), N = y_train.size and η the learning rate,
and write s = ηλ/N (dimensionless). Every dynamics here keeps θ − θ₀ in the span of the
training gradients, θ_t − θ₀ = −Jᵀ a_t, so predictions are

  f_train(t) = f_train(0) − Θ a_t,        f_test(t) = f_test(0) − Θ_test,train a_t,

and a_t is diagonal in Θ's eigenbasis: a_t = (η/N) Σ_v g(s, t) v vᵀ (f_train(0) − y). The
functions below return the *response* g(s, t) (so G = (η/N) g is the gain of the spectral
core). Along a mode the train residual is multiplied by 1 − s g. None of them divides by s, so
zero eigenvalues (g = t for flow and steps) and repeated or complex roots need no special case.

Time is in units of steps throughout (t = number of steps of size η; fractional for flows).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Taylor degree for exp(Y) once ‖Y‖₁ ≤ 1/2: the remainder 0.5¹⁷/17! is below 1e-20.
_TAYLOR_DEGREE = 16


def flow(s: jax.Array, t: jax.Array) -> jax.Array:
  """Gradient flow df/dτ = −Θ(f − y)/N at τ = η t.

  g = (1 − e^{−st}) / s, written as t · h(st) with h(x) = −expm1(−x)/x, h(0) = 1 (accurate for
  every x ≥ 0 because expm1 is).

  Args:
    s: (A,) dimensionless rates ηλ/N.
    t: (T,) times in steps (τ = η t is the flow time).

  Returns:
    (T, A) responses.
  """
  x = s[None, :] * t[:, None]
  safe = jnp.where(x == 0, 1., x)  # a second where keeps gradients finite at x = 0
  return t[:, None] * jnp.where(x == 0, 1., -jnp.expm1(-safe) / safe)


def _step_matrix(s: jax.Array, momentum: float) -> jax.Array:
  # State (g_k, q_k, 1) with g the response and q its velocity (optax: v ← m v + ∇L,
  # θ ← θ − η v, v₀ = 0), in units of η/N:
  #   q_{k+1} = m q_k − s g_k + 1,   g_{k+1} = g_k + q_{k+1}.
  one, zero = jnp.ones_like(s), jnp.zeros_like(s)
  m = jnp.full_like(s, momentum)
  return jnp.stack([jnp.stack([1. - s, m, one], -1),
                    jnp.stack([-s, m, one], -1),
                    jnp.stack([zero, zero, one], -1)], -2)


def steps(s: jax.Array, k: jax.Array, momentum: float = 0.) -> jax.Array:
  """k discrete steps of gradient descent, with heavy-ball momentum m (m = 0: plain GD).

  For m = 0 this is g = Σ_{j<k} (1 − s)^j (so the residual factor is (1 − s)^k); in general
  g_k is the first entry of M^k (0, 0, 1) for the 3x3 affine step matrix M of the mode. M^k is
  evaluated by binary powering: O(log k) products, exact in exact arithmetic, with no division
  by s or by the difference of the two momentum roots.

  Args:
    s: (A,) dimensionless rates ηλ/N.
    k: (T,) non-negative integer step counts.
    momentum: m in [0, 1).

  Returns:
    (T, A) responses g_k.
  """
  power = _step_matrix(s, momentum)
  state = jnp.zeros(k.shape + s.shape + (3,), s.dtype).at[..., 2].set(1.)

  def body(carry):
    k, state, power = carry
    odd = (k & 1 == 1)[:, None, None]
    state = jnp.where(odd, jnp.einsum("aij,taj->tai", power, state), state)
    return k >> 1, state, power @ power

  _, state, _ = jax.lax.while_loop(lambda c: jnp.any(c[0] > 0), body, (k, state, power))
  return state[..., 0]


def heavy_ball_flow(s: jax.Array, t: jax.Array, momentum: float) -> jax.Array:
  """Continuous limit of heavy-ball momentum (neural-tangents' convention).

  With τ = √η t and damping γ = (1 − m)/√η the parameters follow θ'' + γθ' = −∇L, θ'(0) = 0,
  the limit of v ← m v + ∇L, θ ← θ − η v for small η at fixed t·√η. Per mode the response
  solves g'' + (1 − m) g' + s g = 1 (derivatives in steps t), g(0) = g'(0) = 0. In the
  dimensionless state (g/t², g'/t, 1) at time 1 the generator is
  Y = [[0, 1, 0], [−s t², −(1 − m) t, 1], [0, 0, 0]] and g = t² exp(Y)[0, 2], evaluated by
  scaling and squaring with a Taylor series: exact for repeated roots (critical damping),
  complex roots and s = 0 alike.

  Args:
    s: (A,) dimensionless rates ηλ/N.
    t: (T,) times in steps.
    momentum: m in [0, 1).

  Returns:
    (T, A) responses.
  """
  damping = jnp.broadcast_to(((1. - momentum) * t)[:, None], (t.size, s.size))
  stiffness = s[None, :] * (t**2)[:, None]
  zero, one = jnp.zeros_like(stiffness), jnp.ones_like(stiffness)
  y = jnp.stack([jnp.stack([zero, one, zero], -1),
                 jnp.stack([-stiffness, -damping, one], -1),
                 jnp.stack([zero, zero, zero], -1)], -2)
  norm = jnp.maximum(stiffness, 1. + damping)  # ‖Y‖₁: the largest column sum
  squarings = jnp.maximum(jnp.ceil(jnp.log2(2. * norm)), 0.).astype(jnp.int32)
  y = y / jnp.exp2(squarings.astype(y.dtype))[..., None, None]
  eye = jnp.eye(3, dtype=y.dtype)

  def horner(i, e):  # I + Y(I + Y/2(I + Y/3(...))), innermost term first
    return eye + (y @ e) / (_TAYLOR_DEGREE - i).astype(y.dtype)

  expm = jax.lax.fori_loop(0, _TAYLOR_DEGREE, horner, jnp.broadcast_to(eye, y.shape))

  def square(i, e):
    return jnp.where((i < squarings)[..., None, None], e @ e, e)

  expm = jax.lax.fori_loop(0, jnp.max(squarings, initial=0), square, expm)
  return (t**2)[:, None] * expm[..., 0, 2]
