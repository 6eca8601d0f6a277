"""Outer loop of `ntk_dynamics.meta`: exact resume, selection on validation tasks, non-finite
losses, bad task batches, evaluation statistics and the `ntk-dynamics meta` recipe."""
import json
import math
import re

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import ntk_dynamics as nd  # noqa: E402
import tasks  # noqa: E402
from ntk_dynamics import meta, models, runs  # noqa: E402
from recipes import cli  # noqa: E402
from tests.cli_common import usage_error  # noqa: E402


def _setup(inner_name="maml", width=8):
  model = models.mlp([width], 1, activation="tanh", w_std=0.8)
  f = nd.from_haiku(model)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 1)))
  inner = meta.make_inner_loop(inner_name, f, inner_steps=2, inner_lr=0.02)
  train = tasks.SinusoidSampler(4)
  evaluation = tasks.SinusoidSampler(4, 6, num_tasks=8, pool_seed=5)
  return inner, params, train, evaluation


def _config(meta_steps, **kw):
  kw = {"meta_batch": 3, "eval_every": 3, "eval_tasks": 8, "eval_batch": 4,
        "checkpoint_every": 2, "log_every": 1, "seed": 7} | kw
  return meta.MetaConfig(meta_steps=meta_steps, **kw)


def _train(out, meta_steps, resume=False, on_step=None, **kw):
  inner, params, train, evaluation = _setup()
  return meta.meta_train(inner, params, train, evaluation, _config(meta_steps, **kw),
                         meta_optimizer=optax.adam(1e-2), optimizer_name="adam(1e-2)",
                         out_dir=out, resume=resume, progress=False, on_step=on_step)


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_a_crash_and_after_a_shorter_run_is_exact(tmp_path):
  full = _train(tmp_path / "full", 6)
  assert full.status == "completed" and full.step == 6
  assert full.select_evals == [] and full.best_params is None and full.best_step is None

  def crash(step, loss):
    if step == 5:
      raise RuntimeError("simulated crash")

  with pytest.raises(RuntimeError, match="simulated crash"):
    _train(tmp_path / "crashed", 6, on_step=crash)
  step, _, _ = runs.load_checkpoint(tmp_path / "crashed" / meta.train.CHECKPOINT_NAME,
                                    {"params": full.params,
                                     "opt_state": full.opt_state, "key": jax.random.key(0)})
  assert step == 4  # the last checkpoint before the crash
  resumed = _train(tmp_path / "crashed", 6, resume=True)
  assert resumed.step == 6
  _assert_same_params(resumed.params, full.params)
  _assert_same_params(resumed.opt_state, full.opt_state)
  assert [e["loss"] for e in resumed.evals] == [e["loss"] for e in full.evals]
  assert resumed.train_log == full.train_log

  # N/2 steps, then a new call resumed to N.
  half = _train(tmp_path / "half", 3)
  assert half.step == 3
  continued = _train(tmp_path / "half", 6, resume=True)
  _assert_same_params(continued.params, full.params)

  # A checkpoint from other settings is refused, not silently continued.
  with pytest.raises(ValueError, match="different settings"):
    _train(tmp_path / "half", 6, resume=True, meta_batch=4)
  # So is one past the steps asked for (it would report the checkpoint's step as done).
  with pytest.raises(ValueError, match="at meta-step 6, past the 4 meta-steps asked for"):
    _train(tmp_path / "half", 4, resume=True)
  # Resuming a finished run as it is keeps its time per step (no step is timed).
  again = _train(tmp_path / "half", 6, resume=True)
  assert again.step == 6 and again.seconds_per_step == continued.seconds_per_step > 0


def test_interrupt_carries_the_run_so_far_and_resumes_exactly(tmp_path):
  full = _train(tmp_path / "full", 6)

  def interrupt(step, loss):
    if step == 5:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt) as e:
    _train(tmp_path / "cut", 6, on_step=interrupt)
  partial = e.value.result
  assert partial.status == "interrupted" and partial.step == 5 and partial.checkpoint_step == 4
  assert [r["step"] for r in partial.evals] == [0, 3]
  assert [_without_time(r) for r in partial.evals] == [_without_time(r) for r in full.evals[:2]]
  assert "after meta-step 5 of 6" in partial.message and "step 4" in partial.message
  resumed = _train(tmp_path / "cut", 6, resume=True)
  _assert_same_params(resumed.params, full.params)
  assert [_without_time(r) for r in resumed.evals] == [_without_time(r) for r in full.evals]


