"""The outer loop: meta-training with optax, evaluation with confidence intervals, model
selection on validation tasks, checkpoints and exact resume.

State = (meta-parameters, optimizer state, step, PRNG key). Step s draws its task batch from
`sampler.sample(key_s', meta_batch)` with `key_{s+1}, key_s' = split(key_s)`, so the run is a
deterministic function of the seed; a checkpoint holds the whole state plus the metrics so far
(and the best meta-parameters on validation tasks, when selecting), and a resumed run replays
exactly what an uninterrupted one would have done (identical parameters and selection, bit for
bit, on the same machine and JAX version), also when a finished run is extended to more steps.

What a checkpoint is checked against before it is resumed (its fingerprint): the inner loop and
its settings, `MetaConfig` (but `meta_steps`), the parameters' shapes and dtypes, the meta
optimizer's `optimizer_name`, whether selecting, and the task samplers' settings
(`describe()`, see `tasks.TaskSampler`). What cannot be checked: the model function itself
(a different `f` with parameters of the same shapes is not seen) and optimizers beyond their
names (optax transformations are closures: pass `optimizer_name` with the hyperparameters).

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
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_dynamics import runs
from ntk_dynamics.dynamics._inputs import check_int
from ntk_dynamics.meta import losses
from ntk_dynamics.meta.inner import InnerLoop

PyTree = Any
CHECKPOINT_NAME = "checkpoint.npz"
Z_95 = 1.959963984540054
DEFAULT_OPTIMIZER_NAME = "adam(1e-3)"
# Version of what the fingerprint covers: 2 added the task samplers' settings (checkpoints of
# version 1 recorded neither those nor the settings themselves, and are refused).
FINGERPRINT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Outer-loop settings.

  Attributes:
    meta_steps: total number of meta-updates N.
    meta_batch: tasks per meta-update.
    eval_every: evaluate on held-out tasks every E steps (and at steps 0 and N).
    eval_tasks: number of held-out tasks (the first `eval_tasks` of the evaluation pool, and
      of the validation pool when selecting).
    eval_batch: tasks per evaluation call (memory only; results do not depend on it: a pool's
      tasks are taken by index, and a sampler without a pool draws task i alone from seed i).
    checkpoint_every: steps between checkpoints (None: `eval_every`); one is always written
      at the end (also of a run of 0 meta-steps).
    log_every: steps averaged into one point of the training-loss curve.
    seed: seed of the task stream, in [0, 2**32) (the meta-parameter init is the caller's).
    loss: outer (query) loss, "mse" or "xent"; None: `losses.default_loss` of the inner loop.

  Counts and the seed take any integral scalar (Python, numpy or JAX integers; not bools) and
  are stored as Python ints.
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
    # Stored as Python ints: the settings go into the checkpoint's JSON fingerprint, where
    # np.int64(10) must mean what 10 means.
    minimums = {"meta_steps": 0, "meta_batch": 1, "eval_every": 1, "eval_tasks": 1,
                "eval_batch": 1, "log_every": 1, "seed": 0}
    if self.checkpoint_every is not None:
      minimums["checkpoint_every"] = 1
    for name, minimum in minimums.items():
      object.__setattr__(self, name, check_int("MetaConfig", name, getattr(self, name),
                                               minimum=minimum))
    if self.seed >= 2 ** 32:
      # `jax.random.key` keeps only a seed's low 32 bits unless jax_enable_x64 is on (and
      # overflows past 2**63): a larger seed would replay a smaller one's tasks, or give
      # other tasks with that flag flipped. Negative seeds are refused for the same reason.
      raise ValueError(f"MetaConfig: `seed` must be in [0, 2**32), got {self.seed}.")
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
    evals: list of evaluation records (see `evaluate`) with their "step" and "seconds" (wall
      time of that evaluation): at step 0, every `eval_every` steps, and, when N is not a
      multiple of `eval_every`, an end-of-run record at step N. That last record is not part
      of the schedule: a run extended past N (resumed with more `meta_steps`) drops it, so
      its records, selection and training log are those of an uninterrupted run.
    train_log: list of {"step", "loss"}: the mean training loss over the steps since the
      previous entry; an entry every `log_every`, `eval_every` and `checkpoint_every` steps,
      and one at the end of the run (dropped, like the end-of-run record, when extended).
    seconds_per_step: median wall time of a meta-step (excluding compilation and evaluation).
    select_evals: the validation records, one per entry of `evals` (same steps); empty
      without a `select_sampler`.
    best_params: the meta-parameters of the best validation record (highest accuracy for
      classification, lowest loss for regression; the earliest on ties; records with
      non-finite losses rank last), the end-of-run record included; None without a
      `select_sampler`.
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

  Args:
    batch: {"support": (x, y), "query": (x, y), ...} stacked over tasks.
    num_outputs: the model's number of outputs K (see `model_outputs`); None: the labels' own
      range, which checks nothing against the model.

  Raises ValueError (naming the task) for missing parts, mismatched shapes, empty batches or
  support or query sets, non-finite inputs or targets, integer labels outside [0, num_outputs)
  (N-way tasks on a model with fewer than N outputs), N-way tasks on a model with more than N
  outputs, labels that are neither integers nor floats (bools), and support sets of a
  classification task that do not hold every class 0..num_outputs−1 (e.g. a support set with
  one class: N-way tasks need examples of each of their N classes).
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
  if 0 in xs.shape[:2] or xq.shape[1] == 0:
    # An empty support set adapts nothing (a mean over no examples has gradient 0) and an
    # empty query set has a NaN loss: neither is a task.
    raise ValueError(f"task batch with no tasks or an empty set: support x {xs.shape}, query x "
                     f"{xq.shape}; a batch needs at least one task, each with at least one "
                     "support and one query example.")
  for name, a in (("support x", xs), ("query x", xq), ("support y", ys), ("query y", yq)):
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
      bad = np.flatnonzero(~np.all(np.isfinite(a.reshape(a.shape[0], -1)), axis=1))
      raise ValueError(f"{name} holds non-finite values (tasks {bad[:5].tolist()}).")
  for name, a in (("support y", ys), ("query y", yq)):
    if a.dtype.kind not in "iuf":
      # A bool label would pass as a 0/1 regression target (with MSE) or fail later.
      raise ValueError(f"{name} has dtype {a.dtype}; labels must be integers (classes) or "
                       "floats (regression targets), e.g. y.astype(np.int32) for two classes.")
  classification = ys.dtype.kind in "iu"
  if classification != (yq.dtype.kind in "iu"):
    raise ValueError(f"support labels ({ys.dtype}) and query labels ({yq.dtype}) must both be "
                     "integer (classification) or both float (regression).")
  if not classification:
    return False
  if ys.ndim != 2 or yq.ndim != 2:
    raise ValueError(f"classification labels must be (meta_batch, n) ints, got support "
                     f"{ys.shape} and query {yq.shape}.")
  n_way = int(max(ys.max(), yq.max())) + 1  # what the labels say (when they start at 0)
  k = int(num_outputs) if num_outputs is not None else n_way
  for name, y in (("support", ys), ("query", yq)):
    if y.min() < 0 or y.max() >= k:
      hint = (f": {n_way}-way tasks need a model with {n_way} outputs, not {k}"
              if y.min() >= 0 and num_outputs is not None else "")
      raise ValueError(f"{name} labels must lie in [0, {k}) (the model's {k} outputs), got "
                       f"values from {y.min()} to {y.max()}{hint}.")
  present = np.zeros((ys.shape[0], k), bool)
  np.put_along_axis(present, ys.astype(np.int64), True, axis=1)
  missing = np.flatnonzero(~present.all(axis=1))
  if missing.size and n_way < k and present[:, :n_way].all():
    # Every task is complete for its own n_way classes: the model is the wrong size.
    raise ValueError(f"the tasks are {n_way}-way (labels 0..{n_way - 1}) but the model has {k} "
                     f"outputs: {n_way}-way tasks need a model with {n_way} outputs (the "
                     f"other {k - n_way} would never be a task's class).")
  if missing.size:
    t = int(missing[0])
    raise ValueError(f"the support set of task {t} holds classes {np.unique(ys[t]).tolist()} "
                     f"but a {k}-way task needs examples of every class 0..{k - 1} "
                     f"({missing.size} of {ys.shape[0]} tasks are incomplete).")
  return True


def model_outputs(inner: InnerLoop, params: PyTree, batch: dict) -> int:
  """The model's number of outputs K, read off the shape of the inner loop's query outputs
  (`jax.eval_shape`: traced, not run)."""
  (xs, ys), xq = batch["support"], batch["query"][0]
  return int(jax.eval_shape(inner.batched, params, (xs, ys), xq).shape[-1])


def _check_against_model(inner: InnerLoop, params: PyTree, batch: dict) -> tuple[bool, Any]:
  """(classification?, K or None): validates `batch`, its labels against the model's K."""
  if not check_task_batch(batch):
    return False, None
  k = model_outputs(inner, params, batch)
  check_task_batch(batch, k)
  return True, k


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


