"""`ntk-dynamics curves` end to end with tiny sizes: files, sweep, interrupts, bad input."""
from __future__ import annotations

import csv
import json
import math
import types

import numpy as np
import pytest

from ntk_dynamics import runs
from ntk_dynamics.dynamics import curves
from recipes import cli
from recipes import curves as recipe

BASE = ["--n-train", "24", "--n-test", "16", "--steps", "20", "--log-points", "6",
        "--drift-examples", "8", "--no-progress"]
TINY = BASE + ["--width", "32"]  # sweeps give --widths instead


def _read_csv(path):
  with open(path) as fh:
    return list(csv.reader(fh))


def test_single_run_writes_all_files(tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(["curves", *TINY, "--out", str(out)]) == 0
  for name in ("config.json", "metrics.json", "curves.csv", "plot.png"):
    assert (out / name).stat().st_size > 0, name
  rows = _read_csv(out / "curves.csv")
  assert tuple(rows[0]) == curves.CURVE_COLUMNS
  assert rows[1][0] == "0" and rows[-1][0] == "20"
  assert rows[1][1] == rows[1][2]  # both curves start at the initial loss
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["status"] == "complete" and metrics["lr_ratio"] == pytest.approx(0.5)
  assert metrics["width"] == 32 and metrics["kernel"] == "full"
  for key in ("max_train_loss_deviation", "max_test_loss_deviation", "train_output_rmse",
              "test_output_rmse", "ntk_drift", "lr_max"):
    assert metrics[key] >= 0, key
  config = json.loads((out / "config.json").read_text())
  assert config["n_train"] == 24 and config["model"] == "mlp"
  text = capsys.readouterr().out
  assert "train loss pred" in text and "η_max" in text


def test_sweep_xent_momentum_writes_table_and_plot(tmp_path, capsys):
  out = tmp_path / "sweep"
  with pytest.warns(curves.UntrustedPredictionWarning):  # narrow nets drift with xent
    code = cli.main(["curves", *BASE, "--widths", "8,32", "--loss", "xent",
                     "--optimizer", "momentum", "--lr-fraction", "0.2", "--out", str(out)])
  assert code == 0
  rows = _read_csv(out / "sweep.csv")
  assert tuple(rows[0]) == recipe.SWEEP_COLUMNS
  assert [r[0] for r in rows[1:]] == ["8", "32"]
  assert (out / "sweep.png").stat().st_size > 0
  for w in (8, 32):
    m = json.loads((out / f"width{w}_seed0" / "metrics.json").read_text())
    assert m["loss"] == "xent" and m["momentum"] == 0.9 and m["method"] == "gradient_descent"
    assert (out / f"width{w}_seed0" / "plot.png").exists()
  assert "max ΔL_train/L0" in capsys.readouterr().out


def _strict_json(path):
  """Parses like a strict JSON reader: NaN / Infinity literals are errors."""
  def refuse(name):
    raise ValueError(f"{path} holds the non-JSON literal {name}")
  return json.loads(path.read_text(), parse_constant=refuse)


def test_interrupt_leaves_complete_files(tmp_path, monkeypatch, capsys):
  out = tmp_path / "interrupted"
  real = runs.atomic_write_csv
  calls = []

  def write_then_interrupt(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt

  monkeypatch.setattr(runs, "atomic_write_csv", write_then_interrupt)
  assert cli.main(["curves", *TINY, "--out", str(out)]) == 130
  rows = _read_csv(out / "curves.csv")
  assert len(rows) > 4 and all(len(r) == len(curves.CURVE_COLUMNS) for r in rows)
  actual = [r[2] for r in rows[1:]]
  assert actual[:3] != ["nan"] * 3 and actual[3:] == ["nan"] * (len(actual) - 3)
  metrics = _strict_json(out / "metrics.json")
  assert metrics["status"] == "interrupted" and metrics["stage"] == "training"
  assert metrics["logged_steps"] == 3 and metrics["steps"] == 20
  assert metrics["step"] == int(rows[3][0])  # the last logged step reached
  so_far = metrics["curves_so_far"]
  assert so_far["step"] == [int(r[0]) for r in rows[1:4]]
  assert so_far["actual_train_loss"] == [float(r[2]) for r in rows[1:4]]
  assert metrics["max_train_loss_deviation_so_far"] >= 0 and metrics["width"] == 32
  err = capsys.readouterr().err
  assert "interrupted at step" in err and f"{out}/metrics.json" in err
  assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


def test_sweep_interrupted_in_its_second_run_keeps_the_first(tmp_path, monkeypatch, capsys):
  out = tmp_path / "sweep"
  real = recipe._save_plot
  calls = []

  def plot_then_interrupt(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second run's plot: its metrics are complete, the figure is not
      raise KeyboardInterrupt
    real(*args, **kwargs)

  monkeypatch.setattr(recipe, "_save_plot", plot_then_interrupt)
  assert cli.main(["curves", *BASE, "--steps", "5", "--widths", "8,16",
                   "--out", str(out)]) == 130
  assert _strict_json(out / "width8_seed0" / "metrics.json")["status"] == "complete"
  second = _strict_json(out / "width16_seed0" / "metrics.json")
  assert second["status"] == "interrupted" and second["stage"] == "files"
  assert second["step"] == 5 and "max_test_loss_deviation" in second  # the full metrics kept
  assert len(_read_csv(out / "sweep.csv")) == 2  # header and the completed run
  assert "1 of 2 runs completed" in capsys.readouterr().err


def test_diverging_run_writes_strict_json(tmp_path):
  out = tmp_path / "diverged"
  with pytest.warns(curves.UntrustedPredictionWarning):
    assert cli.main(["curves", *TINY, "--lr-fraction", "3", "--steps", "100",
                     "--out", str(out)]) == 0
  metrics = _strict_json(out / "metrics.json")  # no bare NaN / Infinity
  assert metrics["max_train_loss_deviation"] is None
  assert metrics["non_finite"]["/max_train_loss_deviation"] in ("nan", "inf")
  restored = runs.read_json(out / "metrics.json")
  assert "non_finite" not in restored and not math.isfinite(restored["train_output_rmse"])
  assert restored["batch_size"] is None  # a real null stays None
  _strict_json(out / "config.json")


def test_learning_rate_beyond_stable_warns(tmp_path):
  with pytest.warns(curves.UntrustedPredictionWarning, match="largest stable step"):
    cli.main(["curves", *TINY, "--lr-fraction", "1.5", "--steps", "5",
              "--out", str(tmp_path / "unstable")])
  metrics = json.loads((tmp_path / "unstable" / "metrics.json").read_text())
  assert metrics["trusted"] is False and metrics["lr_ratio"] == pytest.approx(1.5)


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
  with pytest.raises(SystemExit, match="cannot load --dataset 'mnist'.*digits"):
    cli.main(["curves", *TINY, "--dataset", "mnist", "--out", str(tmp_path / "a")])
  with pytest.raises(SystemExit) as e:
    cli.main(["curves", "--model", "transformer", "--out", str(tmp_path / "b")])
  assert e.value.code == 2 and "invalid choice: 'transformer'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="unknown model 'mlpp'"):
    recipe.build_model("mlpp", 8, 1, 10, "ntk")
  with pytest.raises(SystemExit, match="--momentum needs --optimizer momentum"):
    cli.main(["curves", "--momentum", "0.5", "--out", str(tmp_path / "c")])
  with pytest.raises(SystemExit, match="give --width .* or --widths .*, not both"):
    cli.main(["curves", "--width", "16", "--widths", "8,32", "--out", str(tmp_path / "c")])
  with pytest.raises(SystemExit, match="give --seed .* or --seeds .*, not both"):
    cli.main(["curves", "--seed", "3", "--seeds", "0,1", "--out", str(tmp_path / "c")])
  with pytest.raises(SystemExit, match="--widths: must be comma-separated integers"):
    cli.main(["curves", "--widths", "8,x", "--out", str(tmp_path / "d")])
  with pytest.raises(SystemExit) as e:
    cli.main(["curves", "--lr", "0.1", "--lr-fraction", "0.5"])
  assert e.value.code == 2
  capsys.readouterr()
  for flag, value in (("--widths", ""), ("--seeds", ""), ("--seeds", ","), ("--widths", "0,8"),
                      ("--widths", "8,8"), ("--steps", "0"), ("--lr", "-1"),
                      ("--lr-fraction", "nan"), ("--n-train", "x")):
    with pytest.raises(SystemExit, match=f"argument {flag}") as e:
      cli.main(["curves", flag, value, "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"ntk-dynamics curves: error: argument {flag}")
    assert err.count("\n") == 1, err  # one line
  assert not (tmp_path / "a").exists()  # nothing written before the inputs are valid
  assert not (tmp_path / "e").exists()


def test_resume_keeps_completed_runs_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
  """Ctrl-C in a sweep's second run, then the same command with --resume: the first run is
  kept (not recomputed, its sweep.csv row unchanged) and only the second is redone. Before,
  rerunning the command recomputed everything, and the printed advice (rerun with the widths
  left) overwrote sweep.csv with those runs only."""
  out = tmp_path / "sweep"
  argv = ["curves", *BASE, "--steps", "3", "--log-points", "2", "--widths", "8,16",
          "--out", str(out)]
  real, started = recipe._one_run, []

  def second_run_interrupted(args, data, width, *rest, **kwargs):
    started.append(width)
    if len(started) == 2:
      raise KeyboardInterrupt
    return real(args, data, width, *rest, **kwargs)

  def redo(args, data, width, seed, sub, progress, fingerprint):
    """Stands for a real run (test_sweep_* run those): width 8's metrics, relabelled."""
    started.append(width)
    m = runs.read_json(out / "width8_seed0" / "metrics.json")
    m.update(width=width, settings_fingerprint=fingerprint)
    runs.atomic_write_json(sub / "metrics.json", m)
    for name in ("curves.csv", "plot.png"):
      runs.atomic_write_bytes(sub / name, (out / "width8_seed0" / name).read_bytes())
    return None, m

  monkeypatch.setattr(recipe, "_one_run", second_run_interrupted)
  assert cli.main(argv) == 130
  assert "with --resume" in capsys.readouterr().err
  first_row = _read_csv(out / "sweep.csv")[1]
  monkeypatch.setattr(recipe, "_one_run", redo)
  assert cli.main(argv + ["--resume"]) == 0
  assert started == [8, 16, 16]  # width 8 kept
  rows = _read_csv(out / "sweep.csv")
  assert rows[1] == first_row and [r[0] for r in rows[1:]] == ["8", "16"]
  assert "width 8, seed 0: completed" in capsys.readouterr().out

  # A run that completed with other settings (its fingerprint) is redone, not mixed in.
  path = out / "width8_seed0" / "metrics.json"
  runs.atomic_write_json(path, dict(runs.read_json(path), settings_fingerprint="other"))
  started.clear()
  assert cli.main(argv + ["--resume"]) == 0 and started == [8]

  # Other settings for the folder are refused before anything runs.
  started.clear()
  with pytest.raises(SystemExit) as e:
    cli.main(argv + ["--resume", "--lr-fraction", "0.3"])
  assert e.value.code == 2 and not started
  assert ("--resume: " + str(out) + " holds runs with other settings (--lr-fraction None -> "
          "0.3)") in capsys.readouterr().err


def test_resume_sees_default_seed_and_width_as_given(tmp_path, capsys):
  """A run started with the default seed and width resumes when they are then spelled out
  (`--seed 0`, the model's default width); before, the raw flags (None -> 0) were compared and
  the complete run was refused as one with other settings."""
  out = tmp_path / "c"
  argv = ["curves", *BASE, "--steps", "3", "--log-points", "2", "--out", str(out)]
  assert cli.main(argv) == 0
  capsys.readouterr()
  width = recipe.DEFAULT_WIDTH["mlp"]
  assert cli.main(argv + ["--resume", "--seed", "0", "--width", str(width)]) == 0
  assert "nothing to resume" in capsys.readouterr().out
  with pytest.raises(SystemExit, match=r"resolved_seeds \[0\] -> \[1\]"):
    cli.main(argv + ["--resume", "--seed", "1"])
  with pytest.raises(SystemExit, match=r"sweep False -> True"):
    cli.main(argv + ["--resume", "--widths", str(width)])


def test_plots_of_diverged_runs_are_drawn(tmp_path):
  """A run whose losses are all NaN after step 0 (`--lr 1e300`), or a sweep whose figures are
  all NaN (`--widths 8 --lr-fraction 3`), has nothing to draw on a log axis: matplotlib raised
  "Data cannot be log-scaled", which ended the command as a user error after the run was done
  and stopped a sweep at its first diverged run."""
  nan = math.nan
  steps = np.array([0, 1, 2])
  predicted = types.SimpleNamespace(steps=steps, train_loss=np.full(3, nan),
                                    test_loss=np.full(3, nan), train_accuracy=np.zeros(3),
                                    test_accuracy=np.zeros(3))
  actual = types.SimpleNamespace(steps=steps, train_loss=np.array([0.1, nan, nan]),
                                 test_loss=np.array([0.2, nan, nan]),
                                 train_accuracy=np.zeros(3), test_accuracy=np.zeros(3))
  recipe._save_plot(tmp_path / "plot.png", predicted, actual, "diverged")
  row = dict.fromkeys(recipe.SWEEP_COLUMNS, nan) | {"width": 8, "seed": 0}
  recipe._save_sweep_plot(tmp_path / "sweep.png", [row], "diverged")
  assert (tmp_path / "plot.png").stat().st_size > 0 and (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize("flags, message", [
    (["--seed", "4294967296"], "argument --seed: must be an integer in [0, 2**32)"),
    (["--seeds", "0,4294967296"], "argument --seeds: values must be < 2**32"),
    (["--seeds=-1,0"], "argument --seeds: values must be >= 0"),
    (["--out", ""], "argument --out: must name a folder"),
])
def test_seeds_and_out_are_checked_when_parsed(flags, message, tmp_path, capsys):
  """JAX keeps a seed's low 32 bits: 2**32 would silently replay seed 0's run."""
  argv = ["curves", *TINY, "--out", str(tmp_path / "c"), *flags]
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
  path = tmp_path / "taken"
  path.write_text("x")
  monkeypatch.setattr(recipe, "_one_run", lambda *a, **k: pytest.fail("ran"))
  with pytest.raises(SystemExit, match=r"--out '.*taken': it is a file, not a folder"):
    cli.main(["curves", *TINY, "--out", str(path)])
