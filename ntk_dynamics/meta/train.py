"""The outer loop: meta-training with optax, evaluation with confidence intervals, model
selection on validation tasks, checkpoints and exact resume.

State = (meta-parameters, optimizer state, step, PRNG key). Step s draws its task batch from
`sampler.sample(key_s', meta_batch)` with `key_{s+1}, key_s' = split(key_s)`, so the run is a
deterministic function of the seed; a checkpoint holds the whole state plus the metrics so far
(and the best meta-parameters on validation tasks, when selecting), and a resumed run replays
exactly what an uninterrupted one would have done (identical parameters and selection, bit for
bit, on the same machine and JAX version).

Ctrl-C (KeyboardInterrupt) during `meta_train` is re-raised with the run so far attached as
`.result`, a `MetaResult` of status "interrupted"; the last checkpoint stays resumable.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_dynamics import runs
from ntk_dynamics.meta import losses
from ntk_dynamics.meta.inner import InnerLoop

PyTree = Any
CHECKPOINT_NAME = "checkpoint.npz"
Z_95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Outer-loop settings.

  Attributes:
    meta_steps: total number of meta-updates N.
    meta_batch: tasks per meta-update.
    eval_every: evaluate on held-out tasks every E steps (and at steps 0 and N).
    eval_tasks: number of held-out tasks (the first `eval_tasks` of the evaluation pool, and
      of the validation pool when selecting).
    eval_batch: tasks per evaluation call (memory only; results do not depend on it).
    checkpoint_every: steps between checkpoints (None: `eval_every`); one is always written
      at the end.
    log_every: steps averaged into one point of the training-loss curve.
    seed: seed of the task stream (the meta-parameter init is the caller's).
    loss: outer (query) loss, "mse" or "xent"; None: `losses.default_loss` of the inner loop.
  """
  meta_steps: int = 1000
  meta_batch: int = 25
  eval_every: int = 500
  eval_tasks: int = 600
  eval_batch: int = 100
  checkpoint_every: Optional[int] = None
  log_every: int = 50
  seed: int = 0
  loss: Optional[str] = None

  def __post_init__(self):
    for name in ("meta_steps",):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {v!r}.")
    for name in ("meta_batch", "eval_every", "eval_tasks", "eval_batch", "log_every"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
    if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                              or self.checkpoint_every < 1):
      raise ValueError(f"`checkpoint_every` must be a positive int or None, got "
                       f"{self.checkpoint_every!r}.")
    if self.loss is not None:
      losses.get_loss(self.loss)


