"""Shared set-up of the `ntk_dynamics.init` tests: a small tanh MLP on N random inputs."""
import jax
import jax.numpy as jnp
import numpy as np

import ntk_dynamics as nd
from ntk_dynamics import models

N, D, K = 10, 4, 3
# Jacobian contraction: the fastest to compile for these tiny models (AUTO is exercised by the
# matrix-free test and by `spectral_learning_rate`).
JC = dict(implementation=nd.NtkImplementation.JACOBIAN_CONTRACTION)


def make_model(activation="tanh", widths=(12, 12), b_std=0.0, w_std=1.0):
  return models.mlp(list(widths), K, activation=activation, w_std=w_std, b_std=b_std)


def make_setup():
  """(Haiku model, f, params, x) with x of shape (N, D), float64."""
  x = jax.random.normal(jax.random.PRNGKey(1), (N, D), jnp.float64)
  model = make_model()
  params = model.init(jax.random.PRNGKey(0), x)
  return model, nd.from_haiku(model), params, x


def dense_kernel(f, params, x, trace_axes=(-1,)):
  """Θ(x, x) as a 2-D matrix (the full kernel flattened example-major)."""
  k = nd.empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=0, **JC)(x, None, params)
  k = np.asarray(k)
  if k.ndim == 4:
    k = k.transpose(0, 2, 1, 3).reshape(k.shape[0] * k.shape[2], -1)
  return k
