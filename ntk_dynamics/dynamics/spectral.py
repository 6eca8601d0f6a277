"""The spectral core shared by every closed-form MSE dynamics (flow, steps, momentum).

`Spectrum.create` regularises and eigendecomposes the flattened train-train kernel once.
`Spectrum.finite_time` turns a per-mode gain G(λ, t) (see `modes`) into whole prediction
curves: it projects the initial residual onto the eigenbasis once per call, and each extra time
costs one (A, C) scaling plus two small matrix products. `Spectrum.solve` serves the t → ∞
limit with a Cholesky solve (no division by eigenvalues), as in neural-tangents.
"""
from __future__ import annotations

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


def _cutoff(evals: jax.Array) -> jax.Array:
  # Eigenvalues below A·eps·λ_max are rounding noise of a rank-deficient kernel.
  return evals.shape[0] * jnp.finfo(evals.dtype).eps * jnp.max(evals)


class Spectrum(NamedTuple):
  """Eigendecomposition of Θ + ρI over the A untraced training entries.

  Attributes:
    evals: (A,) eigenvalues, negative rounding errors clipped to 0 (Θ is PSD).
    evecs: (A, A) orthonormal eigenvectors (columns).
    cholesky: (A, A) lower Cholesky factor of Θ + ρI, or None when it is singular.
  """
  evals: jax.Array
  evecs: jax.Array
  cholesky: Optional[jax.Array]

  @classmethod
  def create(cls, k_reg: jax.Array) -> "Spectrum":
    """`k_reg`: (A, A) symmetric regularised kernel Θ + ρI."""
    k_reg = (k_reg + k_reg.T) / 2
    evals, evecs = jnp.linalg.eigh(k_reg)
    evals = jnp.maximum(evals, 0.)
    # A (numerically) singular kernel has no usable Cholesky factor; its t → ∞ limit is the
    # pseudo-inverse solution, which the eigenbasis gives. Only decidable for concrete kernels.
    singular = _inputs.is_concrete(evals) and bool(evals[0] <= _cutoff(evals))
    return cls(evals, evecs, None if singular else jnp.linalg.cholesky(k_reg))

  def solve(self, rhs: jax.Array) -> jax.Array:
    """(Θ + ρI)⁻¹ rhs for rhs (A, C); the minimum-norm solution if Θ + ρI is singular."""
    if self.cholesky is not None:
      return jax.scipy.linalg.cho_solve((self.cholesky, True), rhs)
    lam = self.evals
    keep = lam > _cutoff(lam)
    inv = jnp.where(keep, 1. / jnp.where(keep, lam, 1.), 0.)
    return self.evecs @ (inv[:, None] * (self.evecs.T @ rhs))

  def limit(self, initial: jax.Array, target: jax.Array) -> jax.Array:
    """t → ∞ train outputs (A, C): `target`, except that the null space of a singular
    Θ + ρI keeps its `initial` component."""
    if self.cholesky is not None:
      return target
    keep = (self.evals > _cutoff(self.evals)).astype(target.dtype)
    return initial - self.evecs @ (keep[:, None] * (self.evecs.T @ (initial - target)))

  def finite_time(self, gains: jax.Array, residual: jax.Array,
                  k_test: Optional[jax.Array]):
    """Predictions at T times from the per-mode gains.

    Args:
      gains: (T, A) gains G(λ_a, t) in units of 1/λ (see `modes`: G = (η/N) g).
      residual: (A, C) initial train residual f_train(0) − y.
      k_test: (B, A) unregularised test-train kernel, or None.

    Returns:
      (train change (T, A, C), test change (T, B, C) or None), both to be added to the
      initial predictions: −Θ_reg a_t and −Θ_test,train a_t for a_t = V G Vᵀ residual.
    """
    proj = self.evecs.T @ residual  # (A, C)
    d_train = -jnp.einsum("ia,ta,ac->tic", self.evecs, self.evals * gains, proj)
    if k_test is None:
      return d_train, None
    d_test = -jnp.einsum("ba,ta,ac->tbc", k_test @ self.evecs, gains, proj)
    return d_train, d_test
