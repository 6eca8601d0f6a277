"""`ntk-dynamics meta`: few-shot meta-learning with MAML, ANIL or a closed-form NTK inner loop.

Meta-trains a Haiku MLP (or CNN) on sinusoid regression or N-way K-shot classification,
evaluating every `--eval-every` steps on `--eval-tasks` held-out tasks (mean ± 95% CI).
`--select validation` also evaluates on tasks of validation classes and reports the held-out
figures of the meta-parameters that did best there, next to those of the last ones.
Writes to `--out`: metrics.json, learning_curve.png, checkpoint.npz (resumable with
`--resume`) and results.md (the final table). `--profile` instead measures the wall time and
compiled memory of one meta-step of every inner loop against the number of inner steps.
Ctrl-C writes metrics.json with "status": "interrupted", the step reached and every evaluation
completed, keeps the last checkpoint for `--resume`, and exits with status 130.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from recipes.cli import int_list, non_negative_int, positive_float, positive_int, seed_int

INNER = ("maml", "anil", "ntk_flow", "ntk_steps", "ntk_ridge")
# Tasks with a split of their classes that holds validation classes (--select validation).
VALIDATION_TASKS = ("digits", "tfds:omniglot", "tfds:cifar100")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--task", default="sinusoid",
                 help="sinusoid, digits, tfds:omniglot, tfds:mnist, tfds:fashion_mnist, "
                      "tfds:cifar10 or tfds:cifar100")
  p.add_argument("--inner", default="maml", choices=INNER)
  p.add_argument("--k-shot", type=positive_int, default=5, help="support examples per class / task")
  p.add_argument("--n-way", type=positive_int, default=5, help="classes per task (classification)")
  p.add_argument("--k-query", type=positive_int, default=None,
                 help="query examples per class / task during meta-training (default: k-shot "
                      "for sinusoid, as in MAML; 15 for classification)")
  p.add_argument("--eval-k-query", type=positive_int, default=None,
                 help="query examples per class / task for evaluation (default: 50 for "
                      "sinusoid, --k-query for classification)")
  p.add_argument("--inner-steps", type=non_negative_int, default=1,
                 help="k: inner steps (ntk_flow: flow time k * inner-lr; unused by ntk_ridge)")
  p.add_argument("--inner-lr", type=positive_float, default=None,
                 help="α on the inner loss mean((f-y)^2) or cross-entropy (default 0.01 for "
                      "sinusoid as in MAML, 0.4 for classification as in MAML's Omniglot)")
  p.add_argument("--first-order", action="store_true", help="first-order MAML / ANIL")
  p.add_argument("--ridge", type=float, default=1e-3,
                 help="ntk_ridge: ridge relative to mean(diag Θ) (neural-tangents diag_reg)")
  p.add_argument("--outer-loss", default="auto", choices=("auto", "mse", "xent"),
                 help="query loss of the meta-objective; auto: cross-entropy for maml/anil "
                      "classification, MSE otherwise (the closed forms' inner loss)")
  p.add_argument("--query-kernel", default="auto", choices=("auto", "explicit", "products"),
                 help="closed forms: explicit Θ(query, support) or NTK-vector products (auto: "
                      "explicit for the traced kernel, products for the full one)")
  p.add_argument("--full-kernel", action="store_true",
                 help="closed forms on classification: full per-class kernel (trace_axes=()) "
                      "instead of the logit-traced one")
  p.add_argument("--meta-steps", type=non_negative_int, default=10000)
  p.add_argument("--meta-batch", type=positive_int, default=None,
                 help="tasks per meta-step (default 25 for sinusoid, 32 for classification)")
  p.add_argument("--meta-lr", type=positive_float, default=1e-3, help="Adam step size")
  p.add_argument("--eval-every", type=positive_int, default=1000)
  p.add_argument("--eval-tasks", type=positive_int, default=600)
  p.add_argument("--eval-batch", type=positive_int, default=100, help="tasks per evaluation call")
  p.add_argument("--checkpoint-every", type=positive_int, default=None,
                 help="default: --eval-every")
  p.add_argument("--select", default="last", choices=("last", "validation"),
                 help="meta-parameters to report. last: those after the last step. validation: "
                      "also evaluate on --eval-tasks tasks of validation classes at every "
                      "evaluation and report the held-out (test) figures of the best (highest "
                      "validation accuracy, earliest on ties) next to the last; needs "
                      f"--task {', '.join(VALIDATION_TASKS)}, and changes the meta-train "
                      "classes of digits (0-3, validation 4-5) and Omniglot (MAML's 1100, "
                      "validation 100)")
  p.add_argument("--model", default="auto", choices=("auto", "mlp", "cnn"),
                 help="auto: MLP for sinusoid and digits, CNN for tfds images")
  p.add_argument("--width", type=positive_int, default=None,
                 help="hidden width / channels (default 40 for sinusoid, 64 otherwise)")
  p.add_argument("--depth", type=non_negative_int, default=2, help="hidden layers")
  p.add_argument("--w-std", type=positive_float, default=1 / math.sqrt(3),
                 help="weight std × √fan_in (default 1/√3, the std of PyTorch nn.Linear's "
                      "default init; with He's √2 MAML's α=0.01 is beyond the stable inner "
                      "step on sinusoids)")
  p.add_argument("--seed", type=seed_int, default=0,
                 help="seed of the task stream and of the initialization, in [0, 2**32)")
  p.add_argument("--eval-seed", type=non_negative_int, default=1_000_003,
                 help="pool seed of the held-out tasks (the same for every run)")
  p.add_argument("--out", default=None, help="run folder (required for --resume)")
  p.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir")
  p.add_argument("--resume", action="store_true",
                 help="continue from OUT/checkpoint.npz (same settings; --meta-steps may grow)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--profile", action="store_true",
                 help="measure time and compiled memory of one meta-step of every inner loop "
                      "for --profile-steps instead of training")
  p.add_argument("--profile-steps", type=int_list(minimum=0), default="1,5,10,50",
                 help="comma-separated inner step counts (ints >= 0) to profile")
  p.add_argument("--profile-inner", type=_inner_list, default=",".join(INNER),
                 help="comma-separated inner loops to profile")
  p.add_argument("--profile-repeats", type=non_negative_int, default=5,
                 help="timed calls per configuration (the median is reported)")


def _inner_list(text: str) -> list[str]:
  """A type for --profile-inner: a non-empty comma-separated list of loops of `INNER`."""
  names = [s.strip() for s in text.split(",") if s.strip()]
  unknown = [s for s in names if s not in INNER]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"must list inner loops of {', '.join(INNER)}, got "
                                     f"{text!r}")
  return names


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
  regression = args.task == "sinusoid"
  if args.k_query is None:
    args.k_query = args.k_shot if regression else 15
  if args.eval_k_query is None:
    args.eval_k_query = 50 if regression else args.k_query
  if args.inner_lr is None:
    args.inner_lr = 0.01 if regression else 0.4
  if args.meta_batch is None:
    args.meta_batch = 25 if regression else 32
  if args.width is None:
    args.width = 40 if regression else 64
  if args.model == "auto":
    args.model = "mlp" if args.task in ("sinusoid", "digits") else "cnn"
  return args


def _check(args: argparse.Namespace) -> None:
  # Ranges (counts positive, rates finite and > 0) are checked by the parser's types.
  if args.task != "sinusoid" and args.n_way < 2:
    raise SystemExit(f"error: --n-way must be at least 2 for classification, got "
                     f"{args.n_way}: a 1-way task has a single class, so every prediction is "
                     "trivially right.")
  if args.resume and not args.out:
    raise SystemExit("error: --resume needs --out (the run folder holding checkpoint.npz).")
  if args.task == "sinusoid" and args.outer_loss == "xent":
    raise SystemExit("error: --outer-loss xent needs a classification task.")
  if args.inner == "ntk_ridge" and not args.ridge > 0:
    raise SystemExit("error: ntk_ridge needs --ridge > 0.")
  if args.select == "validation" and args.task not in VALIDATION_TASKS:
    raise SystemExit(f"error: --select validation needs a task with validation classes "
                     f"(--task {', '.join(VALIDATION_TASKS)}); --task {args.task} has no "
                     "validation split. Use --select last.")


def build_tasks(args: argparse.Namespace):
  """(train sampler, evaluation sampler with a fixed pool, validation sampler with a fixed pool
  (None unless `--select validation`), number of model outputs, the support inputs (n, ...) of
  one task).

  Raises SystemExit with the sampler's message on impossible sizes (e.g. K-shot larger than a
  class holds)."""
  import tasks
  validation = None
  try:
    if args.task == "sinusoid":
      train = tasks.SinusoidSampler(args.k_shot, args.k_query)
      evaluation = tasks.SinusoidSampler(args.k_shot, args.eval_k_query,
                                         num_tasks=args.eval_tasks, pool_seed=args.eval_seed)
      outputs = 1
    else:
      # CIFAR-100's default split already has validation classes.
      class_splits = ({"digits": tasks.DIGITS_CLASS_SPLITS_WITH_VALIDATION,
                       "tfds:omniglot": "maml"}.get(args.task)
                      if args.select == "validation" else None)
      source = tasks.load_few_shot_source(args.task, data_dir=args.data_dir,
                                          class_splits=class_splits)
      train = source.sampler("train", n_way=args.n_way, k_shot=args.k_shot,
                             k_query=args.k_query)
      evaluation = source.sampler("test", n_way=args.n_way, k_shot=args.k_shot,
                                  k_query=args.eval_k_query, num_tasks=args.eval_tasks,
                                  pool_seed=args.eval_seed)
      if args.select == "validation":
        try:
          validation = source.sampler("validation", n_way=args.n_way, k_shot=args.k_shot,
                                      k_query=args.eval_k_query, num_tasks=args.eval_tasks,
                                      pool_seed=args.eval_seed)
        except ValueError as e:
          raise ValueError(f"the validation split (--select validation): {e}") from e
      outputs = args.n_way
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
  example = train.sample(0, 1)["support"][0][0]
  return train, evaluation, validation, outputs, example


def build_model(args: argparse.Namespace, outputs: int):
  from ntk_dynamics import models
  if args.model == "mlp":
    return models.mlp([args.width] * args.depth, outputs, w_std=args.w_std)
  return models.cnn([args.width] * max(args.depth, 1), outputs, w_std=args.w_std)


def build_inner(args: argparse.Namespace, f, name: str | None = None, inner_steps=None):
  from ntk_dynamics import meta
  name = name or args.inner
  settings = {"inner_steps": args.inner_steps if inner_steps is None else inner_steps,
              "inner_lr": args.inner_lr}
  # make_inner_loop refuses arguments a loop does not take: each loop gets its own.
  if name in ("maml", "anil"):
    settings["first_order"] = args.first_order
  else:
    # --ridge is ntk_ridge's; ntk_flow / ntk_steps are the unregularised support-set dynamics.
    settings.update(ridge=args.ridge if name == "ntk_ridge" else 0.,
                    trace_axes=() if args.full_kernel else (-1,),
                    query_kernel=args.query_kernel)
  return meta.make_inner_loop(name, f, **settings)


def _peak_rss_mb() -> float:
  import resource
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


def _describe(args, outputs) -> str:
  task = (f"sinusoid {args.k_shot}-shot" if args.task == "sinusoid"
          else f"{args.task} {args.n_way}-way {args.k_shot}-shot")
  net = f"{args.model.upper()} " + "-".join([str(args.width)] * args.depth) + f"-{outputs}"
  inner = args.inner + ("" if args.inner == "ntk_ridge"
                        else f" k={args.inner_steps} α={args.inner_lr:g}")
  if args.inner in ("maml", "anil") and args.first_order:
    inner += " first-order"
  if args.inner == "ntk_ridge":
    inner += f" ridge={args.ridge:g}"
  if args.inner.startswith("ntk") and args.task != "sinusoid":
    inner += " full kernel" if args.full_kernel else " traced kernel"
  return f"{task}, {net}, inner {inner}"


def _plot(path, result, title: str, classification: bool) -> None:
  import numpy as np

  from ntk_dynamics import plots  # selects the headless backend before pyplot is imported
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2 if classification else 1, figsize=(11 if classification else
                                                                   6, 4), squeeze=False)
  ax = axes[0][0]
  if result.train_log:
    ax.plot([r["step"] for r in result.train_log], [r["loss"] for r in result.train_log],
            "-", color="0.6", lw=1, label="meta-train query loss")
  steps = np.array([e["step"] for e in result.evals])
  loss = np.array([e["loss"] for e in result.evals])
  ci = np.nan_to_num(np.array([e["loss_ci95"] for e in result.evals]))
  ax.errorbar(steps, loss, yerr=ci, fmt="o-", color="C0", capsize=3,
              label=f"held-out tasks (±95% CI, {result.evals[-1]['tasks']} tasks)")
  if result.select_evals:
    ax.errorbar(steps, [e["loss"] for e in result.select_evals],
                yerr=np.nan_to_num([e["loss_ci95"] for e in result.select_evals]), fmt="s--",
                color="C2", capsize=3, label="validation tasks")
  ax.set(xlabel="meta-step", ylabel="post-adaptation query loss", yscale="log")
  if classification:
    ax = axes[0][1]
    for records, fmt, color, label in ((result.evals, "o-", "C1", "held-out"),
                                       (result.select_evals, "s--", "C2", "validation")):
      if records:
        ax.errorbar(steps, [100 * e["accuracy"] for e in records],
                    yerr=100 * np.nan_to_num([e["accuracy_ci95"] for e in records]), fmt=fmt,
                    color=color, capsize=3, label=label)
    ax.set(xlabel="meta-step", ylabel="accuracy (%)")
  for ax in axes[0]:
    if result.best_step is not None:
      ax.axvline(result.best_step, color="0.4", ls=":", lw=1,
                 label=f"selected (step {result.best_step})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  plots.save_figure(path, fig, suptitle=title, fontsize=10)


def _profile(args, f, params, train) -> int:
  import jax
  from ntk_dynamics import runs
  from ntk_dynamics.meta.profile import profile_meta_step

  batch = train.sample(args.seed, args.meta_batch)
  step_counts, inners = args.profile_steps, args.profile_inner
  print(f"profiling one meta-step ({args.meta_batch} tasks, Adam): "
        f"{_describe(args, f(params, batch['support'][0][0]).shape[-1])}, jax "
        f"{jax.__version__} on {jax.devices()[0].platform}")
  print(f"{'inner loop':22s} {'k':>4s} {'compile s':>10s} {'ms/step':>9s} {'temp MiB':>9s}")
  rows = []
  for name in inners:
    variants = [(name, False)] + ([(name, True)] if name in ("maml", "anil") else [])
    for inner_name, first_order in variants:
      label = inner_name + (" (1st order)" if first_order else "")
      for k in (step_counts if inner_name != "ntk_ridge" else step_counts[:1]):
        args.first_order = first_order
        inner = build_inner(args, f, inner_name, inner_steps=k)
        r = profile_meta_step(inner, params, batch, repeats=max(args.profile_repeats, 0))
        r.update(inner=inner_name, first_order=first_order, inner_steps=k)
        rows.append(r)
        temp = r["temp_bytes"] / 2**20 if r["temp_bytes"] is not None else float("nan")
        print(f"{label:22s} {k if inner_name != 'ntk_ridge' else '∞':>4} "
              f"{r['compile_s']:10.2f} {1e3 * r['step_s']:9.2f} {temp:9.3f}", flush=True)
  if args.out:
    runs.atomic_write_json(f"{args.out}/profile.json",
                           {"config": {k: v for k, v in vars(args).items()
                                       if not k.startswith("_")}, "rows": rows,
                            "peak_rss_mb": _peak_rss_mb()})
  return 0


def _config_dict(args: argparse.Namespace) -> dict:
  return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def _interrupted(args: argparse.Namespace, result, inner_config: dict, wall: float) -> int:
  """After Ctrl-C: writes OUT/metrics.json with status "interrupted" and everything completed
  so far (`result`, the `MetaResult` that `meta_train` attached to the interrupt), says where
  it is and how to resume, and returns 130."""
  import jax

  from ntk_dynamics import runs
  if result is None:
    print("\nntk-dynamics meta: interrupted before meta-training started; nothing written.",
          file=sys.stderr)
    return 130
  lines = [f"\nntk-dynamics meta: interrupted after meta-step {result.step} of "
           f"{args.meta_steps}."]
  if args.out:
    metrics = {"config": _config_dict(args), "inner_config": inner_config,
               "status": "interrupted", "message": result.message, "step": result.step,
               "checkpoint_step": result.checkpoint_step, "evals": result.evals,
               "train_log": result.train_log, "seconds_per_step": result.seconds_per_step,
               "wall_seconds": wall, "jax": jax.__version__}
    if result.select_evals:
      metrics.update(select_evals=result.select_evals, best_step=result.best_step,
                     best_eval=result.best_eval)
    runs.atomic_write_json(f"{args.out}/metrics.json", metrics)
    steps = [str(e["step"]) for e in result.evals]
    if len(steps) > 6:
      steps = steps[:3] + ["…", steps[-1]]
    lines.append(f"wrote {args.out}/metrics.json (status \"interrupted\"; "
                 f"{len(result.evals)} evaluations, at steps {', '.join(steps) or 'none'}).")
    if result.checkpoint_step is not None:
      lines.append(f"{args.out}/checkpoint.npz holds meta-step {result.checkpoint_step}: run "
                   "the same command with --resume to continue from there.")
    else:
      lines.append("no checkpoint yet: run the same command again to start over.")
  else:
    lines.append("nothing was saved (no --out); pass --out to keep checkpoints.")
  print("\n".join(lines), file=sys.stderr, flush=True)
  return 130


def run(args: argparse.Namespace) -> int:
  args = _defaults(args)
  _check(args)
  import jax
  import numpy as np
  import optax

  import ntk_dynamics as nd
  from ntk_dynamics import meta, runs

  train, evaluation, validation, outputs, example = build_tasks(args)
  model = build_model(args, outputs)
  params = model.init(jax.random.PRNGKey(args.seed), np.asarray(example))
  f = nd.from_haiku(model)
  if args.profile:
    return _profile(args, f, params, train)

  inner = build_inner(args, f)
  config = meta.MetaConfig(meta_steps=args.meta_steps, meta_batch=args.meta_batch,
                           eval_every=args.eval_every, eval_tasks=args.eval_tasks,
                           eval_batch=args.eval_batch, checkpoint_every=args.checkpoint_every,
                           log_every=max(1, min(50, args.eval_every)), seed=args.seed,
                           loss=None if args.outer_loss == "auto" else args.outer_loss)
  title = _describe(args, outputs)
  print(f"{title}; {args.meta_steps} meta-steps of {args.meta_batch} tasks, Adam "
        f"{args.meta_lr:g}; jax {jax.__version__} on {jax.devices()[0].platform}")
  t0 = time.perf_counter()
  try:
    result = meta.meta_train(inner, params, train, evaluation, config,
                             select_sampler=validation, meta_optimizer=optax.adam(args.meta_lr),
                             optimizer_name=f"adam({args.meta_lr!r})", out_dir=args.out,
                             resume=args.resume, progress=not args.no_progress)
  except KeyboardInterrupt as e:
    return _interrupted(args, getattr(e, "result", None), dict(inner.config),
                        time.perf_counter() - t0)
  wall = time.perf_counter() - t0
  final = result.evals[-1]
  classification = args.task != "sinusoid"
  outer = args.outer_loss
  if outer == "auto":
    outer = "xent" if classification and args.inner in ("maml", "anil") else "mse"
  loss_name = {"mse": "MSE", "xent": "cross-entropy"}[outer]
  peak_rss_mb = _peak_rss_mb()

  def table_row(record: dict) -> dict:
    return {"task": title.split(",")[0], "inner": title.split("inner ")[-1],
            "meta_steps": result.step, "step": record["step"], "loss": record["loss"],
            "loss_ci95": record["loss_ci95"], "accuracy": record["accuracy"],
            "accuracy_ci95": record["accuracy_ci95"],
            "ms_per_step": 1e3 * result.seconds_per_step, "peak_rss_mb": peak_rss_mb}

  row = table_row(final)
  rows = [row]
  selected = None
  if validation is not None:
    # The held-out record of the selected parameters: evaluated at the same step as `best_eval`.
    selected = table_row(next(e for e in result.evals if e["step"] == result.best_step))
    selected.update(parameters="selected", validation=result.best_eval)
    row.update(parameters="last", validation=result.select_evals[-1])
    rows = [selected, row]
  header = "| task | inner loop | meta-steps |"
  if selected is not None:
    header += " parameters | validation accuracy % (±95% CI) |"
  header += " query " + loss_name + " (±95% CI) |"
  if classification:
    header += " accuracy % (±95% CI) |"
  header += " ms/step | peak RSS MiB |"
  lines = []
  for r in rows:
    line = f"| {r['task']} | {r['inner']} | {r['meta_steps']} |"
    if selected is not None:
      v = r["validation"]
      line += (f" {r['parameters']} (step {r['step']}) | "
               f"{100 * v['accuracy']:.2f} ± {100 * v['accuracy_ci95']:.2f} |")
    line += f" {r['loss']:.4f} ± {r['loss_ci95']:.4f} |"
    if classification:
      line += f" {100 * r['accuracy']:.2f} ± {100 * r['accuracy_ci95']:.2f} |"
    lines.append(line + f" {r['ms_per_step']:.2f} | {r['peak_rss_mb']:.0f} |")
  table = "\n".join([header, "|" + " --- |" * (header.count("|") - 1)] + lines)
  chosen = ("" if selected is None else
            f"; selected step {result.best_step} on {result.best_eval['tasks']} validation tasks")
  print(f"\n{result.message} in {wall:.1f} s ({final['tasks']} held-out tasks{chosen})\n"
        f"{table}")
  if args.out:
    metrics = {
        "config": _config_dict(args),
        "inner_config": dict(inner.config), "status": result.status,
        "message": result.message, "final": row, "evals": result.evals,
        "train_log": result.train_log, "seconds_per_step": result.seconds_per_step,
        "wall_seconds": wall, "jax": jax.__version__}
    if selected is not None:
      metrics.update(selected=selected, select_evals=result.select_evals)
    runs.atomic_write_json(f"{args.out}/metrics.json", metrics)
    runs.atomic_write_bytes(f"{args.out}/results.md", (table + "\n").encode())
    _plot(f"{args.out}/learning_curve.png", result, title, classification)
    print(f"wrote {args.out}/metrics.json, learning_curve.png, results.md, checkpoint.npz")
  if result.status != "completed":
    print(f"error: {result.message}", file=sys.stderr)
    return 1
  return 0
