"""Closed-form response of one eigenmode of the linearized MSE dynamics.

Let Θ (train-train, + ρI) have eigenpairs (λ, v), N = y_train.size and η the learning rate,
and write s = ηλ/N (dimensionless). Every dynamics here keeps θ − θ₀ in the span of the
training gradients, θ_t − θ₀ = −Jᵀ a_t, so predictions are

  f_train(t) = f_train(0) − Θ a_t,        f_test(t) = f_test(0) − Θ_test,train a_t,

and a_t is diagonal in Θ's eigenbasis: a_t = (η/N) Σ_v g(s, t) v vᵀ (f_train(0) − y). The
functions below return the *response* g(s, t) (so G = (η/N) g is the gain of the spectral
core). Along a mode the train residual is multiplied by 1 − s g. None of them divides by an s
that can vanish, so zero eigenvalues (g = t for flow and steps) need no special case, and all
are jittable and reverse-differentiable with finite gradients (`steps` only in forward mode:
its trip count is traced).

Time is in units of steps throughout (t = number of steps of size η; fractional for flows).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Terms of the series in `heavy_ball_flow` (arguments of modulus ≤ 1): remainder < 1e-20.
_SERIES_TERMS = 22


def flow(s: jax.Array, t: jax.Array) -> jax.Array:
  """Gradient flow df/dτ = −Θ(f − y)/N at τ = η t.

  g = (1 − e^{−st}) / s, written as t · h(−st) with h(x) = expm1(x)/x, h(0) = 1 (accurate for
  every x because expm1 is; a Taylor series near 0 keeps h and its derivative exact there),
  and as −expm1(−st)/s once st > 1 (then s > 1/t > 0): t · h(−st) would underflow h to 0,
  hence g = 0, once st nears the largest float.

  Args:
    s: (A,) dimensionless rates ηλ/N.
    t: (T,) times in steps (τ = η t is the flow time).

  Returns:
    (T, A) responses.
  """
  x = s[None, :] * t[:, None]
  far = x > 1.
  s_far = jnp.where(far, s[None, :], 1.)
  return jnp.where(far, -jnp.expm1(-jnp.where(far, x, 1.)) / s_far,
                   t[:, None] * _h1(-jnp.where(far, 0., x)))


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


def _h1(x: jax.Array) -> jax.Array:
  """(e^x − 1)/x, accurate for every real x (expm1), with its Taylor series near 0 so that
  h1(0) = 1 and the derivative there (1/2) is right too."""
  near = jnp.abs(x) < 1e-4
  safe, small = jnp.where(near, 1., x), jnp.where(near, x, 0.)  # finite in both branches
  taylor = 1. + small * (1. / 2 + small * (1. / 6 + small * (1. / 24 + small / 120)))
  return jnp.where(near, taylor, jnp.expm1(safe) / safe)  # Taylor error < x⁵/720


def _factorials(count: int) -> list:
  out = [1.]
  for k in range(1, count):
    out.append(out[-1] * k)
  return out


def heavy_ball_flow(s: jax.Array, t: jax.Array, momentum: float) -> jax.Array:
  """Continuous limit of heavy-ball momentum (neural-tangents' convention).

  With τ = √η t and damping γ = (1 − m)/√η the parameters follow θ'' + γθ' = −∇L, θ'(0) = 0,
  the limit of v ← m v + ∇L, θ ← θ − η v for small η at fixed t·√η. Per mode the response
  solves g'' + a g' + s g = 1 (derivatives in steps t, a = 1 − m), g(0) = g'(0) = 0, and the
  residual factor φ = 1 − s g solves the homogeneous equation with φ(0) = 1, φ'(0) = 0. With
  p = a t, q = s t² and the dimensionless roots ρ₁,₂ of ρ² + pρ + q = 0, g = t² exp[0, ρ₁, ρ₂]
  (a divided difference of exp). It is evaluated in the regime where each form is well
  conditioned, so that float32 stays accurate for any t, s ≥ 0 and a in (0, 1]:

  * p ≤ 1 and q ≤ 1 (|ρ| ≤ 1): the Taylor series of exp[0, ρ₁, ρ₂] in the real coefficients
    (p, q), exact for s = 0;
  * real, well-separated roots (a² − 4s ≥ a²/9): g = t (h(ρ₁) − h(ρ₂)) / √(a² − 4s) with
    h(x) = expm1(x)/x and ρ₁ = −2st/(a + √(a² − 4s)) (no cancellation: covers s = 0 and the
    slow overdamped creep, where 1 − s g ≪ 1);
  * otherwise (near-critical or complex roots, where 1 − φ is of order one):
    φ = e^{−p/2}(C(w) + (p/2) S(w)) with w = (a²/4 − s)t², C = cosh √w and S = sinh(√w)/√w
    (cos and sinc for w < 0, their series for |w| < 1, so critical damping needs no special
    case), and g = (1 − φ)/s.

  No branch divides by s where s can vanish, and every branch is fed safe arguments where it is
  not selected, so values and reverse-mode gradients stay finite. Times beyond
  T = 500 (a/s + 1/a) are evaluated at T, where φ < e^{−100}: g = 1/s to rounding, and no
  overflowing a t or s t (t near the largest float) turns into a NaN or a 0.

  Args:
    s: (A,) dimensionless rates ηλ/N.
    t: (T,) times in steps.
    momentum: m in [0, 1).

  Returns:
    (T, A) responses.
  """
  s2, t2 = s[None, :], t[:, None]
  dtype = jnp.result_type(s2, t2)
  s2, t2 = s2.astype(dtype), t2.astype(dtype)
  shape = (t.size, s.size)
  a = (1. - jnp.asarray(momentum)).astype(dtype)
  # φ decays at least as fast as e^{−t·min(s/a, 2a/9)} (slow overdamped root, or the
  # 'other' regime below, with s ≥ 2a²/9): past the cap it is below e^{−100}, so g does not
  # depend on the cap (no gradient through it, which would overflow for tiny s).
  positive = s2 > 0
  cap = jnp.where(positive, 500. * (a / jnp.where(positive, s2, 1.) + 1. / a), jnp.inf)
  t2 = jnp.minimum(t2, jax.lax.stop_gradient(cap))
  aa = a * a
  p = jnp.broadcast_to(a * t2, shape)
  q = s2 * (t2 * t2)  # only compared, never differentiated
  disc = aa - 4. * s2  # (1, A): a² − 4s; ≥ 0 for real roots
  small = (p <= 1.) & (q <= 1.)
  separated = ~small & (9. * disc >= aa)
  other = ~small & ~separated

  # |ρ| ≤ 1: exp[0, ρ₁, ρ₂] = Σ_n h_n/(n+2)! with h_n = −p h_{n−1} − q h_{n−2}, h₀ = 1.
  ts = jnp.where(small, t2, 0.)
  ps, qs = a * ts, jnp.where(small, s2, 0.) * ts * ts
  fact = _factorials(_SERIES_TERMS + 2)
  h_prev, h = jnp.ones_like(ps), -ps
  series = 1. / fact[2] + h / fact[3]
  for n in range(2, _SERIES_TERMS):
    h_prev, h = h, -ps * h - qs * h_prev
    series = series + h / fact[n + 2]
  g_small = ts * ts * series

  # Real roots, well separated.
  d = jnp.sqrt(jnp.where(separated, disc, aa))
  s_sep = jnp.where(separated, s2, 0.)
  rho1 = -2. * s_sep / (a + d) * t2
  rho2 = -0.5 * (a + d) * t2
  g_separated = t2 * (_h1(rho1) - _h1(rho2)) / d

  # Near-critical or complex roots: g = (1 − φ)/s, s ≥ 2a²/9 > 0 here.
  s_o = jnp.where(other, s2, 0.25 * aa)
  t_o = jnp.where(other, t2, 0.)
  half_p = 0.5 * a * t_o
  mu = 0.25 * aa - s_o  # w = μ t², formed only where |w| < 1 (t² may overflow)
  root_w = jnp.sqrt(jnp.abs(mu)) * t_o  # √|w|, only compared
  pos, neg = (mu > 0) & (root_w >= 1.), (mu < 0) & (root_w >= 1.)
  mid = ~pos & ~neg
  x_pos = jnp.where(pos, jnp.sqrt(jnp.where(pos, mu, 1.)) * t_o, 1.)
  up, down = jnp.exp(x_pos - half_p), jnp.exp(-x_pos - half_p)  # x < p/6 here: no overflow
  c_pos, s_pos = 0.5 * (up + down), 0.5 * (up - down) / x_pos
  x_neg = jnp.where(neg, jnp.sqrt(jnp.where(neg, -mu, 1.)) * t_o, 1.)
  decay = jnp.exp(-half_p)
  c_neg, s_neg = decay * jnp.cos(x_neg), decay * jnp.sin(x_neg) / x_neg
  t_mid = jnp.where(mid, t_o, 0.)
  w_mid = jnp.where(mid, mu, 0.) * t_mid * t_mid
  c_mid, s_mid, power = jnp.zeros_like(w_mid), jnp.zeros_like(w_mid), jnp.ones_like(w_mid)
  for k in range(_SERIES_TERMS // 2):
    c_mid, s_mid = c_mid + power / fact[2 * k], s_mid + power / fact[2 * k + 1]
    power = power * w_mid
  c = jnp.where(pos, c_pos, jnp.where(neg, c_neg, decay * c_mid))
  sh = jnp.where(pos, s_pos, jnp.where(neg, s_neg, decay * s_mid))
  phi = c + half_p * sh
  g_other = (1. - phi) / s_o

  return jnp.where(small, g_small, jnp.where(separated, g_separated, g_other))
