"""NTK-based initialization tweaks: spectral learning rate, output centering, layer balancing.

Every tweak is a pure function `tweak(model, params, x, ...) -> TweakResult`: it never mutates
its inputs and returns the function to train, the parameters to start from, and a report
(a JSON-able dict) of what changed, with the figures. `search_init_scales` (in `search.py`)
follows the same convention.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_dynamics import dynamics
from ntk_dynamics.dynamics import _inputs as _dyn_inputs
from ntk_dynamics.init import _common
from ntk_dynamics.init import spectrum as spectrum_lib
from ntk_dynamics.kernels import NtkImplementation

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TweakResult:
  """What a tweak hands back.

  Attributes:
    f: the function to train, `f(params, x)` (the input model's, or a wrapper of it).
    params: the parameters to start training from (a new pytree; the input is untouched).
    report: JSON-able dict of what changed, with before/after figures.
    learning_rate: the step size the tweak chose (`spectral_learning_rate`), else None.
    lr_multipliers: per-leaf learning-rate multipliers (a pytree like `params`), else None.
  """
  f: Callable[..., jax.Array]
  params: PyTree
  report: dict
  learning_rate: Optional[float] = None
  lr_multipliers: Optional[PyTree] = None

  def optimizer(self, learning_rate: Optional[float] = None,
                momentum: float = 0.) -> optax.GradientTransformation:
    """`optax.sgd(η, momentum)` followed by the per-leaf multipliers, if any: leaf l moves
    with step η·m_l (exact for SGD and heavy-ball, both linear in the gradient)."""
    lr = self.learning_rate if learning_rate is None else learning_rate
    if lr is None:
      raise ValueError("TweakResult.optimizer: no learning rate was chosen by this tweak; "
                       "pass `learning_rate`.")
    tx = optax.sgd(lr, momentum=momentum or None)
    if self.lr_multipliers is None:
      return tx
    return optax.chain(tx, scale_by_multipliers(self.lr_multipliers))


def scale_by_multipliers(multipliers: PyTree) -> optax.GradientTransformation:
  """Stateless optax transformation multiplying each update leaf by its multiplier."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(
      lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers))


def effective_model(f: Callable, params: PyTree, lr_multipliers: PyTree
                    ) -> tuple[Callable, PyTree]:
  """The reparameterisation whose plain-SGD training equals SGD with per-leaf multipliers.

  With θ = √m ⊙ φ, SGD(η) on φ moves θ by −η m ∇_θ L, so `f_eff(φ, x) = f(√m ⊙ φ, x)` started
  from φ₀ = θ₀/√m trains exactly like `f` under `TweakResult.optimizer`, and its NTK is the
  effective kernel Σ_l m_l Θ_l that governs that training (use it for spectra and dynamics).
  Returns `(f_eff, phi_0)`. Multipliers must be finite and > 0 (φ₀ = θ₀/√m), else ValueError.
  """
  bad = [f"'{n}' ({np.asarray(m).min():.4g})" for n, m in
         zip(_common.leaf_names(lr_multipliers), jax.tree.leaves(lr_multipliers))
         if not isinstance(m, jax.core.Tracer) and np.size(m)
         and not np.all(np.isfinite(np.asarray(m)) & (np.asarray(m) > 0))]
  if bad:
    raise ValueError(f"effective_model: `lr_multipliers` must be finite and > 0 (φ₀ = θ₀/√m); "
                     f"got {', '.join(bad)} (smallest value shown). A zero multiplier freezes "
                     "its leaf: close over it in f instead.")
  root = jax.tree.map(lambda m: jnp.sqrt(jnp.asarray(m)), lr_multipliers)

  def f_eff(phi, x, **kwargs):
    return f(jax.tree.map(lambda p, r: p * r.astype(p.dtype), phi, root), x, **kwargs)

  phi0 = jax.tree.map(lambda p, r: p / r.astype(jnp.result_type(p)), params, root)
  return f_eff, phi0


# --- spectral learning rate ------------------------------------------------------------------

CATAPULT_MAX_FACTOR = 2.0


def learning_rate_regime(factor: float) -> str:
  """Regime of η = c·η_max (η_max = 2(1+m)N/λ_max, the dynamics' stable step)."""
  if factor < 1:
    return ("lazy: every mode of the linearized model contracts (the top mode monotonically "
            "for c ≤ 0.5, oscillating for 0.5 < c < 1); the kernel stays close to its "
            "initial value")
  if factor < CATAPULT_MAX_FACTOR:
    return ("catapult: the top mode grows at first, the loss spikes and λ_max falls until "
            "ηλ_max/N < 2(1+m), then training converges in a flatter region (Lewkowycz et "
            "al., 2020); the upper end ≈2 is model-dependent")
  return ("divergent: beyond ≈2·η_max the catapult usually cannot reduce λ_max fast enough "
          "and the loss diverges")


