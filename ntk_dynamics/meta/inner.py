"""Inner loops of few-shot meta-learning behind one interface.

Every inner loop is an `InnerLoop` whose `adapt(meta_params, support, query_x)` adapts the
model to one task's support set `(x, y)` and returns its outputs on `query_x`; the query loss
is computed outside (`losses`), so the same loop serves regression and classification.
`InnerLoop.batched` maps it over a leading meta-batch axis (`jax.vmap`). Everything is
jittable and differentiable w.r.t. `meta_params` (the meta-gradient).

Loops (α = `inner_lr`, k = `inner_steps`, inner loss `mean((f − y)²)` or cross-entropy):

* `maml`: k steps of an optax optimizer (default `optax.sgd(α)`) on the support loss of the
  network itself; second-order by default, first-order with `first_order=True`
  (`stop_gradient` on the inner gradients). Memory of the meta-gradient grows with k.
* `anil`: the same, adapting only the head: by default the parameters of the last
  parameterised operation before the output, found in the graph of `f` (see `head_names`).
* `ntk_flow`: the network linearized at `meta_params`, trained on the support set by
  gradient flow for time α·k (k "steps" of size α), solved in closed form with the
  empirical NTK: f_q = f_q(0) − Θ_qs G(Θ_ss) (f_s(0) − y_s). Uses
  `ntk_dynamics.dynamics.gradient_descent_mse`.
* `ntk_steps`: exactly k discrete steps of `optax.sgd(α)` on the linearized model, in closed
  form (dynamics' `gradient_descent_mse_steps`).
* `ntk_ridge`: the t → ∞ limit with a ridge ρ (kernel ridge regression with the empirical
  NTK): f_q = f_q(0) + Θ_qs (Θ_ss + ρ' I)⁻¹ (y_s − f_s(0)), ρ' = ρ·mean(diag Θ_ss). For the
  linearized model this is the proximal inner problem of iMAML (Rajeswaran et al. 2019),
  min_φ mean((f_φ − y)²) + (λ/2)‖φ − θ‖² with λ = 2ρ'/N, N = y_s.size.

The closed forms cost the same for every k or t, so their memory does not grow with k: the
kernels Θ_ss (n×n, or nK×nK) and Θ_qs (or NTK-vector products in its place, see
`query_kernel`), one eigendecomposition (or Cholesky factorization for the ridge limit) in
`dynamics`, and a few matrix products.
Classification targets are one-hot and the inner loss is MSE; the kernel is traced over the
logits by default (Θ ⊗ I, `trace_axes=(-1,)`) or the full per-class kernel with
`trace_axes=()`. With the traced kernel the closed forms are exact for the network whose
kernel is Θ_traced ⊗ I (exact for one output); with `trace_axes=()` they are exact for the
linearized network itself.

Units: the inner loss is MAML's `mean((f − y)²)`, twice neural-tangents' `½ mean`, so the
dynamics' closed forms are called with learning rate 2α; `ntk_steps(k, α)` then equals k
steps of `optax.sgd(α)` on `mean((f_lin − y)²)`.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jex_core

from ntk_dynamics.dynamics._inputs import check_int
from ntk_dynamics.kernels import NtkImplementation, empirical_ntk_fn
from ntk_dynamics.kernels.structured import interpreter as interp
from ntk_dynamics.meta import _closed_forms
from ntk_dynamics.meta import losses

PyTree = Any
Axes = Union[int, Sequence[int]]
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

INNER_LOOPS = ("maml", "anil", "ntk_flow", "ntk_steps", "ntk_ridge")
CLOSED_FORMS = ("ntk_flow", "ntk_steps", "ntk_ridge")


@dataclasses.dataclass(frozen=True)
class InnerLoop:
  """One inner loop.

  Attributes:
    name: one of `INNER_LOOPS`.
    adapt: `adapt(meta_params, support, query_x) -> query outputs` for one task: `support`
      is `(x, y)` with x (n, ...) and y (n, D) float targets or (n,) integer labels,
      `query_x` is (m, ...), the result (m, K) outputs of the adapted model.
    config: the settings it was built with (JSON-serialisable).
  """
  name: str
  adapt: Callable[[PyTree, tuple, jax.Array], jax.Array]
  config: Mapping[str, Any]

  def __call__(self, meta_params: PyTree, support: tuple, query_x: jax.Array) -> jax.Array:
    return self.adapt(meta_params, support, query_x)

  def batched(self, meta_params: PyTree, support: tuple, query_x: jax.Array) -> jax.Array:
    """`adapt` over a leading meta-batch axis of `support` and `query_x` (params shared)."""
    return jax.vmap(self.adapt, in_axes=(None, 0, 0))(meta_params, support, query_x)


def _check_steps_lr(fn: str, inner_steps: int, inner_lr: float) -> tuple[int, float]:
  # Any integral scalar (numpy / JAX integers too, not bools), stored as a Python int so that
  # `config` stays JSON-serialisable and fingerprints do not depend on the integer's type.
  inner_steps = check_int(fn, "inner_steps", inner_steps, minimum=0)
  lr = float(inner_lr)
  if not (lr > 0 and lr < float("inf")):
    raise ValueError(f"{fn}: `inner_lr` must be a finite positive number, got {inner_lr!r}.")
  return inner_steps, lr


def _check_support(fn: str, x: Any) -> None:
  """Raises for a support set without examples (checked on shapes, so under `jit` too): a
  gradient step on a mean over no examples is a step of 0, so the "adapted" model would
  silently be the unadapted one."""
  if any(jnp.ndim(leaf) and jnp.shape(leaf)[0] == 0 for leaf in jax.tree.leaves(x)):
    raise ValueError(f"{fn}: the support set holds no examples (support x of shape "
                     f"{jax.tree.map(jnp.shape, x)}); a task needs at least one support "
                     "example to adapt to.")


def _inner_loss(loss: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`"auto"`: cross-entropy for integer labels, MSE for float targets."""
  if loss == "auto":
    return lambda out, y: (losses.xent if losses.is_classification(y) else losses.mse)(out, y)
  return losses.get_loss(loss)


