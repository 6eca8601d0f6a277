"""Init-scale search: one positive scale per weight tensor, tuned on the empirical NTK.

θ(s) = s_l · θ⁰_l for every selected leaf l (default: the non-zero weight tensors). The scales
are found by projected Adam on u = log s, minimising

    J(s) = smax_τ(log λ) − smin_τ(log λ)      subject to  Tr Θ(s) = T*,  lo ≤ s_l ≤ hi,

where λ are the eigenvalues of Θ(s) = Θ(X, X; θ(s)) and smax_τ(a) = τ log Σ exp(a/τ) (smin the
same with −a). With τ = 0, J is exactly log κ; τ > 0 gives a smooth upper bound (at most
τ log A above it) that does not jump when the smallest eigenvalues cross.

The trace constraint: the gradient is projected orthogonally to ∇_u log Tr Θ before Adam sees
it, and after every step a common shift δ of all log-scales (Newton on
log Tr Θ(u + δ) = log T*, using the cheap per-example trace, not Θ) puts the trace back on the
target T* (default: Tr Θ(θ⁰)). κ is scale-free; without the constraint the search could trade
conditioning for a kernel, and so a learning speed, of any size.

Gradient. For simple eigenvalues ∂λ_i/∂s = u_iᵀ (∂Θ/∂s) u_i (Hellmann–Feynman), and
u_iᵀ Θ(s) u_i = (1/K) Σ_k ‖J(s)ᵀ (u_i ⊗ e_k)‖², so ∂J/∂s is the gradient of a few
vector-Jacobian products at fixed (u_i, ∂J/∂λ_i). Θ itself comes from `empirical_ntk_fn` once
per step (for the eigenpairs); ∂Θ/∂s is never formed. `gradient="autodiff"` differentiates
through `empirical_ntk_fn` and `eigvalsh` instead (same gradient, much slower; it checks the
fast path).

`objective="gradinit"` replaces J by GradInit's (Zhu et al., 2021) one-step lookahead loss: the
MSE on the second half of the batch after one SGD step of size η on the first half, subject to
‖∇L‖ ≤ γ (while violated, the step reduces ‖∇L‖ instead). No trace constraint is applied.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_dynamics import dynamics
from ntk_dynamics.init import _common
from ntk_dynamics.init.tweaks import TweakResult
from ntk_dynamics.kernels import NtkImplementation

PyTree = Any
OBJECTIVES = ("log_cond", "gradinit")
# Eigenpairs whose soft-max/-min weight is below this are left out of the gradient.
_WEIGHT_CUTOFF = 1e-3
# Relative trace error accepted by the retraction, and Newton iterations allowed.
_TRACE_RTOL, _NEWTON_ITERS = 1e-3, 8
# Examples per chunk of the per-example Jacobians behind Tr Θ (memory: chunk·K·P floats).
_TRACE_CHUNK = 32


def default_scalable(name: str, leaf) -> bool:
  """Weight tensors: rank ≥ 2 and not identically zero (zero-initialised biases are skipped:
  scaling them changes nothing)."""
  del name
  return np.ndim(leaf) >= 2 and bool(np.any(np.asarray(leaf) != 0))


def soft_log_condition(lam: np.ndarray, tau: float, cap: int) -> tuple[float, np.ndarray]:
  """smax_τ(log λ) − smin_τ(log λ) and its derivative in λ (ascending λ > 0), keeping at most
  `cap` eigenpairs per extreme (weights renormalised after the cut)."""
  a = np.log(lam)
  n = len(a)
  if tau <= 0:
    w_max, w_min = np.eye(n)[-1], np.eye(n)[0]
    value = a[-1] - a[0]
  else:
    # Shifted by the extremes first: a/τ itself overflows for tiny τ (then NaN weights).
    with np.errstate(over="ignore"):  # → −inf: weight 0, as it should be
      z_max, z_min = (a - a.max()) / tau, (a.min() - a) / tau
    l_max, l_min = np.logaddexp.reduce(z_max), np.logaddexp.reduce(z_min)
    w_max, w_min = np.exp(z_max - l_max), np.exp(z_min - l_min)
    value = a.max() - a.min() + tau * (l_max + l_min)

  def cut(w):
    keep = np.zeros(n, bool)
    keep[np.argsort(w)[::-1][:cap]] = True
    w = np.where(keep & (w >= _WEIGHT_CUTOFF * w.max()), w, 0.)
    return w / w.sum()

  return float(value), (cut(w_max) - cut(w_min)) / lam


def _single_example(f: Callable) -> Callable:
  def g(params, x_i):
    return f(params, jax.tree.map(lambda a: a[None], x_i))[0]
  return g


def _scaled(u, leaves, treedef, idx):
  s = jnp.exp(u)
  new = list(leaves)
  for j, i in enumerate(idx):
    new[i] = leaves[i] * s[j].astype(leaves[i].dtype)
  return treedef.unflatten(new)


def _trace(f, p, x, full: bool, per_example: bool):
  """Tr Θ(p) without Θ: (1/K) Σ_{n,k} ‖∂f_k(x_n)/∂θ‖² (no 1/K for the full kernel)."""
  if per_example:
    g = _single_example(f)
    n = jax.tree.leaves(x)[0].shape[0]

    def one(x_i):
      return sum(jnp.sum(j ** 2) for j in jax.tree.leaves(jax.jacrev(g)(p, x_i)))
    total = jnp.sum(jax.lax.map(one, x, batch_size=min(n, _TRACE_CHUNK)))
    k_out = jax.eval_shape(g, p, jax.tree.map(lambda a: a[0], x)).shape[-1]
  else:
    out, vjp = jax.vjp(lambda q: f(q, x), p)
    k_out = out.shape[-1]
    basis = jnp.eye(out.size, dtype=out.dtype).reshape((-1,) + out.shape)
    total = jnp.sum(jax.lax.map(
        lambda c: sum(jnp.sum(v ** 2) for v in jax.tree.leaves(vjp(c)[0])), basis,
        batch_size=32))
  return total if full else total / k_out


_STATIC = ("f", "treedef", "idx")
_TSTATIC = _STATIC + ("full", "per_example")


# Module-level jits with the model as a static argument: repeated searches on the same `f`
# (seeds, recipes) compile once per shape.
@functools.partial(jax.jit, static_argnames=_TSTATIC)
def _log_trace_value_and_grad(u, leaves, x, *, f, treedef, idx, full, per_example):
  return jax.value_and_grad(lambda u: jnp.log(_trace(
      f, _scaled(u, leaves, treedef, idx), x, full, per_example)))(u)


@functools.partial(jax.jit, static_argnames=_TSTATIC)
def _log_trace_slope(u, delta, leaves, x, *, f, treedef, idx, full, per_example):
  """log Tr Θ(u + δ·1) and its derivative in δ."""
  return jax.jvp(lambda d: jnp.log(_trace(f, _scaled(u + d, leaves, treedef, idx), x, full,
                                          per_example)), (delta,), (jnp.ones_like(delta),))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _eig_grad(u, leaves, x, cots, weights, *, f, treedef, idx):
  """∇_u Σ_m w_m ‖J(θ(u))ᵀ c_m‖²."""
  def phi(u):
    _, vjp = jax.vjp(lambda q: f(q, x), _scaled(u, leaves, treedef, idx))
    sq = jax.vmap(lambda c: sum(jnp.sum(v ** 2) for v in jax.tree.leaves(vjp(c)[0])))(cots)
    return jnp.dot(weights, sq)
  return jax.grad(phi)(u)


def _mse(f, p, x, y):
  return 0.5 * jnp.mean((f(p, x) - y) ** 2)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _grad_norm_value_and_grad(u, leaves, xa, ya, *, f, treedef, idx):
  def norm(u):
    g = jax.grad(lambda p: _mse(f, p, xa, ya))(_scaled(u, leaves, treedef, idx))
    return jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
  return jax.value_and_grad(norm)(u)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _lookahead_value_and_grad(u, eta, leaves, xa, ya, xb, yb, *, f, treedef, idx):
  def lookahead(u):
    p = _scaled(u, leaves, treedef, idx)
    g = jax.grad(lambda q: _mse(f, q, xa, ya))(p)
    return _mse(f, jax.tree.map(lambda a, b: a - eta * b, p, g), xb, yb)
  return jax.value_and_grad(lookahead)(u)


def search_init_scales(model: Any, params: PyTree, x: PyTree, *,
                       objective: str = "log_cond", steps: int = 30,
                       learning_rate: float = 0.05,
                       bounds: tuple[float, float] = (0.2, 5.),
                       trace_target: Union[str, float, None] = "initial",
                       temperature: float = 0.05, max_pairs: int = 8,
                       scalable: Callable[[str, Any], bool] = default_scalable,
                       gradient: str = "eigvec", y: Optional[Any] = None,
                       gradinit_lr: Optional[float] = None,
                       gradinit_max_grad_norm: Optional[float] = None,
                       trace_axes: Sequence[int] = (-1,),
                       implementation=NtkImplementation.AUTO, vmap_axes: Any = 0,
                       optimizer: Optional[optax.GradientTransformation] = None,
                       callback: Optional[Callable[[int, dict], None]] = None) -> TweakResult:
  """Finds one positive scale per weight tensor that lowers κ(Θ) at a fixed trace.

  Args:
    model: an `hk.Transformed` or `f(params, x) -> (N, K)`.
    params: initial parameters θ⁰.
    x: the batch Θ is taken on (keep N small, 64–256: one kernel per step).
    objective: "log_cond" (see the module doc) or "gradinit" (needs `y`).
    steps: Adam steps on log s.
    learning_rate: Adam step size on log s.
    bounds: (lo, hi); every scale stays in [lo, hi] (relative to θ⁰).
    trace_target: "initial" (Tr Θ(θ⁰)), a number, or None (trace free).
    temperature: τ of the soft extremes (0: exact log κ).
    max_pairs: at most this many eigenpairs per extreme enter the gradient.
    scalable: `(leaf_name, leaf) -> bool`, which leaves get a scale.
    gradient: "eigvec" (fast, Hellmann–Feynman) or "autodiff" (through the kernel).
    y: targets (N, K) for `objective="gradinit"`.
    gradinit_lr: η of the lookahead step (default: 0.5·η_max of Θ(θ⁰) with these
      `trace_axes`, dynamics' units; a traced kernel's λ_max is a lower bound on the full
      kernel's, so with (-1,) this can exceed half the full kernel's stable step).
    gradinit_max_grad_norm: γ (default: ‖∇L(θ⁰)‖, i.e. the gradient may not grow).
    trace_axes, implementation, vmap_axes: kernel options (`vmap_axes=0` also lets the trace
      use per-example Jacobians; None falls back to full-batch products).
    optimizer: optax transformation on the log-scales (default `optax.adam(learning_rate)`).
    callback: called as `callback(step, record)` after every step (progress bars).

  Returns:
    TweakResult with θ(s*) at the best step (lowest exact κ among steps whose trace is within
    1% of the target — for GradInit: lowest lookahead loss with ‖∇L‖ ≤ γ), and a report with
    the scales, κ/λ_max/λ_min/trace before and after, and the per-step history.
  """
  fn = "search_init_scales"
  if objective not in OBJECTIVES:
    raise ValueError(f"{fn}: `objective` must be one of {OBJECTIVES}, got {objective!r}.")
  if gradient not in ("eigvec", "autodiff"):
    raise ValueError(f"{fn}: `gradient` must be 'eigvec' or 'autodiff', got {gradient!r}.")
  lo, hi = _common.check_bounds(fn, bounds)
  if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) \
      or steps < 0:
    raise ValueError(f"{fn}: `steps` must be a non-negative int, got {steps!r}.")
  steps = int(steps)
  if optimizer is None:  # numpy scalars too (np.float32 is no Python float)
    learning_rate = _common.check_real(fn, "learning_rate", learning_rate)
  temperature = _common.check_real(fn, "temperature", temperature, positive=False,
                                   hint=" (0: exact log κ)")
  initial_trace = isinstance(trace_target, str) and trace_target == "initial"
  if not (trace_target is None or initial_trace):
    if isinstance(trace_target, str):
      raise ValueError(f"{fn}: `trace_target` must be 'initial', None or a number > 0, got "
                       f"{trace_target!r}.")
    trace_target = _common.check_real(fn, "trace_target", trace_target,
                                      hint=" ('initial' or None for the others)")
  f = _common.as_f(model, fn)
  _common.check_params(fn, params)
  out_shape = _common.output_shape(fn, f, params, x)
  leaves, treedef = jax.tree.flatten(params)
  names = _common.leaf_names(params)
  idx = [i for i, (n, l) in enumerate(zip(names, leaves)) if scalable(n, l)]
  if not idx:
    raise ValueError(f"{fn}: no parameter leaf is selected for scaling (leaves {names}); the "
                     "default selects non-zero tensors of rank ≥ 2.")
  traced = tuple(a % len(out_shape) for a in trace_axes)
  if len(out_shape) != 2 or traced not in ((), (1,)):
    raise ValueError(f"{fn}: supports (N, K) outputs with trace_axes=(-1,) or (); got outputs "
                     f"{out_shape} and trace_axes={tuple(trace_axes)}.")
  n_ex, k_out = out_shape
  full = traced == ()
  dtype = jnp.result_type(*leaves)
  kw = dict(trace_axes=trace_axes, implementation=implementation, vmap_axes=vmap_axes)
  log_lo, log_hi = math.log(lo), math.log(hi)

  if objective == "gradinit":
    if y is None:
      raise ValueError(f"{fn}: objective='gradinit' needs the targets `y` (N, K).")
    y = jnp.asarray(y, dtype)
    if y.shape != tuple(out_shape):
      raise ValueError(f"{fn}: `y` has shape {y.shape}, expected the outputs' {out_shape}.")
    if n_ex < 2:
      raise ValueError(f"{fn}: objective='gradinit' needs ≥ 2 examples (two half-batches).")

  statics = dict(f=f, treedef=treedef, idx=tuple(idx))
  tstatics = dict(statics, full=full, per_example=vmap_axes is not None)

  def scaled(u):
    return _scaled(u, leaves, treedef, tuple(idx))

  def kernel_of(u):
    return _common.kernel_matrix(_common.ntk_kernel(f, scaled(u), x, **kw), fn)

  def log_trace_grad(u):
    return _log_trace_value_and_grad(u, leaves, x, **tstatics)[1]

  def retract(u, log_target):
    """u + δ·1 (then clipped to the box) with log Tr Θ = log T*, by damped Newton on δ."""
    delta = jnp.zeros((), dtype)
    for _ in range(_NEWTON_ITERS):
      val, slope = _log_trace_slope(u, delta, leaves, x, **tstatics)
      gap = float(val) - log_target
      if abs(gap) <= _TRACE_RTOL:
        break
      if not (math.isfinite(float(slope)) and float(slope) > 1e-8):
        break  # the trace does not grow with a common scale here: leave it
      delta = delta - jnp.clip(gap / slope, -0.5, 0.5).astype(dtype)
    return jnp.clip(u + delta, log_lo, log_hi)

  def eig_grad(u, cots, weights):
    return _eig_grad(u, leaves, x, cots, weights, **statics)

  def cotangents(vecs, coef):
    """Cotangents c and weights w with ∇_u Σ w‖Jᵀc‖² = Σ_i coef_i ∇_u(u_iᵀ Θ u_i); padded to a
    power of two (few recompilations)."""
    sel = np.nonzero(coef)[0]
    if full:
      cots = vecs[:, sel].T.reshape(len(sel), n_ex, k_out)
      w = coef[sel]
    else:
      ev = vecs[:, sel].T                                               # (M, N)
      cots = (ev[:, None, :, None] * np.eye(k_out)[None, :, None, :]).reshape(-1, n_ex, k_out)
      w = np.repeat(coef[sel] / k_out, k_out)
    pad = 2 ** math.ceil(math.log2(max(len(w), 1))) - len(w)
    cots = np.concatenate([cots, np.zeros((pad, n_ex, k_out))])
    w = np.concatenate([w, np.zeros(pad)])
    return jnp.asarray(cots, dtype), jnp.asarray(w, dtype)

  def soft_objective_jax(u):
    k = _common.ntk_kernel(f, scaled(u), x, **kw)
    k = k if not full else k.transpose(0, 2, 1, 3).reshape(n_ex * k_out, -1)
    lam = jnp.linalg.eigvalsh((k + k.T) / 2)
    a = jnp.log(jnp.maximum(lam, jnp.finfo(lam.dtype).tiny))
    if temperature > 0:  # shifted as in `soft_log_condition` (a/τ overflows for tiny τ)
      hi, lo = jax.lax.stop_gradient(a[-1]), jax.lax.stop_gradient(a[0])
      return (hi - lo + temperature * (jax.nn.logsumexp((a - hi) / temperature)
                                       + jax.nn.logsumexp((lo - a) / temperature)))
    return a[-1] - a[0]

  t0 = time.perf_counter()
  u = jnp.zeros(len(idx), dtype)
  k0 = kernel_of(u)
  lam0, vecs0 = _common.eigh(k0)
  noise = math.sqrt(len(lam0)) * float(jnp.finfo(dtype).eps) * float(lam0[-1])
  if not lam0[0] > noise:
    raise ValueError(f"{fn}: Θ(θ⁰) has λ_min = {lam0[0]:.4g} (λ_max = {lam0[-1]:.4g}, "
                     f"{len(lam0)} rows), not above the rounding level {noise:.3g}: Θ is "
                     "singular, κ is undefined and cannot be lowered. Use fewer examples than "
                     "parameters and no duplicated inputs.")
  tr0 = float(lam0.sum())
  if objective == "gradinit" or trace_target is None:
    target = None
  elif initial_trace:
    target = tr0
  else:
    target = trace_target

  if objective == "gradinit":
    half = n_ex // 2
    xa, xb = jax.tree.map(lambda a: a[:half], x), jax.tree.map(lambda a: a[half:], x)
    ya, yb = y[:half], y[half:]

    def grad_norm_vg(u):
      return _grad_norm_value_and_grad(u, leaves, xa, ya, **statics)

    def lookahead_vg(u, eta):
      return _lookahead_value_and_grad(u, eta, leaves, xa, ya, xb, yb, **statics)

    eta = gradinit_lr
    if eta is None:  # half the stable step on the full batch, in the dynamics' units
      eta = 0.5 * float(dynamics.max_learning_rate(jnp.asarray(k0), y.size))
    gamma = gradinit_max_grad_norm
    if gamma is None:
      gamma = float(grad_norm_vg(u)[0])

  opt = optax.adam(learning_rate) if optimizer is None else optimizer
  opt_state = opt.init(u)
  history, best = [], None
  lam, vecs = lam0, vecs0
  for step in range(steps + 1):
    ok_spec = lam[0] > 0
    log_cond = float(np.log(lam[-1] / lam[0])) if ok_spec else math.inf
    tr = float(lam.sum())
    record = {"step": step, "log_cond": log_cond,
              "condition_number": math.exp(log_cond) if ok_spec else math.inf,
              "lambda_max": float(lam[-1]), "lambda_min": float(lam[0]), "trace": tr,
              "scales": np.exp(np.asarray(u, np.float64)).tolist()}
    if objective == "gradinit":
      gn, gn_grad = grad_norm_vg(u)
      la, la_grad = lookahead_vg(u, jnp.asarray(eta, dtype))
      record["grad_norm"], record["objective"] = float(gn), float(la)
      key = (record["grad_norm"] > gamma * (1 + 1e-6), record["objective"])
    else:
      if ok_spec:
        record["objective"], dlam = soft_log_condition(lam, temperature, max_pairs)
      else:
        record["objective"] = math.inf
      off = target is not None and abs(math.log(tr / target)) > 0.01
      key = (off, log_cond)
    history.append(record)
    if best is None or key < best[0]:
      best = (key, step, u, lam)
    if callback is not None:
      callback(step, record)
    if step == steps:
      break
    if objective == "gradinit":
      g = gn_grad if record["grad_norm"] > gamma else la_grad
    elif not ok_spec:
      _common.warn(f"{fn}: λ_min = {lam[0]:.4g} ≤ 0 at step {step}; κ is undefined there, "
                   "stopping early.")
      break
    elif gradient == "autodiff":
      g = jax.grad(soft_objective_jax)(u)
    else:
      g = eig_grad(u, *cotangents(vecs, dlam))
    g = jnp.where(jnp.isfinite(g), g, 0.)
    if target is not None:  # keep to the tangent space of {Tr Θ = T*}
      n = log_trace_grad(u)
      g = g - jnp.dot(g, n) / jnp.maximum(jnp.dot(n, n), 1e-30) * n
    updates, opt_state = opt.update(g, opt_state, u)
    u = jnp.clip(optax.apply_updates(u, updates), log_lo, log_hi)
    if target is not None:
      u = retract(u, math.log(target))
    lam, vecs = _common.eigh(kernel_of(u))

  _, best_step, u_best, lam_best = best
  s_best = np.exp(np.asarray(u_best, np.float64))
  new_params = scaled(u_best)
  _common.check_params(fn, new_params)
  at_bounds = [names[i] for i, s in zip(idx, s_best) if s <= lo * 1.001 or s >= hi / 1.001]
  report = {
      "tweak": "search_init_scales", "objective": objective, "gradient": gradient,
      "steps": steps, "best_step": best_step, "bounds": list(bounds),
      "temperature": temperature, "trace_target": target,
      "scales": {names[i]: float(s) for i, s in zip(idx, s_best)},
      "scales_at_bounds": at_bounds,
      "condition_number_before": float(lam0[-1] / lam0[0]),
      "condition_number_after": (float(lam_best[-1] / lam_best[0]) if lam_best[0] > 0
                                 else math.inf),
      "lambda_max_before": float(lam0[-1]), "lambda_max_after": float(lam_best[-1]),
      "lambda_min_before": float(lam0[0]), "lambda_min_after": float(lam_best[0]),
      "trace_before": tr0, "trace_after": float(lam_best.sum()),
      "num_examples": n_ex, "seconds": time.perf_counter() - t0, "history": history}
  if objective == "gradinit":
    report.update(gradinit_lr=eta, gradinit_max_grad_norm=gamma)
  if at_bounds:
    report["note"] = (f"{len(at_bounds)} scale(s) ended at the bounds {list(bounds)}: "
                      f"{at_bounds}; widen `bounds` to search further.")
  return TweakResult(f, new_params, report)