def spectral_learning_rate(model: Any, params: PyTree, x: PyTree, *, factor: float = 0.5,
                           momentum: float = 0., y_size: Optional[int] = None,
                           kernel: Any = None, method: str = "auto",
                           trace_axes: Sequence[int] = (),
                           implementation=NtkImplementation.AUTO,
                           vmap_axes: Any = 0) -> TweakResult:
  """η = c·η_max with η_max = 2(1+m)·N/λ_max(Θ) from `dynamics.max_learning_rate`.

  Units are those of `ntk_dynamics.dynamics`: loss `0.5 * mean((f − y)**2)` over N = `y_size`
  entries (default: all outputs f(params, x).size), update `optax.sgd(η, momentum=m)`.
  c < 1 is the lazy regime, 1 ≤ c < ≈2 the catapult regime, beyond that divergence (see
  `learning_rate_regime`). λ_max comes from the dense kernel (`kernel`, or formed with
  `empirical_ntk_fn`) or, with `method="lanczos"`, from `ntk_vp_fn` products only.

  The default `trace_axes=()` uses the full (N·K, N·K) kernel, whose λ_max decides whether
  the linearized network itself converges. A logit-traced kernel (`trace_axes=(-1,)`, or a
  2-D `kernel` for K > 1 outputs) stands for Θ_tr ⊗ I, and λ_max(Θ_tr) ≤ λ_max(Θ) always, often
  by 2–3× at finite width: its η_max is only that of the infinite-width approximation, and
  c < 1 of it can still diverge. Such a kernel is accepted with a RuntimeWarning.

  A given `kernel` must be Θ(x, x) on this batch, full ((N, N, K, K) or flat (N·K, N·K)) or
  logit-traced ((N, N)); another shape raises ValueError, and so does a zero kernel (no
  parameter moves the outputs: λ_max = 0, no finite stable step).

  Returns:
    TweakResult with the model and params unchanged and `learning_rate` = c·η_max.
  """
  fn = "spectral_learning_rate"
  if not (isinstance(factor, numbers.Real) and math.isfinite(factor) and factor > 0):
    raise ValueError(f"{fn}: `factor` c must be a finite number > 0, got {factor!r}.")
  factor = float(factor)  # a numpy float32 factor would round the learning rate to float32
  _dyn_inputs.check_scalar(fn, "momentum", momentum, upper=1.)
  momentum = float(momentum)
  if method not in ("auto", "eigh", "lanczos"):
    raise ValueError(f"{fn}: `method` must be 'auto', 'eigh' or 'lanczos', got {method!r}.")
  f = _common.as_f(model, fn)
  _common.check_params(fn, params)
  out_shape = _common.output_shape(fn, f, params, x)
  size = (math.prod(out_shape) if y_size is None
          else _dyn_inputs.check_int(fn, "y_size", y_size))
  if kernel is None:
    traced = _common.resolve_trace_axes(fn, out_shape, trace_axes)
    dim = math.prod(s for i, s in enumerate(out_shape) if i not in traced)
    if method == "auto":
      method = "eigh" if dim <= spectrum_lib.DENSE_MAX_DIM else "lanczos"
    if method == "eigh":
      kernel = _common.ntk_kernel(f, params, x, trace_axes=traced,
                                  implementation=implementation, vmap_axes=vmap_axes)
  else:
    traced = _kernel_traced_axes(fn, kernel, out_shape)
  approximate = any(out_shape[a] > 1 for a in traced)
  if approximate:
    _common.warn(f"{fn}: λ_max of a logit-traced kernel (Θ_tr ⊗ I) is a lower bound on that "
                 "of the full kernel, so η_max from it can make the linearized network "
                 "diverge; use the full kernel (trace_axes=()) for a stable step.")
  if kernel is not None:  # max_learning_rate checks a given kernel (symmetric, PSD)
    k = jnp.asarray(kernel)
    eta_max = float(dynamics.max_learning_rate(k, size, momentum))
    lam_max = 2. * (1. + momentum) * size / eta_max if np.any(np.asarray(k) != 0) else 0.
  else:  # exactly 0 for Θ = 0 (a random probe with Θv = 0)
    matvec, vshape = _common.kernel_matvec(f, params, x, out_shape, traced, fn)
    lam_max = float(dynamics.largest_eigenvalue(lambda v: matvec(jnp.ravel(v)),
                                                vector_shape=vshape))
    eta_max = 2. * (1. + momentum) * size / lam_max if lam_max > 0 else math.inf
  if not lam_max > 0:
    raise ValueError(f"{fn}: the kernel Θ(x, x) is zero (no parameter influences the outputs "
                     "on these inputs: frozen, unused or dead parameters?), so λ_max = 0 and "
                     "there is no largest stable step.")
  lr = factor * eta_max
  report = {"tweak": "spectral_learning_rate", "lambda_max": lam_max, "y_size": size,
            "momentum": momentum, "eta_max": eta_max, "factor": factor, "learning_rate": lr,
            "regime": learning_rate_regime(factor),
            "kernel": "traced (Θ_tr ⊗ I approximation)" if approximate else "full",
            "normalisation": "eta_max = 2(1+m) N / lambda_max, loss 0.5*mean((f-y)^2), "
                             "optax.sgd"}
  return TweakResult(f, params, report, learning_rate=lr)


