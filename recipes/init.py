"""`ntk-dynamics init`: NTK-based initialization tweaks, judged by real training.

For every seed, the default initialization of a deep MLP and each tweak of it are compared on
the NTK at initialization (κ, λ_max, λ_min, trace, effective rank on the training set; layer
shares of Tr Θ on the search batch), on the training curve the closed-form dynamics predicts
from that kernel, and on the curve actually obtained by K steps of full-batch `optax.sgd`
on the MSE loss 0.5·mean((f − y)²) (train loss, test accuracy).

Rows (`--tweaks`):
  default        default init, fixed step `--lr`
  spectral_lr    default init, η = c·η_max (c = `--lr-factor`, η_max = 2N/λ_max)
  catapult       default init, η = `--catapult-factor`·η_max (1 < c < 2: catapult regime)
  centered       antisymmetric init (f₀ ≡ 0, Θ unchanged), η = c·η_max
  balanced       per-layer weight scales giving equal shares of Tr Θ, η = c·η_max
  balanced_lr    per-layer learning-rate multipliers with equal shares of the effective
                 kernel, η = c·η_max(effective kernel)
  scale_search   per-tensor scales minimising κ at fixed trace, η = c·η_max
  gradinit       per-tensor scales minimising GradInit's one-step loss, η = c·η_max
Every row after `default` uses the same rule η = c·η_max of its own kernel, so "vs
spectral_lr" isolates what the initialization change does; "vs default" also includes the
change of step size.

Writes to `--out`: metrics.json (config, per-seed figures and curves, summary), table.md,
spectra.png (normalised eigenvalues, one panel per initialization), loss_curves.png
(actual and predicted training loss), shares.png (layer shares of Tr Θ). After Ctrl-C (exit
status 130) or an error in one row, metrics.json holds every (seed, row) finished ("status":
"interrupted" or "failed"); the same command with `--resume` keeps them and computes the rest,
and refuses a metrics.json written with other settings.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from recipes.cli import (SEED_LIMIT, int_list, non_negative_float, non_negative_int, out_folder,
                         positive_float, positive_int, refuse_other_settings, writable_folder)

ROWS = ("default", "spectral_lr", "catapult", "centered", "balanced", "balanced_lr",
        "scale_search", "gradinit")
DEFAULT_ROWS = ("default", "spectral_lr", "catapult", "centered", "balanced", "balanced_lr",
                "scale_search", "gradinit")


def _tweak_list(text: str) -> list[str]:
  """A type for --tweaks: a non-empty comma-separated list of rows of `ROWS`, run in the order
  of `ROWS` (a repeated row runs once)."""
  names = [r.strip() for r in text.split(",") if r.strip()]
  unknown = [r for r in names if r not in ROWS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
        (f"unknown {', '.join(map(repr, unknown))}" if unknown else f"empty, got {text!r}")
        + f"; choose among {', '.join(ROWS)}")
  return [r for r in ROWS if r in names]


def _bounds(text: str) -> list[float]:
  """A type for --bounds: 'lo,hi' with 0 < lo <= 1 <= hi < inf."""
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be 'lo,hi', got {text!r}") from None
  if not (0 < lo <= 1 <= hi < math.inf):
    raise argparse.ArgumentTypeError(f"must satisfy 0 < lo <= 1 <= hi < inf, got {text!r}")
  return [lo, hi]


def add_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("data")
  g.add_argument("--dataset", default="digits", help="'digits' (bundled) or tfds:NAME")
  g.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir")
  g.add_argument("--n-train", type=positive_int, default=256,
                 help="training examples (the kernel, the prediction and the training)")
  g.add_argument("--n-test", type=positive_int, default=None,
                 help="test examples (default: all)")
  g.add_argument("--n-search", type=positive_int, default=128,
                 help="the first N training examples: batch of the searches and shares")
  g.add_argument("--data-seed", type=non_negative_int, default=0)
  g = p.add_argument_group("model")
  g.add_argument("--width", type=positive_int, default=64)
  g.add_argument("--depth", type=positive_int, default=8, help="hidden layers")
  g.add_argument("--activation", default="tanh", choices=("tanh", "relu", "gelu", "erf"))
  g.add_argument("--w-std", type=positive_float, default=None,
                 help="σ_w of the default init (default: 1 for tanh/erf, √2 otherwise)")
  g.add_argument("--b-std", type=non_negative_float, default=0.0)
  g.add_argument("--parameterization", default="standard", choices=("standard", "ntk"))
  g = p.add_argument_group("training")
  g.add_argument("--steps", type=positive_int, default=300, help="K, full-batch SGD steps")
  g.add_argument("--lr", type=positive_float, default=0.1,
                 help="fixed step of the 'default' row")
  g.add_argument("--lr-factor", type=positive_float, default=0.5,
                 help="c in η = c·η_max for every row but 'default' and 'catapult' "
                      "(c < 1: lazy regime)")
  g.add_argument("--catapult-factor", type=positive_float, default=1.5,
                 help="c of the 'catapult' row")
  g = p.add_argument_group("tweaks")
  g.add_argument("--tweaks", type=_tweak_list, default=",".join(DEFAULT_ROWS),
                 help=f"comma-separated rows among {', '.join(ROWS)}")
  g.add_argument("--search-steps", type=positive_int, default=20)
  g.add_argument("--search-lr", type=positive_float, default=0.1,
                 help="Adam step on log-scales")
  g.add_argument("--bounds", type=_bounds, default="0.1,10",
                 help="scale bounds lo,hi of the searches (0 < lo <= 1 <= hi)")
  g.add_argument("--temperature", type=non_negative_float, default=0.05,
                 help="τ of the soft log κ (0: exact)")
  g = p.add_argument_group("run")
  g.add_argument("--seeds", type=int_list(minimum=0, maximum=SEED_LIMIT), default="0,1,2",
                 help="comma-separated distinct initialization seeds in [0, 2**32)")
  g.add_argument("--implementation", default="auto",
                 choices=("auto", "jacobian_contraction", "ntk_vector_products",
                          "structured_derivatives"))
  g.add_argument("--out", type=out_folder, default="runs/init", help="output folder")
  g.add_argument("--no-progress", action="store_true")
  g.add_argument("--resume", action="store_true",
                 help="continue an interrupted run in --out: the (seed, row) results it holds "
                      "are kept, the others are computed; other settings are refused")


def _fail(msg: str):
  raise SystemExit(f"init: {msg}")


def _parse(args: argparse.Namespace) -> tuple[list[int], list[str], tuple[float, float]]:
  """The seeds, rows and bounds; argparse has checked every option on its own."""
  if args.n_search > args.n_train:
    _fail(f"--n-search must be at most --n-train ({args.n_train}), got {args.n_search}.")
  if "gradinit" in args.tweaks and args.n_search < 2:
    _fail(f"--tweaks gradinit needs --n-search >= 2 (two half-batches), got {args.n_search}.")
  return list(args.seeds), list(args.tweaks), tuple(args.bounds)


# Options that do not change what is computed: the rest of the config must match to --resume.
RUN_CONTROL = ("out", "no_progress", "resume")


def _settings(config: dict) -> dict:
  """The config without its run-control entries, as JSON reads it back."""
  import json

  from ntk_dynamics import runs
  kept = {k: v for k, v in config.items() if k not in RUN_CONTROL}
  return json.loads(runs.strict_json_dumps(kept))


def _resumable(path, settings: dict, flags: set) -> tuple[dict, list, float]:
  """The rows of the run in `path` (metrics.json) that `--resume` keeps: `{(seed, row):
  entry}`, their warnings and seconds; nothing when there is no file. Refuses (SystemExit) a
  file it cannot read or one written with other settings."""
  from ntk_dynamics import runs
  if not path.exists():
    return {}, [], 0.0
  try:
    m = runs.read_json(path)
    stored = _settings(m["config"])
    done = {(int(s["seed"]), r): s for r, entries in m["per_seed"].items() for s in entries}
    warnings, seconds = list(m["warnings"]), float(m["seconds"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    _fail(f"--resume cannot read {path} ({type(e).__name__}: {e}); delete it to start over, "
          "or drop --resume.")
  refuse_other_settings("init", f"{path} holds results computed with", stored, settings, flags)
  return done, warnings, seconds


_TRAINERS: dict = {}


def _train(f, params, x, y, x_test, y_test, learning_rate: float, multipliers, steps: int):
  """K full-batch `optax.sgd` steps (per-leaf multipliers via `TweakResult.optimizer`);
  returns (loss at steps 0..K, test accuracy, test loss). One compilation per (f, K, shapes):
  the step size and multipliers are traced arguments."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from ntk_dynamics import init as ntk_init

  key = (f, steps, multipliers is None)
  if key not in _TRAINERS:
    def loss_fn(p, x, y):
      return 0.5 * jnp.mean((f(p, x) - y) ** 2)

    def run(p, lr, mult, x, y, x_test, y_test):
      tx = ntk_init.TweakResult(f, p, {}, lr, mult).optimizer()

      def step(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss
      (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
      out_t = f(p, x_test)
      # A diverged network's NaN logits would argmax to class 0: such an example is wrong.
      correct = (jnp.argmax(out_t, -1) == y_test) & jnp.all(jnp.isfinite(out_t), -1)
      return (jnp.append(losses, loss_fn(p, x, y)), jnp.mean(correct),
              0.5 * jnp.mean((out_t - jax.nn.one_hot(y_test, out_t.shape[-1])) ** 2))
    _TRAINERS[key] = jax.jit(run)
  losses, acc, test_loss = _TRAINERS[key](params, learning_rate, multipliers, x, y, x_test,
                                          y_test)
  return np.asarray(losses, np.float64), float(acc), float(test_loss)


def _predict(kernel, f0, y, lr: float, steps: int):
  """Closed-form train loss of the linearized network after 0..K steps (dynamics module), from
  the full (N, N, K, K) kernel."""
  import warnings

  import jax.numpy as jnp
  import numpy as np

  from ntk_dynamics import dynamics
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # c ≥ 1 rows diverge by design
    predict = dynamics.gradient_descent_mse_steps(kernel, y, learning_rate=lr, trace_axes=())
    ft = predict(jnp.arange(steps + 1), fx_train_0=f0)
  loss = np.asarray(0.5 * jnp.mean((ft - y) ** 2, axis=(1, 2)), np.float64)
  return np.where(np.isfinite(loss), loss, np.inf)  # c ≥ 1: the linearized model diverges


def _diverged_as_inf(losses):
  """Losses with NaN (a diverged run) as +inf, so that any finite loss is lower."""
  import numpy as np
  losses = np.asarray(losses, np.float64)
  return np.where(np.isnan(losses), np.inf, losses)


def _tail_mean(losses) -> float:
  """Mean training loss over the last 10% of the steps: at large steps the loss oscillates
  (edge of stability) and its value at exactly step K is noisy. inf if the run diverged."""
  import numpy as np
  losses = _diverged_as_inf(losses)
  return float(np.mean(losses[-max(1, (len(losses) - 1) // 10):]))


def _final(entry: dict) -> float:
  """Training loss at step K; inf if the run diverged (NaN)."""
  return float(_diverged_as_inf(entry["actual_loss"][-1]))


def _summary(per_seed: dict, rows: list[str], steps: int) -> dict:
  import numpy as np
  out = {}
  for r in rows:
    runs_ = per_seed[r]
    final = np.array([_final(s) for s in runs_])
    tail = np.array([_tail_mean(s["actual_loss"]) for s in runs_])

    def wins(ref, tail_mean=False):
      if ref not in per_seed or ref == r:
        return None
      mine = tail if tail_mean else final
      theirs = np.array([_tail_mean(s["actual_loss"]) if tail_mean else _final(s)
                         for s in per_seed[ref]])
      return int(np.sum(mine < theirs))

    def med(key):
      vals = np.array([s[key] for s in runs_], np.float64)
      return float(np.median(vals))
    out[r] = {"seeds": len(runs_), "condition_number_median": med("condition_number"),
              "lambda_max_median": med("lambda_max"), "trace_median": med("trace"),
              "effective_rank_median": med("effective_rank"),
              "learning_rate_median": med("learning_rate"),
              "predicted_final_loss_median": float(np.median(
                  [s["predicted_loss"][-1] for s in runs_])),
              "actual_final_loss_median": float(np.median(final)),
              "actual_final_loss_mean": float(np.mean(final)),
              "actual_tail_loss_median": float(np.median(tail)),
              "tail_wins_vs_default": wins("default", True),
              "tail_wins_vs_spectral_lr": wins("spectral_lr", True),
              "test_accuracy_median": med("test_accuracy"),
              "test_accuracy_mean": float(np.mean([s["test_accuracy"] for s in runs_])),
              "wins_vs_default": wins("default"),
              "wins_vs_spectral_lr": wins("spectral_lr"),
              "search_batch_kappa_before_after_median": (
                  [float(np.median([s["tweak_report"]["condition_number_before"]
                                    for s in runs_])),
                   float(np.median([s["tweak_report"]["condition_number_after"]
                                    for s in runs_]))]
                  if all("condition_number_after" in s["tweak_report"] for s in runs_)
                  else None),
              # κ_default / κ_row per seed (> 1: the row is better conditioned)
              "kappa_reduction_vs_default_median": (float(np.median(
                  [d["condition_number"] / s["condition_number"]
                   for d, s in zip(per_seed["default"], runs_)])) if "default" in per_seed
                  else None)}
  return out


def _fmt_loss(v: float, limit: float = 1e6) -> str:
  return f"{v:.3g}" if math.isfinite(v) and v < limit else "diverges"


def _wins(s: dict, ref: str) -> str:
  if s[f"wins_vs_{ref}"] is None:
    return "—"
  return f"{s[f'wins_vs_{ref}']}/{s['seeds']} ({s[f'tail_wins_vs_{ref}']}/{s['seeds']})"


def _table(summary: dict, rows: list[str], steps: int) -> str:
  head = ("| row | κ (train) | κ₀/κ | λ_max | η | pred. loss@K | actual loss@K | "
          "last-10% mean | test acc | wins vs default | wins vs spectral_lr |")
  lines = [head, "|" + "---|" * 11]
  for r in rows:
    s = summary[r]
    red = s["kappa_reduction_vs_default_median"]
    lines.append(
        f"| {r} | {s['condition_number_median']:.4g} | "
        f"{'—' if red is None else format(red, '.3g')} | {s['lambda_max_median']:.4g} | "
        f"{s['learning_rate_median']:.3g} | "
        f"{_fmt_loss(s['predicted_final_loss_median'])} | "
        f"{_fmt_loss(s['actual_final_loss_median'], math.inf)} | "
        f"{_fmt_loss(s['actual_tail_loss_median'], math.inf)} | "
        f"{s['test_accuracy_median']:.3f} | "
        f"{_wins(s, 'default')} | {_wins(s, 'spectral_lr')} |")
  return "\n".join(lines) + f"\n\nMedians over seeds; K = {steps} steps; wins: seeds with a " \
      "lower actual training loss at step K (in brackets: lower mean over the last 10% of " \
      "the steps, robust to edge-of-stability oscillations).\n"


def _plots(out, per_seed: dict, rows: list[str], title: str) -> None:
  import numpy as np

  from ntk_dynamics import plots
  styles = {r: f"C{i}" for i, r in enumerate(ROWS)}
  # spectra: one panel per distinct kernel
  kernels = [r for r in rows if r not in ("spectral_lr", "catapult", "centered")]
  if "default" not in kernels and any(r in rows for r in ("spectral_lr", "catapult",
                                                          "centered")):
    kernels.insert(0, next(r for r in rows if r in ("spectral_lr", "catapult", "centered")))
  panels = []
  for r in kernels:
    series = {}
    for s in per_seed[r]:
      lam = np.sort(np.asarray(s["eigenvalues"]))[::-1]
      series[f"seed {s['seed']} (κ={s['condition_number']:.3g})"] = (
          np.arange(1, len(lam) + 1), lam / lam.sum(), "-")
    panels.append((r, "index", "λ_i / Tr Θ", series))
  plots.save_panels(out / "spectra.png", panels, logy=True, logx=True,
                    suptitle=f"NTK spectra at init (train set) — {title}")
  # loss curves: actual (mean over seeds) and predicted
  actual, predicted = {}, {}
  for r in rows:
    a = np.mean([s["actual_loss"] for s in per_seed[r]], axis=0)
    p = np.median([s["predicted_loss"] for s in per_seed[r]], axis=0)
    steps = np.arange(len(a))
    actual[r] = (steps[1:], a[1:], styles[r] + "-")
    predicted[r] = (steps[1:], np.clip(p[1:], 1e-12, 1e3), styles[r] + "--")
  plots.save_panels(out / "loss_curves.png",
                    [("actual training loss (mean over seeds)", "step", "loss", actual),
                     ("predicted by the NTK at init (median)", "step", "loss", predicted)],
                    logx=True, logy=True, suptitle=title)
  series = {}
  for r in kernels:
    shares = per_seed[r][0]["shares"]
    series[r] = (np.arange(len(shares)), list(shares.values()), styles[r] + "o-")
  if series:
    plots.save_panels(out / "shares.png",
                      [("share of Tr Θ per layer (seed %d)" % per_seed[kernels[0]][0]["seed"],
                        "layer", "Tr Θ_l / Tr Θ", series)], suptitle=title)


def run(args: argparse.Namespace) -> int:
  seeds, rows, bounds = _parse(args)
  import warnings

  import jax
  import jax.numpy as jnp
  import numpy as np
  from tqdm import tqdm

  import ntk_dynamics as nd
  import tasks
  from ntk_dynamics import init as ntk_init
  from ntk_dynamics import models, runs
  from ntk_dynamics.init import _common

  t_start = time.perf_counter()
  # Before any work: results that cannot be saved would be lost.
  out = writable_folder(args.out, ("metrics.json", "table.md", "spectra.png",
                                   "loss_curves.png", "shares.png"))
  config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
  w_std = args.w_std if args.w_std is not None else (
      1.0 if args.activation in ("tanh", "erf") else math.sqrt(2.0))
  config.update({"w_std_resolved": w_std, "jax_version": jax.__version__,
                 "platform": jax.devices()[0].platform})
  done, warn_log, seconds_before = (
      _resumable(out / "metrics.json", _settings(config), set(vars(args))) if args.resume
      else ({}, [], 0.0))
  impl = nd.NtkImplementation[args.implementation.upper()]
  if impl == nd.NtkImplementation.STRUCTURED_DERIVATIVES:
    try:  # not every checkout has it yet: fail before any work
      nd.empirical_ntk_fn(lambda p, x: x * p, implementation=impl)(
          jnp.ones((1, 1)), None, jnp.ones(()))
    except NotImplementedError as e:
      _fail(f"--implementation structured_derivatives: {e}")
  kw = dict(implementation=impl, vmap_axes=0)
  try:
    data = tasks.load_dataset(args.dataset, data_dir=args.data_dir, n_train=args.n_train,
                              n_test=args.n_test, seed=args.data_seed, flatten=True)
  except ValueError as e:  # load_dataset names its arguments, which these flags set
    message = str(e)
    for name, flag in (("n_train", "--n-train"), ("n_test", "--n-test"),
                       ("seed", "--data-seed"), ("data_dir", "--data-dir")):
      message = message.replace(f"`{name}`", flag)
    _fail(f"cannot load --dataset {args.dataset!r}: {message}")
  x = jnp.asarray(data.x_train)
  y = jnp.asarray(tasks.one_hot(data.y_train, data.num_classes))
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  x_search, y_search = x[:args.n_search], y[:args.n_search]
  model = models.mlp([args.width] * args.depth, data.num_classes, activation=args.activation,
                     parameterization=args.parameterization, w_std=w_std, b_std=args.b_std)
  f = nd.from_haiku(model)
  title = (f"{args.activation} MLP {args.depth}×{args.width} (σ_w={w_std:.3g}, "
           f"{args.parameterization}) on {args.dataset}, n={len(x)}, K={args.steps}")
  print(title)
  if done:
    kept = sum((seed, r) in done for seed in seeds for r in rows)
    print(f"--resume: {kept} of {len(seeds) * len(rows)} rows kept from {out}/metrics.json")

  per_seed = {r: [] for r in rows}
  bar = tqdm(total=len(seeds) * len(rows), disable=args.no_progress, unit="row")

  def save_rows(status: str) -> int:
    """metrics.json with the rows finished so far; returns their number."""
    bar.close()
    runs.atomic_write_json(out / "metrics.json", {
        "status": status, "config": config, "title": title, "per_seed": per_seed,
        "warnings": warn_log, "seconds": seconds_before + time.perf_counter() - t_start})
    return sum(len(v) for v in per_seed.values())

  where = ""
  try:
    for seed in seeds:
      where = f"seed {seed}"
      params0 = model.init(jax.random.PRNGKey(seed), x[:1])
      cache: dict = {}

      def default_kernel():
        if "k" not in cache:
          cache["k"] = _common.ntk_kernel(f, params0, x, **kw)
          cache["shares"] = ntk_init.layer_shares(f, params0, x_search, by="group", **kw)
        return cache["k"], cache["shares"]

      for r in rows:
        if (seed, r) in done:  # --resume: computed by the interrupted run
          per_seed[r].append(done[seed, r])
          bar.update(1)
          continue
        where = f"seed {seed}, row {r}"
        bar.set_description(f"seed {seed} {r}")
        t0 = time.perf_counter()
        report: dict = {}
        multipliers = None
        with warnings.catch_warnings(record=True) as caught:
          warnings.simplefilter("always", RuntimeWarning)
          if r in ("default", "spectral_lr", "catapult"):
            f_r, p_r = f, params0
            k_r, shares = default_kernel()
            f_eff, p_eff = f_r, p_r
          elif r == "centered":
            res = ntk_init.center_outputs(f, params0, x_search, mode="antisymmetric")
            f_r, p_r, report = res.f, res.params, res.report
            # Θ is unchanged by construction (tests check it to round-off): reuse it
            k_r, shares = default_kernel()
            f_eff, p_eff = f_r, p_r
          elif r in ("balanced", "balanced_lr"):
            res = ntk_init.balance_layers(
                f, params0, x_search,
                method="weights" if r == "balanced" else "learning_rate", **kw)
            f_r, p_r, report, multipliers = res.f, res.params, res.report, res.lr_multipliers
            f_eff, p_eff = ((f_r, p_r) if multipliers is None else
                            ntk_init.effective_model(f_r, p_r, multipliers))
            k_r = _common.ntk_kernel(f_eff, p_eff, x, **kw)
            shares = report["relative_shares_after"]
          else:  # scale_search, gradinit
            res = ntk_init.search_init_scales(
                f, params0, x_search, steps=args.search_steps, learning_rate=args.search_lr,
                bounds=bounds, temperature=args.temperature,
                objective="log_cond" if r == "scale_search" else "gradinit",
                y=y_search if r == "gradinit" else None, **kw)
            f_r, p_r, report = res.f, res.params, res.report
            f_eff, p_eff = f_r, p_r
            k_r = _common.ntk_kernel(f_eff, p_eff, x, **kw)
            shares = ntk_init.layer_shares(f_r, p_r, x_search, by="group", **kw)
          spec = ntk_init.kernel_spectrum(k_r)
          # The step limit and the predicted curve use the full (N·K, N·K) kernel: the traced
          # k_r's λ_max is only a lower bound on it, and half the traced η_max can already make
          # the linearized network diverge.
          k_full = _common.ntk_kernel(f_eff, p_eff, x, trace_axes=(), **kw)
          eta_max = ntk_init.spectral_learning_rate(f_eff, p_eff, x, factor=1.0, kernel=k_full,
                                                    **kw).report["eta_max"]
          if r == "default":
            lr, factor = args.lr, None
          else:
            factor = args.catapult_factor if r == "catapult" else args.lr_factor
            lr = factor * eta_max
          f0 = f_eff(p_eff, x)
          predicted = _predict(k_full, f0, y, lr, args.steps)
          actual, acc, test_loss = _train(f_r, p_r, x, y, x_test, y_test, lr, multipliers,
                                          args.steps)
        per_seed[r].append({
            "seed": seed, "condition_number": spec.condition_number,
            "lambda_max": spec.lambda_max, "lambda_min": spec.lambda_min, "trace": spec.trace,
            "effective_rank": spec.effective_rank, "top_eigenvalues": list(spec.top_eigenvalues),
            "eigenvalues": spec.eigenvalues.tolist(), "learning_rate": lr, "eta_max": eta_max,
            "lr_factor": factor, "regime": (ntk_init.learning_rate_regime(factor).split(":")[0]
                                            if factor else "fixed"),
            "shares": {k: float(v) for k, v in shares.items()},
            "max_abs_f0": float(jnp.max(jnp.abs(f0))),
            "predicted_loss": predicted.tolist(), "actual_loss": actual.tolist(),
            "test_accuracy": acc, "test_loss": test_loss,
            "tweak_report": _common.jsonable(report), "seconds": time.perf_counter() - t0})
        # After the row: the warnings kept by an interrupted run are those of its rows.
        warn_log.extend(f"seed {seed} {r}: {w.message}" for w in caught)
        bar.update(1)
  except KeyboardInterrupt:
    n_done = save_rows("interrupted")
    print(f"\ninit: interrupted after {n_done} of {len(seeds) * len(rows)} rows; they are in "
          f"{out}/metrics.json (status 'interrupted'). Run the same command with --resume to "
          "keep them and compute the rest.", file=sys.stderr)
    return 130
  except Exception as e:
    # An error in one row (e.g. a singular kernel for the search) must not cost the others.
    n_done = save_rows("failed")
    if not isinstance(e, (ValueError, OSError)):
      raise
    _fail(f"{where}: {e} ({n_done} row(s) finished before are in {out}/metrics.json, "
          "status 'failed'; --resume keeps them)")
  bar.close()

  summary = _summary(per_seed, rows, args.steps)
  table = _table(summary, rows, args.steps)
  print(table)
  for w in warn_log[:20]:
    print("warning:", w)
  runs.atomic_write_json(out / "metrics.json", {
      "status": "completed", "config": config, "title": title, "summary": summary,
      "per_seed": per_seed, "warnings": warn_log,
      "seconds": seconds_before + time.perf_counter() - t_start})
  runs.atomic_write_bytes(out / "table.md", (f"{title}\n\n" + table).encode())
  _plots(out, per_seed, rows, title)
  print(f"wrote {out}/metrics.json, table.md, spectra.png, loss_curves.png, shares.png "
        f"({time.perf_counter() - t_start:.0f} s)")
  return 0
