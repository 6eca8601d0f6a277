"""The NTK's spectrum at initialization, dense (eigh) or matrix-free (Lanczos), and the share
of Tr Θ that every parameter leaf contributes.

Definitions (Θ = Θ(X, X), eigenvalues λ₁ ≥ … ≥ λ_A ≥ 0 over the A kernel rows):

* condition number κ = λ_max / λ_min (∞ with a warning when λ_min ≤ 0: κ is undefined);
* effective rank r_eff = (Σλ)² / Σλ² = (Tr Θ)² / ‖Θ‖_F², the participation ratio, between
  1 (one mode carries everything) and A (a multiple of the identity);
* layer share of a parameter leaf l: Tr Θ_l / Tr Θ where Θ = Σ_l Θ_l, Θ_l = J_l J_lᵀ (the
  shares are non-negative and sum to 1).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

from ntk_dynamics.dynamics import _inputs as _dyn_inputs
from ntk_dynamics.init import _common
from ntk_dynamics.kernels import NtkImplementation

PyTree = Any

# Above this many kernel rows `method="auto"` switches from eigh to Lanczos.
DENSE_MAX_DIM = 2048


@dataclasses.dataclass(frozen=True)
class NtkSpectrum:
  """Summary of the spectrum of Θ(X, X).

  Attributes:
    lambda_max, lambda_min: extreme eigenvalues.
    condition_number: λ_max / λ_min; `inf` when λ_min ≤ 0.
    trace: Tr Θ = Σλ.
    top_eigenvalues: the `top_k` largest eigenvalues, descending.
    effective_rank: (Σλ)² / Σλ² (participation ratio).
    effective_rank_bounds: (low, high); equal to effective_rank for eigh. Matrix-free, Σλ² is
      the exact top-k part plus a Hutchinson estimate of the deflated rest, clipped to its
      bounds [0, λ_k (Tr − Σ_top λ)], and these bounds give the interval.
    dim: A, the number of kernel rows (N traced, N·K full).
    method: "eigh" or "lanczos".
    eigenvalues: all eigenvalues ascending (eigh only, else None).
    matvecs: kernel-vector products used (lanczos only, else 0).
  """
  lambda_max: float
  lambda_min: float
  condition_number: float
  trace: float
  top_eigenvalues: tuple
  effective_rank: float
  effective_rank_bounds: tuple
  dim: int
  method: str
  eigenvalues: Optional[np.ndarray] = None
  matvecs: int = 0

  @property
  def log10_condition_number(self) -> float:
    return math.log10(self.condition_number) if math.isfinite(self.condition_number) and \
        self.condition_number > 0 else math.inf

  def as_dict(self, eigenvalues: bool = False) -> dict:
    """JSON-able summary (all eigenvalues only if `eigenvalues`)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["eigenvalues"] = (None if self.eigenvalues is None or not eigenvalues
                        else self.eigenvalues.tolist())
    d["top_eigenvalues"] = list(self.top_eigenvalues)
    d["effective_rank_bounds"] = list(self.effective_rank_bounds)
    return d


def _condition(fn: str, lam_max: float, lam_min: float, dim: int, eps: float) -> float:
  if not lam_max > 0:
    _common.warn(f"{fn}: λ_max = {lam_max:.4g} ≤ 0: the kernel is zero (no parameter "
                 "influences the outputs on these inputs); κ is undefined.")
    return math.inf
  if lam_min <= 0:
    _common.warn(f"{fn}: λ_min = {lam_min:.4g} ≤ 0 (λ_max = {lam_max:.4g}, {dim} rows): Θ is "
                 "singular to working precision, so κ = λ_max/λ_min is undefined (reported "
                 "as inf). Typical causes: more examples than parameters, duplicated inputs, "
                 "dead units.")
    return math.inf
  cond = lam_max / lam_min
  # Rounding in a kernel computed at precision eps moves eigenvalues by ~eps·λ_max (measured:
  # ‖Θ₃₂ − Θ₆₄‖₂ ≈ 0.5 eps₃₂ λ_max for a deep MLP); √A·eps·λ_max leaves a margin.
  noise = math.sqrt(dim) * eps * lam_max
  if lam_min <= noise:
    _common.warn(f"{fn}: λ_min = {lam_min:.4g} is within rounding (√A·eps·λ_max = "
                 f"{noise:.3g}) of 0; κ = {cond:.4g} is not reliable (compute the kernel in "
                 "float64).")
  return cond