def test_checkpoint_with_non_finite_metrics_is_strict_json_and_round_trips(tmp_path):
  path = tmp_path / "c.npz"
  extra = {"evals": [{"loss": 1.5, "accuracy": math.nan, "loss_ci95": math.inf}]}
  runs.save_checkpoint(path, {"w": jnp.ones(2)}, step=3, extra=extra)
  with np.load(path) as data:
    text = bytes(data["__meta__"]).decode()
  assert "NaN" not in text and "Infinity" not in text
  json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON literal {c}"))
  step, _, back = runs.load_checkpoint(path, {"w": jnp.ones(2)})
  record = back["evals"][0]
  assert step == 3 and record["loss"] == 1.5 and math.isnan(record["accuracy"])
  assert record["loss_ci95"] == math.inf


def test_ctrl_c_inside_a_checkpoint_write_lands_after_the_file(tmp_path, monkeypatch):
  """SIGINT in the middle of `np.savez` (what CI hit: zipfile's cleanup then raised a ValueError
  that hid the interrupt) is held back until the checkpoint is complete, then raised."""
  import os
  import signal
  savez = np.savez

  def interrupted_savez(file, **arrays):
    os.kill(os.getpid(), signal.SIGINT)
    savez(file, **arrays)

  monkeypatch.setattr(np, "savez", interrupted_savez)
  path = tmp_path / "c.npz"
  with pytest.raises(KeyboardInterrupt):
    runs.save_checkpoint(path, {"w": jnp.arange(3.0)}, step=7)
  step, tree, _ = runs.load_checkpoint(path, {"w": jnp.ones(3)})
  assert step == 7 and np.array_equal(tree["w"], np.arange(3.0))
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path):
  path = tmp_path / meta.train.CHECKPOINT_NAME
  runs.save_checkpoint(path, {"w": jnp.ones(2)}, step=3)
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(runs.CorruptCheckpointError, match=f"checkpoint {path} is corrupt.*delete"):
    runs.load_checkpoint(path, {"w": jnp.ones(2)})
  # meta_train does not mistake it for a checkpoint of other settings.
  with pytest.raises(runs.CorruptCheckpointError):
    _train(tmp_path, 2, resume=True)


def _without_time(record):
  # As text, where NaN (regression accuracy) equals NaN.
  return json.dumps({k: v for k, v in record.items() if k != "seconds"}, sort_keys=True)


def test_selection_keeps_the_best_validation_parameters_and_resumes_them_exactly(tmp_path):
  inner, params, train, evaluation = _setup()
  validation = tasks.SinusoidSampler(4, 6, num_tasks=8, pool_seed=11)

  def run(out, resume=False, on_step=None, select_sampler=validation):
    # Two descent steps, then gradient ascent: the best validation loss lies within the first
    # three steps, never at the last one.
    descend_then_ascend = optax.sgd(lambda count: jnp.where(count < 2, 0.05, -0.5))
    return meta.meta_train(inner, params, train, evaluation, _config(6, eval_every=1),
                           select_sampler=select_sampler, meta_optimizer=descend_then_ascend,
                           optimizer_name="sgd(0.05, then -0.5 from step 2)", out_dir=out,
                           resume=resume, progress=False, on_step=on_step)

  full = run(tmp_path / "full")
  steps = list(range(7))
  assert [e["step"] for e in full.select_evals] == [e["step"] for e in full.evals] == steps
  val_losses = [e["loss"] for e in full.select_evals]
  assert full.best_step == int(np.argmin(val_losses)) < 3  # lowest loss, the earliest on ties
  assert full.best_eval == full.select_evals[full.best_step]
  # best_params are the parameters evaluated at best_step: re-evaluating them reproduces both
  # their validation record and their held-out record.
  again = meta.evaluate(inner, full.best_params, validation, num_tasks=8, batch_size=4)
  assert again["loss"] == pytest.approx(full.best_eval["loss"], rel=1e-12)
  held_out = meta.evaluate(inner, full.best_params, evaluation, num_tasks=8, batch_size=4)
  assert held_out["loss"] == pytest.approx(full.evals[full.best_step]["loss"], rel=1e-12)
  assert held_out["loss"] != pytest.approx(full.evals[-1]["loss"], rel=1e-3)

  def interrupt(step, loss):
    if step == 5:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "crashed", on_step=interrupt)
  template = {"params": params, "opt_state": full.opt_state, "key": jax.random.key(0),
              "best_params": params}
  step, tree, extra = runs.load_checkpoint(tmp_path / "crashed" / meta.train.CHECKPOINT_NAME,
                                           template)
  assert step == 4 and extra["best_eval"]["step"] == full.best_step
  _assert_same_params(tree["best_params"], full.best_params)
  resumed = run(tmp_path / "crashed", resume=True)
  assert resumed.best_step == full.best_step
  _assert_same_params(resumed.best_params, full.best_params)
  _assert_same_params(resumed.params, full.params)
  assert _without_time(resumed.best_eval) == _without_time(full.best_eval)
  assert ([_without_time(e) for e in resumed.select_evals]
          == [_without_time(e) for e in full.select_evals])
  with pytest.raises(ValueError, match="selection on validation tasks"):
    run(tmp_path / "crashed", resume=True, select_sampler=None)


