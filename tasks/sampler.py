"""The task-batch convention and the sampler base shared by every task family.

A task is a dict pytree `{"support": (x, y), "query": (x, y), "info": {...}}` (the learn2learn /
torchmeta convention plus an `info` dict of per-task metadata). A batch stacks tasks over a
leading meta-batch axis B on every leaf, so `jax.vmap` over a batch maps over its tasks. Arrays are
numpy (jax functions take them as they are).
"""
from __future__ import annotations

import abc
import numbers
from typing import Any, Sequence

import numpy as np

from tasks._common import KeyOrSeed, as_generator, check_positive_int

TaskBatch = dict[str, Any]
# A task's random choices (e.g. class and example indices), each with a leading task axis.
TaskSpec = dict[str, np.ndarray]


class TaskSampler(abc.ABC):
  """Draws batches of tasks, either endlessly or from a fixed pool of pre-drawn tasks.

  Subclasses describe tasks by small specs (`_draw`) and turn specs into task arrays (`_build`),
  so a pool stores specs only (a pool of 10⁵ image tasks holds indices, not images) and both
  modes share one code path; `_settings` lists what else decides the tasks (for `describe`).
  """

  def __init__(self, *, num_tasks: int | None, pool_seed: int) -> None:
    # Subclasses call this last: drawing the pool needs their fully set-up state.
    if num_tasks is None:
      self._pool = None
      self._pool_seed = None
    else:
      size = check_positive_int("num_tasks", num_tasks)
      # An int only (not a JAX key, which `as_generator` would take): `describe` records it.
      if isinstance(pool_seed, bool) or not isinstance(pool_seed, numbers.Integral):
        raise ValueError(f"`pool_seed` must be a non-negative int seed, got "
                         f"{type(pool_seed).__name__} {pool_seed!r}.")
      self._pool = self._draw(as_generator(pool_seed, "pool_seed"), size)
      self._pool_seed = int(pool_seed)

  @property
  def num_tasks(self) -> int | None:
    """Size of the fixed task pool, or None when every batch draws fresh tasks."""
    return None if self._pool is None else len(next(iter(self._pool.values())))

  def sample(self, key_or_seed: KeyOrSeed, meta_batch_size: int) -> TaskBatch:
    """A batch of `meta_batch_size` tasks; the same key or seed always gives the same batch.

    Args:
      key_or_seed: int seed >= 0 or a single JAX PRNG key.
      meta_batch_size: number of tasks B >= 1.

    Returns:
      A task batch (see the subclass for shapes). With a pool, its tasks are drawn uniformly
      with replacement from the pool; otherwise they are fresh independent tasks.
    """
    rng = as_generator(key_or_seed)
    size = check_positive_int("meta_batch_size", meta_batch_size)
    if self._pool is None:
      return self._build(self._draw(rng, size))
    return self._build(_take(self._pool, rng.integers(0, self.num_tasks, size=size)))

  def describe(self) -> dict[str, Any]:
    """The settings that decide which tasks this sampler draws, as a JSON-serialisable dict
    ({"type", "num_tasks", "pool_seed", ...the subclass's settings}): two samplers with equal
    descriptions draw the same tasks from the same seeds. `ntk_dynamics.meta` stores it in
    checkpoints, so that a run is not resumed on other tasks."""
    return {"type": type(self).__name__, "num_tasks": self.num_tasks,
            "pool_seed": self._pool_seed, **self._settings()}

  def pool_batch(self, indices: Sequence[int] | np.ndarray) -> TaskBatch:
    """The pool's tasks at `indices` (e.g. `range(num_tasks)` to evaluate on the whole pool)."""
    if self._pool is None:
      raise ValueError("`pool_batch` needs a fixed task pool; this sampler was built with "
                       "num_tasks=None.")
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
      raise ValueError(f"`indices` must be a non-empty 1-D sequence of ints, got shape "
                       f"{idx.shape} and dtype {idx.dtype}.")
    if idx.min() < 0 or idx.max() >= self.num_tasks:
      raise ValueError(f"`indices` must lie in [0, {self.num_tasks}) (the pool size), got values "
                       f"from {idx.min()} to {idx.max()}.")
    return self._build(_take(self._pool, idx))

  def _settings(self) -> dict[str, Any]:
    """The subclass's part of `describe` (JSON-serialisable values). A subclass that does not
    override it is described by its type and pool only, so resuming cannot tell its other
    settings apart."""
    return {}

  @abc.abstractmethod
  def _draw(self, rng: np.random.Generator, num: int) -> TaskSpec:
    """Specs of `num` independent random tasks."""

  @abc.abstractmethod
  def _build(self, spec: TaskSpec) -> TaskBatch:
    """The task batch described by `spec`."""


def _take(spec: TaskSpec, idx: np.ndarray) -> TaskSpec:
  return {name: value[idx] for name, value in spec.items()}