@dataclasses.dataclass
class MetaResult:
  """What `meta_train` returns.

  Attributes:
    params, opt_state: the last finite state (at `step`).
    step: meta-steps completed.
    status: "completed", "non_finite" (training stopped; see `message`) or "interrupted"
      (only on the `.result` of the KeyboardInterrupt that `meta_train` re-raises).
    message: human-readable outcome.
    evals: list of evaluation records (see `evaluate`) with their "step".
    train_log: list of {"step", "loss", "seconds"}: mean training loss over each window.
    seconds_per_step: median wall time of a meta-step (excluding compilation and evaluation).
    select_evals: the validation records, one per entry of `evals` (same steps); empty
      without a `select_sampler`.
    best_params: the meta-parameters of the best validation record (highest accuracy for
      classification, lowest loss for regression; the earliest on ties; records with
      non-finite losses rank last); None without a `select_sampler`.
    best_step: the step `best_params` come from (None without a `select_sampler`); their
      held-out record is the entry of `evals` at that step.
    best_eval: their validation record (None without a `select_sampler`).
    checkpoint_step: the step of the last checkpoint written or resumed from (None: none).
  """
  params: PyTree
  opt_state: PyTree
  step: int
  status: str
  message: str
  evals: list
  train_log: list
  seconds_per_step: float
  select_evals: list = dataclasses.field(default_factory=list)
  best_params: PyTree = None
  best_step: Optional[int] = None
  best_eval: Optional[dict] = None
  checkpoint_step: Optional[int] = None


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
  """Mean and the half-width of its normal 95% confidence interval, 1.96·sd/√n."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return float(np.mean(v)), float("nan")
  return float(v.mean()), float(Z_95 * v.std(ddof=1) / math.sqrt(v.size))


def check_task_batch(batch: dict, num_outputs: Optional[int] = None) -> bool:
  """Validates a task batch on the host; returns whether it is a classification batch.

  Raises ValueError (naming the task) for missing parts, mismatched shapes, non-finite inputs
  or targets, integer labels outside [0, num_outputs), and support sets of a classification
  task that do not hold every class 0..num_outputs−1 (e.g. a support set with one class:
  N-way tasks need examples of each of their N classes).
  """
  for part in ("support", "query"):
    if part not in batch or len(batch[part]) != 2:
      raise ValueError(f"task batch needs `{part}` = (x, y); got keys {sorted(batch)}.")
  (xs, ys), (xq, yq) = batch["support"], batch["query"]
  xs, ys, xq, yq = map(np.asarray, (xs, ys, xq, yq))
  if xs.shape[:2] != ys.shape[:2] or xq.shape[:2] != yq.shape[:2] or xs.ndim < 3:
    raise ValueError(f"task batch shapes do not match the (meta_batch, n, ...) convention: "
                     f"support x {xs.shape}, y {ys.shape}; query x {xq.shape}, y {yq.shape}.")
  if xs.shape[0] != xq.shape[0] or xs.shape[2:] != xq.shape[2:]:
    raise ValueError(f"support x {xs.shape} and query x {xq.shape} must share the meta-batch "
                     "and feature shapes.")
  for name, a in (("support x", xs), ("query x", xq), ("support y", ys), ("query y", yq)):
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
      bad = np.flatnonzero(~np.all(np.isfinite(a.reshape(a.shape[0], -1)), axis=1))
      raise ValueError(f"{name} holds non-finite values (tasks {bad[:5].tolist()}).")
  classification = ys.dtype.kind in "iu"
  if classification != (yq.dtype.kind in "iu"):
    raise ValueError(f"support labels ({ys.dtype}) and query labels ({yq.dtype}) must both be "
                     "integer (classification) or both float (regression).")
  if not classification:
    return False
  if ys.ndim != 2 or yq.ndim != 2:
    raise ValueError(f"classification labels must be (meta_batch, n) ints, got support "
                     f"{ys.shape} and query {yq.shape}.")
  k = int(num_outputs) if num_outputs is not None else int(max(ys.max(), yq.max())) + 1
  for name, y in (("support", ys), ("query", yq)):
    if y.min() < 0 or y.max() >= k:
      raise ValueError(f"{name} labels must lie in [0, {k}) (the model's {k} outputs), got "
                       f"values from {y.min()} to {y.max()}.")
  present = np.zeros((ys.shape[0], k), bool)
  np.put_along_axis(present, ys.astype(np.int64), True, axis=1)
  missing = np.flatnonzero(~present.all(axis=1))
  if missing.size:
    t = int(missing[0])
    raise ValueError(f"the support set of task {t} holds classes {np.unique(ys[t]).tolist()} "
                     f"but a {k}-way task needs examples of every class 0..{k - 1} "
                     f"({missing.size} of {ys.shape[0]} tasks are incomplete).")
  return True


def _to_jax(batch: dict) -> dict:
  return {"support": tuple(jnp.asarray(a) for a in batch["support"]),
          "query": tuple(jnp.asarray(a) for a in batch["query"])}


def task_metrics_fn(inner: InnerLoop, loss_name: str) -> Callable:
  """`metrics(params, batch) -> (per-task query loss (B,), per-task accuracy (B,))`."""
  loss_fn = losses.get_loss(loss_name)

  def metrics(params, batch):
    (xs, ys), (xq, yq) = batch["support"], batch["query"]
    out = inner.batched(params, (xs, ys), xq)
    return jax.vmap(loss_fn)(out, yq), jax.vmap(losses.accuracy)(out, yq)

  return metrics


def evaluate(inner: InnerLoop, params: PyTree, sampler: Any, *, num_tasks: int = 600,
             batch_size: int = 100, loss: Optional[str] = None,
             metrics_fn: Optional[Callable] = None) -> dict:
  """Post-adaptation query loss (and accuracy) over held-out tasks, mean ± 95% CI.

  Args:
    inner: the inner loop.
    params: meta-parameters.
    sampler: a task sampler; with a fixed pool (`num_tasks` set) its first `num_tasks` tasks
      are used, otherwise tasks are drawn from seed 0 (always the same tasks).
    num_tasks, batch_size: tasks evaluated and tasks per call.
    loss: "mse" or "xent" (None: the inner loop's default for these tasks).
    metrics_fn: a jitted `task_metrics_fn` to reuse (avoids recompiling).

  Returns:
    {"loss": mean, "loss_ci95": half-width, "accuracy", "accuracy_ci95" (NaN for regression),
     "tasks": n}.
  """
  if sampler.num_tasks is not None and sampler.num_tasks < num_tasks:
    raise ValueError(f"the evaluation pool holds {sampler.num_tasks} tasks but {num_tasks} "
                     "were asked for.")
  per_loss, per_acc = [], []
  for start in range(0, num_tasks, batch_size):
    idx = np.arange(start, min(start + batch_size, num_tasks))
    batch = (sampler.pool_batch(idx) if sampler.num_tasks is not None
             else sampler.sample(start // batch_size, len(idx)))
    classification = check_task_batch(batch)
    if metrics_fn is None:
      name = loss or losses.default_loss(inner.name, classification)
      metrics_fn = jax.jit(task_metrics_fn(inner, name))
    l, a = metrics_fn(params, _to_jax(batch))
    per_loss.append(np.asarray(l))
    per_acc.append(np.asarray(a))
  l, a = np.concatenate(per_loss), np.concatenate(per_acc)
  lm, lc = mean_ci95(l)
  am, ac = mean_ci95(a) if not np.all(np.isnan(a)) else (float("nan"), float("nan"))
  return {"loss": lm, "loss_ci95": lc, "accuracy": am, "accuracy_ci95": ac,
          "tasks": int(l.size), "finite": bool(np.all(np.isfinite(l)))}


def _fingerprint(inner: InnerLoop, config: MetaConfig, optimizer_name: str,
                 params: PyTree, selecting: bool) -> str:
  """What must match for a checkpoint to be resumed (everything but `meta_steps`)."""
  desc = {"inner": inner.name, "inner_config": dict(inner.config),
          "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "meta_steps"},
          "optimizer": optimizer_name,
          "params": [(str(p.dtype), list(np.shape(p))) for p in jax.tree.leaves(params)]}
  # Only when selecting, so that checkpoints written before selection existed still resume.
  if selecting:
    desc["select"] = "validation"
  text = json.dumps(desc, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _selection_score(record: dict, classification: bool) -> float:
  if not record["finite"]:
    return -math.inf
  return record["accuracy"] if classification else -record["loss"]


def meta_train(inner: InnerLoop, init_params: PyTree, train_sampler: Any, eval_sampler: Any,
               config: MetaConfig = MetaConfig(), *, select_sampler: Any = None,
               meta_optimizer: Optional[optax.GradientTransformation] = None,
               optimizer_name: str = "adam(1e-3)", out_dir: Optional[str] = None,
               resume: bool = False, progress: bool = True,
               on_step: Optional[Callable[[int, float], None]] = None) -> MetaResult:
  """Meta-trains `init_params` with `inner` on tasks from `train_sampler`.

  Args:
    inner: an `InnerLoop`.
    init_params: initial meta-parameters (ignored when resuming from a checkpoint).
    train_sampler: `sample(key, meta_batch)` task source.
    eval_sampler: held-out tasks (ideally a fixed pool of at least `config.eval_tasks`).
    config: a `MetaConfig`.
    select_sampler: validation tasks (e.g. of classes held out from both `train_sampler` and
      `eval_sampler`), evaluated alongside `eval_sampler` at every evaluation step; the
      meta-parameters with the best validation record are kept as `best_params` (see
      `MetaResult`). None: no selection.
    meta_optimizer: optax transformation (default `optax.adam(1e-3)`).
    optimizer_name: its description, stored in the checkpoint fingerprint.
    out_dir: folder for `checkpoint.npz` (None: no checkpoints).
    resume: continue from `out_dir/checkpoint.npz` if it exists (its settings must match,
      and `config.meta_steps` must be at least its step).
    progress: show a tqdm progress bar.
    on_step: called as `on_step(step, loss)` after each finite meta-step (e.g. to stop).

  Returns:
    A `MetaResult`. A non-finite meta-loss or meta-gradient at step s stops training with
    status "non_finite", returns the state before that step (and the best parameters
    evaluated before it) and leaves the last checkpoint (always of a finite state) untouched.

  Raises:
    ValueError: when resuming from a checkpoint written with other settings, or one past
      `config.meta_steps`; `runs.CorruptCheckpointError` (a ValueError) for an unreadable one.
    KeyboardInterrupt: re-raised on Ctrl-C with `.result`, the `MetaResult` so far (status
      "interrupted", the step reached, every completed evaluation, `checkpoint_step`).
  """
  optimizer = meta_optimizer if meta_optimizer is not None else optax.adam(1e-3)
  ckpt_every = config.checkpoint_every or config.eval_every
  ckpt_path = None if out_dir is None else pathlib.Path(out_dir) / CHECKPOINT_NAME
  selecting = select_sampler is not None
  fingerprint = _fingerprint(inner, config, optimizer_name, init_params, selecting)

  params = init_params
  opt_state = optimizer.init(params)
  key = jax.random.key(config.seed)
  step, evals, train_log = 0, [], []
  select_evals, best_params, best_eval = [], None, None
  last_ckpt = None
  resumed_seconds_per_step = math.nan

  def state():
    tree = {"params": params, "opt_state": opt_state, "key": key}
    if selecting:
      # The template for loading is built before any evaluation: `params` give it its shape.
      tree["best_params"] = params if best_params is None else best_params
    return tree

  if resume and ckpt_path is not None:
    different = (f"checkpoint {ckpt_path} was written with different settings (inner loop, "
                 "meta-batch, seed, optimizer, model or selection on validation tasks); use "
                 "another --out folder or drop --resume.")
    try:
      loaded = runs.load_checkpoint(ckpt_path, state())
    except runs.CorruptCheckpointError:
      raise
    except ValueError as e:
      # Selecting or not changes the leaves saved, so this fails before the fingerprint is read.
      raise ValueError(different) from e
    if loaded is not None:
      step, tree, extra = loaded
      if extra.get("fingerprint") != fingerprint:
        raise ValueError(different)
      if step > config.meta_steps:
        raise ValueError(f"checkpoint {ckpt_path} is at meta-step {step}, past the "
                         f"{config.meta_steps} meta-steps asked for; resume with meta_steps "
                         f"(--meta-steps) of at least {step}, or use another output folder.")
      params, opt_state, key = tree["params"], tree["opt_state"], tree["key"]
      evals, train_log = list(extra["evals"]), list(extra["train_log"])
      if selecting:
        select_evals, best_eval = list(extra["select_evals"]), extra["best_eval"]
        best_params = tree["best_params"]
      stored = extra.get("seconds_per_step")
      resumed_seconds_per_step = math.nan if stored is None else float(stored)
      last_ckpt = step

  probe = train_sampler.sample(0, 1)
  classification = check_task_batch(probe)
  loss_name = config.loss or losses.default_loss(inner.name, classification)
  metrics = task_metrics_fn(inner, loss_name)
  metrics_jit = jax.jit(metrics)

  def objective(p, batch):
    l, a = metrics(p, batch)
    return jnp.mean(l), jnp.mean(a)

  @jax.jit
  def train_step(p, s, batch):
    (loss, acc), grads = jax.value_and_grad(objective, has_aux=True)(p, batch)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, jnp.stack([loss, optax.tree.norm(grads)])

  @jax.jit
  def next_key(k):
    # The sampler seeds from a key's bits; handing it the raw bits saves eager dispatches.
    k, sub = jax.random.split(k)
    return k, jax.random.key_data(sub)

  def run_eval(sampler):
    t0 = time.perf_counter()
    record = evaluate(inner, params, sampler, num_tasks=config.eval_tasks,
                      batch_size=config.eval_batch, loss=loss_name, metrics_fn=metrics_jit)
    record.update(step=step, seconds=time.perf_counter() - t0)
    return record

  def run_evals():
    nonlocal best_params, best_eval
    evals.append(run_eval(eval_sampler))
    if selecting:
      select_evals.append(run_eval(select_sampler))
      # Strictly better only: ties keep the earliest parameters.
      if best_eval is None or (_selection_score(select_evals[-1], classification)
                               > _selection_score(best_eval, classification)):
        best_params, best_eval = params, select_evals[-1]

  def seconds_per_step():
    # The first timed step of this call includes compilation; a call that ran no timed step
    # (a finished run resumed) reports the checkpoint's figure.
    times = step_times[1:]
    return float(np.median(times)) if times else resumed_seconds_per_step

  def checkpoint():
    nonlocal last_ckpt
    if ckpt_path is not None:
      last_ckpt = step
      extra = {"fingerprint": fingerprint, "evals": evals, "train_log": train_log,
               "seconds_per_step": seconds_per_step()}
      if selecting:
        extra.update(select_evals=select_evals, best_eval=best_eval)
      runs.save_checkpoint(ckpt_path, state(), step=step, extra=extra)

  def result(status, message):
    return MetaResult(params=params, opt_state=opt_state, step=step, status=status,
                      message=message, evals=evals, train_log=train_log,
                      seconds_per_step=seconds_per_step(), select_evals=select_evals,
                      best_params=best_params,
                      best_step=None if best_eval is None else best_eval["step"],
                      best_eval=best_eval, checkpoint_step=last_ckpt)

  bar = None
  status, message = "completed", ""
  window, step_times = [], []
  try:
    if step == 0 and not evals:
      run_evals()
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=config.meta_steps, initial=min(step, config.meta_steps),
                 desc=f"meta-train {inner.name}", unit="step", dynamic_ncols=True)
    while step < config.meta_steps:
      key, sub_bits = next_key(key)
      batch = train_sampler.sample(sub_bits, config.meta_batch)
      check_task_batch(batch)
      t0 = time.perf_counter()
      new_params, new_opt_state, stats = train_step(
          params, opt_state, {"support": batch["support"], "query": batch["query"]})
      loss, gnorm = (float(v) for v in np.asarray(stats))
      step_times.append(time.perf_counter() - t0)
      if not (math.isfinite(loss) and math.isfinite(gnorm)):
        last = "none" if last_ckpt is None else f"{ckpt_path} (step {last_ckpt})"
        status = "non_finite"
        message = (f"non-finite meta-{'loss' if not math.isfinite(loss) else 'gradient'} "
                   f"(loss {loss}, gradient norm {gnorm}) at meta-step {step + 1}; stopped. "
                   f"Parameters are those after step {step}; last good checkpoint: {last}.")
        break
      params, opt_state = new_params, new_opt_state
      step += 1
      window.append(loss)
      if on_step is not None:
        on_step(step, loss)
      last_step = step == config.meta_steps
      is_ckpt = step % ckpt_every == 0 or last_step
      if step % config.log_every == 0 or is_ckpt or step % config.eval_every == 0:
        train_log.append({"step": step, "loss": float(np.mean(window))})
        window = []
      if step % config.eval_every == 0 or last_step:
        run_evals()
        if bar is not None:
          bar.write(_format_eval(evals[-1], select_evals[-1] if selecting else None))
      if is_ckpt:
        checkpoint()
      if bar is not None:
        bar.update(1)
        if step % 10 == 0 or last_step:
          bar.set_postfix(loss=f"{train_log[-1]['loss'] if train_log else loss:.4g}")
    if status == "completed":
      if not evals or evals[-1]["step"] != step:
        run_evals()
      message = f"completed {step} meta-steps"
  except KeyboardInterrupt as e:
    # A record cut short by the interrupt was never appended: every record kept is complete.
    if selecting and len(select_evals) < len(evals):
      evals.pop()
    last = ("no checkpoint" if last_ckpt is None
            else f"last checkpoint {ckpt_path} at step {last_ckpt}")
    e.result = result("interrupted", f"interrupted after meta-step {step} of "
                                     f"{config.meta_steps}; {last}")
    raise
  finally:
    if bar is not None:
      bar.close()
  return result(status, message)


def _format_metrics(record: dict) -> str:
  text = f"query loss {record['loss']:.4f} ± {record['loss_ci95']:.4f}"
  if math.isfinite(record.get("accuracy", float("nan"))):
    text += f", accuracy {100 * record['accuracy']:.2f} ± {100 * record['accuracy_ci95']:.2f}%"
  return text + f" ({record['tasks']} tasks)"


def _format_eval(record: dict, validation: Optional[dict] = None) -> str:
  text = f"step {record['step']:>6d}: {_format_metrics(record)}"
  return text if validation is None else f"{text}; validation {_format_metrics(validation)}"