def kernel_spectrum(kernel: Any, top_k: int = 10, *, name: str = "kernel_spectrum"
                    ) -> NtkSpectrum:
  """Exact spectrum (float64 `eigh`) of a given kernel, zipped (N, N) or (N, N, K, K).

  The kernel must be symmetric (max |K − Kᵀ| ≤ √eps₃₂ · max |K|, √eps of its own dtype for
  float16/bfloat16 kernels) and positive semi-definite up to rounding (λ_min ≥
  −max(10·A·eps, √eps)·λ_max at the kernel's precision eps, and λ_max > 0 unless the kernel
  is zero); otherwise ValueError, with the figures.
  """
  if not isinstance(top_k, int) or top_k < 1:  # as ntk_spectrum: 0 or -1 would slice silently
    raise ValueError(f"{name}: `top_k` must be a positive int, got {top_k!r}.")
  k_dtype = jnp.result_type(kernel) if hasattr(kernel, "dtype") else np.float64
  eps_dtype = np.dtype(k_dtype) if jnp.issubdtype(k_dtype, jnp.floating) else np.float64
  eps = _dyn_inputs.eps_of(eps_dtype)
  m = _common.kernel_matrix(kernel, name)
  if m.shape[0] == 0:
    raise ValueError(f"{name}: the kernel is empty (0 examples).")
  shape = tuple(np.shape(kernel))
  _dyn_inputs.check_symmetric(name, "kernel", _dyn_inputs.zipped_to_matrix(np.asarray(kernel)),
                              shape)
  lam = _common.eigh(m, eigenvectors=False)
  _dyn_inputs.check_psd(name, "kernel", shape, lam, eps_dtype)
  lam_max, lam_min = float(lam[-1]), float(lam[0])
  cond = _condition(name, lam_max, lam_min, m.shape[0], eps)
  tr = float(lam.sum())
  sq = float(np.sum(lam ** 2))
  r = tr ** 2 / sq if sq > 0 else math.nan
  return NtkSpectrum(lam_max, lam_min, cond, tr, tuple(float(v) for v in lam[::-1][:top_k]),
                     r, (r, r), m.shape[0], "eigh", lam, 0)


def _diag_trace(diag: Any) -> float:
  """Σ_n Tr Θ(x_n, x_n) from a per-example diagonal kernel (N,) or (N, *zipped), where the
  zipped part is (a₁, a₁, a₂, a₂, …): rows on axes 1, 3, … and columns on axes 2, 4, …"""
  d = np.asarray(diag, np.float64)
  if d.ndim == 1:
    return float(d.sum())
  n = d.shape[0]
  rows = d.shape[1::2]
  order = (0,) + tuple(range(1, d.ndim, 2)) + tuple(range(2, d.ndim, 2))
  a = math.prod(rows)
  return float(np.trace(d.transpose(order).reshape(n, a, a), axis1=1, axis2=2).sum())


