"""Sinusoid regression tasks as in MAML (Finn et al., 2017, section 5.1).

Each task is y = A·sin(x − φ) with amplitude A ~ U[0.1, 5], phase φ ~ U[0, π] and inputs
x ~ U[−5, 5] (the ranges of the MAML code), observed at `k_shot` support and `k_query` query
points drawn independently from the same sine.
"""
from __future__ import annotations

import numbers

import numpy as np

from tasks._common import check_positive_int
from tasks.sampler import TaskBatch, TaskSampler, TaskSpec

MAML_AMPLITUDE_RANGE = (0.1, 5.0)
MAML_PHASE_RANGE = (0.0, float(np.pi))
MAML_X_RANGE = (-5.0, 5.0)


class SinusoidSampler(TaskSampler):
  """K-shot sinusoid regression tasks.

  A batch of B tasks is
    {"support": (x, y), "query": (x_q, y_q), "info": {"amplitude": A, "phase": phi}}
  with x, y of shape (B, k_shot, 1), x_q, y_q of shape (B, k_query, 1), A and phi of shape (B,),
  all float32, and y == A[:, None, None] * np.sin(x - phi[:, None, None]) evaluated in float32 on
  exactly the stored (float32) x, A and phi.

  Args:
    k_shot: support points per task (K), >= 1.
    k_query: query points per task; None means `k_shot`, as in MAML (which draws 2K points and
      splits them in halves).
    amplitude_range, phase_range, x_range: (low, high) of the uniform distributions of A, φ and x;
      the defaults are MAML's.
    num_tasks: size of a fixed pool of tasks drawn once from `pool_seed`; None for endless
      sampling.
    pool_seed: seed of the pool (unused when `num_tasks` is None).
  """

  def __init__(self, k_shot: int = 10, k_query: int | None = None, *,
               amplitude_range: tuple[float, float] = MAML_AMPLITUDE_RANGE,
               phase_range: tuple[float, float] = MAML_PHASE_RANGE,
               x_range: tuple[float, float] = MAML_X_RANGE,
               num_tasks: int | None = None, pool_seed: int = 0) -> None:
    self.k_shot = check_positive_int("k_shot", k_shot)
    self.k_query = self.k_shot if k_query is None else check_positive_int("k_query", k_query)
    self.amplitude_range = _check_range("amplitude_range", amplitude_range)
    self.phase_range = _check_range("phase_range", phase_range)
    self.x_range = _check_range("x_range", x_range)
    super().__init__(num_tasks=num_tasks, pool_seed=pool_seed)

  def _settings(self) -> dict:
    return {"k_shot": self.k_shot, "k_query": self.k_query,
            "amplitude_range": list(self.amplitude_range),
            "phase_range": list(self.phase_range), "x_range": list(self.x_range)}

  def _draw(self, rng: np.random.Generator, num: int) -> TaskSpec:
    uniform = lambda bounds, shape: rng.uniform(*bounds, size=shape).astype(np.float32)
    return {"amplitude": uniform(self.amplitude_range, (num,)),
            "phase": uniform(self.phase_range, (num,)),
            "x_support": uniform(self.x_range, (num, self.k_shot, 1)),
            "x_query": uniform(self.x_range, (num, self.k_query, 1))}

  def _build(self, spec: TaskSpec) -> TaskBatch:
    amplitude = spec["amplitude"][:, None, None]
    phase = spec["phase"][:, None, None]
    sine = lambda x: amplitude * np.sin(x - phase)
    return {"support": (spec["x_support"], sine(spec["x_support"])),
            "query": (spec["x_query"], sine(spec["x_query"])),
            "info": {"amplitude": spec["amplitude"], "phase": spec["phase"]}}


def _check_range(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
  if (not isinstance(bounds, (tuple, list)) or len(bounds) != 2
      or not all(isinstance(b, numbers.Real) and np.isfinite(b) for b in bounds)
      or not bounds[0] < bounds[1]):
    raise ValueError(f"`{name}` must be a pair (low, high) of finite numbers with low < high, "
                     f"got {bounds!r}.")
  return float(bounds[0]), float(bounds[1])
