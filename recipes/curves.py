"""`ntk-dynamics curves`: training curves predicted from the NTK at initialization, against
the curves of the same network actually trained with optax.

One run writes to `--out`: config.json, metrics.json, curves.csv (step, predicted/actual
train/test loss and accuracy, relative loss errors) and plot.png, and prints a short table.
`--widths 128,512,2048` (and/or `--seeds 0,1,2`) repeats the comparison for every width and
seed into OUT/width{W}_seed{S}/ and summarises it in OUT/sweep.csv and OUT/sweep.png.
Every file is written atomically: after Ctrl-C, files on disk are complete (curves.csv holds
the actual curve up to the last logged step reached), metrics.json of the run cut short says
"status": "interrupted" with the step reached and the curves logged so far, and the command
exits with status 130. The same command with `--resume` keeps every run that completed in
`--out` with the same settings (config.json) and redoes the others from the start, so a sweep
ends as an uninterrupted one would; other settings are refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import sys
import time
import warnings
from typing import Optional

from recipes.cli import (SEED_LIMIT, int_list, non_negative_int, out_folder, positive_float,
                         positive_int, refuse_other_settings, seed_int, writable_folder)

MODELS = ("mlp", "cnn", "resnet")
DEFAULT_WIDTH = {"mlp": 2048, "cnn": 32, "resnet": 16}
DEFAULT_DEPTH = {"mlp": 1, "cnn": 2, "resnet": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("data")
  g.add_argument("--dataset", default="digits", help="'digits' (bundled) or tfds:NAME "
                 "(mnist, fashion_mnist, cifar10, cifar100)")
  g.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir")
  g.add_argument("--n-train", type=positive_int, default=256,
                 help="training examples (the NTK is (n·K)² entries)")
  g.add_argument("--n-test", type=positive_int, default=256, help="test examples")
  g.add_argument("--data-seed", type=non_negative_int, default=0,
                 help="seed of the random subsets")
  g = p.add_argument_group("model")
  g.add_argument("--model", default="mlp", choices=MODELS)
  g.add_argument("--width", type=positive_int, default=None,
                 help="hidden width / channels (default: mlp 2048, cnn 32, resnet 16)")
  g.add_argument("--depth", type=non_negative_int, default=None,
                 help="hidden layers / conv layers / residual blocks (default: mlp 1, cnn 2, "
                      "resnet 1)")
  g.add_argument("--parameterization", default="ntk", choices=("standard", "ntk"),
                 help="ntk keeps the kernel O(1) in width (lazy training at large width)")
  g = p.add_argument_group("training")
  g.add_argument("--loss", default="mse", choices=("mse", "xent"),
                 help="mse: 0.5·mean((f−y)²) on one-hot targets (exact closed form); xent: "
                      "softmax cross-entropy (ODE flow)")
  g.add_argument("--optimizer", default="sgd", choices=("sgd", "momentum"))
  g.add_argument("--momentum", type=float, default=None,
                 help="heavy-ball momentum for --optimizer momentum (default 0.9)")
  lr = g.add_mutually_exclusive_group()
  lr.add_argument("--lr", type=positive_float, default=None, help="absolute learning rate η")
  lr.add_argument("--lr-fraction", type=positive_float, default=None,
                  help="η as a fraction of the largest stable step η_max = 2(1+m)N/λ_max "
                       "(default 0.5)")
  g.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps")
  g.add_argument("--batch-size", type=positive_int, default=None,
                 help="minibatch SGD (default: full batch); its noise is not in the prediction")
  g.add_argument("--log-points", type=int, default=40, help="log-spaced logged steps")
  g.add_argument("--linearized", action="store_true",
                 help="train the linearized network instead (must match the prediction)")
  g = p.add_argument_group("kernel")
  g.add_argument("--traced-kernel", action="store_true",
                 help="logit-traced (n, n) kernel instead of the full (n, n, K, K) one: "
                      "cheaper, exact only at infinite width")
  g.add_argument("--drift-examples", type=non_negative_int, default=128,
                 help="training points for the NTK drift ‖Θ_T−Θ₀‖/‖Θ₀‖ (0: all)")
  g.add_argument("--kernel-batch-size", type=positive_int, default=None,
                 help="compute kernels in blocks of this many examples (bounds memory)")
  g = p.add_argument_group("run")
  g.add_argument("--seed", type=seed_int, default=None,
                 help="initialization seed in [0, 2**32) (default 0)")
  g.add_argument("--widths", type=int_list(minimum=1), default=None,
                 help="comma-separated widths: a sweep (e.g. 128,512,2048)")
  g.add_argument("--seeds", type=int_list(minimum=0, maximum=SEED_LIMIT), default=None,
                 help="comma-separated seeds: a sweep (e.g. 0,1,2)")
  g.add_argument("--out", type=out_folder, default="runs/curves", help="output folder")
  g.add_argument("--no-progress", action="store_true", help="no progress bars")
  g.add_argument("--resume", action="store_true",
                 help="continue an interrupted run in --out: runs completed there with the same "
                      "settings are kept, the others are redone")


def _validate(args: argparse.Namespace) -> None:
  # Counts, rates and lists are range-checked by the parser's types; these depend on others.
  if args.log_points < 2:
    raise SystemExit("curves: --log-points must be at least 2.")
  if args.optimizer == "sgd" and args.momentum not in (None, 0.0):
    raise SystemExit("curves: --momentum needs --optimizer momentum.")
  if args.momentum is not None and not 0 <= args.momentum < 1:
    raise SystemExit("curves: --momentum must be in [0, 1).")
  if args.batch_size is not None and args.batch_size > args.n_train:
    raise SystemExit("curves: --batch-size must be in [1, --n-train].")
  if args.widths is not None and args.width is not None:
    raise SystemExit("curves: give --width (one run) or --widths (a sweep), not both.")
  if args.seeds is not None and args.seed is not None:
    raise SystemExit("curves: give --seed (one run) or --seeds (a sweep), not both.")


def build_model(name: str, width: int, depth: int, num_outputs: int, parameterization: str):
  """The Haiku transform for `--model`; raises ValueError for an unknown name."""
  from ntk_dynamics import models
  if name == "mlp":
    return models.mlp([width] * depth, num_outputs, parameterization=parameterization)
  if name == "cnn":
    return models.cnn([width] * depth, num_outputs, parameterization=parameterization)
  if name == "resnet":
    return models.resnet(width, depth, num_outputs, parameterization=parameterization)
  raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")


# ----------------------------------------------------------------------------- figures


def _log_log_if_possible(values) -> dict:
  """Log-log axes for a panel plotting `values` when one of them is finite and positive, else
  linear ones: matplotlib refuses to draw a log axis holding no such value ("Data cannot be
  log-scaled"), as in a diverged run whose curves are NaN."""
  import numpy as np
  v = np.asarray(values, np.float64)
  scale = "log" if np.any(np.isfinite(v) & (v > 0)) else "linear"
  return {"xscale": scale, "yscale": scale}


def _save_plot(path, predicted, actual, title: str) -> None:
  import numpy as np

  from ntk_dynamics import plots  # selects the headless backend before pyplot is imported
  import matplotlib.pyplot as plt

  s = np.asarray(predicted.steps)
  keep = s > 0  # log-scaled step axis; step 0 is the shared starting point
  x = s[keep]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, split in zip(axes[:2], ("train", "test")):
    act, pred = (np.asarray(getattr(c, f"{split}_loss")) for c in (actual, predicted))
    ax.plot(x, act[keep], "C0-", label="actual (optax)")
    ax.plot(x, pred[keep], "C1--", label="predicted (NTK₀)")
    ax.axhline(act[0], color="0.6", lw=0.8, ls=":", label="initial loss")
    ax.set(title=f"{split} loss", xlabel="step", ylabel="loss",
           **_log_log_if_possible(np.concatenate([act[keep], pred[keep]])))
  ax = axes[2]
  for split, color in (("train", "C2"), ("test", "C3")):
    ax.plot(x, getattr(actual, f"{split}_accuracy")[keep], f"{color}-",
            label=f"{split} actual")
    ax.plot(x, getattr(predicted, f"{split}_accuracy")[keep], f"{color}--",
            label=f"{split} predicted")
  ax.set(title="accuracy", xlabel="step", ylabel="accuracy", xscale="log")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  plots.save_figure(path, fig, suptitle=title, fontsize=10)


SWEEP_COLUMNS = ("width", "seed", "num_params", "lr", "lr_ratio", "max_train_loss_deviation",
                 "max_test_loss_deviation", "max_train_loss_rel_error",
                 "max_test_loss_rel_error", "train_output_rmse", "test_output_rmse",
                 "train_output_rmse_relative", "test_output_rmse_relative", "ntk_drift",
                 "final_actual_train_loss", "final_actual_test_loss",
                 "final_test_accuracy_diff", "trusted", "seconds")


def _save_sweep_plot(path, rows: list[dict], title: str) -> None:
  import numpy as np

  from ntk_dynamics import plots  # selects the headless backend before pyplot is imported
  import matplotlib.pyplot as plt

  widths = sorted({r["width"] for r in rows})
  panels = [("max |L_pred − L_act| / L(0)", (("max_train_loss_deviation", "train", "C0"),
                                             ("max_test_loss_deviation", "test", "C1"))),
            ("output RMSE at the end / distance moved",
             (("train_output_rmse_relative", "train", "C0"),
              ("test_output_rmse_relative", "test", "C1"))),
            ("NTK drift ‖Θ_T − Θ₀‖_F / ‖Θ₀‖_F", (("ntk_drift", "train-train", "C2"),))]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, (label, series) in zip(axes, panels):
    for key, name, color in series:
      for r in rows:
        ax.plot(r["width"], r[key], "o", color=color, alpha=0.4, ms=4)
      with warnings.catch_warnings():  # a width whose runs all diverged has a NaN mean
        warnings.simplefilter("ignore", RuntimeWarning)
        means = [np.nanmean([r[key] for r in rows if r["width"] == w]) for w in widths]
      ax.plot(widths, means, "-", color=color, label=f"{name} (mean over seeds)")
    values = [r[key] for key, _, _ in series for r in rows]
    ax.set(title=label, xlabel="width", **_log_log_if_possible(values))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  plots.save_figure(path, fig, suptitle=title, fontsize=10)


# ----------------------------------------------------------------------------- one run


def _fmt(v: float, pct: bool = False) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "nan"
  if pct:
    return f"{100 * v:.2f}%" if abs(v) < 10 else f"{100 * v:.3g}%"
  return f"{v:.4g}"


def _print_table(comparison) -> None:
  import numpy as np
  p, a, m = comparison.predicted, comparison.actual, comparison.metrics
  idx = np.unique(np.round(np.geomspace(1, len(p.steps), 8)).astype(int) - 1)
  idx = np.unique(np.concatenate([[0], idx]))
  print(f"{'step':>7} | {'train loss pred':>15} {'actual':>9} | {'test loss pred':>14} "
        f"{'actual':>9} | {'test acc pred':>13} {'actual':>7}")
  for i in idx:
    print(f"{int(p.steps[i]):7d} | {p.train_loss[i]:15.4g} {a.train_loss[i]:9.4g} | "
          f"{p.test_loss[i]:14.4g} {a.test_loss[i]:9.4g} | {p.test_accuracy[i]:13.3f} "
          f"{a.test_accuracy[i]:7.3f}")
  print(f"η = {m['lr']:.4g} = {m['lr_ratio']:.3g}·η_max (η_max = {m['lr_max']:.4g}); "
        f"max |ΔL| / L(0): train {_fmt(m['max_train_loss_deviation'], True)}, test "
        f"{_fmt(m['max_test_loss_deviation'], True)}; output RMSE train "
        f"{_fmt(m['train_output_rmse'])}, test {_fmt(m['test_output_rmse'])}; NTK drift "
        f"{_fmt(m['ntk_drift'], True)}; prediction {'trusted' if m['trusted'] else 'NOT TRUSTED'}"
        f" ({m['seconds']['kernel']:.1f}s kernels, {m['seconds']['predict']:.1f}s predict, "
        f"{m['seconds']['train']:.1f}s train, {m['seconds']['drift']:.1f}s drift)")


def _partial_metrics(state: dict) -> dict:
  """What an interrupted run had measured: the curves logged so far and their largest gaps."""
  import numpy as np

  from ntk_dynamics.dynamics import curves
  predicted, actual = state["predicted"], state["actual"]
  reached = 0 if actual is None else len(actual)
  m = {"step": int(actual.steps[-1]) if reached else 0, "logged_steps": reached,
       "prediction_done": predicted is not None}
  if predicted is not None and reached:
    rows = curves.curve_rows(predicted, actual)[:reached]
    m["curves_so_far"] = {c: [r[i] for r in rows] for i, c in enumerate(curves.CURVE_COLUMNS)}
    for split in ("train", "test"):
      lp = np.asarray(getattr(predicted, f"{split}_loss")[:reached], np.float64)
      la = np.asarray(getattr(actual, f"{split}_loss"), np.float64)
      with np.errstate(divide="ignore", invalid="ignore"):
        m[f"max_{split}_loss_deviation_so_far"] = float(np.max(np.abs(lp - la)) / abs(la[0]))
  return m


def _one_run(args, data, width: int, seed: int, out: pathlib.Path, progress: bool,
             fingerprint: str, title_extra: str = ""):
  """One comparison into `out`. metrics.json records the settings' `fingerprint`, which
  `--resume` checks before keeping a completed run. On Ctrl-C, writes `out/metrics.json` with
  status "interrupted" (the step reached, the curves logged so far, and the final metrics if
  they were already computed) and re-raises the KeyboardInterrupt with `.run_dir` and
  `.step`."""
  import jax

  from ntk_dynamics import runs
  from ntk_dynamics.dynamics import curves

  depth = args.depth if args.depth is not None else DEFAULT_DEPTH[args.model]
  about = dict(width=width, depth=depth, seed=seed, model=args.model,
               parameterization=args.parameterization, dataset=data.name, steps=args.steps,
               settings_fingerprint=fingerprint)
  # stage: kernels (and prediction) -> training -> drift (training done) -> files.
  state = {"predicted": None, "actual": None, "stage": "kernels", "metrics": None}
  t0 = time.perf_counter()

  def on_log(predicted, actual_so_far):
    if state["predicted"] is None:
      state["predicted"] = predicted
      state["stage"] = "training"
      runs.atomic_write_json(out / "metrics.json", {"status": "training", **about})
      print(f"  predicted in {time.perf_counter() - t0:.1f}s; training {args.steps} steps",
            flush=True)
    state["actual"] = actual_so_far
    runs.atomic_write_csv(out / "curves.csv", curves.CURVE_COLUMNS,
                          curves.curve_rows(predicted, actual_so_far))
    if len(actual_so_far) == len(predicted):
      state["stage"] = "drift"

  try:
    model = build_model(args.model, width, depth, data.num_classes, args.parameterization)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), data.x_train[:1])
    momentum = 0.0 if args.optimizer == "sgd" else (0.9 if args.momentum is None
                                                     else args.momentum)
    n_out = len(data.x_train) * (1 if args.traced_kernel else data.num_classes)
    print(f"  NTK at initialization: {args.model} width {width} depth {depth}, "
          f"{'traced' if args.traced_kernel else 'full'} kernel ({n_out}×{n_out} train-train)",
          flush=True)
    comparison = curves.compare_curves(
        model, data, params=params, steps=args.steps, loss=args.loss,
        learning_rate=args.lr, lr_fraction=args.lr_fraction, momentum=momentum,
        log_points=args.log_points, trace_axes=(-1,) if args.traced_kernel else (),
        batch_size=args.batch_size, linearized=args.linearized,
        drift_examples=args.drift_examples or None, kernel_batch_size=args.kernel_batch_size,
        seed=seed, progress=progress, callback=on_log)
    seconds = time.perf_counter() - t0
    state["stage"] = "files"
    metrics = dict(comparison.metrics, status="complete", **about, total_seconds=seconds)
    state["metrics"] = metrics
    runs.atomic_write_csv(out / "curves.csv", curves.CURVE_COLUMNS, comparison.rows())
    runs.atomic_write_json(out / "metrics.json", metrics)
    title = (f"{args.model} width {width} depth {depth} ({args.parameterization}) on "
             f"{data.name} n={len(data.x_train)}, {args.loss}, {args.optimizer} "
             f"η={metrics['lr']:.3g} ({metrics['lr_ratio']:.2f}·η_max), {args.steps} steps"
             f"{title_extra}; max |ΔL|/L₀ train "
             f"{100 * metrics['max_train_loss_deviation']:.2f}%, test "
             f"{100 * metrics['max_test_loss_deviation']:.2f}%")
    _save_plot(out / "plot.png", comparison.predicted, comparison.actual, title)
  except KeyboardInterrupt as e:
    if state["metrics"] is not None:  # measured in full; only a file was cut short
      partial = dict(state["metrics"], step=args.steps)
    else:
      partial = _partial_metrics(state)
    partial.update(about, status="interrupted", stage=state["stage"],
                   total_seconds=time.perf_counter() - t0)
    runs.atomic_write_json(out / "metrics.json", partial)
    e.run_dir, e.step, e.stage = out, partial["step"], state["stage"]
    raise
  return comparison, metrics


