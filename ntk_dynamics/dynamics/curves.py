"""Predicted (NTK at initialization) against actual (optax) training curves.

Before training: `predict_curves` computes the empirical NTK at initialization,
Θ₀(train, train) and Θ₀(test, train), and runs the linearized dynamics of this package's
closed forms (nothing is re-derived here):

* MSE + `optax.sgd(η, momentum=m)`: `gradient_descent_mse_steps` — exact discrete steps (with
  heavy-ball momentum) of the linearized network;
* softmax cross-entropy: the ODE of `gradient_descent` (gradient flow, or the heavy-ball flow
  with momentum) at flow time τ = η t, an approximation of discrete steps whose error grows
  with η/η_max.

`train_curves` trains the same network from the same parameters with optax (full batch, or
minibatches whose noise the prediction does not model) and logs the same quantities at the
same steps; `compare_curves` does both and measures how far the prediction can be trusted
(`agreement_metrics`, `kernel_drift`, the stable-step ratio η/η_max).

Conventions are those of `ntk_dynamics.dynamics` (and neural-tangents):

* MSE: L = ‖f − y‖² / (2N), N = y_train.size, i.e. `0.5 * jnp.mean((fx - y) ** 2)` with
  one-hot targets; cross-entropy: `optax.softmax_cross_entropy(fx, y).mean()` (averaged over
  examples only). The optax update is v ← m v + ∇L, θ ← θ − η v.
* η_max = 2(1 + m) N / λ_max(Θ₀) (`max_learning_rate`): the largest stable step of the
  linearized MSE dynamics. For cross-entropy the same η_max is reported: at uniform softmax
  outputs the curvature of the loss in function space equals the MSE's (1/(nK) per output).
* Steps are optimizer steps; step 0 is the initialization (both curves start there exactly).

Everything runs in the dtype of the inputs and parameters (float32 unless `jax_enable_x64`
is on and float64 data are passed).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special

from ntk_dynamics.dynamics import ode
from ntk_dynamics.dynamics import mse
from ntk_dynamics.dynamics import stability
from ntk_dynamics.haiku import from_haiku
from ntk_dynamics.kernels import api as kernels_api
from ntk_dynamics.linearize import linearize

PyTree = Any
ApplyFn = Callable[..., jax.Array]
Axes = Union[int, Sequence[int]]

__all__ = ["Comparison", "Curves", "Prediction", "Training", "UntrustedPredictionWarning",
           "CURVE_COLUMNS", "LOSSES", "agreement_metrics", "compare_curves", "curve_rows",
           "kernel_drift", "log_steps", "predict_curves", "sgd_hyperparameters",
           "train_curves"]

# Thresholds of `compare_curves`' warnings.
DRIFT_THRESHOLD = 0.1
# Gradient descent on the MSE of a linearized model never raises the loss below η_max; a rise
# by this factor means the run diverged (or is in a catapult spike).
DIVERGENCE_FACTOR = 10.0
DEFAULT_LR_FRACTION = 0.5


class UntrustedPredictionWarning(UserWarning):
  """The NTK prediction of a training curve should not be trusted (see the message)."""


def mse_loss(fx: jax.Array, y: jax.Array) -> jax.Array:
  """0.5 · mean((f − y)²) over examples and outputs: the closed forms' normalisation."""
  return 0.5 * jnp.mean((fx - y) ** 2)


def xent_loss(fx: jax.Array, y: jax.Array) -> jax.Array:
  """Softmax cross-entropy averaged over examples."""
  return optax.softmax_cross_entropy(fx, y).mean()


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "mse": mse_loss, "xent": xent_loss}
_LOSS_ALIASES = {"cross_entropy": "xent", "softmax_cross_entropy": "xent"}


def _loss_name(loss: str) -> str:
  name = _LOSS_ALIASES.get(loss, loss) if isinstance(loss, str) else loss
  if name not in LOSSES:
    raise ValueError(f"`loss` must be one of {sorted(LOSSES)} (or 'cross_entropy'), got "
                     f"{loss!r}.")
  return name


# ----------------------------------------------------------------------------- containers


@dataclasses.dataclass(frozen=True)
class Curves:
  """Loss and accuracy at logged steps, and the outputs at the last one.

  Attributes:
    steps: (T,) int optimizer steps (0 = initialization).
    train_loss, test_loss: (T,) losses on the whole train / test set.
    train_accuracy, test_accuracy: (T,) argmax accuracies (NaN without class labels).
    fx_train, fx_test: outputs on x_train / x_test at `steps[-1]`.
  """
  steps: np.ndarray
  train_loss: np.ndarray
  test_loss: np.ndarray
  train_accuracy: np.ndarray
  test_accuracy: np.ndarray
  fx_train: np.ndarray
  fx_test: np.ndarray

  def __len__(self) -> int:
    return len(self.steps)


CURVE_KEYS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")
CURVE_COLUMNS = (("step",) + tuple(f"{kind}_{k}" for k in CURVE_KEYS
                                   for kind in ("predicted", "actual"))
                 + ("train_loss_rel_error", "test_loss_rel_error"))


