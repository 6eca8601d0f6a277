"""Measurement protocol shared by both workers (this project's and the neural-tangents peer's).

Importable under JAX 0.4.25 and 0.10: stdlib, numpy and basic jax only.

A worker process performs exactly one measurement, so its peak resident set size is that
measurement's own peak, plus the interpreter/JAX runtime baseline (reported separately as
`baseline_rss_mb`: VmRSS after imports and after loading params and inputs, before the kernel
function is built).

The peak is VmHWM from /proc/self/status (the high-water mark of this process's own address
space). `ru_maxrss` is recorded too but is NOT used: on Linux it survives execve, so a worker
started by a large parent reports at least the parent's RSS (subprocess uses vfork, and exec
folds the parent's high-water mark into the child's `ru_maxrss`).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback

RESULT_MARK = "@@RESULT "

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_mb(field: str) -> float:
  with open("/proc/self/status") as fh:
    for line in fh:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def current_rss_mb() -> float:
  """VmRSS of this process now, in MiB."""
  return _status_mb("VmRSS")


def peak_rss_mb() -> float:
  """VmHWM: peak RSS of this process's own address space so far, in MiB."""
  return _status_mb("VmHWM")


def ru_maxrss_mb() -> float:
  """getrusage's ru_maxrss in MiB (Linux: KiB); inflated by the parent's RSS, see above."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_calls(call, repeats: int, budget_s: float = float("inf"), min_total_s: float = 1.0,
                max_calls: int = 200):
  """First call (compile + run), then timed calls, each to block_until_ready: at least
  `repeats`, and more (up to `max_calls`) until they add up to `min_total_s`, because the
  median of five 20 ms calls still moves by tens of percent with the OS scheduler. Stops
  early (never before one timed call) when another call would take the timed calls past
  `budget_s` seconds; the caller reports how many ran."""
  import jax
  t0 = time.perf_counter()
  out = jax.block_until_ready(call())
  first = time.perf_counter() - t0
  times = []
  while len(times) < max(repeats, 1) or (sum(times) < min_total_s and
                                         len(times) < max_calls):
    t0 = time.perf_counter()
    out = jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
    if sum(times) + times[-1] > budget_s:
      break
  return out, first, times


def load_case(case_dir: str):
  import numpy as np
  import models
  params = models.load_params(os.path.join(case_dir, "params.npz"))
  x1 = np.load(os.path.join(case_dir, "x1.npy"))
  x2 = np.load(os.path.join(case_dir, "x2.npy"))
  return params, x1, x2


def trace_axes(kind: str):
  return () if kind == "full" else (-1,)


def run_measurement(spec: dict, build_fn) -> dict:
  """Loads the case, builds `ntk_fn = build_fn(f, spec)`, times it, saves the kernel.

  `build_fn(apply, spec)` returns (ntk_fn, info dict). Exceptions are classified: a
  NotImplementedError is status "n/a"; anything else "error" (with the traceback tail).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import models

  res = {"status": "error"}
  try:
    params, x1, x2 = load_case(spec["case_dir"])
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    apply = models.transform(spec["model"], spec["cfg"]).apply
    res["baseline_rss_mb"] = current_rss_mb()
    ntk_fn, info = build_fn(apply, spec)
    res.update(info)
    out, first, times = timed_calls(lambda: ntk_fn(x1, x2, params), spec["repeats"],
                                    spec.get("budget_s", float("inf")))
    res.update(info)  # build_fn may fill `info` lazily during the first call
    out = np.asarray(out)
    res.update(status="ok", first_call_s=first, times_s=times,
               median_s=statistics.median(times) if times else first,
               kernel_shape=list(out.shape), kernel_dtype=str(out.dtype),
               kernel_finite=bool(np.isfinite(out).all()))
    if spec.get("kernel_out"):
      tmp = spec["kernel_out"] + ".tmp.npy"
      np.save(tmp, out)
      os.replace(tmp, spec["kernel_out"])
      res["kernel_path"] = spec["kernel_out"]
  except NotImplementedError as e:
    res.update(status="n/a", message=f"NotImplementedError: {e}")
  except Exception as e:  # reported, never fatal to the benchmark
    tb = traceback.format_exc()
    res.update(status="error", message=f"{type(e).__name__}: {e}"[:2000],
               traceback=tb[-4000:])
  res["peak_rss_mb"] = peak_rss_mb()
  res["ru_maxrss_mb"] = ru_maxrss_mb()
  res["jax_version"] = jax.__version__
  return res


def emit(result: dict) -> None:
  sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
  sys.stdout.flush()


def worker_main(build_fn, extra_tasks=None) -> None:
  """`python X_worker.py SPEC_JSON`: one measurement, result printed as one marked line."""
  sys.path.insert(0, HERE)
  spec = json.loads(sys.argv[1])
  task = spec.get("task", "ntk")
  if extra_tasks and task in extra_tasks:
    emit(extra_tasks[task](spec))
  else:
    emit(run_measurement(spec, build_fn))


def matmul_peak(spec: dict) -> dict:
  """float32 GEMM throughput of jnp.dot on square matrices: best of `repeats` per size."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  out = {"status": "ok", "sizes": {}}
  f = jax.jit(jnp.dot)
  for n in spec["sizes"]:
    rng = np.random.default_rng(n)
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    _, first, times = timed_calls(lambda: f(a, b), spec["repeats"])
    flops = 2.0 * n ** 3
    out["sizes"][str(n)] = {"median_s": statistics.median(times), "best_s": min(times),
                            "gflops_median": flops / statistics.median(times) / 1e9,
                            "gflops_best": flops / min(times) / 1e9}
  out["peak_gflops"] = max(v["gflops_median"] for v in out["sizes"].values())
  out["peak_rss_mb"] = peak_rss_mb()
  out["jax_version"] = jax.__version__
  out["devices"] = [str(d) for d in jax.devices()]
  return out