def test_extending_a_finished_run_gives_the_records_and_selection_of_an_uninterrupted_one(
    tmp_path):
  """A 5-step run with eval_every=3 ends with an off-schedule record at step 5 (and a training
  log entry there); extended to 6 steps it drops them, so that its evaluations, selection and
  training log are those of a 6-step run, not [0, 3, 5, 6]."""
  inner, params, train, evaluation = _setup()
  validation = tasks.SinusoidSampler(4, 6, num_tasks=8, pool_seed=11)

  def run(out, steps, resume=False):
    return meta.meta_train(inner, params, train, evaluation,
                           _config(steps, log_every=2, checkpoint_every=None),
                           select_sampler=validation, meta_optimizer=optax.adam(5e-2),
                           optimizer_name="adam(5e-2)", out_dir=out, resume=resume,
                           progress=False)

  def same(a, b):
    return [_without_time(r) for r in a] == [_without_time(r) for r in b]

  full = run(tmp_path / "full", 6)
  short = run(tmp_path / "ext", 5)
  assert [e["step"] for e in short.evals] == [e["step"] for e in short.select_evals] == [0, 3, 5]
  assert [r["step"] for r in short.train_log] == [2, 3, 4, 5]
  # The end-of-run record takes part in the selection of its own run...
  losses = [e["loss"] for e in short.select_evals]
  assert short.best_step == [0, 3, 5][int(np.argmin(losses))]
  again = run(tmp_path / "ext", 5, resume=True)  # ...and a finished run resumed as it is
  assert same(again.evals, short.evals) and same(again.select_evals, short.select_evals)
  assert again.train_log == short.train_log and again.best_step == short.best_step
  _assert_same_params(again.best_params, short.best_params)

  extended = run(tmp_path / "ext", 6, resume=True)
  assert [e["step"] for e in extended.evals] == [0, 3, 6]
  assert same(extended.evals, full.evals) and same(extended.select_evals, full.select_evals)
  assert extended.train_log == full.train_log  # step 6's entry averages steps 5 and 6
  assert extended.best_step == full.best_step
  _assert_same_params(extended.best_params, full.best_params)
  _assert_same_params(extended.params, full.params)


def test_zero_meta_steps_still_write_a_checkpoint(tmp_path):
  result = _train(tmp_path / "zero", 0)
  assert result.status == "completed" and [e["step"] for e in result.evals] == [0]
  assert result.checkpoint_step == 0
  assert (tmp_path / "zero" / meta.train.CHECKPOINT_NAME).exists()
  continued = _train(tmp_path / "zero", 2, resume=True)
  _assert_same_params(continued.params, _train(tmp_path / "fresh", 2).params)