@dataclasses.dataclass(frozen=True)
class Prediction:
  """What the NTK at initialization predicts, before any training.

  Attributes:
    curves: the predicted `Curves`.
    loss: "mse" or "xent".
    method: the dynamics used: "gradient_descent_mse_steps" (exact discrete steps of the
      linearized model) or "gradient_descent" (ODE flow, cross-entropy).
    learning_rate, momentum: η and m of `optax.sgd`.
    max_learning_rate: η_max = 2(1 + m)N/λ_max (`dynamics.max_learning_rate`).
    lambda_max: λ_max(Θ₀(train, train)).
    trace_axes: the kernels' trace_axes (() = the full kernel, exact).
    k_train_train: Θ₀(train, train), zipped layout ((n, n, K, K) full, (n, n) traced).
    fx_train_0, fx_test_0: outputs at initialization.
    seconds: wall time of the kernels and of the prediction.
  """
  curves: Curves
  loss: str
  method: str
  learning_rate: float
  momentum: float
  max_learning_rate: float
  lambda_max: float
  trace_axes: tuple
  k_train_train: Any
  fx_train_0: np.ndarray
  fx_test_0: np.ndarray
  seconds: dict

  @property
  def lr_ratio(self) -> float:
    """η/η_max: below 1 every linearized MSE mode converges; ≪ 1 is the flow regime."""
    return self.learning_rate / self.max_learning_rate


@dataclasses.dataclass(frozen=True)
class Training:
  """Curves of a network actually trained with optax, and its final parameters."""
  curves: Curves
  params: PyTree
  apply_fn: ApplyFn
  seconds: float


@dataclasses.dataclass(frozen=True)
class Comparison:
  """`compare_curves`' result: both curves, the agreement metrics and the warnings raised."""
  prediction: Prediction
  training: Training
  metrics: dict
  warnings: tuple[str, ...]

  @property
  def predicted(self) -> Curves:
    return self.prediction.curves

  @property
  def actual(self) -> Curves:
    return self.training.curves

  @property
  def trusted(self) -> bool:
    return not self.warnings

  def rows(self) -> list[list[float]]:
    """Rows of `CURVE_COLUMNS` (for a CSV file)."""
    return curve_rows(self.predicted, self.actual)


class _Data(NamedTuple):
  x_train: jax.Array
  y_train: jax.Array  # targets, shaped like the outputs
  labels_train: Optional[np.ndarray]
  x_test: jax.Array
  y_test: jax.Array
  labels_test: Optional[np.ndarray]


# ----------------------------------------------------------------------------- helpers


def log_steps(steps: int, num: int = 40) -> np.ndarray:
  """0 and about `num` log-spaced integer steps from 1 to `steps` (both included)."""
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
    raise ValueError(f"`steps` must be a positive integer, got {steps!r}.")
  if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num < 2:
    raise ValueError(f"`num` (log points) must be an integer >= 2, got {num!r}.")
  points = np.round(np.logspace(0, math.log10(steps), int(num))).astype(np.int64)
  return np.unique(np.concatenate([[0], points, [steps]]))


def _check_log_at(log_at: Any) -> np.ndarray:
  steps = np.asarray(log_at)
  if steps.ndim != 1 or steps.size == 0 or steps.dtype.kind not in "iu":
    raise ValueError(f"`log_at` must be a non-empty 1-D array of integer steps, got "
                     f"{steps.dtype} of shape {steps.shape}.")
  if steps[0] < 0 or np.any(np.diff(steps) <= 0):
    raise ValueError("`log_at` must be non-negative and strictly increasing.")
  if steps[0] != 0:
    # The initial losses, the divergence test and the loss deviations (relative to L(0)) are
    # read at the first logged step.
    raise ValueError(f"`log_at` must start at step 0 (the initialization); its first steps "
                     f"are {steps[:3].tolist()}.")
  return steps.astype(np.int64)


def _resolve_model(model: Any, params: Optional[PyTree], x: jax.Array,
                   seed: int) -> tuple[ApplyFn, PyTree]:
  if isinstance(model, hk.TransformedWithState):
    raise TypeError("compare_curves: stateful Haiku transforms are not supported; pass "
                    "`from_haiku(model, state=state)` and its params as an f + params pair.")
  if isinstance(model, hk.Transformed):
    f = from_haiku(model)
    if params is None:
      params = jax.jit(model.init)(jax.random.PRNGKey(seed), x[:1])
    return f, params
  if callable(model):
    if params is None:
      raise ValueError("`params` is required when `model` is a function f(params, x) "
                       "rather than a Haiku transform.")
    return model, params
  raise TypeError(f"`model` must be an hk.Transformed or a function f(params, x), got "
                  f"{type(model).__name__}.")


def _targets(name: str, y: Any, num_outputs: int, dtype) -> tuple[jax.Array, Optional[np.ndarray]]:
  y = np.asarray(y)
  if y.ndim == 1 and y.dtype.kind in "iu":
    if y.size and (y.min() < 0 or y.max() >= num_outputs):
      raise ValueError(f"`{name}` holds labels from {y.min()} to {y.max()}, but the model has "
                       f"{num_outputs} outputs.")
    return jnp.asarray(y[:, None] == np.arange(num_outputs), dtype), y.astype(np.int64)
  if y.ndim == 2 and y.shape[1] == num_outputs and y.dtype.kind == "f":
    labels = np.argmax(y, axis=1) if num_outputs > 1 else None
    return jnp.asarray(y, dtype), labels
  raise ValueError(f"`{name}` must be integer class labels (n,) or float targets (n, "
                   f"{num_outputs}), got {y.dtype} of shape {y.shape}.")


