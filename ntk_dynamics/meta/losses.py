"""Task losses, targets and metrics shared by the inner and outer loops.

Conventions (the MAML ones, so `--inner-lr` means what it means in Finn et al. 2017):

* Regression: targets y of shape (n, D) (float); the loss is the mean squared error
  `mean((f − y)²)` over examples *and* outputs (no factor ½).
* Classification: integer labels y of shape (n,) in [0, K) with K the number of model
  outputs. `"xent"` is the mean softmax cross-entropy; `"mse"` is `mean((f − onehot(y))²)`
  over the n·K entries (the loss the closed-form NTK inner loops solve).

Whether a task is a classification task is read from the dtype of its labels (integer ->
classification), which is static under `jit`, so one inner loop serves both.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LOSSES = ("mse", "xent")
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def is_classification(y: jax.Array) -> bool:
  """Integer labels mean classification, floating-point targets regression."""
  return jnp.issubdtype(jnp.result_type(y), jnp.integer)


def regression_targets(y: jax.Array, outputs: jax.Array) -> jax.Array:
  """Targets as an array shaped like the model outputs: one-hot for integer labels."""
  if is_classification(y):
    return jax.nn.one_hot(y, outputs.shape[-1], dtype=outputs.dtype)
  return jnp.asarray(y, outputs.dtype).reshape(outputs.shape)


def mse(outputs: jax.Array, y: jax.Array) -> jax.Array:
  """`mean((f − y)²)`, with y one-hot encoded if it holds integer labels."""
  return jnp.mean((outputs - regression_targets(y, outputs)) ** 2)


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of integer labels."""
  if not is_classification(y):
    raise ValueError(f"cross-entropy needs integer class labels, got dtype {jnp.result_type(y)}.")
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
  """Fraction of argmax predictions equal to the labels (NaN for regression)."""
  if not is_classification(y):
    return jnp.asarray(jnp.nan, outputs.dtype)
  return jnp.mean((jnp.argmax(outputs, -1) == y).astype(outputs.dtype))