def test_resume_refuses_other_tasks_and_optimizers_naming_what_differs(tmp_path):
  inner, params, train, evaluation = _setup()

  def run(steps, train=train, evaluation=evaluation, **kw):
    return meta.meta_train(inner, params, train, evaluation, _config(steps), out_dir=tmp_path,
                           resume=True, progress=False, **kw)

  assert run(2).step == 2
  for other, differs in (
      ({"train": tasks.SinusoidSampler(10)}, "tasks.train.k_query 4 -> 10; "
                                             "tasks.train.k_shot 4 -> 10"),
      ({"train": tasks.SinusoidSampler(4, amplitude_range=(3., 4.))},
       "tasks.train.amplitude_range [0.1, 5.0] -> [3.0, 4.0]"),
      ({"evaluation": tasks.SinusoidSampler(4, 6, num_tasks=8, pool_seed=99)},
       "tasks.eval.pool_seed 5 -> 99"),
      ({"meta_optimizer": optax.adam(0.5), "optimizer_name": "adam(0.5)"},
       'optimizer "adam(1e-3)" -> "adam(0.5)"')):
    with pytest.raises(ValueError, match=rf"was written with different settings "
                                         rf"\({re.escape(differs)}\); use another --out"):
      run(4, **other)
  # An optax transformation cannot be inspected: without a name it is refused and warned of.
  with pytest.warns(UserWarning, match="without `optimizer_name`"):
    with pytest.raises(ValueError, match='optimizer "adam\\(1e-3\\)" -> "custom"'):
      run(4, meta_optimizer=optax.adam(1e-3))
  assert run(4).step == 4  # the same settings still resume

  # A checkpoint of the first version recorded no settings: refused as such.
  path = tmp_path / meta.train.CHECKPOINT_NAME
  template = {"params": params, "opt_state": optax.adam(1e-3).init(params),
              "key": jax.random.key(0)}
  step, tree, extra = runs.load_checkpoint(path, template)
  old = {k: v for k, v in extra.items() if k != "settings"} | {"fingerprint": "0" * 16}
  runs.save_checkpoint(path, tree, step=step, extra=old)
  with pytest.raises(ValueError, match="earlier version that did not record the task settings"):
    run(6)


def test_labels_beyond_the_model_outputs_are_refused():
  """5-way tasks on a 3-output model would run to "completed" (one-hot of labels 3 and 4 is
  zero) or NaN; on a 7-output model two outputs would never be a class."""
  rng = np.random.default_rng(0)
  x = rng.random((100, 4, 4, 1)).astype(np.float32)
  y = np.repeat(np.arange(5), 20)
  train = tasks.FewShotSampler(x, y, n_way=5, k_shot=1, k_query=2)
  pool = tasks.FewShotSampler(x, y, n_way=5, k_shot=1, k_query=2, num_tasks=4)
  for outputs, message in (
      (3, r"support labels must lie in \[0, 3\) \(the model's 3 outputs\), got values from 0 "
          r"to 4: 5-way tasks need a model with 5 outputs, not 3"),
      (7, r"the tasks are 5-way \(labels 0..4\) but the model has 7 outputs: 5-way tasks need "
          r"a model with 5 outputs")):
    model = models.mlp([4], outputs)
    f = nd.from_haiku(model)
    params = model.init(jax.random.PRNGKey(0), x[:1])
    for name in ("maml", "ntk_flow"):
      inner = meta.make_inner_loop(name, f, inner_steps=1, inner_lr=0.4)
      with pytest.raises(ValueError, match=message):
        meta.meta_train(inner, params, train, pool, _config(2, eval_tasks=4), progress=False)
      with pytest.raises(ValueError, match=message):
        meta.evaluate(inner, params, pool, num_tasks=4)


def test_evaluate_without_a_pool_does_not_depend_on_the_batch_size():
  inner, params, _, _ = _setup()
  endless = tasks.SinusoidSampler(4, 6)
  records = [meta.evaluate(inner, params, endless, num_tasks=5, batch_size=b) for b in (1, 2, 5)]
  for r in records[1:]:
    assert r["loss"] == pytest.approx(records[0]["loss"], rel=1e-12)
    assert r["loss_ci95"] == pytest.approx(records[0]["loss_ci95"], rel=1e-9)
  for kw, name in (({"num_tasks": 0}, "num_tasks"), ({"num_tasks": -1}, "num_tasks"),
                   ({"batch_size": 0}, "batch_size"), ({"batch_size": True}, "batch_size")):
    with pytest.raises(ValueError, match=f"evaluate: `{name}` must be a positive integer"):
      meta.evaluate(inner, params, endless, **kw)


def test_selection_ties_keep_the_earliest_parameters():
  inner, params, train, evaluation = _setup()
  result = meta.meta_train(inner, params, train, evaluation, _config(2, eval_every=1),
                           select_sampler=evaluation, meta_optimizer=optax.set_to_zero(),
                           optimizer_name="set_to_zero", progress=False)
  assert len({e["loss"] for e in result.select_evals}) == 1 and result.best_step == 0
  assert result.best_eval is result.select_evals[0]
  _assert_same_params(result.best_params, params)