def _prepare(model: Any, data: Any, params: Optional[PyTree],
             seed: int) -> tuple[ApplyFn, PyTree, _Data, jax.Array, jax.Array]:
  if all(hasattr(data, a) for a in ("x_train", "y_train", "x_test", "y_test")):
    arrays = (data.x_train, data.y_train, data.x_test, data.y_test)
  elif isinstance(data, (tuple, list)) and len(data) == 4:
    arrays = tuple(data)
  else:
    raise TypeError("`data` must have attributes x_train, y_train, x_test, y_test (e.g. "
                    "tasks.Dataset) or be a tuple (x_train, y_train, x_test, y_test).")
  x_train, y_train, x_test, y_test = arrays
  x_train, x_test = jnp.asarray(x_train), jnp.asarray(x_test)
  if len(x_train) != len(y_train) or len(x_test) != len(y_test):
    raise ValueError(f"inputs and targets disagree in length: x_train {len(x_train)}, "
                     f"y_train {len(y_train)}, x_test {len(x_test)}, y_test {len(y_test)}.")
  f, params = _resolve_model(model, params, x_train, seed)
  apply = jax.jit(f)
  fx_train_0 = apply(params, x_train)
  fx_test_0 = apply(params, x_test)
  if not isinstance(fx_train_0, jax.Array) or fx_train_0.ndim != 2:
    raise ValueError(f"the model must return an (n, K) array of outputs, got "
                     f"{getattr(fx_train_0, 'shape', type(fx_train_0))}.")
  k, dtype = fx_train_0.shape[1], fx_train_0.dtype
  y_tr, l_tr = _targets("y_train", y_train, k, dtype)
  y_te, l_te = _targets("y_test", y_test, k, dtype)
  return f, params, _Data(x_train, y_tr, l_tr, x_test, y_te, l_te), fx_train_0, fx_test_0


def _accuracy(fx: np.ndarray, labels: Optional[np.ndarray]) -> np.ndarray:
  if labels is None:
    return np.full(fx.shape[:-2], np.nan)
  return np.mean(np.argmax(fx, axis=-1) == labels, axis=-1)


def _losses(loss: str, fx: np.ndarray, y: np.ndarray) -> np.ndarray:
  """`mse_loss` / `xent_loss` over a leading time axis, in float64 numpy (no compilation for
  every new number of logged steps): (T, n, K) -> (T,)."""
  fx = np.asarray(fx, np.float64)
  y = np.asarray(y, np.float64)
  if loss == "mse":
    return 0.5 * np.mean((fx - y) ** 2, axis=(-2, -1))
  log_softmax = fx - scipy.special.logsumexp(fx, axis=-1, keepdims=True)
  return -np.mean(np.sum(y * log_softmax, axis=-1), axis=-1)


def _curve_values(loss: str, fx_train: Any, fx_test: Any, data: _Data) -> dict[str, np.ndarray]:
  """Losses and accuracies of outputs with a leading time axis: (T, n, K) -> (T,) each."""
  fx_train, fx_test = np.asarray(fx_train), np.asarray(fx_test)
  return {"train_loss": _losses(loss, fx_train, data.y_train),
          "test_loss": _losses(loss, fx_test, data.y_test),
          "train_accuracy": _accuracy(fx_train, data.labels_train),
          "test_accuracy": _accuracy(fx_test, data.labels_test)}


def sgd_hyperparameters(optimizer: optax.GradientTransformation,
                        params: PyTree) -> tuple[float, float]:
  """Reads η and m from an optax optimizer that is heavy-ball SGD with a constant step.

  The optimizer is probed on scalar stand-ins with `params`' tree structure with the gradient
  sequence 1, 0, then arbitrary values: plain SGD answers −η, −ηm, and the heavy-ball
  recurrence afterwards; the same sequence scaled by 10⁶ must give updates scaled by 10⁶
  (clipping and adaptive steps fail that). A state holding a schedule (`ScaleByScheduleState`,
  or a schedule inside `inject_hyperparams`) is refused outright, since a probe of a few steps
  cannot see a later change. Anything else (Nesterov, weight decay, Adam...) fails the check:
  the closed forms model only `optax.sgd(η, momentum=m)`.

  Returns:
    (learning_rate, momentum).
  """
  grads = [1.0, 0.0, 0.37, -1.3, 2.1, 0.5, -0.8]
  scale = 1e6
  dtype = jnp.result_type(float)
  probe = jax.tree.map(lambda _: jnp.ones((), dtype), params)

  def run(factor: float) -> list[float]:
    state = optimizer.init(probe)
    if _holds_schedule(state):
      raise ValueError("its state holds a learning-rate schedule")
    updates, p = [], probe
    for g in grads:
      u, state = optimizer.update(
          jax.tree.map(lambda x: jnp.full((), factor * g, dtype), probe), state, p)
      p = optax.apply_updates(p, u)
      leaves = [float(v) for v in jax.tree.leaves(u)]
      if max(leaves) - min(leaves) > 1e-6 * max(1., max(abs(v) for v in leaves)):
        raise ValueError("the update differs between parameter leaves")
      updates.append(leaves[0])
    return updates

  try:
    updates, scaled = run(1.), run(scale)
  except Exception as e:  # noqa: BLE001 - reported with the reason
    raise ValueError(f"could not read a learning rate and momentum from `optimizer` "
                     f"({type(e).__name__}: {e}); the predictions model "
                     "optax.sgd(learning_rate, momentum) only.") from e
  if not np.allclose(scaled, scale * np.asarray(updates), rtol=1e-4,
                     atol=1e-7 * scale * max(abs(u) for u in updates)):
    raise ValueError(
        f"`optimizer`'s updates are not linear in the gradient (probe updates {updates}, "
        f"with gradients ×{scale:g}: {scaled}): clipping or adaptive steps; the predictions "
        "model optax.sgd(learning_rate, momentum) only.")
  lr = -updates[0]
  momentum = updates[1] / updates[0] if lr != 0 else 0.
  v, expected = 0., []
  for g in grads:
    v = momentum * v + g
    expected.append(-lr * v)
  ok = lr > 0 and 0 <= momentum < 1 and np.allclose(updates, expected, rtol=1e-4,
                                                       atol=1e-7 * abs(lr))
  if not ok:
    raise ValueError(
        f"`optimizer` is not heavy-ball SGD with a constant step (probe updates {updates}, "
        f"read η={lr:.6g}, m={momentum:.6g}); the predictions model optax.sgd(learning_rate, "
        "momentum) only (no Nesterov, schedules, weight decay, clipping or adaptive steps).")
  return float(lr), float(momentum)