def _descend(loss_of: Callable[[PyTree], jax.Array], start: PyTree,
             optimizer: optax.GradientTransformation, steps: int, first_order: bool) -> PyTree:
  """`steps` optimizer steps on `loss_of` from `start`, as a `lax.scan` (reverse-mode
  differentiable; second-order unless `first_order`)."""

  def step(carry, _):
    p, state = carry
    g = jax.grad(loss_of)(p)
    if first_order:
      g = jax.lax.stop_gradient(g)
    updates, state = optimizer.update(g, state, p)
    return (optax.apply_updates(p, updates), state), None

  (adapted, _), _ = jax.lax.scan(step, (start, optimizer.init(start)), None, length=steps)
  return adapted


def maml(f: ApplyFn, *, inner_steps: int = 1, inner_lr: float = 0.01,
         optimizer: Optional[optax.GradientTransformation] = None, first_order: bool = False,
         loss: str = "auto") -> InnerLoop:
  """MAML (Finn et al. 2017): `inner_steps` optimizer steps on the support loss.

  Args:
    f: `f(params, x) -> (n, K)` outputs.
    inner_steps: k ≥ 0.
    inner_lr: α, the step of the default `optax.sgd(α)`.
    optimizer: any optax transformation used instead of `sgd(inner_lr)` (its state starts
      fresh for every task). Second-order meta-gradients differentiate through its update:
      `optax.adam(lr)` divides by sqrt(v) with v = 0 for a parameter whose gradient is 0 (a
      dead ReLU unit, an unused logit), and the derivative of sqrt at 0 makes the
      meta-gradient NaN; use `optax.adam(lr, eps_root=1e-12)` (or `first_order=True`). Its
      hyperparameters are not in `config` ("custom"), so checkpoints cannot tell two custom
      optimizers apart.
    first_order: FOMAML: the inner gradients are treated as constants.
    loss: `"auto"` (cross-entropy for integer labels, MSE otherwise), `"mse"` or `"xent"`.
  """
  inner_steps, inner_lr = _check_steps_lr("maml", inner_steps, inner_lr)
  opt = optimizer if optimizer is not None else optax.sgd(inner_lr)
  loss_fn = _inner_loss(loss)

  def adapt(params, support, query_x):
    x, y = support
    _check_support("maml", x)
    adapted = _descend(lambda p: loss_fn(f(p, x), y), params, opt, inner_steps, first_order)
    return f(adapted, query_x)

  return InnerLoop("maml", adapt, {"inner_steps": inner_steps, "inner_lr": inner_lr,
                                   "first_order": bool(first_order), "loss": loss,
                                   "optimizer": "sgd" if optimizer is None else "custom"})