def _lanczos_spectrum(fn: str, matvec: Callable, dim: int, dtype, top_k: int, tol: float,
                      trace: float, num_probes: int, seed: int) -> NtkSpectrum:
  count = [0]

  def mv(v):
    count[0] += 1
    return np.array(matvec(jnp.asarray(np.ravel(v), dtype)), np.float64)

  op = scipy.sparse.linalg.LinearOperator((dim, dim), matvec=mv, dtype=np.float64)
  eps = _dyn_inputs.eps_of(dtype)
  rest = None  # Σλ² beyond the top-k, where it is known exactly
  if dim <= 2:  # ARPACK needs k < dim: build the tiny matrix column by column
    m = np.stack([mv(e) for e in np.eye(dim)], axis=1)
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    top, lam_min, vecs = lam[::-1][:top_k], float(lam[0]), None
    rest = float(np.sum(lam[::-1][top_k:] ** 2))
  else:
    k = max(1, min(top_k, dim - 1))
    ncv = min(dim, max(2 * k + 1, 20))
    top, vecs = scipy.sparse.linalg.eigsh(op, k=k, which="LA", tol=tol, ncv=ncv,
                                          maxiter=100 * dim)
    order = np.argsort(top)[::-1]
    top, vecs = top[order], vecs[:, order]
    lam_min = float(scipy.sparse.linalg.eigsh(op, k=1, which="SA", tol=tol,
                                              ncv=min(dim, 40), maxiter=100 * dim,
                                              return_eigenvectors=False)[0])
    if k == dim - 1:  # all but the smallest eigenvalue are known, and it is λ_min
      if top_k >= dim:
        top = np.append(top, lam_min)
      rest = 0. if top_k >= dim else lam_min ** 2
  lam_max = float(top[0])
  cond = _condition(fn, lam_max, lam_min, dim, eps)
  # Σλ² = Σ_top λ² + R, 0 ≤ R ≤ λ_k (Tr − Σ_top λ); R by Hutchinson on (I − P)Θ(I − P).
  sq_top = float(np.sum(top ** 2))
  if rest is not None:
    r_lo = r_hi = r_est = rest
  else:
    r_lo, r_hi = 0., max(0., float(top[-1]) * (trace - float(np.sum(top))))
    rng = np.random.default_rng(seed)
    est = []
    for _ in range(num_probes):
      z = rng.choice([-1., 1.], size=dim)
      z -= vecs @ (vecs.T @ z)
      w = mv(z)
      w -= vecs @ (vecs.T @ w)
      est.append(float(w @ w))
    r_est = float(np.clip(np.mean(est), r_lo, r_hi)) if est else r_hi / 2
  eff = trace ** 2 / (sq_top + r_est)
  bounds = (trace ** 2 / (sq_top + r_hi), trace ** 2 / (sq_top + r_lo))
  return NtkSpectrum(lam_max, lam_min, cond, trace, tuple(float(v) for v in top), eff,
                     bounds, dim, "lanczos", None, count[0])


def ntk_spectrum(model: Any, params: PyTree, x: PyTree, *, method: str = "auto",
                 top_k: int = 10, trace_axes: Sequence[int] = (-1,),
                 implementation=NtkImplementation.AUTO, vmap_axes: Any = 0,
                 dense_max_dim: int = DENSE_MAX_DIM, tol: float = 1e-10,
                 num_probes: int = 16, seed: int = 0) -> NtkSpectrum:
  """Spectrum of the empirical NTK Θ(x, x) at `params`.

  Args:
    model: an `hk.Transformed` or `f(params, x) -> (N, K)`.
    params: parameters (e.g. at initialization).
    x: a batch of inputs, examples on axis 0.
    method: "eigh" (form Θ with `empirical_ntk_fn`, float64 eigvalsh), "lanczos" (never form
      Θ: ARPACK Lanczos on `ntk_vp_fn` products for the top-k and λ_min; the trace from the
      per-example diagonal), or "auto" (eigh up to `dense_max_dim` rows).
    top_k: number of largest eigenvalues to report.
    trace_axes: (-1,) for the logit-traced (N, N) kernel (default, the dynamics' Θ ⊗ I), ()
      for the full (N·K, N·K) kernel. Outputs (N,) have no logit axis: both give (N, N). The
      batch axis 0 cannot be traced (ValueError).
    implementation, vmap_axes: passed to `empirical_ntk_fn`.
    dense_max_dim: the eigh/lanczos switch of "auto".
    tol: Lanczos relative tolerance.
    num_probes: Hutchinson probes for the matrix-free effective rank.
    seed: seed of those probes.

  Returns:
    An `NtkSpectrum`. Warns (RuntimeWarning, with the figures) when λ_min ≤ 0 or is within
    rounding of 0, where κ is undefined or unreliable.
  """
  fn = "ntk_spectrum"
  if method not in ("auto", "eigh", "lanczos"):
    raise ValueError(f"{fn}: `method` must be 'auto', 'eigh' or 'lanczos', got {method!r}.")
  if not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"{fn}: `top_k` must be a positive int, got {top_k!r}.")
  f = _common.as_f(model, fn)
  _common.check_params(fn, params)
  out_shape = _common.output_shape(fn, f, params, x)
  trace_axes = _common.resolve_trace_axes(fn, out_shape, trace_axes)
  dim = math.prod(s for i, s in enumerate(out_shape) if i not in trace_axes)
  if method == "auto":
    method = "eigh" if dim <= dense_max_dim else "lanczos"
  if method == "eigh":
    k = _common.ntk_kernel(f, params, x, trace_axes=trace_axes,
                           implementation=implementation, vmap_axes=vmap_axes)
    return kernel_spectrum(k, top_k, name=fn)
  diag = _common.ntk_kernel(f, params, x, trace_axes=trace_axes,
                            implementation=implementation, vmap_axes=vmap_axes, diagonal=True)
  trace = _diag_trace(diag)
  matvec, vshape = _common.kernel_matvec(f, params, x, out_shape, trace_axes, fn)
  dtype = jnp.result_type(*jax.tree.leaves(params))
  return _lanczos_spectrum(fn, matvec, math.prod(vshape), dtype, top_k, tol, trace,
                           num_probes, seed)


