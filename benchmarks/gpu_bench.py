"""Checks and times this project's empirical NTK on one accelerator, in one process.

    python benchmarks/gpu_bench.py --out DIR [--quick] [--models mlp,cnn] [--with-vp]

Made for a short lease of a GPU (see `benchmarks/gpu_run.sh`, which installs the carried
Haiku wheels first), where neural-tangents cannot be installed beside current JAX with
CUDA 13: the comparison is against the FLOP floor (`flops.py`) and the measured matmul rate.
It runs on CPU too (that is how it is tested).

For every benchmark model (`models.py`) and kernel (full, traced) it measures our defaults,
STRUCTURED_DERIVATIVES, AUTO and JACOBIAN_CONTRACTION (vmap_axes=0; NTK-vector products with
--with-vp) under the default matmul precision (TF32 on NVIDIA GPUs for float32), and the
defaults again under `jax.default_matmul_precision("highest")`:
  * time: first call (trace + compile + run) and the median of timed calls (at least 5, more until
    they add up to 1 s, at most 200), each to `block_until_ready`;
  * XLA's memory of the compiled call (`memory_analysis()`: arguments + temporaries + output);
  * agreement: max |Θ - Θ_ref| / max |Θ_ref| against Jacobian contraction at "highest";
  * the floor: floor FLOPs / time, against the measured matmul rate at the same precision.

Every finished measurement is appended to DIR/gpu_results.jsonl (a rerun with the same DIR
skips what is there), and DIR/GPU_RESULTS.md is rewritten atomically after each one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
import flops  # noqa: E402
import models  # noqa: E402

CONFIGS = (("DEFAULTS", None), ("STRUCTURED_DERIVATIVES", 0), ("AUTO", 0),
           ("JACOBIAN_CONTRACTION", 0))
SHORT = {"DEFAULTS": "defaults", "STRUCTURED_DERIVATIVES": "SD", "AUTO": "AUTO",
         "JACOBIAN_CONTRACTION": "JC", "NTK_VECTOR_PRODUCTS": "VP"}


def matmul_rate(precision: str, n: int) -> float:
  """FLOP/s of one float32 n×n matmul under `precision`: best of 5 after a warm-up."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  with jax.default_matmul_precision(precision):
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a, a))
      best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def kernel_fn(model: str, cfg: dict, kind: str, impl: str, vmap):
  import ntk_dynamics as nd
  f = nd.from_haiku(models.transform(model, cfg))
  trace = () if kind == "full" else (-1,)
  if impl == "DEFAULTS":
    return nd.empirical_ntk_fn(f, trace_axes=trace)
  return nd.empirical_ntk_fn(f, trace_axes=trace, vmap_axes=vmap,
                             implementation=nd.NtkImplementation[impl])


def measure(model: str, cfg: dict, kind: str, impl: str, vmap, precision: str) -> dict:
  import jax
  import numpy as np
  params = models.init_params(model, cfg)
  x1, x2 = (jax.device_put(x) for x in models.make_inputs(model, cfg))
  fn = kernel_fn(model, cfg, kind, impl, vmap)
  with jax.default_matmul_precision(precision):
    t0 = time.perf_counter()
    compiled = jax.jit(lambda a, b, p: fn(a, b, p)).lower(x1, x2, params).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    # The compiled call itself is timed: compiling `fn` again would spend lease time twice.
    out, first, times = common.timed_calls(lambda: compiled(x1, x2, params), 5,
                                           budget_s=60.0)
  nbytes = None
  if mem is not None:
    nbytes = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes +
                 mem.output_size_in_bytes)
  return {"median_s": statistics.median(times), "first_call_s": compile_s + first,
          "calls": len(times),
          "xla_bytes": nbytes, "kernel": np.asarray(out, np.float64)}