def head_names(params: PyTree, head: Union[None, str, Sequence[str]] = None, *,
               f: Optional[ApplyFn] = None, x: Any = None) -> tuple[str, ...]:
  """Top-level keys of `params` that form the head ANIL adapts.

  Args:
    params: a mapping layer name -> parameters (e.g. Haiku params).
    head: the key(s) to adapt; None: found from the graph of `f` on inputs like `x`.
    f, x: the model and an input (or anything with its shape and dtype); needed when `head`
      is None.

  By default the head is the module(s) whose parameters the last parameterised operation
  before the output consumes (for `models.mlp`, `cnn` and `resnet`, the readout's bias add):
  `f` is traced abstractly (`jax.make_jaxpr`) and every value is followed from the inputs.
  The order of the keys is never used: `jit`, `optax.apply_updates` and `jax.tree` functions
  sort dict keys, so the last key is the last layer only by accident (`models.resnet`'s keys
  sort to block_0_a, ..., readout, stem). A model whose output depends on no parameter, or
  whose head would be every layer (e.g. layers inside a `scan`), is refused: name `head`.
  """
  if not isinstance(params, Mapping) or not params:
    raise ValueError("anil needs `params` to be a non-empty mapping of layer name -> "
                     f"parameters (e.g. Haiku params), got {type(params).__name__}.")
  if head is None:
    if f is None or x is None:
      raise ValueError("head_names: finding the head needs the model `f` and an input `x` "
                       "(or pass `head`, the top-level keys to adapt; available: "
                       f"{sorted(params)}).")
    names = _graph_head(f, params, x)
    if len(names) == len(params):
      raise ValueError(f"anil: the last parameterised operation of the model consumes every "
                       f"layer's parameters ({list(names)}), so no head can be told apart; "
                       f"pass `head`, the top-level keys to adapt (available: {sorted(params)}).")
    return names
  names = (head,) if isinstance(head, str) else tuple(head)
  missing = [n for n in names if n not in params]
  if missing or not names:
    raise ValueError(f"`head` {names!r} must name layers of `params`; available: {list(params)}.")
  if len(names) == len(params):
    raise ValueError(f"`head` {names!r} names every layer; use maml to adapt all parameters.")
  return names


def _graph_head(f: ApplyFn, params: Mapping, x: Any) -> tuple[str, ...]:
  """The top-level keys whose leaves the last parameterised operation before the output of
  `f(params, x)` consumes (see `head_names`)."""
  abstract = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
  param_paths, _ = jax.tree_util.tree_flatten_with_path(params)
  closed = jax.make_jaxpr(f)(jax.tree.map(abstract, params), jax.tree.map(abstract, x))
  jaxpr = closed.jaxpr
  num_params = len(param_paths)
  # A value's label: (depends on x, parameter leaves). For a value computed from parameters
  # alone, the leaves it comes from; for one that depends on x, the leaves consumed by the
  # last operation on its way that combined it with parameter-only values.
  labels = [(False, frozenset({i})) for i in range(num_params)]
  labels += [(True, frozenset())] * (len(jaxpr.invars) - num_params)
  outputs = _propagate(jaxpr, labels)
  leaves = frozenset().union(*(leaves for data, leaves in outputs if data))
  if not any(data for data, _ in outputs) or not leaves:
    raise ValueError("anil: the output of the model depends on no parameter combined with "
                     "its input, so it has no head to find; pass `head`, the top-level keys to "
                     f"adapt (available: {sorted(params)}).")
  keys = {getattr(param_paths[i][0][0], "key", None) for i in leaves}
  return tuple(k for k in sorted(params) if k in keys)


def _propagate(jaxpr: Any, in_labels: list) -> list:
  """Labels (see `_graph_head`) of `jaxpr`'s outputs given those of its inputs."""
  none = (False, frozenset())
  env = {v: none for v in jaxpr.constvars}
  env.update(zip(jaxpr.invars, in_labels))
  read = lambda v: none if isinstance(v, jex_core.Literal) else env.get(v, none)
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    inner = _called_jaxpr(eqn)
    if inner is not None:
      outs = _propagate(inner, ins)
    else:
      data = [leaves for is_data, leaves in ins if is_data]
      fixed = [leaves for is_data, leaves in ins if not is_data and leaves]
      if not data:      # parameters only (e.g. a weight scaled or cast)
        out = (False, frozenset().union(*fixed))
      elif fixed:       # a parameterised operation: it is the last one so far on this path
        out = (True, frozenset().union(*fixed))
      else:             # parameter-free (activations, pooling, sums of branches)
        out = (True, frozenset().union(*data))
      outs = [out] * len(eqn.outvars)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _called_jaxpr(eqn: Any) -> Any:
  """The body of a call (jit, checkpoint, custom-derivative function) that takes the
  equation's operands one to one: followed inside, so a jitted model or a custom-derivative
  activation is not mistaken for one operation on all its inputs."""
  if eqn.primitive.name not in interp.INLINE_PRIMITIVES:
    return None
  inner = interp.inner_jaxpr(eqn)
  if (inner is None or len(inner[0].invars) != len(eqn.invars)
      or len(inner[0].outvars) != len(eqn.outvars)):
    return None
  return inner[0]


