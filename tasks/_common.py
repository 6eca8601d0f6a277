"""Seeding and argument checks shared by the task sources.

Every random choice in `tasks` goes through a `numpy.random.Generator` made here from an int seed
or a JAX PRNG key, so the same seed or key always gives the same tasks.
"""
from __future__ import annotations

import numbers
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

# An int seed (>= 0) or a single JAX PRNG key (typed `jax.random.key` or raw `PRNGKey` uint32).
KeyOrSeed = Union[int, jax.Array]


def as_generator(key_or_seed: KeyOrSeed, name: str = "key_or_seed") -> np.random.Generator:
  """A numpy Generator seeded from an int seed or from the bits of a single JAX PRNG key."""
  if isinstance(key_or_seed, numbers.Integral) and not isinstance(key_or_seed, bool):
    if key_or_seed < 0:
      raise ValueError(f"`{name}` must be a non-negative int seed, got {key_or_seed}.")
    return np.random.default_rng(int(key_or_seed))
  if isinstance(key_or_seed, jax.Array):
    is_typed = jnp.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key)
    bits = np.asarray(jax.random.key_data(key_or_seed) if is_typed else key_or_seed)
    # Batched keys would silently seed from all their bits; ask for one key instead.
    if bits.dtype != np.uint32 or bits.ndim != 1:
      raise ValueError(f"`{name}` must be a single JAX PRNG key; got an array of dtype "
                       f"{key_or_seed.dtype} and shape {key_or_seed.shape}.")
    return np.random.default_rng(bits)
  raise ValueError(f"`{name}` must be an int seed or a JAX PRNG key, got "
                   f"{type(key_or_seed).__name__}.")


def check_positive_int(name: str, value: Any) -> int:
  """Returns `value` as an int, or raises if it is not an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  return int(value)


def sample_ordered_subsets(rng: np.random.Generator, sizes: np.ndarray, k: int) -> np.ndarray:
  """Row r: `k` distinct ints from [0, sizes[r]) in uniformly random order.

  Every ordered k-subset is equally likely. Vectorized Floyd's algorithm (uniform unordered
  subset) followed by a random shuffle of each row: O(rows·k²) time and O(rows·k) memory, however
  large `sizes` is (a class of 7000 MNIST digits costs as much as one of 20 Omniglot drawings).

  Args:
    rng: source of randomness.
    sizes: (rows,) int array, each >= k (checked by the callers, who know what the sizes mean).
    k: subset size >= 1.

  Returns:
    (rows, k) int64 array.
  """
  sizes = np.asarray(sizes, dtype=np.int64)
  chosen = np.empty((sizes.shape[0], k), dtype=np.int64)
  for i in range(k):
    top = sizes - k + i
    draw = rng.integers(0, top + 1)
    taken = np.any(chosen[:, :i] == draw[:, None], axis=1)
    chosen[:, i] = np.where(taken, top, draw)
  order = np.argsort(rng.random(chosen.shape), axis=1)
  return np.take_along_axis(chosen, order, axis=1)
