"""The spectral core shared by every closed-form MSE dynamics (flow, steps, momentum).

`eigh` eigendecomposes the regularised train-train kernel once; `Spectrum.create` builds the
core from it.
`Spectrum.finite_time` turns a per-mode gain G(λ, t) (see `modes`) into whole prediction
curves: it projects the initial residual onto the eigenbasis once per call, and each extra time
costs one (A, C) scaling plus two small matrix products. `Spectrum.solve` serves the t → ∞
limit with a Cholesky solve (no division by eigenvalues), as in neural-tangents, or with the
pseudo-inverse in the eigenbasis when Θ + ρI is singular (decided with a traced predicate when
the kernel is traced, e.g. built under `jax.jit`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from ntk_dynamics.dynamics import _inputs


def regularizer(fn: str, k_matrix: jax.Array, diag_reg: float,
                diag_reg_absolute_scale: bool) -> jax.Array:
  """ρ added to Θ's diagonal: `diag_reg` times the mean diagonal entry, or absolute."""
  _inputs.check_scalar(fn, "diag_reg", diag_reg)
  if diag_reg_absolute_scale:
    return jnp.asarray(diag_reg, k_matrix.dtype)
  return diag_reg * jnp.trace(k_matrix) / k_matrix.shape[0]


def _cutoff(evals: jax.Array, eps: float) -> jax.Array:
  # Eigenvalues below √A·eps·λ_max are rounding noise of a rank-deficient kernel (the rounding
  # threshold of `init.kernel_spectrum` too): a kernel computed at precision eps is within
  # ~eps·λ_max of the exact one in norm, so modes above the cutoff are real and kept. eps is
  # the kernel's, not that of the (possibly wider) dtype the eigenvalues are computed in: a
  # float32 kernel's noise modes (~1e-7·λ_max) must not be inverted in float64.
  eps = jnp.maximum(jnp.asarray(eps, evals.dtype), jnp.finfo(evals.dtype).eps)
  return math.sqrt(evals.shape[0]) * eps * jnp.max(evals)