def _holds_schedule(state: Any) -> bool:
  schedule_states = (optax.ScaleByScheduleState, optax.InjectStatefulHyperparamsState)
  nodes = jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, schedule_states))
  return any(isinstance(n, optax.ScaleByScheduleState)
             or (isinstance(n, optax.InjectStatefulHyperparamsState) and n.hyperparams_states)
             for n in nodes)


def _resolve_lr(learning_rate: Optional[float], lr_fraction: Optional[float],
                optimizer: Optional[optax.GradientTransformation], momentum: float,
                params: PyTree) -> tuple[Optional[float], Optional[float], float]:
  """(absolute η or None, fraction of η_max or None, momentum)."""
  given = sum(v is not None for v in (learning_rate, lr_fraction, optimizer))
  if given > 1:
    raise ValueError("give at most one of `learning_rate`, `lr_fraction` and `optimizer`.")
  if optimizer is not None:
    if momentum:
      raise ValueError("`momentum` is read from `optimizer`; do not pass both.")
    lr, momentum = sgd_hyperparameters(optimizer, params)
    return lr, None, momentum
  if not (isinstance(momentum, numbers.Real) and 0 <= momentum < 1):
    raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
  if learning_rate is not None:
    if not (isinstance(learning_rate, numbers.Real) and math.isfinite(learning_rate)
            and learning_rate > 0):
      raise ValueError(f"`learning_rate` must be a finite number > 0, got {learning_rate!r}.")
    return float(learning_rate), None, float(momentum)
  fraction = DEFAULT_LR_FRACTION if lr_fraction is None else lr_fraction
  if not (isinstance(fraction, numbers.Real) and math.isfinite(fraction) and fraction > 0):
    raise ValueError(f"`lr_fraction` must be a finite number > 0, got {lr_fraction!r}.")
  return None, float(fraction), float(momentum)


def _check_trace_axes(trace_axes: Axes) -> tuple:
  axes = (trace_axes,) if isinstance(trace_axes, numbers.Integral) else tuple(trace_axes)
  if axes == ():
    return ()
  if axes in ((-1,), (1,)):
    return (-1,)
  raise ValueError(f"`trace_axes` must be () (full kernel) or (-1,) (logit-traced kernel) "
                   f"for (n, K) outputs, got {trace_axes!r}.")


def _unstable_message(lr: float, lr_max: float, momentum: float, loss: str) -> str:
  what = ("the linearized MSE dynamics oscillate or diverge along the top NTK modes"
          if loss == "mse" else
          "at this step cross-entropy training is not in the small-step (flow) regime the "
          "ODE assumes")
  return (f"learning rate η={lr:.6g} is {lr / lr_max:.3g}·η_max, at or beyond the largest "
          f"stable step η_max = 2(1+m)N/λ_max = {lr_max:.6g} (m={momentum:g}): {what}, and "
          "the network is likely to leave the lazy (kernel) regime. Do not trust the "
          "predicted curve; use η ≤ 0.5·η_max.")


def _warn(message: str, collected: Optional[list]) -> None:
  warnings.warn(message, UntrustedPredictionWarning, stacklevel=3)
  if collected is not None:
    collected.append(message)


# ----------------------------------------------------------------------------- prediction


def _ntk_fn(f: ApplyFn, trace_axes: Axes, implementation, kernel_batch_size: Optional[int]):
  fn = kernels_api.empirical_ntk_fn(f, trace_axes=trace_axes, implementation=implementation)
  if kernel_batch_size is not None:
    from ntk_dynamics.kernels import blocks
    fn = blocks.batch(fn, kernel_batch_size)
  return fn