def layer_traces(model: Any, params: PyTree, x: PyTree, *, trace_axes: Sequence[int] = (-1,),
                 implementation=NtkImplementation.AUTO, vmap_axes: Any = 0) -> dict:
  """Tr Θ_l for every parameter leaf l ("dense_0/w" → float), from the per-parameter diagonal
  kernel (`empirical_ntk_fn(..., diagonal_axes=(0,), per_parameter=True)`): Θ is never formed."""
  fn = "layer_traces"
  f = _common.as_f(model, fn)
  _common.check_params(fn, params)
  out_shape = _common.output_shape(fn, f, params, x)
  trace_axes = _common.resolve_trace_axes(fn, out_shape, trace_axes)
  parts = _common.ntk_kernel(f, params, x, trace_axes=trace_axes,
                             implementation=implementation, vmap_axes=vmap_axes,
                             per_parameter=True, diagonal=True)
  names = _common.leaf_names(params)
  leaves = jax.tree.structure(params).flatten_up_to(parts)
  return {n: _diag_trace(d) for n, d in zip(names, leaves)}


def shares_from_traces(traces: dict, params: Optional[PyTree] = None, by: str = "leaf") -> dict:
  """Normalises per-leaf traces to shares summing to 1; `by="group"` sums them per layer
  (needs `params` for the grouping)."""
  if by not in ("leaf", "group"):
    raise ValueError(f"`by` must be 'leaf' or 'group', got {by!r}.")
  total = sum(traces.values())
  if not total > 0:
    raise ValueError(f"Tr Θ = {total:.4g}: the kernel is zero on these inputs, so layer "
                     "shares are undefined.")
  shares = {k: v / total for k, v in traces.items()}
  if by == "leaf":
    return shares
  if params is None:
    raise ValueError("`by='group'` needs `params` to group the leaves.")
  out: dict = {}
  for name, group in zip(_common.leaf_names(params), _common.leaf_groups(params)):
    out[group] = out.get(group, 0.) + shares[name]
  return out


def layer_shares(model: Any, params: PyTree, x: PyTree, *, by: str = "leaf",
                 trace_axes: Sequence[int] = (-1,), implementation=NtkImplementation.AUTO,
                 vmap_axes: Any = 0) -> dict:
  """Tr Θ_l / Tr Θ for every parameter leaf (`by="leaf"`, keys "dense_0/w") or summed per
  layer (`by="group"`, keys "dense_0"). Values are ≥ 0 and sum to 1."""
  traces = layer_traces(model, params, x, trace_axes=trace_axes,
                        implementation=implementation, vmap_axes=vmap_axes)
  return shares_from_traces(traces, params, by)