class _Poisoned:
  """Sinusoid tasks whose targets overflow the MSE on the `bad_call`-th training batch."""

  def __init__(self, bad_call):
    self.base, self.calls, self.bad_call = tasks.SinusoidSampler(4), 0, bad_call
    self.num_tasks = None

  def sample(self, key, n):
    batch = self.base.sample(key, n)
    self.calls += 1
    if self.calls == self.bad_call:
      x, y = batch["query"]
      batch["query"] = (x, y.astype(np.float64) * 1e200)
    return batch


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  inner, params, _, evaluation = _setup()
  # Call 1 is the probe batch, so call 7 is meta-step 6.
  result = meta.meta_train(inner, params, _Poisoned(bad_call=7), evaluation, _config(8),
                           out_dir=tmp_path, progress=False)
  assert result.status == "non_finite" and result.step == 5
  assert "meta-step 6" in result.message and "step 4" in result.message
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(result.params))
  step, tree, extra = runs.load_checkpoint(tmp_path / meta.train.CHECKPOINT_NAME,
                                           {"params": params,
                                            "opt_state": optax.adam(1e-3).init(params),
                                            "key": jax.random.key(0)})
  assert step == 4 and all(np.all(np.isfinite(np.asarray(p)))
                           for p in jax.tree.leaves(tree["params"]))


def _classification_batch(n_way=3, shots=2, queries=2, tasks_=2):
  rng = np.random.default_rng(0)
  x = rng.random((20 * n_way, 4, 4, 1)).astype(np.float32)
  y = np.repeat(np.arange(n_way), 20)
  sampler = tasks.FewShotSampler(x, y, n_way=n_way, k_shot=shots, k_query=queries)
  return sampler, sampler.sample(0, tasks_)


def test_check_task_batch_rejects_bad_batches():
  sampler, batch = _classification_batch()
  assert meta.check_task_batch(batch, 3) is True
  assert meta.check_task_batch(tasks.SinusoidSampler(3).sample(0, 2)) is False
  xs, ys = batch["support"]
  one_class = dict(batch, support=(xs, np.zeros_like(ys)))
  with pytest.raises(ValueError, match=r"support set of task 0 holds classes \[0\]"):
    meta.check_task_batch(one_class, 3)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    meta.check_task_batch(batch, 2)
  bad_x = xs.copy()
  bad_x[1, 0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"non-finite values \(tasks \[1\]\)"):
    meta.check_task_batch(dict(batch, support=(bad_x, ys)), 3)
  with pytest.raises(ValueError, match="shapes"):
    meta.check_task_batch(dict(batch, support=(xs[:, :2], ys)), 3)


def test_check_task_batch_rejects_empty_batches_and_sets():
  """An empty support set adapts nothing and an empty query set has a NaN loss: regression
  batches with them passed the check, classification ones failed inside numpy's max."""
  _, batch = _classification_batch()
  sine = tasks.SinusoidSampler(3).sample(0, 2)
  for b in (batch, sine):
    (xs, ys), (xq, yq) = b["support"], b["query"]
    for support, query in (((xs[:, :0], ys[:, :0]), (xq, yq)),
                           ((xs, ys), (xq[:, :0], yq[:, :0])),
                           ((xs[:0], ys[:0]), (xq[:0], yq[:0]))):
      with pytest.raises(ValueError, match=r"task batch with no tasks or an empty set: "
                                           rf"support x {re.escape(str(support[0].shape))}"):
        meta.check_task_batch(dict(b, support=support, query=query))


def test_check_task_batch_refuses_bool_labels():
  """Bool labels passed as 0/1 regression targets, silently trained with MSE."""
  sine = tasks.SinusoidSampler(3).sample(0, 2)
  (xs, ys), (xq, yq) = sine["support"], sine["query"]
  for support, query, name in (((xs, ys > 0), (xq, yq > 0), "support y"),
                               ((xs, ys), (xq, yq > 0), "query y")):
    with pytest.raises(ValueError, match=f"{name} has dtype bool; labels must be integers"):
      meta.check_task_batch(dict(sine, support=support, query=query))
  from ntk_dynamics.meta import losses
  with pytest.raises(ValueError, match="labels `y` have dtype bool"):
    losses.check_labels("mse", jnp.zeros((3, 1)), jnp.array([True, False, True]))


def test_resume_without_an_out_dir_is_refused():
  """resume=True without out_dir silently started a fresh run."""
  with pytest.raises(ValueError, match="resume=True needs out_dir"):
    _train(None, 2, resume=True)