def _interrupted(e: KeyboardInterrupt, out: pathlib.Path, sweep: bool, done: int,
                 total: int, steps: int) -> int:
  """After Ctrl-C: says what was kept and how to redo the rest; returns 130."""
  run_dir = getattr(e, "run_dir", None)
  lines = ["\nntk-dynamics curves: interrupted"]
  if run_dir is None:
    lines[0] += "."
  else:
    lines[0] += f" at step {e.step} of {steps} ({e.stage})."
    lines.append(f"wrote {run_dir}/metrics.json (status \"interrupted\", with the curves "
                 f"logged so far; curves.csv has them too).")
  if sweep:
    lines.append(f"{done} of {total} runs completed ({out}/sweep.csv).")
  lines.append("run the same command with --resume to finish: "
               + ("the completed runs are kept, " if sweep else "")
               + "the interrupted run starts over.")
  print("\n".join(lines), file=sys.stderr, flush=True)
  return 130


# Options that do not change what is computed; every other entry of config.json must match
# for `--resume` to keep a run.
RUN_CONTROL = ("out", "no_progress", "resume", "argv")


def _settings(config: dict) -> dict:
  """config.json without the run-control entries, as JSON reads it back. Widths and seeds
  count as resolved (`--seed 0` is the default seed, `--width` unset its model's default), and
  whether the run is a sweep, which lays out the folder."""
  from ntk_dynamics import runs
  kept = {k: v for k, v in config.items() if k not in RUN_CONTROL + ("width", "seed", "seeds")}
  kept["sweep"] = kept.pop("widths", None) is not None or len(kept["resolved_seeds"]) > 1
  return runs.restore_non_finite(json.loads(runs.strict_json_dumps(kept)))