def anil(f: ApplyFn, *, inner_steps: int = 1, inner_lr: float = 0.01,
         optimizer: Optional[optax.GradientTransformation] = None, first_order: bool = False,
         loss: str = "auto", head: Union[None, str, Sequence[str]] = None) -> InnerLoop:
  """ANIL (Raghu et al. 2020): MAML adapting only the head.

  Args: those of `maml`, plus `head`: the top-level parameter keys to adapt; None (default):
  the module(s) of the last parameterised operation before the output, found in the graph
  of `f` whatever the order of the keys (see `head_names`).
  """
  inner_steps, inner_lr = _check_steps_lr("anil", inner_steps, inner_lr)
  opt = optimizer if optimizer is not None else optax.sgd(inner_lr)
  loss_fn = _inner_loss(loss)
  found = {}  # abstract signature of (params, x) -> head: one trace of `f` per signature

  def head_of(params, x):
    if head is not None:
      return head_names(params, head)
    leaves, treedef = jax.tree.flatten((params, x))
    signature = (treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves))
    if signature not in found:
      found[signature] = head_names(params, f=f, x=x)
    return found[signature]

  def adapt(params, support, query_x):
    x, y = support
    _check_support("anil", x)
    names = head_of(params, x)
    body = {k: v for k, v in params.items() if k not in names}
    start = {k: params[k] for k in names}
    merge = lambda h: {k: (h[k] if k in names else body[k]) for k in params}
    adapted = _descend(lambda h: loss_fn(f(merge(h), x), y), start, opt, inner_steps,
                       first_order)
    return f(merge(adapted), query_x)

  return InnerLoop("anil", adapt, {"inner_steps": inner_steps, "inner_lr": inner_lr,
                                   "first_order": bool(first_order), "loss": loss,
                                   "head": None if head is None else list(
                                       (head,) if isinstance(head, str) else head),
                                   "optimizer": "sgd" if optimizer is None else "custom"})


QUERY_KERNELS = ("auto", "explicit", "products")