def _predict(f, params, data, fx_train_0, fx_test_0, *, loss, steps_at, learning_rate,
             lr_fraction, momentum, trace_axes, implementation, kernel_batch_size,
             collected) -> Prediction:
  t0 = time.perf_counter()
  ntk_fn = _ntk_fn(f, trace_axes, implementation, kernel_batch_size)
  k_train_train = jnp.asarray(ntk_fn(data.x_train, None, params))
  # Θ is symmetric; a kernel accumulated in float32 (e.g. float32 layers promoted to float64
  # outputs) is so only up to float32 rounding, which the closed forms' float64 check rejects.
  k_train_train = jax.block_until_ready(
      (k_train_train + k_train_train.transpose((1, 0, 3, 2)[:k_train_train.ndim])) / 2)
  k_test_train = jax.block_until_ready(ntk_fn(data.x_test, data.x_train, params))
  t1 = time.perf_counter()
  size = int(np.prod(data.y_train.shape))
  # Matrix-free (Lanczos): the closed form eigendecomposes Θ once more anyway, and a dense
  # eigvalsh of the (nK, nK) kernel would double the cost of the prediction.
  # The kernel is flattened to a matrix first: a transpose inside the jitted matvec would be
  # constant-folded by XLA at compile time (slow for large kernels).
  full = k_train_train.ndim == 4
  a = size if full else data.y_train.shape[0]
  matrix = (k_train_train.transpose(0, 2, 1, 3) if full else k_train_train).reshape(a, a)

  def matvec(v):
    return (matrix @ v.reshape(a, -1)).reshape(v.shape)

  if not full and data.y_train.shape[1] > 1:
    # λ_max(Θ_tr) ≤ λ_max(Θ): the traced kernel's step limit can exceed the real linearized
    # network's, so η_max comes from the full kernel, by NTK-vector products (never formed).
    matvec = kernels_api.ntk_vp_fn(f, data.x_train, None, params)

  # eps=0: a zero kernel gives η_max = inf and the error below, not a huge finite step.
  lr_max = float(stability.max_learning_rate(matvec, size, momentum,
                                             vector_shape=data.y_train.shape, eps=0.))
  lambda_max = 2. * (1. + momentum) * size / lr_max
  lr = learning_rate if learning_rate is not None else lr_fraction * lr_max
  if not lr_max > 0 or not math.isfinite(lr_max):
    raise ValueError(f"the NTK at initialization has λ_max = {lambda_max:.3g}; nothing trains.")
  unstable = lr >= lr_max
  if unstable:
    _warn(_unstable_message(lr, lr_max, momentum, loss), collected)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if loss == "mse":
      method = "gradient_descent_mse_steps"
      predict = mse.gradient_descent_mse_steps(k_train_train, data.y_train, lr,
                                               momentum=momentum, trace_axes=trace_axes)
      times = jnp.asarray(steps_at)
    else:
      method = "gradient_descent"
      predict = ode.gradient_descent(xent_loss, k_train_train, data.y_train, lr,
                                     momentum=momentum or None, trace_axes=trace_axes,
                                     rtol=1e-6, atol=1e-8)
      times = jnp.asarray(steps_at, fx_train_0.dtype)
    fx_train_t, fx_test_t = predict(times, fx_train_0, fx_test_0, k_test_train)
    fx_train_t, fx_test_t = jax.block_until_ready((fx_train_t, fx_test_t))
  for w in caught:  # the closed form's own instability warning repeats ours
    if not (unstable and issubclass(w.category, RuntimeWarning)):
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  values = _curve_values(loss, fx_train_t, fx_test_t, data)
  curves = Curves(steps=np.asarray(steps_at), fx_train=np.asarray(fx_train_t[-1]),
                  fx_test=np.asarray(fx_test_t[-1]), **values)
  seconds = {"kernel": t1 - t0, "predict": time.perf_counter() - t1}
  return Prediction(curves=curves, loss=loss, method=method, learning_rate=float(lr),
                    momentum=float(momentum), max_learning_rate=lr_max,
                    lambda_max=float(lambda_max), trace_axes=trace_axes,
                    k_train_train=k_train_train, fx_train_0=np.asarray(fx_train_0),
                    fx_test_0=np.asarray(fx_test_0), seconds=seconds)


def predict_curves(model: Any, data: Any, *, params: Optional[PyTree] = None,
                   steps: int = 1000, loss: str = "mse",
                   learning_rate: Optional[float] = None, lr_fraction: Optional[float] = None,
                   momentum: float = 0., optimizer: Optional[optax.GradientTransformation] = None,
                   log_points: int = 40, log_at: Optional[Sequence[int]] = None,
                   trace_axes: Axes = (),
                   implementation: kernels_api.NtkImplementation = (
                       kernels_api.NtkImplementation.AUTO),
                   kernel_batch_size: Optional[int] = None, seed: int = 0) -> Prediction:
  """Training curves predicted from the NTK at initialization, without training.

  Args:
    model: an `hk.Transformed` (params initialised from `seed` unless given) or a function
      `f(params, x) -> (n, K)` (then `params` is required).
    data: an object with x_train, y_train, x_test, y_test (e.g. `tasks.load_dataset(...)`)
      or such a 4-tuple. Targets are integer labels (one-hot encoded to K classes; gives
      accuracies) or float targets shaped like the outputs (MSE regression).
    params: initial parameters θ₀.
    steps: number of optimizer steps T.
    loss: "mse" (0.5·mean((f − y)²), one-hot targets) or "xent" (softmax cross-entropy).
    learning_rate: absolute step η. Or `lr_fraction`: η = fraction · η_max (default 0.5 when
      neither nor `optimizer` is given). Or `optimizer`: an optax `sgd` (any construction
      that behaves as heavy-ball SGD with a constant step; η and m are read by probing it).
    momentum: heavy-ball momentum m in [0, 1) of `optax.sgd(η, momentum=m)`.
    log_points: about how many log-spaced steps to report (plus 0 and T); or `log_at`, the
      exact increasing integer steps, starting at 0.
    trace_axes: () (default) uses the full (n, n, K, K) kernel, exact for the linearized
      network; (-1,) uses the logit-traced (n, n) kernel Θ ⊗ I, cheaper and exact only in
      the infinite-width limit (off-diagonal class blocks are dropped).
    implementation, kernel_batch_size: how the NTK is computed (`empirical_ntk_fn`'s
      implementation; blocks of that many examples with `kernels.batch` to bound memory).
    seed: PRNG seed of the Haiku initialization.

  Returns:
    A `Prediction`. Warns (`UntrustedPredictionWarning`) when η ≥ η_max.
  """
  loss = _loss_name(loss)
  trace_axes = _check_trace_axes(trace_axes)
  steps_at = _check_log_at(log_at) if log_at is not None else log_steps(steps, log_points)
  f, params, data_, fx_train_0, fx_test_0 = _prepare(model, data, params, seed)
  lr, fraction, momentum = _resolve_lr(learning_rate, lr_fraction, optimizer, momentum,
                                       params)
  return _predict(f, params, data_, fx_train_0, fx_test_0, loss=loss, steps_at=steps_at,
                  learning_rate=lr, lr_fraction=fraction, momentum=momentum,
                  trace_axes=trace_axes, implementation=implementation,
                  kernel_batch_size=kernel_batch_size, collected=None)


# ----------------------------------------------------------------------------- training