def test_resume_refuses_another_vmap_axes(tmp_path):
  """vmap_axes=None (a model that mixes examples) and the default 0 are different closed
  forms: a checkpoint of one was resumed with the other."""
  _, params, train, evaluation = _setup()
  f = nd.from_haiku(models.mlp([8], 1, activation="tanh", w_std=0.8))

  def run(**kw):
    return meta.meta_train(meta.ntk_flow(f, **kw), params, train, evaluation, _config(0),
                           out_dir=tmp_path, resume=True, progress=False)

  run()
  # A setting one checkpoint does not record is named as such, not as "null -> null".
  with pytest.raises(ValueError, match=r"different settings \(inner_config.vmap_axes "
                                       r"\(not recorded\) -> null\); use another --out"):
    run(vmap_axes=None)
  assert run().step == 0  # the same settings still resume


def test_meta_train_refuses_one_class_support_sets():
  sampler, _ = _classification_batch()

  class OneClass:
    num_tasks = None

    def sample(self, key, n):
      batch = sampler.sample(key, n)
      x, y = batch["support"]
      return dict(batch, support=(x, np.zeros_like(y)))

  model = models.mlp([4], 3)
  f = nd.from_haiku(model)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 1)))
  with pytest.raises(ValueError, match="needs examples of every class"):
    meta.meta_train(meta.maml(f), params, OneClass(), sampler, _config(2), progress=False)


def test_k_shot_larger_than_a_class_holds_is_refused_by_the_recipe():
  with pytest.raises(SystemExit, match="ntk-dynamics meta: error: .*exceeds the") as e:
    cli.main(["meta", "--task", "digits", "--k-shot", "500", "--meta-steps", "1"])
  assert e.value.code == 2
  with pytest.raises(SystemExit, match="positive"):
    cli.main(["meta", "--meta-batch", "0"])
  with pytest.raises(SystemExit, match="--resume needs --out"):
    cli.main(["meta", "--resume"])


def test_mean_ci95_and_config_validation():
  mean, half = meta.mean_ci95(np.array([1., 2., 3., 4.]))
  assert mean == 2.5 and math.isclose(half, 1.959963984540054 * np.std([1, 2, 3, 4], ddof=1) / 2)
  with pytest.raises(ValueError, match="meta_batch"):
    meta.MetaConfig(meta_batch=0)
  with pytest.raises(ValueError, match="loss"):
    meta.MetaConfig(loss="hinge")
  # Integral scalars of any kind, stored as Python ints (they go into the JSON fingerprint).
  config = meta.MetaConfig(meta_steps=np.int64(10), meta_batch=jnp.int32(4), seed=np.uint8(3),
                           checkpoint_every=np.int16(5))
  assert config == meta.MetaConfig(meta_steps=10, meta_batch=4, seed=3, checkpoint_every=5)
  assert all(type(getattr(config, k)) is int
             for k in ("meta_steps", "meta_batch", "seed", "checkpoint_every"))
  for kw in ({"checkpoint_every": True}, {"meta_steps": 10.0}, {"eval_every": np.array([2])}):
    with pytest.raises(ValueError, match=f"MetaConfig: `{next(iter(kw))}` must be"):
      meta.MetaConfig(**kw)


def test_seeds_outside_32_bits_are_refused(capsys):
  """Without jax_enable_x64, jax.random.key(2**32) is jax.random.key(0) and key(-1) is
  key(2**32 - 1): those runs replayed others' tasks; past 2**63 the key overflowed."""
  assert meta.MetaConfig(seed=2 ** 32 - 1).seed == 2 ** 32 - 1
  for seed in (2 ** 32, 2 ** 63, -1):
    with pytest.raises(ValueError, match="MetaConfig: `seed` must be"):
      meta.MetaConfig(seed=seed)
  for text in ("4294967296", "-1"):
    assert "argument --seed: must be an integer" in usage_error(["meta", "--seed", text], capsys)


def test_profile_meta_step_checks_repeats():
  inner, params, train, _ = _setup()
  batch = train.sample(0, 2)
  for repeats in (-2, True, 1.5):
    with pytest.raises(ValueError, match="profile_meta_step: `repeats` must be a >= 0 integer"):
      meta.profile_meta_step(inner, params, batch, repeats=repeats)


def test_evaluate_reports_accuracy_for_classification():
  sampler, _ = _classification_batch()
  pool = tasks.FewShotSampler(sampler._x, np.repeat(np.arange(3), 20), n_way=3, k_shot=2,
                              k_query=2, num_tasks=5)
  model = models.mlp([4], 3)
  f = nd.from_haiku(model)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 1)))
  record = meta.evaluate(meta.ntk_ridge(f, ridge=1e-2), params, pool, num_tasks=5,
                         batch_size=2)
  assert record["tasks"] == 5 and 0 <= record["accuracy"] <= 1
  assert math.isfinite(record["accuracy_ci95"]) and record["finite"]
  with pytest.raises(ValueError, match="holds 5 tasks"):
    meta.evaluate(meta.ntk_ridge(f), params, pool, num_tasks=6)