def eigh(k_reg: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues (ascending, unclipped) and eigenvectors of the symmetrised (A, A) kernel."""
  return jnp.linalg.eigh((k_reg + k_reg.T) / 2)


def _pinv_solve(evals: jax.Array, evecs: jax.Array, rhs: jax.Array, eps: float) -> jax.Array:
  keep = evals > _cutoff(evals, eps)
  inv = jnp.where(keep, 1. / jnp.where(keep, evals, 1.), 0.)
  return evecs @ (inv[:, None] * (evecs.T @ rhs))


def _pinv_limit(evals: jax.Array, evecs: jax.Array, initial: jax.Array,
                target: jax.Array, eps: float) -> jax.Array:
  keep = (evals > _cutoff(evals, eps)).astype(target.dtype)
  return initial - evecs @ (keep[:, None] * (evecs.T @ (initial - target)))


class Spectrum(NamedTuple):
  """Eigendecomposition of Θ + ρI over the A untraced training entries.

  Θ + ρI is *singular* when its smallest eigenvalue is at most the cutoff √A·eps·λ_max (eps of
  the kernel's dtype, or of the eigenvalues' if coarser): the modes below the cutoff are
  rounding noise of an exact null space. They are dropped everywhere
  (finite t, t → ∞), so finite-t predictions converge to the t=None ones.

  Attributes:
    evals: (A,) eigenvalues, negative rounding errors clipped to 0 (Θ is PSD).
    evecs: (A, A) orthonormal eigenvectors (columns).
    keep: (A,) bool, the modes above the cutoff.
    cholesky: (A, A) lower Cholesky factor of Θ + ρI; None when it is known (concrete kernel)
      to be singular. For a traced kernel, the factor of Θ + ρI, or of I where `singular`.
    singular: None when singularity was decided on a concrete kernel; for a traced kernel the
      traced predicate, which `solve` and `limit` select on with `jnp.where`.
    pinv_evals, pinv_evecs: for a traced kernel, the eigendecomposition of Θ + ρI where
      `singular`, else of a fixed matrix with distinct eigenvalues (the unselected branch then
      has finite values and gradients); None for a concrete kernel (`evals`, `evecs` serve).
    eps: machine epsilon of the kernel's own dtype, the precision of the cutoff (0: that of
      `evals`).
  """
  evals: jax.Array
  evecs: jax.Array
  keep: jax.Array
  cholesky: Optional[jax.Array]
  singular: Optional[jax.Array] = None
  pinv_evals: Optional[jax.Array] = None
  pinv_evecs: Optional[jax.Array] = None
  eps: float = 0.

  @classmethod
  def create(cls, k_reg: jax.Array, evals: jax.Array, evecs: jax.Array,
             eps: float = 0.) -> "Spectrum":
    """`k_reg`: (A, A) regularised kernel Θ + ρI; `evals`, `evecs`: its `eigh` (computed by
    the caller, which checks the unclipped eigenvalues first); `eps`: the machine epsilon of
    the kernel's own dtype (`_inputs.eps_of`), when coarser than that of `evals`."""
    k_reg = (k_reg + k_reg.T) / 2
    evals = jnp.maximum(evals, 0.)
    cutoff = _cutoff(evals, eps)
    keep = evals > cutoff
    if _inputs.is_concrete(evals):
      # A singular kernel has no usable Cholesky factor; its t → ∞ limit is the
      # pseudo-inverse solution, which the eigenbasis gives.
      singular = bool(evals[0] <= cutoff)
      return cls(evals, evecs, keep, None if singular else jnp.linalg.cholesky(k_reg),
                 eps=eps)
    # Traced: decide with a traced predicate and keep both branches NaN-free.
    singular = evals[0] <= cutoff
    eye = jnp.eye(k_reg.shape[0], dtype=k_reg.dtype)
    cholesky = jnp.linalg.cholesky(jnp.where(singular, eye, k_reg))
    distinct = jnp.diag(jnp.arange(1, k_reg.shape[0] + 1, dtype=k_reg.dtype))
    pinv_evals, pinv_evecs = jnp.linalg.eigh(jnp.where(singular, k_reg, distinct))
    return cls(evals, evecs, keep, cholesky, singular, jnp.maximum(pinv_evals, 0.), pinv_evecs,
               eps)

  def solve(self, rhs: jax.Array) -> jax.Array:
    """(Θ + ρI)⁻¹ rhs for rhs (A, C); the minimum-norm solution if Θ + ρI is singular."""
    if self.singular is None:
      if self.cholesky is not None:
        return jax.scipy.linalg.cho_solve((self.cholesky, True), rhs)
      return _pinv_solve(self.evals, self.evecs, rhs, self.eps)
    return jnp.where(self.singular,
                     _pinv_solve(self.pinv_evals, self.pinv_evecs, rhs, self.eps),
                     jax.scipy.linalg.cho_solve((self.cholesky, True), rhs))

  def limit(self, initial: jax.Array, target: jax.Array) -> jax.Array:
    """t → ∞ train outputs (A, C): `target`, except that the null space of a singular
    Θ + ρI keeps its `initial` component."""
    if self.singular is None:
      if self.cholesky is not None:
        return target
      return _pinv_limit(self.evals, self.evecs, initial, target, self.eps)
    return jnp.where(self.singular,
                     _pinv_limit(self.pinv_evals, self.pinv_evecs, initial, target, self.eps),
                     target)

  def finite_time(self, gains: jax.Array, residual: jax.Array,
                  k_test: Optional[jax.Array]):
    """Predictions at T times from the per-mode gains.

    Modes below the cutoff (`keep` False) are dropped: they are rounding noise of an exact
    null space, which the train residual keeps and `k_test` has no component in.

    Args:
      gains: (T, A) gains G(λ_a, t) in units of 1/λ (see `modes`: G = (η/N) g).
      residual: (A, C) initial train residual f_train(0) − y.
      k_test: (B, A) unregularised test-train kernel, or None.

    Returns:
      (train change (T, A, C), test change (T, B, C) or None), both to be added to the
      initial predictions: −Θ_reg a_t and −Θ_test,train a_t for a_t = V G Vᵀ residual.
    """
    gains = jnp.where(self.keep, gains, 0.)
    proj = self.evecs.T @ residual  # (A, C)
    d_train = -jnp.einsum("ia,ta,ac->tic", self.evecs, self.evals * gains, proj)
    if k_test is None:
      return d_train, None
    d_test = -jnp.einsum("ba,ta,ac->tbc", k_test @ self.evecs, gains, proj)
    return d_train, d_test
