#!/usr/bin/env python
"""Does AUTO choose well beyond the four benchmark models? A sweep over a zoo of
architectures chosen so that the three methods trade places: deep-narrow and wide MLPs, many
outputs, strided and depthwise convolutions, recurrent networks (one weight used at every
step: a Python loop, an LSTM under `scan` over 12 and 96 steps, a GRU with split gate
weights), a large embedding table, a two-block transformer, a stack of layers under
`hk.layer_stack`, a single large example, and a plain JAX function with a pytree of
parameters. Writes AUTO_RESULTS.md.

    .venv/bin/python benchmarks/bench_auto.py            # full sweep (quiet machine!)
    .venv/bin/python benchmarks/bench_auto.py --quick    # tiny shapes, a smoke test

For every (model, kernel kind) one worker process times, in turn, the three implementations
with `vmap_axes=0`, AUTO with `vmap_axes=0`, and the defaults (`empirical_ntk_fn(f)`, with only
`trace_axes` set): compile + run once, then the median of calls adding up to at least 1 s.
AUTO's pick is read from the library's own cost model (`choice.estimate_flops`). The figure
of merit is `time(AUTO's pick) / time(fastest)` from the same process (AUTO runs the same
compiled program as its pick, so comparing two separate measurements of it would only measure
noise). Records go to `.bench/auto.jsonl` as each worker finishes; a rerun resumes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402

METHODS = ("JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS", "STRUCTURED_DERIVATIVES")
SHORT = {"JACOBIAN_CONTRACTION": "JC", "NTK_VECTOR_PRODUCTS": "VP",
         "STRUCTURED_DERIVATIVES": "SD"}
REL_TOL = 1e-4


# ------------------------------------------------------------------------------- the zoo
# Each entry: (description, builder(quick) -> (f, params, x1, x2)). Builders import haiku
# lazily so that the driver process stays light.


def _haiku(net, x_shape, seed=0, x_dtype="float32", vocab=None):
  import haiku as hk
  import jax
  import jax.numpy as jnp
  t = hk.without_apply_rng(hk.transform(net))
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  if x_dtype == "int32":
    x1 = jax.random.randint(k1, x_shape, 0, vocab)
    x2 = jax.random.randint(k2, x_shape, 0, vocab)
  else:
    x1 = jax.random.normal(k1, x_shape)
    x2 = jax.random.normal(k2, x_shape)
  params = t.init(k3, x1)
  return t.apply, params, x1, jnp.asarray(x2)


def mlp_deep_narrow(quick):
  import haiku as hk
  import jax
  w, depth, n = (16, 3, 8) if quick else (64, 8, 128)

  def net(x):
    h = x
    for _ in range(depth):
      h = jax.numpy.tanh(hk.Linear(w)(h))
    return hk.Linear(10)(h)
  return _haiku(net, (n, 32))


def mlp_wide_one_output(quick):
  import haiku as hk
  import jax
  w, n = (64, 4) if quick else (2048, 32)

  def net(x):
    h = jax.nn.relu(hk.Linear(w)(x))
    h = jax.nn.relu(hk.Linear(w)(h))
    return hk.Linear(1)(h)
  return _haiku(net, (n, 256))


def mlp_many_outputs(quick):
  import haiku as hk
  import jax
  w, o, n = (16, 20, 4) if quick else (256, 100, 16)

  def net(x):
    h = jax.nn.relu(hk.Linear(w)(x))
    h = jax.nn.relu(hk.Linear(w)(h))
    return hk.Linear(o)(h)
  return _haiku(net, (n, 64))


def cnn_strided(quick):
  import haiku as hk
  import jax
  c, hw, n = (4, 8, 4) if quick else (64, 32, 32)

  def net(x):
    h = jax.nn.relu(hk.Conv2D(c // 2, 5, stride=2)(x))
    h = jax.nn.relu(hk.Conv2D(c, 3, stride=2)(h))
    h = jax.nn.relu(hk.Conv2D(c, 3, stride=1, rate=2)(h))   # dilated
    return hk.Linear(10)(h.mean(axis=(1, 2)))
  return _haiku(net, (n, hw, hw, 3))


def cnn_depthwise(quick):
  import haiku as hk
  import jax
  c, hw, n = (8, 6, 4) if quick else (32, 8, 8)

  def net(x):
    h = jax.nn.relu(hk.Conv2D(c, 1)(x))
    h = jax.nn.relu(hk.Conv2D(c, 3, feature_group_count=c)(h))   # depthwise
    h = jax.nn.relu(hk.Conv2D(c, 1)(h))
    h = jax.nn.relu(hk.Conv2D(c, 3, feature_group_count=4)(h))   # grouped
    return hk.Linear(10)(h.reshape(h.shape[0], -1))
  return _haiku(net, (n, hw, hw, c))


def _python_loop_rnn(cell_cls, hdim, steps, n, features):
  """A Haiku recurrent cell applied at every step by a Python loop, then dense 10."""
  import haiku as hk

  def net(x):                      # x: (N, T, D); one cell, applied at every step
    cell = cell_cls(hdim)
    h = cell.initial_state(x.shape[0])
    for t in range(x.shape[1]):
      _, h = cell(x[:, t], h)
    return hk.Linear(10)(h)
  return _haiku(net, (n, steps, features))


def rnn(quick):
  import haiku as hk
  return _python_loop_rnn(hk.VanillaRNN, *((8, 4, 4) if quick else (128, 16, 32)), 32)


def lstm_scan(quick, steps=12):
  import haiku as hk
  import jax
  hdim, steps, n = (8, 3, 4) if quick else (64, steps, 16)

  def net(x):                      # hk.dynamic_unroll: a `scan` over time
    core = hk.LSTM(hdim)
    out, _ = hk.dynamic_unroll(core, jax.numpy.swapaxes(x, 0, 1),
                               core.initial_state(x.shape[0]))
    return hk.Linear(10)(out[-1])
  return _haiku(net, (n, steps, 16))


def gru(quick):                    # gates from fused weights, `split` inside the cell
  import haiku as hk
  return _python_loop_rnn(hk.GRU, *((8, 3, 4) if quick else (64, 12, 16)), 16)


def embedding_bag(quick):
  import haiku as hk
  import jax
  vocab, d, t, n = (50, 8, 4, 4) if quick else (20000, 128, 32, 32)

  def net(ids):
    e = hk.Embed(vocab, d)(ids).mean(axis=1)
    return hk.Linear(10)(jax.nn.relu(hk.Linear(64)(e)))
  return _haiku(net, (n, t), x_dtype="int32", vocab=vocab)


def transformer_2_blocks(quick):
  import haiku as hk
  import jax
  d, heads, t, n = (8, 2, 4, 4) if quick else (64, 4, 16, 16)

  def block(h):
    y = hk.LayerNorm(-1, True, True)(h)
    y = hk.MultiHeadAttention(heads, d // heads, w_init=hk.initializers.VarianceScaling())(
        y, y, y)
    h = h + y
    y = hk.LayerNorm(-1, True, True)(h)
    return h + hk.Linear(d)(jax.nn.gelu(hk.Linear(2 * d)(y)))

  def net(x):
    h = hk.Linear(d)(x)
    h = block(block(h))
    return hk.Linear(10)(h.mean(axis=1))
  return _haiku(net, (n, t, 24))


def one_large_example(quick):
  import haiku as hk
  import jax
  c, hw = (4, 6) if quick else (128, 32)

  def net(x):
    h = jax.nn.relu(hk.Conv2D(c, 3)(x))
    h = jax.nn.relu(hk.Conv2D(c, 3)(h))
    return hk.Linear(10)(h.mean(axis=(1, 2)))
  return _haiku(net, (1, hw, hw, 3))


def layer_stack(quick):           # hk.layer_stack: the weights stacked and scanned over
  import haiku as hk
  import jax
  depth, width, n = (3, 8, 4) if quick else (24, 128, 32)

  def net(x):
    h = jax.nn.tanh(hk.Linear(width)(x))

    @hk.layer_stack(depth)
    def blocks(h):
      return h + jax.nn.tanh(hk.Linear(width)(h)) / depth ** 0.5
    return hk.Linear(10)(blocks(h))
  return _haiku(net, (n, 32))


def plain_jax_pytree(quick):
  """Not Haiku: a hand-written residual MLP with LayerNorm, a dict of parameters and a
  tuple of weights inside it."""
  import jax
  import jax.numpy as jnp
  d, n = (8, 4) if quick else (256, 64)
  ks = jax.random.split(jax.random.PRNGKey(1), 6)
  params = {"inp": jax.random.normal(ks[0], (48, d)) / math.sqrt(48),
            "blocks": tuple((jax.random.normal(ks[1 + i], (d, d)) / math.sqrt(d),
                             jnp.ones(d), jnp.zeros(d)) for i in range(3)),
            "out": (jax.random.normal(ks[4], (d, 10)) / math.sqrt(d), jnp.zeros(10))}

  def f(p, x):
    h = x @ p["inp"]
    for w, scale, shift in p["blocks"]:
      y = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
      h = h + jax.nn.relu((y * scale + shift) @ w)
    w, b = p["out"]
    return h @ w + b
  x1 = jax.random.normal(ks[5], (n, 48))
  x2 = jax.random.normal(jax.random.fold_in(ks[5], 1), (n, 48))
  return f, params, x1, x2


ZOO = {
    "mlp_deep_narrow": ("MLP 32-(64 tanh)x8-10, N=128", mlp_deep_narrow),
    "mlp_wide_1out": ("MLP 256-2048-2048-1 ReLU, N=32", mlp_wide_one_output),
    "mlp_100_outputs": ("MLP 64-256-256-100 ReLU, N=16", mlp_many_outputs),
    "cnn_strided": ("conv5x5/2 32ch, conv3x3/2 64ch, conv3x3 dilation 2, GAP, dense 10 on "
                    "32x32x3, N=32", cnn_strided),
    "cnn_depthwise": ("conv1x1 32, depthwise 3x3, conv1x1 32, grouped 3x3 (4 groups), "
                      "flatten, dense 10 on 8x8x32, N=8", cnn_depthwise),
    "rnn": ("Elman RNN (hk.VanillaRNN 128) over 16 steps of 32 features, dense 10, N=32",
            rnn),
    "lstm": ("hk.LSTM 64 unrolled by hk.dynamic_unroll (a scan) over 12 steps of 16 "
             "features, dense 10, N=16", lstm_scan),
    "lstm_long": ("the same LSTM over 96 steps", lambda quick: lstm_scan(quick, 96)),
    "gru": ("hk.GRU 64 over 12 steps of 16 features (Python loop), dense 10, N=16", gru),
    "embedding": ("embedding 20000x128, mean over 32 tokens, dense 64 ReLU, dense 10, N=32",
                  embedding_bag),
    "transformer": ("2 pre-LN transformer blocks (width 64, 4 heads, MLP 128) on 16 tokens, "
                    "mean-pool, dense 10, N=16", transformer_2_blocks),
    "one_example": ("2x conv3x3 128ch on 32x32x3, GAP, dense 10, N=1", one_large_example),
    "layer_stack": ("24 residual tanh layers of width 128 under hk.layer_stack (a scan over "
                    "stacked weights), dense 10, N=32", layer_stack),
    "plain_jax": ("plain JAX residual MLP (48-256, 3 LayerNorm blocks, 10), dict/tuple "
                  "params, N=64", plain_jax_pytree),
}
KINDS = ("full", "traced")


# ------------------------------------------------------------------------------- worker


def worker(spec: dict) -> dict:
  import statistics
  import jax
  import numpy as np
  import ntk_dynamics as nd
  from ntk_dynamics.kernels import axes as axes_lib
  from ntk_dynamics.kernels import batching
  from ntk_dynamics.kernels import choice

  f, params, x1, x2 = ZOO[spec["model"]][1](spec["quick"])
  trace = common.trace_axes(spec["kind"])
  fx1, fx2 = f(params, x1), f(params, x2)
  costs = choice.estimate_flops(f, params, x1, x2, {}, axes_lib.OutputAxes.create(trace, ()),
                                batching.VmapAxes.create(0), fx1, fx2)
  res = {"params": int(sum(np.size(l) for l in jax.tree.leaves(params))),
         "n": int(x1.shape[0]), "outputs": int(fx1.shape[-1]),
         "modelled_gflop": {k.name: v / 1e9 for k, v in costs.items()},
         "auto_pick": min(costs, key=costs.get).name, "configs": {}}
  kernels = {}
  configs = [(m, 0) for m in METHODS] + [("AUTO", 0), ("DEFAULTS", None)]
  for impl, vmap in configs:
    if impl == "DEFAULTS":
      fn = nd.empirical_ntk_fn(f, trace_axes=trace)
    else:
      fn = nd.empirical_ntk_fn(f, trace_axes=trace, vmap_axes=vmap,
                               implementation=nd.NtkImplementation[impl])
    try:
      out, first, times = common.timed_calls(lambda: fn(x1, x2, params), 3,
                                             budget_s=spec["budget_s"])
    except Exception as e:  # noqa: BLE001 - reported as a row
      res["configs"][impl] = {"status": f"{type(e).__name__}: {e}"[:300]}
      continue
    kernels[impl] = np.asarray(out, np.float64)
    res["configs"][impl] = {"status": "ok", "first_call_s": first,
                            "median_s": statistics.median(times), "calls": len(times)}
  ref = kernels.get("JACOBIAN_CONTRACTION", next(iter(kernels.values()), None))
  for impl, k in kernels.items():
    res["configs"][impl]["rel_err"] = float(np.abs(k - ref).max() / np.abs(ref).max())
  res["status"] = "ok"
  return res


# ------------------------------------------------------------------------------- driver


def _load(path):
  done = {}
  if os.path.exists(path):
    with open(path) as fh:
      for line in fh:
        r = json.loads(line)
        done[(r["model"], r["kind"])] = r
  return done


def _fmt_s(s):
  if s is None:
    return "–"
  return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _table(records):
  lines = ["| model | kernel | params | N × O | JC | VP | SD | AUTO picks | AUTO's pick / "
           "fastest | defaults | defaults / fastest | modelled GFLOP JC / VP / SD | "
           "max rel. err |", "|" + "---|" * 13]
  ratios = []
  for (model, kind), r in sorted(records.items(), key=lambda kv: (list(ZOO).index(kv[0][0]),
                                                                  kv[0][1])):
    if r.get("status") != "ok":
      lines.append(f"| {model} | {kind} | " + " | ".join(["–"] * 10) +
                   f" | {r.get('message', r.get('status'))[:80]} |")
      continue
    c = r["configs"]
    t = {m: c[m]["median_s"] for m in METHODS if c.get(m, {}).get("status") == "ok"}
    best = min(t, key=t.get)
    pick = r["auto_pick"]
    ratio = t[pick] / t[best] if pick in t else math.inf
    ratios.append(ratio)
    d = c.get("DEFAULTS", {})
    d_ratio = d["median_s"] / t[best] if d.get("status") == "ok" else math.inf
    cells = []
    for m in METHODS:
      if m in t:
        cell = _fmt_s(t[m])
        cells.append(f"**{cell}**" if m == best else cell)
      else:
        cells.append(c.get(m, {}).get("status", "–")[:40])
    g = r["modelled_gflop"]
    model_cells = " / ".join(f"{g[m]:.3g}" if m in g else "–" for m in METHODS)
    err = max(v.get("rel_err", 0.0) for v in c.values() if v.get("status") == "ok")
    lines.append(
        f"| {model} | {kind} | {r['params']:,} | {r['n']} × {r['outputs']} | "
        + " | ".join(cells)
        + f" | {SHORT[pick]} | {ratio:.2f}× | {_fmt_s(d.get('median_s'))} | {d_ratio:.2f}× | "
        f"{model_cells} | {err:.1e} {'✓' if err <= REL_TOL else '✗'} |")
  return lines, ratios


def write_report(records, args, path):
  lines, ratios = _table(records)
  hits = sum(r <= 1.1 for r in ratios)
  geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else float("nan")
  head = [
      "# AUTO across architectures", "",
      f"- measured: {_span(records)}; report written "
      f"{datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- command: `.venv/bin/python benchmarks/bench_auto.py"
      f"{' --quick' if args.quick else ''}`",
      f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
      f"{platform.platform()}, Python {platform.python_version()}",
      f"- ours: ntk_dynamics at git "
      f"{', '.join(sorted({r.get('git', 'unrecorded') for r in records.values()}))}",
      "- protocol: one worker process per (model, kernel); in it JC, VP and SD with "
      "`vmap_axes=0`, AUTO with `vmap_axes=0` and the defaults (`empirical_ntk_fn(f)`, only "
      "`trace_axes` set) are each compiled and run once, then timed (median of at least 3 "
      "calls and at least 1 s of calls, fewer when a call would exceed the budget). "
      "float32, x1 ≠ x2 of equal size; `full` = `trace_axes=()`, `traced` = "
      "`trace_axes=(-1,)`.",
      "- AUTO's pick / fastest: the time of the method AUTO's cost model picks over the "
      "fastest of the three, both from the same process (AUTO compiles the same program as "
      "its pick). Defaults / fastest compares two separate timings, so ±10% is noise.",
      "", ZOO_DOC, "",
      f"**AUTO's pick is within 10% of the fastest method on {hits} of {len(ratios)} rows**; "
      f"geometric mean of AUTO's pick / fastest: {geo:.3f}×; worst: "
      f"{max(ratios):.2f}×." if ratios else "no rows", ""]
  text = "\n".join(head + lines) + "\n"
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    fh.write(text)
  os.replace(tmp, path)
  return hits, len(ratios)


def _span(records) -> str:
  times = sorted(r["finished"] for r in records.values() if "finished" in r)
  return f"{times[0]} to {times[-1]}" if times else "unrecorded"


ZOO_DOC = "Models:\n\n" + "\n".join(f"- **{k}**: {v[0]}" for k, v in ZOO.items())


def common_git():
  try:
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
  p.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
  p.add_argument("--fresh", action="store_true", help="ignore earlier records")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
  p.add_argument("--budget-s", type=float, default=20.0,
                 help="timed calls of one configuration stop before exceeding this")
  p.add_argument("--out", default=None, help="report path (default AUTO_RESULTS.md)")
  p.add_argument("--workdir", default=os.path.join(HERE, ".bench"),
                 help="folder of the JSON-lines records")
  args = p.parse_args()
  store = args.workdir
  os.makedirs(store, exist_ok=True)
  jsonl = os.path.join(store, "auto.quick.jsonl" if args.quick else "auto.jsonl")
  if args.fresh and os.path.exists(jsonl):
    os.remove(jsonl)
  report = args.out or os.path.join(HERE, "AUTO_RESULTS.quick.md" if args.quick
                                    else "AUTO_RESULTS.md")
  records = _load(jsonl)
  todo = [(m, k) for m in args.models for k in KINDS if (m, k) not in records]
  try:
    from tqdm import tqdm
    bar = tqdm(todo, desc="bench_auto", unit="worker")
  except ImportError:
    bar = todo
  for model, kind in bar:
    spec = {"model": model, "kind": kind, "quick": args.quick, "budget_s": args.budget_s}
    try:
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                             json.dumps(spec)], capture_output=True, text=True,
                            timeout=args.timeout, cwd=REPO)
      found = [l for l in proc.stdout.splitlines() if l.startswith(common.RESULT_MARK)]
      rec = (json.loads(found[-1][len(common.RESULT_MARK):]) if found else
             {"status": "error", "message": (proc.stderr or "no result")[-300:]})
    except subprocess.TimeoutExpired:
      rec = {"status": "timeout", "message": f"over {args.timeout:.0f} s"}
    # Each record keeps when and at which commit it was measured: a report rewritten later
    # (after a partial rerun, or with no rerun at all) must not claim today's sources.
    rec.update(model=model, kind=kind, git=common_git(),
               finished=datetime.datetime.now().isoformat(timespec="seconds"))
    with open(jsonl, "a") as fh:
      fh.write(json.dumps(rec) + "\n")
    records[(model, kind)] = rec
    write_report({k: v for k, v in records.items() if k[0] in args.models}, args, report)
  hits, total = write_report({k: v for k, v in records.items() if k[0] in args.models},
                             args, report)
  print(f"wrote {report}: AUTO within 10% of the fastest on {hits}/{total} rows")


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    spec = json.loads(sys.argv[2])
    try:
      out = worker(spec)
    except Exception as e:  # noqa: BLE001 - reported, never fatal to the sweep
      out = {"status": "error", "message": f"{type(e).__name__}: {e}"[:500]}
    common.emit(out)
  else:
    main()
