"""Task losses, targets and metrics shared by the inner and outer loops.

Conventions (the MAML ones, so `--inner-lr` means what it means in Finn et al. 2017):

* Regression: targets y of shape (n, D) (float); the loss is the mean squared error
  `mean((f − y)²)` over examples *and* outputs (no factor ½).
* Classification: integer labels y of shape (n,) in [0, K) with K the number of model
  outputs. `"xent"` is the mean softmax cross-entropy; `"mse"` is `mean((f − onehot(y))²)`
  over the n·K entries (the loss the closed-form NTK inner loops solve).

Whether a task is a classification task is read from the dtype of its labels (integer ->
classification), which is static under `jit`, so one inner loop serves both.

Shapes are checked (statically, so under `jit` too): integer labels must be (n,) for outputs
(n, K) (a (n, 1) column would broadcast to (n, n, K)), float targets (n, K) (or (n,) when
K = 1). Label values outside [0, K) would one-hot to zeros or index past the logits, so they
are refused where the labels are concrete (called eagerly); under `jit` they cannot be read,
which is why `meta_train` and `evaluate` check every task batch on the host first.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOSSES = ("mse", "xent")
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def is_classification(y: jax.Array) -> bool:
  """Integer labels mean classification, floating-point targets regression."""
  return jnp.issubdtype(jnp.result_type(y), jnp.integer)


def check_labels(fn: str, outputs: jax.Array, y: jax.Array) -> None:
  """Raises unless `y` fits `outputs` (n, K): integer labels (n,) in [0, K) (values checked
  only when concrete), or float targets (n, K) (or (n,) for K = 1)."""
  out_shape, y_shape = jnp.shape(outputs), jnp.shape(y)
  if len(out_shape) < 1:
    raise ValueError(f"{fn}: `outputs` must be (n, K) model outputs, got shape {out_shape}.")
  k = out_shape[-1]
  if not (is_classification(y) or jnp.issubdtype(jnp.result_type(y), jnp.floating)):
    raise ValueError(f"{fn}: labels `y` have dtype {jnp.result_type(y)}; integers (classes) "
                     "or floats (regression targets) are expected.")
  if is_classification(y):
    if y_shape != out_shape[:-1]:
      raise ValueError(f"{fn}: integer labels must have shape {out_shape[:-1]} (one class per "
                       f"row of the outputs {out_shape}), got {y_shape}.")
    if not isinstance(y, jax.core.Tracer) and np.size(y):
      values = np.asarray(y)
      if values.min() < 0 or values.max() >= k:
        raise ValueError(f"{fn}: labels must lie in [0, {k}) (the model's {k} outputs), got "
                         f"values from {values.min()} to {values.max()}: N-way tasks need a "
                         "model with N outputs.")
  elif y_shape != out_shape and not (k == 1 and y_shape == out_shape[:-1]):
    raise ValueError(f"{fn}: float targets must have the shape of the outputs {out_shape}"
                     f"{' or ' + str(out_shape[:-1]) if k == 1 else ''}, got {y_shape}.")


def regression_targets(y: jax.Array, outputs: jax.Array) -> jax.Array:
  """Targets as an array shaped like the model outputs: one-hot for integer labels."""
  check_labels("regression_targets", outputs, y)
  return _targets(y, outputs)


def _targets(y: jax.Array, outputs: jax.Array) -> jax.Array:
  if is_classification(y):
    return jax.nn.one_hot(y, outputs.shape[-1], dtype=outputs.dtype)
  return jnp.asarray(y, outputs.dtype).reshape(outputs.shape)


def mse(outputs: jax.Array, y: jax.Array) -> jax.Array:
  """`mean((f − y)²)` of outputs (n, K) and float targets (n, K) or integer labels (n,) in
  [0, K) (one-hot encoded)."""
  check_labels("mse", outputs, y)
  return jnp.mean((outputs - _targets(y, outputs)) ** 2)


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of logits (n, K) and integer labels (n,) in [0, K)."""
  if not is_classification(y):
    raise ValueError(f"cross-entropy needs integer class labels, got dtype {jnp.result_type(y)}.")
  check_labels("xent", logits, y)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def get_loss(name: str) -> LossFn:
  if name == "mse":
    return mse
  if name == "xent":
    return xent
  raise ValueError(f"`loss` must be one of {LOSSES}, got {name!r}.")


def default_loss(inner: str, classification: bool) -> str:
  """MSE for regression and for the closed forms; cross-entropy for MAML/ANIL classification."""
  if classification and inner in ("maml", "anil"):
    return "xent"
  return "mse"


def accuracy(outputs: jax.Array, y: jax.Array) -> jax.Array:
  """Fraction of argmax predictions of outputs (n, K) equal to integer labels (n,) in [0, K)
  (NaN for regression)."""
  if not is_classification(y):
    return jnp.asarray(jnp.nan, outputs.dtype)
  check_labels("accuracy", outputs, y)
  return jnp.mean((jnp.argmax(outputs, -1) == y).astype(outputs.dtype))
