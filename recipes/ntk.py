"""`ntk-dynamics ntk`: the empirical NTK of a Haiku MLP on sklearn's digits.

Prints the kernel's shape, trace, eigenvalue range and condition number, and the time taken
by every implementation (after compilation), with their agreement. With `--out`, writes them
to metrics.json ("status": "completed"); after Ctrl-C, metrics.json says "status":
"interrupted" and holds the timings measured so far (and the kernel's figures if they were
computed), and the command exits with status 130.
"""
from __future__ import annotations

import argparse
import sys
import time

from recipes.cli import (EXIT_INTERRUPTED, non_negative_int, out_folder, positive_int,
                         seed_int, writable_folder)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dataset", default="digits", help="'digits' or tfds:NAME")
  p.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir")
  p.add_argument("--n", type=positive_int, default=256,
                 help="number of examples (x2 = x1); at most the training split's size")
  p.add_argument("--width", type=positive_int, default=512)
  p.add_argument("--depth", type=non_negative_int, default=2, help="hidden layers")
  p.add_argument("--full", action="store_true",
                 help="full (N, N, K, K) kernel instead of the logit-traced (N, N) one")
  p.add_argument("--repeats", type=positive_int, default=3,
                 help="timed calls per implementation")
  p.add_argument("--seed", type=seed_int, default=0,
                 help="seed of the subset and of the initialization, in [0, 2**32)")
  p.add_argument("--out", type=out_folder, default=None,
                 help="folder for metrics.json (optional)")


def _time(fn, repeats: int) -> tuple[float, object]:
  import jax
  out = jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2], out


def _metrics(args: argparse.Namespace, status: str, rows: list, summary) -> dict:
  """metrics.json: the config, the kernel's figures (once computed) and the seconds of every
  implementation timed so far (None where it is not available)."""
  return {"status": status, "config": vars(args) | {"_module": None}, **(summary or {}),
          "seconds": {label: s for label, s, _ in rows}}


def run(args: argparse.Namespace) -> int:
  import jax
  import numpy as np

  import ntk_dynamics as nd
  from ntk_dynamics import models, runs
  import tasks

  # --n, --width, --repeats (positive_int) and --depth (non_negative_int) are checked by argparse.
  if args.out:  # before any work: results that cannot be saved would be lost
    writable_folder(args.out, ("metrics.json",))
  try:
    data = tasks.load_dataset(args.dataset, data_dir=args.data_dir, n_train=args.n,
                              seed=args.seed)
  except ValueError as e:
    # load_dataset names its argument `n_train`, which --n sets.
    raise SystemExit(f"ntk: cannot load --dataset {args.dataset!r}: "
                     f"{str(e).replace('`n_train`', '--n')}") from e
  x = jax.numpy.asarray(data.x_train.reshape(len(data.x_train), -1))
  model = models.mlp([args.width] * args.depth, data.num_classes)
  params = model.init(jax.random.PRNGKey(args.seed), x[:1])
  f = nd.from_haiku(model)
  trace_axes = () if args.full else (-1,)

  print(f"MLP {x.shape[1]}-" + "-".join([str(args.width)] * args.depth) +
        f"-{data.num_classes} on {args.dataset}, N={len(x)}, "
        f"{'full' if args.full else 'traced'} kernel, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  rows, kernels, summary = [], {}, None  # rows: (label, seconds or None, note), as measured
  calls = [("default (AUTO, vmap_axes=None)", nd.NtkImplementation.AUTO, None)]
  calls += [(f"{impl.name}, vmap_axes=0", impl, 0) for impl in nd.NtkImplementation]
  try:
    for label, impl, vmap_axes in calls:
      fn = nd.empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=vmap_axes,
                               implementation=impl)
      try:
        seconds, k = _time(lambda: fn(x, None, params), args.repeats)
      except NotImplementedError as e:
        rows.append((label, None, str(e).split(";")[0]))
        continue
      except jax.errors.JaxRuntimeError as e:
        # One implementation out of memory (Jacobian contraction stores N·O·P floats) must
        # not cost the timings of the others.
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        rows.append((label, None, "out of memory: " + str(e).splitlines()[0][:160]))
        continue
      kernels[label] = np.asarray(k, np.float64)
      rows.append((label, seconds, ""))

    if not kernels:
      raise SystemExit("no implementation could compute the kernel: " +
                       "; ".join(f"{label}: {note}" for label, _, note in rows))
    ref = next(iter(kernels.values()))
    mat = ref if not args.full else ref.transpose(0, 2, 1, 3).reshape(
        ref.shape[0] * ref.shape[2], -1)
    eig = np.linalg.eigvalsh((mat + mat.T) / 2)
    lam_min, lam_max = float(eig[0]), float(eig[-1])
    cond = lam_max / lam_min if lam_min > 0 else float("inf")
    summary = {"shape": list(ref.shape), "trace": float(np.trace(mat)),
               "lambda_min": lam_min, "lambda_max": lam_max, "condition_number": cond}
    print(f"kernel shape {ref.shape}, trace {np.trace(mat):.6g}, eigenvalues "
          f"[{lam_min:.4g}, {lam_max:.4g}], condition number {cond:.4g}")
    print(f"{'implementation':40s} {'seconds':>10s} {'max rel. diff':>14s}")
    scale = np.max(np.abs(ref))
    for label, seconds, note in rows:
      if seconds is None:
        print(f"{label:40s} {'n/a':>10s}  {note}")
        continue
      diff = np.max(np.abs(kernels[label] - ref)) / scale
      print(f"{label:40s} {seconds:10.4f} {diff:14.2e}")
  except KeyboardInterrupt:
    done = f"interrupted after {len(rows)} of {len(calls)} implementations"
    if args.out:
      runs.atomic_write_json(f"{args.out}/metrics.json",
                             _metrics(args, "interrupted", rows, summary))
      print(f"\nntk: {done}; their timings are in {args.out}/metrics.json (status "
            "'interrupted'). Rerun the command to complete.", file=sys.stderr, flush=True)
    else:
      timings = ", ".join(f"{label}: {s:.4g} s" for label, s, _ in rows if s is not None)
      print(f"\nntk: {done}" + (f" ({timings})" if timings else "") +
            "; nothing written (no --out).", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  if args.out:
    runs.atomic_write_json(f"{args.out}/metrics.json", _metrics(args, "completed", rows, summary))
  return 0