def _closed_form_loop(name: str, f: ApplyFn, *, inner_steps: int, inner_lr: float,
                      ridge: float, trace_axes: Axes, vmap_axes: Any,
                      implementation: Union[NtkImplementation, int],
                      query_kernel: str) -> InnerLoop:
  inner_steps, inner_lr = _check_steps_lr(name, inner_steps, inner_lr)
  ridge = float(ridge)
  if not (ridge >= 0 and ridge < float("inf")):
    raise ValueError(f"`ridge` must be a finite number >= 0, got {ridge!r}.")
  if name == "ntk_ridge" and ridge == 0:
    raise ValueError("ntk_ridge needs `ridge` > 0 (ridge 0 is the interpolating limit "
                     "ntk_flow reaches as t → ∞; a singular support kernel has no inverse).")
  trace = (trace_axes,) if isinstance(trace_axes, int) else tuple(trace_axes)
  if trace not in ((), (-1,)):
    raise ValueError(f"`trace_axes` must be (-1,) (traced logits) or () (full per-class "
                     f"kernel), got {trace_axes!r}.")
  if query_kernel not in QUERY_KERNELS:
    raise ValueError(f"`query_kernel` must be one of {QUERY_KERNELS}, got {query_kernel!r}.")
  explicit = query_kernel == "explicit" or (query_kernel == "auto" and trace == (-1,))
  joint = vmap_axes is not None
  ntk_fn = empirical_ntk_fn(f, trace_axes=trace, vmap_axes=vmap_axes,
                            implementation=implementation)
  # Inner loss mean((f − y)²) = 2 × neural-tangents' ½ mean: the same step is lr 2α there.
  nt_lr = 2. * inner_lr

  def adapt(params, support, query_x):
    x, y = support
    _check_support(name, x)
    n = x.shape[0]
    if joint and jnp.shape(query_x)[1:] != x.shape[1:]:
      raise ValueError(f"{name}: support x {x.shape} and query_x {jnp.shape(query_x)} must hold "
                       f"examples of one shape {x.shape[1:]} to be evaluated in one pass; pass "
                       "vmap_axes=None for a model that takes the two sets apart.")
    if joint and (jnp.issubdtype(jnp.result_type(query_x), jnp.inexact)
                  != jnp.issubdtype(x.dtype, jnp.inexact)):
      # The joint pass casts the query to the support's dtype: float query points cast to
      # integer ids (or the reverse) would be silently different inputs.
      raise ValueError(f"{name}: support x has dtype {x.dtype} and query_x "
                       f"{jnp.result_type(query_x)}; both must be integer (e.g. token ids) "
                       "or both floating point.")
    if joint:   # one pass over support ∪ query: only when outputs are per example
      x_all = jnp.concatenate([x, jnp.asarray(query_x, x.dtype)], axis=0)
      out_all = f(params, x_all)
      out_s, out_q = out_all[:n], out_all[n:]
    else:       # a model that mixes examples sees each set on its own
      out_s, out_q = f(params, x), f(params, query_x)
    targets = losses.regression_targets(y, out_s)
    if explicit and joint:  # Θ(support ∪ query, support): (n + m, n) or (n + m, n, K, K)
      k_all = ntk_fn(x_all, x, params)
      k_ss, k_qs = k_all[:n], k_all[n:]
    elif explicit:
      k_ss, k_qs = ntk_fn(x, None, params), ntk_fn(query_x, x, params)
    else:
      k_ss = ntk_fn(x, None, params)
    if name == "ntk_steps":
      predict = _closed_forms.steps_predictor(k_ss, targets, nt_lr, inner_steps, ridge, trace)
      t = inner_steps
    else:
      predict = _closed_forms.flow_predictor(k_ss, targets, nt_lr, ridge, trace)
      t = None if name == "ntk_ridge" else float(inner_steps)
    if explicit:
      return predict(t, out_s, out_q, k_qs)[1]
    coef = _closed_forms.dual_coefficients(predict, t, out_s, trace)
    return out_q + _closed_forms.query_kernel_product(f, params, query_x, x, coef,
                                                      traced=trace == (-1,))

  config = {"inner_steps": inner_steps, "inner_lr": inner_lr, "ridge": ridge,
            "trace_axes": list(trace), "implementation": NtkImplementation(implementation).name,
            "query_kernel": "explicit" if explicit else "products", "loss": "mse"}
  if vmap_axes != 0:
    # It decides the math for a model whose outputs mix examples, so checkpoints must tell it
    # apart; recorded only off the default, so that checkpoints written before it was recorded
    # (all with the default) still resume. JSON holds ints and None; other specs by their repr.
    config["vmap_axes"] = (vmap_axes if vmap_axes is None or isinstance(vmap_axes, int)
                           else repr(vmap_axes))
  if name == "ntk_ridge":
    config.pop("inner_steps")
    config.pop("inner_lr")
  return InnerLoop(name, adapt, config)


def ntk_flow(f: ApplyFn, *, inner_steps: int = 1, inner_lr: float = 0.01, ridge: float = 0.,
             trace_axes: Axes = (-1,), vmap_axes: Any = 0,
             implementation: Union[NtkImplementation, int] = NtkImplementation.AUTO,
             query_kernel: str = "auto") -> InnerLoop:
  """Closed-form gradient flow of the linearized model on the support MSE for time α·k.

  Args:
    f: `f(params, x) -> (n, K)`.
    inner_steps, inner_lr: k and α; the flow runs for time α·k (k may be any int ≥ 0; the
      cost does not depend on it).
    ridge: optional ρ (relative to mean(diag Θ_ss)) added to the support kernel.
    trace_axes: `(-1,)` traced logits kernel (default) or `()` the full per-class kernel.
    vmap_axes: `empirical_ntk_fn`'s promise that outputs depend on their own example only
      (0, the default, for MLPs/CNNs without batch statistics); None for models that mix
      examples.
    implementation: an `NtkImplementation` for the kernels.
    query_kernel: how the query points see the support set. `"explicit"`: Θ(query, support)
      from `empirical_ntk_fn`, passed to dynamics as `k_test_train`; `"products"`: never
      formed, applied as NTK-vector products to dual coefficients read off dynamics (see
      `_closed_forms`); `"auto"` (default): explicit for the traced kernel (cheap with
      structured derivatives), products for the full kernel (K× smaller than its (m, n, K, K)
      query kernel).
  """
  return _closed_form_loop("ntk_flow", f, inner_steps=inner_steps, inner_lr=inner_lr,
                           ridge=ridge, trace_axes=trace_axes, vmap_axes=vmap_axes,
                           implementation=implementation, query_kernel=query_kernel)