def _train(f, params, data, *, loss, steps_at, optimizer, batch_size, linearized, seed,
           progress, callback) -> Training:
  from tqdm.auto import tqdm

  # θ₀ enters the compiled steps as an argument: closed over, a linearized model's θ₀ would
  # be embedded in the program as constants (slow compiles, a second copy in memory).
  def apply_at(p0, p, x):
    return linearize(f, p0)(p, x) if linearized else f(p, x)

  loss_fn = LOSSES[loss]
  n = data.x_train.shape[0]
  if batch_size is not None and not (isinstance(batch_size, numbers.Integral)
                                     and 1 <= batch_size <= n):
    raise ValueError(f"`batch_size` must be an integer in [1, {n}] (n_train), got "
                     f"{batch_size!r}.")
  minibatch = batch_size is not None and batch_size < n

  def step_loss(p, p0, x, y):
    return loss_fn(apply_at(p0, p, x), y)

  @jax.jit
  def advance(p0, p, state, key, start, count, x, y):
    def body(i, carry):
      p, state = carry
      xb, yb = x, y
      if minibatch:
        idx = jax.random.choice(jax.random.fold_in(key, start + i), n, (batch_size,),
                                replace=False)
        xb, yb = x[idx], y[idx]
      grads = jax.grad(step_loss)(p, p0, xb, yb)
      updates, state = optimizer.update(grads, state, p)
      return optax.apply_updates(p, updates), state
    return jax.lax.fori_loop(0, count, body, (p, state))

  @jax.jit
  def outputs(p0, p, x_train, x_test):
    return apply_at(p0, p, x_train), apply_at(p0, p, x_test)

  key = jax.random.PRNGKey(seed)
  state = optimizer.init(params)
  p = params
  logged_train, logged_test, logged_steps = [], [], []
  t0 = time.perf_counter()
  chunk = max(1, int(steps_at[-1]) // 200)  # progress granularity
  done = 0
  with tqdm(total=int(steps_at[-1]), desc="training", unit="step", disable=not progress,
            leave=False, dynamic_ncols=True) as bar:
    for target in steps_at:
      while done < target:
        count = min(chunk, int(target) - done)
        p, state = advance(params, p, state, key, done, count, data.x_train, data.y_train)
        done += count
        bar.update(count)
      fx_tr, fx_te = outputs(params, p, data.x_train, data.x_test)
      logged_train.append(np.asarray(fx_tr))
      logged_test.append(np.asarray(fx_te))
      logged_steps.append(int(target))
      if callback is not None:
        callback(_stack_curves(loss, logged_steps, logged_train, logged_test, data))
      if progress:
        bar.set_postfix(train_loss=f"{float(_losses(loss, fx_tr, data.y_train)):.4g}")
  curves = _stack_curves(loss, logged_steps, logged_train, logged_test, data)
  apply_fn = linearize(f, params) if linearized else f
  return Training(curves=curves, params=jax.block_until_ready(p), apply_fn=apply_fn,
                  seconds=time.perf_counter() - t0)


def _stack_curves(loss, steps, fx_train, fx_test, data) -> Curves:
  values = _curve_values(loss, np.stack(fx_train), np.stack(fx_test), data)
  return Curves(steps=np.asarray(steps, np.int64), fx_train=np.asarray(fx_train[-1]),
                fx_test=np.asarray(fx_test[-1]), **values)


def train_curves(model: Any, data: Any, *, params: Optional[PyTree] = None,
                 steps: int = 1000, loss: str = "mse", learning_rate: Optional[float] = None,
                 momentum: float = 0., optimizer: Optional[optax.GradientTransformation] = None,
                 log_points: int = 40, log_at: Optional[Sequence[int]] = None,
                 batch_size: Optional[int] = None, linearized: bool = False, seed: int = 0,
                 progress: bool = True,
                 callback: Optional[Callable[[Curves], None]] = None) -> Training:
  """Trains the network with optax and logs the curves at the steps `predict_curves` uses.

  Args:
    model, data, params, steps, loss, log_points, log_at, seed: as for `predict_curves`
      (`seed` also seeds minibatch sampling).
    learning_rate, momentum: build `optax.sgd(learning_rate, momentum)`; or pass any
      `optimizer` (it is used as given; only `compare_curves` requires it to be SGD).
    batch_size: None (default) for full-batch steps; an int for minibatch SGD, each step on
      `batch_size` training examples drawn without replacement. The prediction is the
      full-batch dynamics: minibatch noise is not in it.
    linearized: train `linearize(f, θ₀)` instead of f. Its curves equal the closed forms
      (for MSE, up to rounding): a check of the pipeline, and the lazy-training ideal.
    progress: a tqdm progress bar over steps.
    callback: called with the `Curves` logged so far after every logged step (e.g. to write
      partial results).

  Returns:
    A `Training` (curves, final parameters, the apply function trained, wall time).
  """
  loss = _loss_name(loss)
  steps_at = _check_log_at(log_at) if log_at is not None else log_steps(steps, log_points)
  f, params, data_, _, _ = _prepare(model, data, params, seed)
  if optimizer is None:
    if learning_rate is None:
      raise ValueError("train_curves needs `learning_rate` or `optimizer`.")
    lr, _, momentum = _resolve_lr(learning_rate, None, None, momentum, params)
    optimizer = optax.sgd(lr, momentum=momentum or None)
  elif learning_rate is not None or momentum:
    # They would be ignored silently: the optimizer is used as given.
    raise ValueError("train_curves: give `learning_rate` (and `momentum`) or `optimizer`, "
                     "not both.")
  return _train(f, params, data_, loss=loss, steps_at=steps_at, optimizer=optimizer,
                batch_size=batch_size, linearized=linearized, seed=seed, progress=progress,
                callback=callback)


# ----------------------------------------------------------------------------- agreement


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.abs(a - b) / np.abs(b)


def _rms(x: np.ndarray) -> float:
  return float(np.sqrt(np.mean(np.square(x))))


def agreement_metrics(predicted: Curves, actual: Curves, *,
                      fx_train_0: Optional[np.ndarray] = None,
                      fx_test_0: Optional[np.ndarray] = None) -> dict[str, Any]:
  """How far a predicted curve is from the actual one, logged at the same steps.

  Returns a dict with, for split in (train, test):
    `{split}_loss_rel_error`: (T,) |L_pred − L_act| / L_act at every logged step;
    `max_{split}_loss_rel_error`, `final_{split}_loss_rel_error`;
    `max_{split}_loss_deviation`: max_t |L_pred(t) − L_act(t)| / L_act(0), the largest gap
      as a fraction of the initial loss (the headline fidelity figure);
    `{split}_output_rmse`: √mean((f_pred(T) − f_act(T))²) over examples and outputs at the
      last logged step; `{split}_output_rmse_relative`: the same divided by
      √mean((f_act(T) − f(0))²), the distance the outputs actually moved (needs fx_*_0);
    `final_{split}_accuracy_diff` and `max_{split}_accuracy_diff`: |acc_pred − acc_act|.
  """
  if not np.array_equal(predicted.steps, actual.steps):
    raise ValueError(f"predicted and actual curves are logged at different steps "
                     f"({len(predicted.steps)} vs {len(actual.steps)} points).")
  out: dict[str, Any] = {}
  for split, f0 in (("train", fx_train_0), ("test", fx_test_0)):
    lp = np.asarray(getattr(predicted, f"{split}_loss"), np.float64)
    la = np.asarray(getattr(actual, f"{split}_loss"), np.float64)
    rel = _rel(lp, la)
    out[f"{split}_loss_rel_error"] = rel
    out[f"max_{split}_loss_rel_error"] = float(np.max(rel))
    out[f"final_{split}_loss_rel_error"] = float(rel[-1])
    out[f"max_{split}_loss_deviation"] = float(np.max(np.abs(lp - la)) / abs(la[0]))
    fp = np.asarray(getattr(predicted, f"fx_{split}"), np.float64)
    fa = np.asarray(getattr(actual, f"fx_{split}"), np.float64)
    out[f"{split}_output_rmse"] = _rms(fp - fa)
    if f0 is not None:
      moved = _rms(fa - np.asarray(f0, np.float64))
      out[f"{split}_output_rmse_relative"] = (out[f"{split}_output_rmse"] / moved
                                              if moved > 0 else math.nan)
    ap = np.asarray(getattr(predicted, f"{split}_accuracy"), np.float64)
    aa = np.asarray(getattr(actual, f"{split}_accuracy"), np.float64)
    out[f"final_{split}_accuracy_diff"] = float(abs(ap[-1] - aa[-1]))
    out[f"max_{split}_accuracy_diff"] = float(np.max(np.abs(ap - aa)))
  return out


def kernel_drift(k_initial: Any, k_final: Any) -> float:
  """‖Θ_T − Θ₀‖_F / ‖Θ₀‖_F between two kernels of the same shape."""
  a, b = np.asarray(k_initial, np.float64), np.asarray(k_final, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"kernels of different shapes: {a.shape} and {b.shape}.")
  norm = np.linalg.norm(a.ravel())
  if norm == 0:
    raise ValueError("the initial kernel is zero; the relative drift is undefined.")
  return float(np.linalg.norm((b - a).ravel()) / norm)


def curve_rows(predicted: Curves, actual: Optional[Curves] = None) -> list[list[float]]:
  """Rows of `CURVE_COLUMNS`; steps `actual` has not reached yet (a partial run) are NaN."""
  rows = []
  m = 0 if actual is None else len(actual)
  for i, step in enumerate(predicted.steps):
    row: list[float] = [int(step)]
    for key in CURVE_KEYS:
      row.append(float(getattr(predicted, key)[i]))
      row.append(float(getattr(actual, key)[i]) if i < m else math.nan)
    for split in ("train", "test"):
      if i < m:
        a = float(getattr(actual, f"{split}_loss")[i])
        p = float(getattr(predicted, f"{split}_loss")[i])
        row.append(abs(p - a) / abs(a) if a else math.nan)
      else:
        row.append(math.nan)
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------- comparison


def compare_curves(model: Any, data: Any, *, params: Optional[PyTree] = None,
                   steps: int = 1000, loss: str = "mse",
                   learning_rate: Optional[float] = None, lr_fraction: Optional[float] = None,
                   momentum: float = 0., optimizer: Optional[optax.GradientTransformation] = None,
                   log_points: int = 40, log_at: Optional[Sequence[int]] = None,
                   trace_axes: Axes = (), batch_size: Optional[int] = None,
                   linearized: bool = False, drift_examples: Optional[int] = 128,
                   drift_threshold: float = DRIFT_THRESHOLD,
                   implementation: kernels_api.NtkImplementation = (
                       kernels_api.NtkImplementation.AUTO),
                   kernel_batch_size: Optional[int] = None, seed: int = 0,
                   progress: bool = True,
                   callback: Optional[Callable[[Curves, Curves], None]] = None) -> Comparison:
  """Predicts the training curves from the NTK at initialization, trains, and compares.

  Arguments are those of `predict_curves` and `train_curves`, plus:
    drift_examples: the NTK drift ‖Θ_T − Θ₀‖_F/‖Θ₀‖_F is measured on Θ(train, train) of the
      first `drift_examples` training points (None: all; the final kernel costs as much as
      the initial one on those points).
    drift_threshold: warn above this drift (default 0.1).
    callback: `callback(predicted, actual_so_far)` after every logged training step.

  Returns:
    A `Comparison`: `.predicted` and `.actual` `Curves`, `.metrics` (the `agreement_metrics`
    plus lr, lr_max, lr_ratio = η/η_max, lambda_max, ntk_drift, timings, ...), `.warnings`.

  Warns (`UntrustedPredictionWarning`, also listed in `.warnings` and `metrics["warnings"]`)
  when η ≥ η_max, when the NTK drifts by more than `drift_threshold`, or when training
  diverges. Minibatch noise (`batch_size`) is not modelled and is reported in the metrics.
  """
  loss = _loss_name(loss)
  trace_axes = _check_trace_axes(trace_axes)
  steps_at = _check_log_at(log_at) if log_at is not None else log_steps(steps, log_points)
  if not (isinstance(drift_threshold, numbers.Real) and drift_threshold > 0):
    raise ValueError(f"`drift_threshold` must be > 0, got {drift_threshold!r}.")
  if drift_examples is not None and not (isinstance(drift_examples, numbers.Integral)
                                         and drift_examples >= 1):
    raise ValueError(f"`drift_examples` must be a positive integer or None, got "
                     f"{drift_examples!r}.")
  f, params, data_, fx_train_0, fx_test_0 = _prepare(model, data, params, seed)
  lr, fraction, momentum = _resolve_lr(learning_rate, lr_fraction, optimizer, momentum,
                                       params)
  collected: list[str] = []
  prediction = _predict(f, params, data_, fx_train_0, fx_test_0, loss=loss,
                        steps_at=steps_at, learning_rate=lr, lr_fraction=fraction,
                        momentum=momentum, trace_axes=trace_axes,
                        implementation=implementation, kernel_batch_size=kernel_batch_size,
                        collected=collected)
  if optimizer is None:
    optimizer = optax.sgd(prediction.learning_rate, momentum=momentum or None)
  on_log = None if callback is None else (lambda part: callback(prediction.curves, part))
  training = _train(f, params, data_, loss=loss, steps_at=steps_at, optimizer=optimizer,
                    batch_size=batch_size, linearized=linearized, seed=seed,
                    progress=progress, callback=on_log)

  metrics = agreement_metrics(prediction.curves, training.curves,
                              fx_train_0=prediction.fx_train_0, fx_test_0=prediction.fx_test_0)
  train_loss = np.asarray(training.curves.train_loss, np.float64)
  if not (np.all(np.isfinite(train_loss))
          and np.all(np.isfinite(training.curves.test_loss))):
    _warn("training diverged (non-finite loss); the prediction is meaningless at this "
          f"learning rate (η/η_max = {prediction.lr_ratio:.3g}).", collected)
  elif np.max(train_loss) > DIVERGENCE_FACTOR * train_loss[0]:
    step = int(np.asarray(training.curves.steps)[np.argmax(train_loss)])
    _warn(f"training diverged: the training loss rose from {train_loss[0]:.4g} to "
          f"{np.max(train_loss):.4g} (step {step}), more than {DIVERGENCE_FACTOR:g}× its "
          f"initial value; the prediction is meaningless at this learning rate "
          f"(η/η_max = {prediction.lr_ratio:.3g}).", collected)

  t0 = time.perf_counter()
  d = data_.x_train.shape[0] if drift_examples is None else min(drift_examples,
                                                                  data_.x_train.shape[0])
  ntk_fn = _ntk_fn(training.apply_fn, prediction.trace_axes, implementation,
                   kernel_batch_size)
  drift = math.nan
  if np.all(np.isfinite(training.curves.train_loss)):
    k_final = ntk_fn(data_.x_train[:d], None, training.params)
    drift = kernel_drift(np.asarray(prediction.k_train_train)[:d, :d], k_final)
  drift_seconds = time.perf_counter() - t0
  if drift > drift_threshold:
    _warn(f"the NTK moved by ‖Θ_T − Θ₀‖_F/‖Θ₀‖_F = {drift:.3g} (> {drift_threshold:g}) "
          f"during training: the network left the lazy regime, so the prediction from Θ₀ "
          "is not reliable. Use a wider network, NTK parameterization or a smaller step.",
          collected)

  metrics.update({
      "loss": loss, "method": prediction.method, "steps": int(steps_at[-1]),
      "lr": prediction.learning_rate, "lr_max": prediction.max_learning_rate,
      "lr_ratio": prediction.lr_ratio, "momentum": momentum,
      "lambda_max": prediction.lambda_max,
      "kernel": "full" if prediction.trace_axes == () else f"traced {prediction.trace_axes}",
      "ntk_drift": drift, "drift_examples": int(d), "drift_threshold": float(drift_threshold),
      "linearized": bool(linearized),
      "batch_size": None if batch_size is None else int(batch_size),
      "minibatch_noise_modelled": False if batch_size is not None and
      batch_size < data_.x_train.shape[0] else None,
      "initial_train_loss": float(training.curves.train_loss[0]),
      "initial_test_loss": float(training.curves.test_loss[0]),
      "seconds": {**prediction.seconds, "train": training.seconds, "drift": drift_seconds},
      "n_train": int(data_.x_train.shape[0]), "n_test": int(data_.x_test.shape[0]),
      "num_outputs": int(data_.y_train.shape[1]),
      "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
      "trusted": not collected, "warnings": list(collected),
  })
  for kind, c in (("predicted", prediction.curves), ("actual", training.curves)):
    for key in CURVE_KEYS:
      metrics[f"final_{kind}_{key}"] = float(getattr(c, key)[-1])
  return Comparison(prediction=prediction, training=training, metrics=metrics,
                    warnings=tuple(collected))