def _strict_json(path):
  return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: {c}"))




def test_recipe_writes_its_files_and_resumes(tmp_path, capsys):
  out = tmp_path / "run"
  common = ["meta", "--inner", "ntk_steps", "--meta-batch", "2", "--width", "8",
            "--eval-every", "2", "--eval-tasks", "6", "--out", str(out), "--no-progress"]
  assert cli.main(common + ["--meta-steps", "2"]) == 0
  for name in ("metrics.json", "learning_curve.png", "results.md", "checkpoint.npz"):
    assert (out / name).exists(), name
  assert cli.main(common + ["--meta-steps", "4", "--resume"]) == 0
  metrics = _strict_json(out / "metrics.json")  # sinusoid accuracy is NaN: null in the file
  assert metrics["status"] == "completed" and metrics["final"]["meta_steps"] == 4
  assert [e["step"] for e in metrics["evals"]] == [0, 2, 4]
  assert metrics["final"]["accuracy"] is None
  assert metrics["non_finite"]["/final/accuracy"] == "nan"
  assert math.isnan(runs.read_json(out / "metrics.json")["evals"][0]["accuracy"])
  assert "| sinusoid 5-shot | ntk_steps k=1" in capsys.readouterr().out

  # Fewer steps than the checkpoint holds, other settings, a damaged checkpoint: one line each.
  err = usage_error(common + ["--meta-steps", "3", "--resume"], capsys)
  assert "at meta-step 4, past the 3 meta-steps" in err
  err = usage_error(common + ["--meta-steps", "4", "--meta-batch", "3", "--resume"], capsys)
  assert "different settings" in err
  # Other tasks too (the checkpoint records the samplers' settings).
  err = usage_error(common + ["--meta-steps", "4", "--k-shot", "10", "--resume"], capsys)
  assert "different settings" in err and "tasks.train.k_shot 5 -> 10" in err
  ckpt = out / "checkpoint.npz"
  ckpt.write_bytes(ckpt.read_bytes()[:300])
  err = usage_error(common + ["--meta-steps", "4", "--resume"], capsys)
  assert f"checkpoint {ckpt} is corrupt" in err and "delete it" in err