def ntk_steps(f: ApplyFn, *, inner_steps: int = 1, inner_lr: float = 0.01, ridge: float = 0.,
              trace_axes: Axes = (-1,), vmap_axes: Any = 0,
              implementation: Union[NtkImplementation, int] = NtkImplementation.AUTO,
              query_kernel: str = "auto") -> InnerLoop:
  """Exactly k steps of `optax.sgd(α)` on the linearized model, in closed form (arguments
  as for `ntk_flow`)."""
  return _closed_form_loop("ntk_steps", f, inner_steps=inner_steps, inner_lr=inner_lr,
                           ridge=ridge, trace_axes=trace_axes, vmap_axes=vmap_axes,
                           implementation=implementation, query_kernel=query_kernel)


def ntk_ridge(f: ApplyFn, *, ridge: float = 1e-3, trace_axes: Axes = (-1,), vmap_axes: Any = 0,
              implementation: Union[NtkImplementation, int] = NtkImplementation.AUTO,
              query_kernel: str = "auto", **unused: Any) -> InnerLoop:
  """Kernel ridge regression with the empirical NTK (the t → ∞ / proximal limit).

  Args:
    ridge: ρ > 0, relative to mean(diag Θ_ss) (neural-tangents' `diag_reg`).
    Others as for `ntk_flow`; `inner_steps` / `inner_lr` are accepted and ignored, so that
    `make_inner_loop` can pass the same arguments to every loop.
  """
  unknown = set(unused) - {"inner_steps", "inner_lr"}
  if unknown:
    raise TypeError(f"ntk_ridge got unexpected arguments {sorted(unknown)}.")
  return _closed_form_loop("ntk_ridge", f, inner_steps=1, inner_lr=1., ridge=ridge,
                           trace_axes=trace_axes, vmap_axes=vmap_axes,
                           implementation=implementation, query_kernel=query_kernel)


_BUILDERS = {"maml": maml, "anil": anil, "ntk_flow": ntk_flow, "ntk_steps": ntk_steps,
             "ntk_ridge": ntk_ridge}


def make_inner_loop(name: str, f: ApplyFn, **kwargs: Any) -> InnerLoop:
  """The inner loop `name` (one of `INNER_LOOPS`) built with `kwargs`.

  Raises:
    ValueError: for an unknown `name`.
    TypeError: for an argument `name` does not take (a typo such as `inner_lrr`, or one of
      another loop such as `loss` for a closed form, whose inner loss is always MSE): passed
      on silently it would leave the loop other than asked for. `ntk_ridge` takes and ignores
      `inner_steps` and `inner_lr`.
  """
  if name not in _BUILDERS:
    raise ValueError(f"`inner` must be one of {INNER_LOOPS}, got {name!r}.")
  accepted = _accepted_arguments(name)
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    everything = set().union(*map(_accepted_arguments, INNER_LOOPS))

    def reason(k):
      owners = [n for n in INNER_LOOPS if k in _accepted_arguments(n)]
      if owners:
        return f"`{k}` is an argument of {', '.join(owners)}"
      close = difflib.get_close_matches(k, sorted(everything), n=1)
      return f"`{k}` is an argument of no inner loop" + (f" (`{close[0]}`?)" if close else "")

    reasons = "; ".join(map(reason, unknown))
    raise TypeError(f"make_inner_loop: {name} got unexpected arguments {unknown} ({reasons}); "
                    f"{name} takes {sorted(accepted)}.")
  return _BUILDERS[name](f, **kwargs)


def _accepted_arguments(name: str) -> set[str]:
  params = inspect.signature(_BUILDERS[name]).parameters
  accepted = {p for p, v in params.items() if p != "f" and v.kind != v.VAR_KEYWORD}
  if name == "ntk_ridge":
    accepted |= {"inner_steps", "inner_lr"}
  return accepted