def fmt_s(t):
  if t is None:
    return "–"
  return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def report(records: list, rates: dict, device: str, jax_version: str) -> str:
  lines = ["# Empirical NTK on an accelerator (ntk_dynamics only)\n",
           f"- device: {device}; JAX {jax_version}; "
           f"{time.strftime('%Y-%m-%dT%H:%M:%S')}",
           "- command: `python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:]) + "`",
           "- matmul rate, float32 n×n: " + ", ".join(
               f"{p}: {r / 1e12:.1f} TFLOP/s" for p, r in rates.items()),
           "- floor: `benchmarks/flops.py` (FLOPs of the cheapest known exact algorithm); "
           "floor FLOP/s = floor FLOPs / median time, to compare with the matmul rate\n",
           "| model | kernel | config | precision | median | first call | XLA memory "
           "| floor FLOP/s | × floor time | rel. err vs JC highest |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    if r.get("status") != "ok":
      lines.append(f"| {r['model']} | {r['kind']} | {r['config']} | {r['precision']} | "
                   f"**{r.get('status')}**: {r.get('message', '')[:100]} | | | | | |")
      continue
    rate = rates.get(r["precision"])
    fps = r["floor_flops"] / r["median_s"]
    err = r.get("rel_err")
    lines.append(
        f"| {r['model']} | {r['kind']} | {r['config']} | {r['precision']} | "
        f"{fmt_s(r['median_s'])} | {fmt_s(r['first_call_s'])} | "
        f"{(r['xla_bytes'] or 0) / 2**20:.0f} MiB | {fps / 1e12:.2f} TFLOP/s | "
        f"{(rate / fps) if rate else float('nan'):.2f}× | "
        f"{'–' if err is None else f'{err:.1e}'} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
  p.add_argument("--models", default=",".join(models.MODEL_NAMES))
  p.add_argument("--kinds", default="full,traced")
  p.add_argument("--with-vp", action="store_true", help="also NTK-vector products")
  args = p.parse_args(argv)
  import jax
  import numpy as np

  os.makedirs(args.out, exist_ok=True)
  jsonl = os.path.join(args.out, "gpu_results.jsonl")
  done = {}
  if os.path.exists(jsonl):
    with open(jsonl) as fh:
      for line in fh:
        try:
          r = json.loads(line)
          done[r["key"]] = r
        except (json.JSONDecodeError, KeyError):
          continue
  dev = jax.devices()[0]
  device = f"{dev.platform}: {getattr(dev, 'device_kind', '?')} ×{jax.device_count()}"
  size = 1024 if args.quick else 8192
  rates = {prec: matmul_rate(prec, size) for prec in ("default", "highest")}
  print(f"{device}; matmul " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s"
                                         for k, v in rates.items()), flush=True)
  configs = list(CONFIGS) + ([("NTK_VECTOR_PRODUCTS", 0)] if args.with_vp else [])
  table = models.QUICK_CONFIGS if args.quick else models.CONFIGS
  records = list(done.values())

  def write():
    text = report(records, rates, device, jax.__version__)
    tmp = os.path.join(args.out, "GPU_RESULTS.md.tmp")
    with open(tmp, "w") as fh:
      fh.write(text)
    os.replace(tmp, os.path.join(args.out, "GPU_RESULTS.md"))

  for model in args.models.split(","):
    cfg = table[model]
    for kind in args.kinds.split(","):
      reference = None
      plan = [("JACOBIAN_CONTRACTION", 0, "highest")] + [(i, v, "default") for i, v in configs]
      plan.append(("DEFAULTS", None, "highest"))
      for impl, vmap, prec in plan:
        key = f"{model}|{json.dumps(cfg, sort_keys=True)}|{kind}|{impl}|{vmap}|{prec}"
        config = SHORT[impl] + ("" if impl == "DEFAULTS" else " vmap=0")
        label = f"{model} {kind} {config} {prec}"
        need_kernel = reference is None and impl == "JACOBIAN_CONTRACTION" and prec == "highest"
        if key in done and not need_kernel:
          print(f"{label:45s} cached", flush=True)
          continue
        rec = {"key": key, "model": model, "kind": kind, "config": config, "precision": prec,
               "floor_flops": flops.floor_flops(model, cfg, kind)["total"]}
        try:
          m = measure(model, cfg, kind, impl, vmap, prec)
        except Exception as e:  # one failure must not stop the others
          rec.update(status="failed", message=f"{type(e).__name__}: {e}")
        else:
          kernel = m.pop("kernel")
          if need_kernel:
            reference = kernel
          if reference is not None:
            scale = max(float(np.max(np.abs(reference))), 1e-30)
            rec["rel_err"] = float(np.max(np.abs(kernel - reference)) / scale)
          rec.update(status="ok", **m)
        print(f"{label:45s} {rec['status']} {fmt_s(rec.get('median_s'))}", flush=True)
        if key not in done:
          with open(jsonl, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
          records.append(rec)
          done[key] = rec
        write()
  write()
  return 0


if __name__ == "__main__":
  sys.exit(main())