def _kernel_traced_axes(fn: str, kernel: Any, out_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The output axes a precomputed `kernel` traces: () for the full kernel of outputs
  `out_shape` (zipped (N, N, K, K) or flat (N·K, N·K)), (last,) for the logit-traced one
  (zipped (N, N) or flat); raises ValueError naming both layouts for any other shape."""
  shape = tuple(np.shape(kernel))
  full = tuple(out_shape)
  traced = full[:-1] if len(full) > 1 else full

  def layouts(s):
    return (tuple(d for a in s for d in (a, a)), (math.prod(s),) * 2)

  if shape in layouts(full):
    return ()
  if shape in layouts(traced):
    return (len(full) - 1,)
  (zf, ff), (zt, ft) = layouts(full), layouts(traced)
  raise ValueError(f"{fn}: `kernel` has shape {shape}, but f(params, x) has shape {full}: "
                   f"expected Θ(x, x) on this batch, full {zf} (or flat {ff}) or logit-traced "
                   f"{zt} (or flat {ft}).")


# --- output centering ------------------------------------------------------------------------

CENTERING_MODES = ("antisymmetric", "subtract")


def center_outputs(model: Any, params: PyTree, x: Optional[PyTree] = None, *,
                   mode: str = "antisymmetric", check_kernel: bool = False,
                   trace_axes: Sequence[int] = (-1,), implementation=NtkImplementation.AUTO,
                   vmap_axes: Any = 0) -> TweakResult:
  """Makes the initial function identically zero while keeping the NTK.

  mode="antisymmetric" (ASI, Zhang et al. 2020): params become {"theta": θ, "theta_prime": θ'}
    with θ' = θ at init and f̃ = (f(θ, x) − f(θ', x))/√2. Both copies are trained. The NTK is
    Θ/2 (from θ, Jacobian J/√2) + Θ/2 (from θ', Jacobian −J/√2) = Θ: the 1/√2 is what keeps
    it; f̃₀ ≡ 0 for every input. Twice the parameters and forward cost.
  mode="subtract": f̃(θ, x) = f(θ, x) − f(θ₀, x) with θ₀ frozen; the parameters are unchanged,
    J and Θ are f's exactly, f̃(θ₀) ≡ 0. Two forward passes per call.

  Args:
    x: optional batch on which to report max|f₀| before and after (and, with
      `check_kernel`, the relative change of Θ, which should be round-off).

  Returns:
    TweakResult with the wrapped function and its parameters.
  """
  fn = "center_outputs"
  if mode not in CENTERING_MODES:
    raise ValueError(f"{fn}: `mode` must be one of {CENTERING_MODES}, got {mode!r}.")
  f = _common.as_f(model, fn)
  _common.check_params(fn, params)
  if mode == "antisymmetric":
    new_params = {"theta": params, "theta_prime": jax.tree.map(jnp.array, params)}

    def f_new(p, x, **kwargs):
      # A Python float is weakly typed: a float32 model stays float32 (np.sqrt(2.) would
      # promote its outputs to float64 under jax_enable_x64).
      return (f(p["theta"], x, **kwargs) - f(p["theta_prime"], x, **kwargs)) / math.sqrt(2.)
  else:
    new_params = params
    params0 = jax.tree.map(jnp.array, params)

    def f_new(p, x, **kwargs):
      return f(p, x, **kwargs) - f(params0, x, **kwargs)

  n_before = sum(np.size(p) for p in jax.tree.leaves(params))
  n_after = sum(np.size(p) for p in jax.tree.leaves(new_params))
  report = {"tweak": "center_outputs", "mode": mode, "num_params_before": n_before,
            "num_params_after": n_after}
  if x is not None:
    trace_axes = _common.resolve_trace_axes(fn, _common.output_shape(fn, f, params, x),
                                            trace_axes)
    report["max_abs_f0_before"] = float(jnp.max(jnp.abs(f(params, x))))
    report["max_abs_f0_after"] = float(jnp.max(jnp.abs(f_new(new_params, x))))
    if check_kernel:
      k0 = np.asarray(_common.ntk_kernel(f, params, x, trace_axes=trace_axes,
                                         implementation=implementation, vmap_axes=vmap_axes))
      k1 = np.asarray(_common.ntk_kernel(f_new, new_params, x, trace_axes=trace_axes,
                                         implementation=implementation, vmap_axes=vmap_axes))
      change, scale = float(np.max(np.abs(k1 - k0))), float(np.max(np.abs(k0)))
      report["kernel_max_rel_change"] = (change / scale if scale > 0
                                         else (0. if change == 0 else math.inf))
  return TweakResult(f_new, new_params, report)


# --- layer balancing -------------------------------------------------------------------------

BALANCE_METHODS = ("weights", "learning_rate")


def _is_weight(leaf) -> bool:
  return np.ndim(leaf) >= 2 and bool(np.any(np.asarray(leaf) != 0))


def balance_layers(model: Any, params: PyTree, x: PyTree, *,
                   target: Optional[Mapping[str, float]] = None, method: str = "weights",
                   by: str = "group", tol: float = 0.02, max_iterations: int = 20,
                   bounds: tuple[float, float] = (0.05, 20.),
                   trace_axes: Sequence[int] = (-1,), implementation=NtkImplementation.AUTO,
                   vmap_axes: Any = 0) -> TweakResult:
  """Brings each layer's share of Tr Θ to a target (equal by default).

  Shares are Tr Θ_g / Tr Θ over groups g (`by="group"`: Haiku modules, "dense_0"; `by="leaf"`:
  every parameter leaf), from the per-parameter diagonal kernel.

  method="weights": multiply every weight tensor (rank ≥ 2, non-zero) of group g by α_g,
    with Π α_g = 1 (for a bias-free ReLU network f is then unchanged). For a positively
    homogeneous network Θ_g ∝ Θ_g/α_g², so α_g ← α_g (share_g/target_g)^½ is exact in one
    step; otherwise it is iterated (step halved whenever the error grows) until every share is
    within `tol` (relative) of its target. Only groups holding a weight tensor take part;
    targets are their shares of the trace these groups carry. `bounds` (0 < lo ≤ 1 ≤ hi)
    limit every α_g.
  method="learning_rate": params unchanged; per-leaf learning-rate multipliers
    m_g = target_g / share_g, normalised so Σ m_g share_g = 1, make the effective kernel
    Σ_g m_g Θ_g (the one SGD with these multipliers follows) have exactly the target shares at
    the same trace. Train with `result.optimizer(lr)`; `effective_model` gives its NTK.
  Groups with no share of Tr Θ on x (unused, frozen or dead parameters) cannot be balanced:
  they are left out (scale and multiplier 1) with a RuntimeWarning, and `target` must omit them.

  Returns:
    TweakResult (rescaled params, or `lr_multipliers`) with shares before/after and scales.
  """
  fn = "balance_layers"
  if method not in BALANCE_METHODS:
    raise ValueError(f"{fn}: `method` must be one of {BALANCE_METHODS}, got {method!r}.")
  if by not in ("group", "leaf"):
    raise ValueError(f"{fn}: `by` must be 'group' or 'leaf', got {by!r}.")
  lo, hi = _common.check_bounds(fn, bounds)
  f = _common.as_f(model, fn)
  _common.check_params(fn, params)
  out_shape = _common.output_shape(fn, f, params, x)
  trace_axes = _common.resolve_trace_axes(fn, out_shape, trace_axes)
  kw = dict(trace_axes=trace_axes, implementation=implementation, vmap_axes=vmap_axes)
  names = _common.leaf_names(params)
  groups = names if by == "leaf" else _common.leaf_groups(params)
  leaves, treedef = jax.tree.flatten(params)
  order = list(dict.fromkeys(groups))

  def group_traces(p):
    traces = spectrum_lib.layer_traces(f, p, x, **kw)
    out = dict.fromkeys(order, 0.)
    for name, g in zip(names, groups):
      out[g] += traces[name]
    return out

  if method == "weights":
    active = [g for g in order if any(_is_weight(l) for l, gg in zip(leaves, groups) if gg == g)]
  else:
    active = list(order)
  traces0 = group_traces(params)
  # A group without a share of Tr Θ on x (unused, frozen or dead) cannot be given one by any
  # scale or multiplier (log 0, m = target/0): it is left out.
  idle = [g for g in active if not traces0[g] > 0]
  if idle:
    active = [g for g in active if g not in idle]
    _common.warn(f"{fn}: {idle} carry no share of Tr Θ on x (unused, frozen or dead "
                 "parameters); they cannot be balanced and are left as they are.")
  if len(active) < 2:
    raise ValueError(f"{fn}: need at least two {'layers' if by == 'group' else 'leaves'} "
                     f"{'with a non-zero weight tensor ' if method == 'weights' else ''}and a "
                     f"non-zero share of Tr Θ to balance; found {active}"
                     f"{f' (no share: {idle})' if idle else ''}.")
  if target is None:
    tgt = {g: 1. / len(active) for g in active}
  else:
    unknown = sorted(set(target) - set(active))
    missing = sorted(set(active) - set(target))
    if unknown or missing:
      why = f" ({idle} have no share of Tr Θ, so cannot be balanced)" if idle else ""
      raise ValueError(f"{fn}: `target` keys must be exactly the balanceable groups {active}; "
                       f"unknown {unknown}, missing {missing}{why}.")
    vals = np.array([float(target[g]) for g in active])
    if np.any(~np.isfinite(vals)) or np.any(vals <= 0):
      raise ValueError(f"{fn}: `target` shares must be finite and > 0, got {dict(target)}.")
    tgt = {g: float(v / vals.sum()) for g, v in zip(active, vals)}

  def relative(traces):
    tot = sum(traces[g] for g in active)
    if not tot > 0:
      raise ValueError(f"{fn}: Tr Θ over the balanced groups is {tot:.4g}; shares are "
                       "undefined.")
    return {g: traces[g] / tot for g in active}

  def error(rel):
    return max(abs(rel[g] - tgt[g]) / tgt[g] for g in active)

  total0 = sum(traces0.values())
  rel0 = relative(traces0)
  report = {"tweak": "balance_layers", "method": method, "by": by, "target": tgt,
            "shares_before": {g: traces0[g] / total0 for g in order},
            "relative_shares_before": rel0, "trace_before": total0}

  if method == "learning_rate":
    m = {g: tgt[g] / rel0[g] if rel0[g] > 0 else 0. for g in active}
    norm = sum(m[g] * rel0[g] for g in active)
    m = {g: v / norm for g, v in m.items()}
    mult = treedef.unflatten([jnp.asarray(m.get(g, 1.), jnp.result_type(l))
                              for l, g in zip(leaves, groups)])
    trace_after = sum(traces0[g] * m.get(g, 1.) for g in order)  # of Σ_g m_g Θ_g
    report.update(multipliers=m, relative_shares_after=tgt, iterations=0, max_rel_error=0.,
                  trace_after=trace_after)
    return TweakResult(f, params, report, lr_multipliers=mult)

  log_alpha = {g: 0. for g in active}

  def apply(la):
    return treedef.unflatten([
        l * jnp.asarray(math.exp(la[g]), jnp.result_type(l)) if g in la and _is_weight(l)
        else l for l, g in zip(leaves, groups)])

  rel, err, step, it = rel0, error(rel0), 0.5, 0
  history = [err]
  traces = traces0
  while err > tol and it < max_iterations:
    it += 1
    trial = {g: log_alpha[g] + step * math.log(rel[g] / tgt[g]) for g in active}
    mean = sum(trial.values()) / len(trial)
    trial = {g: min(max(v - mean, math.log(lo)), math.log(hi)) for g, v in trial.items()}
    t_traces = group_traces(apply(trial))
    t_rel = relative(t_traces)
    t_err = error(t_rel)
    if t_err < err:
      log_alpha, rel, err, traces = trial, t_rel, t_err, t_traces
    else:
      step /= 2
    history.append(err)
  if err > tol:
    _common.warn(f"{fn}: shares reached max relative error {err:.3g} > tol={tol} after {it} "
                 f"iterations (scales {[round(math.exp(v), 4) for v in log_alpha.values()]}, "
                 f"bounds {bounds}).")
  new_params = apply(log_alpha)
  total = sum(traces.values())
  report.update(scales={g: math.exp(v) for g, v in log_alpha.items()},
                shares_after={g: traces[g] / total for g in order},
                relative_shares_after=rel, max_rel_error=err, iterations=it,
                error_history=history, trace_after=total)
  return TweakResult(f, new_params, report)