def _eval_batch(sampler: Any, idx: np.ndarray) -> dict:
  """Tasks `idx` of the evaluation: the pool's, or, without a pool, task i drawn alone from
  seed i, so that a task does not depend on the batch it is evaluated in."""
  if sampler.num_tasks is not None:
    return sampler.pool_batch(idx)
  tasks = [sampler.sample(int(i), 1) for i in idx]
  return jax.tree.map(lambda *leaves: np.concatenate(leaves), *tasks)


def evaluate(inner: InnerLoop, params: PyTree, sampler: Any, *, num_tasks: int = 600,
             batch_size: int = 100, loss: Optional[str] = None,
             metrics_fn: Optional[Callable] = None,
             num_outputs: Optional[int] = None) -> dict:
  """Post-adaptation query loss (and accuracy) over held-out tasks, mean ± 95% CI.

  Args:
    inner: the inner loop.
    params: meta-parameters.
    sampler: a task sampler; with a fixed pool (`num_tasks` set) its first `num_tasks` tasks
      are used, otherwise task i is drawn alone from seed i (always the same tasks, whatever
      `batch_size`).
    num_tasks, batch_size: tasks evaluated (>= 1) and tasks per call (>= 1; memory only).
    loss: "mse" or "xent" (None: the inner loop's default for these tasks).
    metrics_fn: a jitted `task_metrics_fn` to reuse (avoids recompiling).
    num_outputs: the model's number of outputs K that labels are checked against (None: read
      off the inner loop, `model_outputs`).

  Returns:
    {"loss": mean, "loss_ci95": half-width, "accuracy", "accuracy_ci95" (NaN for regression),
     "tasks": n, "finite": whether every task's loss is finite}.
  """
  num_tasks = check_int("evaluate", "num_tasks", num_tasks)
  batch_size = check_int("evaluate", "batch_size", batch_size)
  if sampler.num_tasks is not None and sampler.num_tasks < num_tasks:
    raise ValueError(f"the evaluation pool holds {sampler.num_tasks} tasks but {num_tasks} "
                     "were asked for.")
  per_loss, per_acc = [], []
  for start in range(0, num_tasks, batch_size):
    idx = np.arange(start, min(start + batch_size, num_tasks))
    batch = _eval_batch(sampler, idx)
    if num_outputs is None:
      classification, num_outputs = _check_against_model(inner, params, batch)
    else:
      classification = check_task_batch(batch, num_outputs)
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