def _check_resume(out: pathlib.Path, settings: dict, flags: set) -> None:
  """Refuses (SystemExit) to resume into `out` when its config.json holds other settings;
  nothing to check when there is none (a fresh start)."""
  from ntk_dynamics import runs
  path = out / "config.json"
  if not path.exists():
    return
  try:
    stored = _settings(runs.read_json(path))
  except (OSError, ValueError, AttributeError) as e:
    raise SystemExit(f"curves: --resume cannot read {path} ({e}); use another --out, or "
                     "drop --resume to start over.") from None
  refuse_other_settings("curves", f"{out} holds runs with", stored, settings, flags)


def _completed(run_dir: pathlib.Path, fingerprint: str) -> Optional[dict]:
  """The metrics of a run that completed in `run_dir` with these settings, else None."""
  from ntk_dynamics import runs
  try:
    m = runs.read_json(run_dir / "metrics.json")
  except (OSError, ValueError):
    return None
  files = all((run_dir / name).exists() for name in ("curves.csv", "plot.png"))
  if (files and isinstance(m, dict) and m.get("status") == "complete"
      and m.get("settings_fingerprint") == fingerprint):
    return m
  return None


def run(args: argparse.Namespace) -> int:
  _validate(args)
  # The parser refuses empty lists (`--widths ''` is not "no sweep").
  widths = args.widths
  seeds = [0 if args.seed is None else args.seed] if args.seeds is None else args.seeds
  sweep = widths is not None or len(seeds) > 1
  widths = widths or [args.width or DEFAULT_WIDTH[args.model]]

  import jax
  import numpy as np

  import tasks
  from ntk_dynamics import runs

  try:
    data = tasks.load_dataset(args.dataset, data_dir=args.data_dir, n_train=args.n_train,
                              n_test=args.n_test, seed=args.data_seed)
  except ValueError as e:
    raise SystemExit(f"curves: cannot load --dataset {args.dataset!r}: {e}")
  # Before any work, once the inputs are valid: results that cannot be saved would be lost.
  out = writable_folder(args.out, ("config.json", "metrics.json", "curves.csv", "plot.png",
                                   "sweep.csv", "sweep.png"))
  progress = not args.no_progress and sys.stderr.isatty()
  config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
  config.update({"resolved_widths": widths, "resolved_seeds": seeds,
                 "jax_version": jax.__version__, "platform": jax.devices()[0].platform,
                 "x_train_shape": list(data.x_train.shape), "num_classes": data.num_classes,
                 "argv": sys.argv[1:]})
  settings = _settings(config)
  fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  if args.resume:
    _check_resume(out, settings, set(vars(args)))
    if not sweep and _completed(out, fingerprint) is not None:
      print(f"nothing to resume: {out}/metrics.json is complete, with these settings.")
      return 0
  runs.atomic_write_json(out / "config.json", config)

  rows = []
  total = len(widths) * len(seeds)
  try:
    if not sweep:
      comparison, _ = _one_run(args, data, widths[0], seeds[0], out, progress, fingerprint)
    else:
      for width in widths:
        for seed in seeds:
          sub = out / f"width{width}_seed{seed}"
          m = _completed(sub, fingerprint) if args.resume else None
          if m is not None:
            print(f"[{len(rows) + 1}/{total}] width {width}, seed {seed}: completed in {sub}, "
                  "kept", flush=True)
          else:
            print(f"[{len(rows) + 1}/{total}] width {width}, seed {seed}", flush=True)
            _, m = _one_run(args, data, width, seed, sub, progress, fingerprint)
          rows.append({k: m.get(k) for k in SWEEP_COLUMNS} | {"seconds": m["total_seconds"]})
          runs.atomic_write_csv(out / "sweep.csv", SWEEP_COLUMNS,
                                [[r[k] for k in SWEEP_COLUMNS] for r in rows])
          _save_sweep_plot(out / "sweep.png", rows,
                           f"{args.model} ({args.parameterization}) on {data.name} "
                           f"n={len(data.x_train)}, {args.loss}, {args.optimizer}, "
                           f"{args.steps} steps, η = {rows[-1]['lr_ratio']:.2f}·η_max")
  except KeyboardInterrupt as e:
    return _interrupted(e, out, sweep, len(rows), total, args.steps)
  if not sweep:
    _print_table(comparison)
    print(f"wrote {out}/config.json, metrics.json, curves.csv, plot.png")
    return 0
  print(f"{'width':>6} {'seeds':>5} | {'max ΔL_train/L0':>15} {'max ΔL_test/L0':>15} | "
        f"{'RMSE train':>10} {'RMSE test':>10} | {'NTK drift':>9} | {'trusted':>7}")
  for width in widths:
    rs = [r for r in rows if r["width"] == width]

    def stat(key, pct=True):
      v = np.array([r[key] for r in rs], float)
      if not pct:
        return f"{v.mean():.3g}"
      return (f"{100 * v.mean():.2f}±{100 * v.std():.2f}%" if len(v) > 1
              else f"{100 * v.mean():.2f}%")

    print(f"{width:6d} {len(rs):5d} | {stat('max_train_loss_deviation'):>15} "
          f"{stat('max_test_loss_deviation'):>15} | {stat('train_output_rmse', False):>10} "
          f"{stat('test_output_rmse', False):>10} | {stat('ntk_drift'):>9} | "
          f"{sum(bool(r['trusted']) for r in rs)}/{len(rs):<5}")
  print(f"wrote {out}/config.json, sweep.csv, sweep.png and width*_seed*/ folders")
  return 0
