"""Cost of one meta-step (meta-gradient + optimizer update) of an inner loop.

Memory is XLA's own account of the compiled step (`compiled.memory_analysis()`): temporary
bytes (activations and residuals kept for the backward pass, scratch space) are what grows
with the number of inner steps of an unrolled MAML and stays flat for the closed forms.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_dynamics.dynamics._inputs import check_int
from ntk_dynamics.meta import losses
from ntk_dynamics.meta.inner import InnerLoop
from ntk_dynamics.meta.train import _check_against_model, task_metrics_fn

PyTree = Any


def profile_meta_step(inner: InnerLoop, params: PyTree, batch: dict, *,
                      optimizer: Optional[optax.GradientTransformation] = None,
                      loss: Optional[str] = None, repeats: int = 5) -> dict:
  """Compiles and times one meta-step of `inner` on `batch`.

  Args:
    repeats: timed calls (>= 0) after one warm-up call; 0: compile and measure memory only,
      running nothing (then "step_s" and "loss" are NaN).

  Returns:
    {"compile_s": lowering + compilation time, "step_s": median wall time of `repeats`
     calls (NaN for repeats=0), "temp_bytes", "argument_bytes", "output_bytes",
     "generated_code_bytes": from XLA's memory analysis (None where the backend does not
     report them), "loss": the meta-loss (NaN for repeats=0)}.
  """
  repeats = check_int("profile_meta_step", "repeats", repeats, minimum=0)
  optimizer = optimizer if optimizer is not None else optax.adam(1e-3)
  classification, _ = _check_against_model(inner, params, batch)
  metrics = task_metrics_fn(inner, loss or losses.default_loss(inner.name, classification))

  def step(p, s, b):
    def objective(q):
      return jnp.mean(metrics(q, b)[0])
    value, grads = jax.value_and_grad(objective)(p)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  data = {"support": batch["support"], "query": batch["query"]}
  opt_state = optimizer.init(params)
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(params, opt_state, data).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  get = lambda name: None if mem is None else int(getattr(mem, name, 0) or 0)
  if repeats == 0:  # compile and memory only
    return {"compile_s": compile_s, "step_s": float("nan"),
            "temp_bytes": get("temp_size_in_bytes"),
            "argument_bytes": get("argument_size_in_bytes"),
            "output_bytes": get("output_size_in_bytes"),
            "generated_code_bytes": get("generated_code_size_in_bytes"), "loss": float("nan")}
  out = jax.block_until_ready(compiled(params, opt_state, data))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, opt_state, data))
    times.append(time.perf_counter() - t0)
  return {"compile_s": compile_s, "step_s": float(np.median(times)),
          "temp_bytes": get("temp_size_in_bytes"),
          "argument_bytes": get("argument_size_in_bytes"),
          "output_bytes": get("output_size_in_bytes"),
          "generated_code_bytes": get("generated_code_size_in_bytes"),
          "loss": float(out[2])}