def _describe_sampler(sampler: Any) -> Any:
  """A sampler's settings for the fingerprint: its `describe()` (every `tasks` sampler), or
  only its class for a sampler without one."""
  if sampler is None:
    return None
  describe = getattr(sampler, "describe", None)
  return describe() if callable(describe) else {"type": type(sampler).__qualname__}


def _settings(inner: InnerLoop, config: MetaConfig, optimizer_name: str, params: PyTree,
              samplers: dict) -> dict:
  """What must match for a checkpoint to be resumed (everything but `meta_steps`), as it
  reads back from the checkpoint's JSON."""
  desc = {"version": FINGERPRINT_VERSION, "inner": inner.name,
          "inner_config": dict(inner.config),
          "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "meta_steps"},
          "optimizer": optimizer_name,
          "params": [(str(p.dtype), list(np.shape(p))) for p in jax.tree.leaves(params)],
          "tasks": {name: _describe_sampler(s) for name, s in samplers.items()}}
  return json.loads(json.dumps(desc, sort_keys=True, default=str))


def _fingerprint(settings: dict) -> str:
  text = json.dumps(settings, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


_ABSENT = object()  # a setting one side does not record (not the same as a recorded null)


def _differences(old: Any, new: Any, path: str = "", limit: int = 3) -> list[str]:
  """Up to `limit` "path old -> new" texts where two settings (JSON values) differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    found = []
    for k in sorted(set(old) | set(new)):
      found += _differences(old.get(k, _ABSENT), new.get(k, _ABSENT),
                            f"{path}.{k}" if path else str(k), limit)
    return found[:limit]
  if old is not _ABSENT and new is not _ABSENT and old == new:
    return []
  shorten = lambda v: ("(not recorded)" if v is _ABSENT else
                       text if len(text := json.dumps(v)) <= 60 else text[:57] + "...")
  return [f"{path} {shorten(old)} -> {shorten(new)}"]


def _resume_refusal(ckpt_path: pathlib.Path, extra: dict, settings: dict) -> str:
  stored = extra.get("settings")
  if stored is None:
    why = ("by an earlier version that did not record the task settings, so it cannot be "
           "checked")
  else:
    why = "with different settings (" + "; ".join(_differences(stored, settings)) + ")"
  return f"checkpoint {ckpt_path} was written {why}; use another --out folder or drop --resume."


def _selection_score(record: dict, classification: bool) -> float:
  if not record["finite"]:
    return -math.inf
  return record["accuracy"] if classification else -record["loss"]


def _meta_optimizer(meta_optimizer: Optional[optax.GradientTransformation],
                    optimizer_name: Optional[str],
                    checkpoints: bool) -> tuple[optax.GradientTransformation, str]:
  if meta_optimizer is None:
    name = DEFAULT_OPTIMIZER_NAME if optimizer_name is None else optimizer_name
    return optax.adam(1e-3), name
  if optimizer_name is None:
    # An optax transformation is a pair of closures: its hyperparameters cannot be read, so
    # only a name can tell a checkpoint's optimizer from another.
    if checkpoints:
      warnings.warn("meta_train: `meta_optimizer` was passed without `optimizer_name`, so a "
                    "checkpoint cannot tell it from another optimizer (resume would continue "
                    "with different hyperparameters); pass optimizer_name with them, e.g. "
                    "'adam(0.01)'.", UserWarning, stacklevel=3)
    optimizer_name = "custom"
  return meta_optimizer, optimizer_name


def meta_train(inner: InnerLoop, init_params: PyTree, train_sampler: Any, eval_sampler: Any,
               config: MetaConfig = MetaConfig(), *, select_sampler: Any = None,
               meta_optimizer: Optional[optax.GradientTransformation] = None,
               optimizer_name: Optional[str] = None, out_dir: Optional[str] = None,
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
    optimizer_name: its description with its hyperparameters (e.g. "adam(0.01)"), stored in
      the checkpoint fingerprint: an optax transformation cannot be inspected, so this name
      is all that tells two optimizers apart. None: "adam(1e-3)" for the default optimizer;
      with a `meta_optimizer`, "custom" (and a UserWarning when writing checkpoints).
    out_dir: folder for `checkpoint.npz` (None: no checkpoints).
    resume: continue from `out_dir/checkpoint.npz` (needs `out_dir`) if it exists (its
      settings must match, see the module docstring, and `config.meta_steps` must be at
      least its step).
    progress: show a tqdm progress bar.
    on_step: called as `on_step(step, loss)` after each finite meta-step (e.g. to stop).

  Returns:
    A `MetaResult`. A non-finite meta-loss or meta-gradient at step s stops training with
    status "non_finite", returns the state before that step (and the best parameters
    evaluated before it) and leaves the last checkpoint (always of a finite state) untouched.

  Raises:
    ValueError: for task labels outside the model's outputs (N-way tasks need a model with N
      outputs); for `resume` without `out_dir`; when resuming from a checkpoint written with
      other settings (naming them), or one past `config.meta_steps`;
      `runs.CorruptCheckpointError` (a ValueError) for an unreadable one.
    KeyboardInterrupt: re-raised on Ctrl-C with `.result`, the `MetaResult` so far (status
      "interrupted", the step reached, every completed evaluation, `checkpoint_step`).
  """
  if resume and out_dir is None:
    raise ValueError("meta_train: resume=True needs out_dir, the folder holding the checkpoint "
                     "to continue from.")
  optimizer, optimizer_name = _meta_optimizer(meta_optimizer, optimizer_name,
                                              checkpoints=out_dir is not None)
  ckpt_every = config.checkpoint_every or config.eval_every
  ckpt_path = None if out_dir is None else pathlib.Path(out_dir) / CHECKPOINT_NAME
  selecting = select_sampler is not None
  settings = _settings(inner, config, optimizer_name, init_params,
                       {"train": train_sampler, "eval": eval_sampler, "select": select_sampler})
  fingerprint = _fingerprint(settings)

  params = init_params
  opt_state = optimizer.init(params)
  key = jax.random.key(config.seed)
  # Records on the schedule (evaluations at step 0 and every `eval_every` steps; training-log
  # entries every `log_every`, `eval_every` and checkpoint steps) and the losses of the steps
  # since the last entry. `end` holds the records at the last step of a run that falls off
  # the schedule: reported, but kept apart (and out of the selection state), so that a run
  # extended past that step continues exactly as an uninterrupted one.
  step, evals, train_log, window = 0, [], [], []
  select_evals, best_params, best_eval = [], None, None
  end = None
  last_ckpt = None
  resumed_seconds_per_step = math.nan

  def state():
    tree = {"params": params, "opt_state": opt_state, "key": key}
    if selecting:
      # The template for loading is built before any evaluation: `params` give it its shape.
      tree["best_params"] = params if best_params is None else best_params
    return tree

  if resume and ckpt_path is not None:
    try:
      loaded = runs.load_checkpoint(ckpt_path, state())
    except runs.CorruptCheckpointError:
      raise
    except ValueError as e:
      # Selecting or not changes the leaves saved, so this fails before the fingerprint is read.
      raise ValueError(f"checkpoint {ckpt_path} was written with different settings (another "
                       f"model, or with{'out' if selecting else ''} selection on validation "
                       "tasks); use another --out folder or drop --resume.") from e
    if loaded is not None:
      step, tree, extra = loaded
      if extra.get("fingerprint") != fingerprint:
        raise ValueError(_resume_refusal(ckpt_path, extra, settings))
      if step > config.meta_steps:
        raise ValueError(f"checkpoint {ckpt_path} is at meta-step {step}, past the "
                         f"{config.meta_steps} meta-steps asked for; resume with meta_steps "
                         f"(--meta-steps) of at least {step}, or use another output folder.")
      params, opt_state, key = tree["params"], tree["opt_state"], tree["key"]
      evals, train_log = list(extra["evals"]), list(extra["train_log"])
      window = [float(v) for v in extra["window"]]
      # A finished run resumed as it is reports its end records again; extended, drops them.
      end = extra["end"] if step == config.meta_steps else None
      if selecting:
        select_evals, best_eval = list(extra["select_evals"]), extra["best_eval"]
        best_params = tree["best_params"]
      stored = extra.get("seconds_per_step")
      resumed_seconds_per_step = math.nan if stored is None else float(stored)
      last_ckpt = step

  probe = train_sampler.sample(0, 1)
  classification, outputs = _check_against_model(inner, init_params, probe)
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
                      batch_size=config.eval_batch, loss=loss_name, metrics_fn=metrics_jit,
                      num_outputs=outputs)
    record.update(step=step, seconds=time.perf_counter() - t0)
    return record

  def better(record, than):
    # Strictly better only: ties keep the earliest parameters.
    return than is None or (_selection_score(record, classification)
                            > _selection_score(than, classification))

  def run_evals():
    nonlocal best_params, best_eval
    evals.append(run_eval(eval_sampler))
    if selecting:
      select_evals.append(run_eval(select_sampler))
      if better(select_evals[-1], best_eval):
        best_params, best_eval = params, select_evals[-1]
    if bar is not None:
      bar.write(_format_eval(evals[-1], select_evals[-1] if selecting else None))

  def end_records():
    """The records of the last step where it is off the schedule (None: it is on it)."""
    if step % config.eval_every == 0 and not window:
      return None
    records = {"step": step, "eval": None, "select_eval": None, "train_log": None}
    if window:  # the window stays open: an extended run goes on filling it
      records["train_log"] = {"step": step, "loss": float(np.mean(window))}
    if step % config.eval_every:
      records["eval"] = run_eval(eval_sampler)
      if selecting:
        records["select_eval"] = run_eval(select_sampler)
      if bar is not None:
        bar.write(_format_eval(records["eval"], records["select_eval"]))
    return records

  def seconds_per_step():
    # The first timed step of this call includes compilation; a call that ran no timed step
    # (a finished run resumed) reports the checkpoint's figure.
    times = step_times[1:]
    return float(np.median(times)) if times else resumed_seconds_per_step

  def checkpoint():
    nonlocal last_ckpt
    if ckpt_path is not None:
      last_ckpt = step
      extra = {"fingerprint": fingerprint, "settings": settings, "evals": evals,
               "train_log": train_log, "window": window, "end": end,
               "seconds_per_step": seconds_per_step()}
      if selecting:
        extra.update(select_evals=select_evals, best_eval=best_eval)
      runs.save_checkpoint(ckpt_path, state(), step=step, extra=extra)

  def result(status, message):
    all_evals, all_select, log = list(evals), list(select_evals), list(train_log)
    chosen_params, chosen = best_params, best_eval
    if end is not None:
      if end["eval"] is not None:
        all_evals.append(end["eval"])
      if end["select_eval"] is not None:
        all_select.append(end["select_eval"])
        if better(end["select_eval"], best_eval):
          chosen_params, chosen = params, end["select_eval"]
      if end["train_log"] is not None:
        log.append(end["train_log"])
    return MetaResult(params=params, opt_state=opt_state, step=step, status=status,
                      message=message, evals=all_evals, train_log=log,
                      seconds_per_step=seconds_per_step(), select_evals=all_select,
                      best_params=chosen_params,
                      best_step=None if chosen is None else chosen["step"],
                      best_eval=chosen, checkpoint_step=last_ckpt)

  bar = None
  status, message = "completed", ""
  step_times = []
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
      check_task_batch(batch, outputs)
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
      is_ckpt = step % ckpt_every == 0
      if step % config.log_every == 0 or is_ckpt or step % config.eval_every == 0:
        train_log.append({"step": step, "loss": float(np.mean(window))})
        window = []
      if step % config.eval_every == 0:
        run_evals()
      if is_ckpt:
        checkpoint()
      if bar is not None:
        bar.update(1)
        if step % 10 == 0 or step == config.meta_steps:
          bar.set_postfix(loss=f"{train_log[-1]['loss'] if train_log else loss:.4g}")
    if status == "completed":
      new_end = end is None and (end := end_records()) is not None
      # Always one at the end (a run of 0 steps too), holding the end records; none when a
      # finished run is resumed as it is.
      if last_ckpt != step or new_end:
        checkpoint()
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