def test_recipe_interrupted_writes_metrics_and_resumes(tmp_path, monkeypatch, capsys):
  out = tmp_path / "run"
  common = ["meta", "--inner", "ntk_steps", "--meta-batch", "2", "--width", "8",
            "--eval-every", "2", "--eval-tasks", "6", "--meta-steps", "6", "--out", str(out),
            "--no-progress"]
  real, calls = runs.save_checkpoint, []

  def save_then_interrupt(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(kwargs["step"])
    if len(calls) == 2:  # Ctrl-C right after the step-4 checkpoint
      raise KeyboardInterrupt

  monkeypatch.setattr(runs, "save_checkpoint", save_then_interrupt)
  assert cli.main(common) == 130
  metrics = _strict_json(out / "metrics.json")
  assert metrics["status"] == "interrupted" and metrics["step"] == 4
  assert metrics["checkpoint_step"] == 4 and [e["step"] for e in metrics["evals"]] == [0, 2, 4]
  assert metrics["config"]["meta_steps"] == 6 and metrics["train_log"]
  err = capsys.readouterr().err
  assert "interrupted after meta-step 4 of 6" in err and "--resume" in err
  assert f"{out}/checkpoint.npz holds meta-step 4" in err
  monkeypatch.setattr(runs, "save_checkpoint", real)
  assert cli.main(common + ["--resume"]) == 0
  metrics = _strict_json(out / "metrics.json")
  assert metrics["status"] == "completed" and [e["step"] for e in metrics["evals"]] == [
      0, 2, 4, 6]


def test_recipe_sigint_in_a_subprocess(tmp_path):
  """A real Ctrl-C (SIGINT) mid-run: exit status 130, metrics.json says where it stopped."""
  import os
  import signal
  import subprocess
  import sys
  import time

  out = tmp_path / "run"
  cmd = [sys.executable, "-m", "recipes.cli", "meta", "--inner", "ntk_steps", "--meta-batch",
         "2", "--width", "8", "--eval-every", "2", "--eval-tasks", "4", "--meta-steps",
         "1000000", "--out", str(out), "--no-progress"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.npz").exists():
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err
  metrics = _strict_json(out / "metrics.json")
  assert metrics["status"] == "interrupted" and metrics["step"] >= 2
  assert metrics["evals"][0]["step"] == 0 and metrics["checkpoint_step"] >= 2
  assert "Traceback" not in err and "--resume" in err


def test_recipe_refuses_nonsense_values(capsys):
  for argv, expected in (
      (["--checkpoint-every", "0"], "argument --checkpoint-every: must be a positive"),
      (["--w-std", "0"], "argument --w-std: must be a finite number > 0"),
      (["--w-std", "-1"], "argument --w-std"),
      (["--eval-every", "-3"], "argument --eval-every"),
      (["--meta-lr", "inf"], "argument --meta-lr"),
      (["--task", "digits", "--n-way", "1"], "--n-way must be at least 2"),
  ):
    assert expected in usage_error(["meta", *argv], capsys)


def test_recipe_profile_lists_are_checked_by_the_parser(capsys):
  """--profile-steps 1,x ended in "invalid literal for int()" without naming the flag, after
  loading the data; an empty --profile-inner profiled nothing and wrote an empty table."""
  for argv, expected in (
      (["--profile-steps", "1,x"], "argument --profile-steps: must be comma-separated integers"),
      (["--profile-steps", "-1"], "argument --profile-steps: values must be >= 0"),
      (["--profile-inner", ""], "argument --profile-inner: must list inner loops of maml"),
      (["--profile-inner", "maml,reptile"], "argument --profile-inner: must list inner loops"),
  ):
    assert expected in usage_error(["meta", "--profile", *argv], capsys)


def test_recipe_selects_on_validation_digits_and_reports_both(tmp_path, capsys):
  out = tmp_path / "selected"
  assert cli.main(["meta", "--task", "digits", "--select", "validation", "--inner", "ntk_flow",
                   "--n-way", "3", "--k-shot", "1", "--k-query", "2", "--meta-steps", "3",
                   "--meta-batch", "2", "--meta-lr", "0.3", "--width", "8", "--depth", "1",
                   "--eval-every", "1", "--eval-tasks", "6", "--no-progress",
                   "--out", str(out)]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  val_acc = [e["accuracy"] for e in metrics["select_evals"]]
  best = int(np.argmax(val_acc))  # the highest accuracy, the earliest on ties
  selected, last = metrics["selected"], metrics["final"]
  assert selected["step"] == best and selected["validation"]["accuracy"] == val_acc[best]
  assert selected["accuracy"] == metrics["evals"][best]["accuracy"]
  assert last["parameters"] == "last" and last["step"] == 3
  assert last["accuracy"] == metrics["evals"][-1]["accuracy"]
  table = (out / "results.md").read_text()
  assert f"| selected (step {best}) |" in table and "| last (step 3) |" in table
  assert f"{100 * selected['accuracy']:.2f} ±" in table
  assert "selected step" in capsys.readouterr().out
  for task in ("sinusoid", "tfds:mnist"):
    with pytest.raises(SystemExit, match=f"--select validation needs .*--task {task} has no"):
      cli.main(["meta", "--task", task, "--select", "validation"])
  # Digits 4 and 5 with their rotations are 8 validation classes.
  with pytest.raises(SystemExit, match=r"validation split \(--select validation\): `n_way`=9"):
    cli.main(["meta", "--task", "digits", "--select", "validation", "--n-way", "9"])


def test_recipe_classification_and_profile(tmp_path, capsys):
  assert cli.main(["meta", "--task", "digits", "--inner", "ntk_flow", "--n-way", "3",
                   "--k-shot", "1", "--k-query", "2", "--meta-steps", "1", "--meta-batch", "2",
                   "--width", "8", "--depth", "1", "--eval-every", "1", "--eval-tasks", "4",
                   "--no-progress", "--out", str(tmp_path / "digits")]) == 0
  metrics = json.loads((tmp_path / "digits" / "metrics.json").read_text())
  assert 0 <= metrics["final"]["accuracy"] <= 1
  assert cli.main(["meta", "--profile", "--profile-inner", "maml", "--profile-steps", "1,3",
                   "--meta-batch", "2", "--width", "8", "--out", str(tmp_path / "prof")]) == 0
  rows = json.loads((tmp_path / "prof" / "profile.json").read_text())["rows"]
  assert [(r["inner"], r["first_order"], r["inner_steps"]) for r in rows] == [
      ("maml", False, 1), ("maml", False, 3), ("maml", True, 1), ("maml", True, 3)]
