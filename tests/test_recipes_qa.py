"""`ntk-dynamics ntk` and `init` under a demanding user: options refused at parse time, an
unusable --out refused before any work, init's --resume (same results as an uninterrupted run,
other settings refused), a failing row that keeps the finished ones, diverged runs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ntk_dynamics import runs
from recipes import cli
from recipes import init as init_recipe
from tests.cli_common import usage_error

INIT = ["init", "--n-train", "24", "--n-test", "20", "--n-search", "12", "--width", "6",
        "--depth", "2", "--steps", "4", "--search-steps", "2", "--seeds", "0",
        "--implementation", "jacobian_contraction", "--tweaks", "default,spectral_lr",
        "--no-progress"]
NTK = ["ntk", "--n", "16", "--width", "8", "--depth", "1", "--repeats", "1"]


@pytest.mark.parametrize("argv, expected", [
    # Before: a repeated seed ran twice and counted twice in the wins ("2/2" from one seed).
    (INIT + ["--seeds", "0,0"], "argument --seeds: repeats a value: '0,0'"),
    # Before: 2**32 silently replayed seed 0 (PRNGKey keeps the low 32 bits); larger: traceback.
    (INIT + ["--seeds", "4294967296"], "argument --seeds: values must be < 2**32"),
    (INIT + ["--seeds", "99999999999999999999"], "argument --seeds: values must be < 2**32"),
    (NTK + ["--seed", "4294967296"], "argument --seed: must be an integer in [0, 2**32)"),
    # Before: accepted, and search_init_scales refused it after the other rows had run.
    (INIT + ["--bounds", "0.1,inf"], "argument --bounds: must satisfy 0 < lo <= 1 <= hi < inf"),
    (INIT + ["--tweaks", ","], "argument --tweaks: empty, got ','"),
    (INIT + ["--tweaks", "gradinit", "--n-search", "1"],
     "--tweaks gradinit needs --n-search >= 2 (two half-batches), got 1"),
    # Before: the error named load_dataset's `n_test`, not the option.
    (INIT + ["--n-test", "0"], "argument --n-test: must be a positive integer, got '0'"),
    # Before: ntk wrote nothing without a word; init wrote into the current folder.
    (NTK + ["--out", ""], "argument --out: must name a folder, got ''"),
    (INIT + ["--out", ""], "argument --out: must name a folder, got ''"),
])
def test_bad_options_are_refused_naming_the_option(argv, expected, capsys):
  assert expected in usage_error(argv, capsys)


def test_unusable_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
  """Before, the run computed everything, then failed to write its results (and lost them)."""
  from recipes import ntk

  def no_work(*a, **kw):
    raise AssertionError("work started before --out was checked")

  monkeypatch.setattr(ntk, "_time", no_work)
  monkeypatch.setattr(init_recipe, "_train", no_work)
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  err = usage_error(NTK + ["--out", str(a_file)], capsys)
  assert err.endswith(f"--out {str(a_file)!r}: it is a file, not a folder.")
  (tmp_path / "run" / "metrics.json").mkdir(parents=True)
  err = usage_error(INIT + ["--out", str(tmp_path / "run")], capsys)
  assert "--out" in err and "metrics.json there is a folder" in err


def _results(path) -> dict:
  """metrics.json without what may differ between two runs: timings and run control."""
  m = runs.read_json(path)
  for k in ("seconds",):
    m.pop(k)
  for k in ("out", "resume"):
    m["config"].pop(k)
  for entries in m["per_seed"].values():
    for s in entries:
      s.pop("seconds")
      s["tweak_report"].pop("seconds", None)
  return m


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_init_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
  """Ctrl-C during the third of four rows, then --resume: the two finished rows are kept, the
  other two computed, and every file ends as that of an uninterrupted run. Other settings and
  an unreadable metrics.json are refused. Before, there was no --resume: the rows were redone,
  and a second Ctrl-C that came earlier replaced the first run's rows with fewer."""
  argv = INIT + ["--seeds", "0,1"]
  assert cli.main(argv + ["--out", str(tmp_path / "whole")]) == 0

  real, calls = init_recipe._train, []

  def interrupt_third(*a, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*a, **kw)

  monkeypatch.setattr(init_recipe, "_train", interrupt_third)
  cut = tmp_path / "cut"
  capsys.readouterr()
  assert cli.main(argv + ["--out", str(cut)]) == 130
  assert "Run the same command with --resume" in capsys.readouterr().err
  assert runs.read_json(cut / "metrics.json")["status"] == "interrupted"

  err = usage_error(argv + ["--out", str(cut), "--resume", "--lr", "0.2"], capsys)
  assert f"--resume: {cut}/metrics.json holds results computed with other settings " \
         "(--lr 0.1 -> 0.2)" in err

  calls.clear()
  assert cli.main(argv + ["--out", str(cut), "--resume"]) == 0
  assert len(calls) == 2  # only the rows of seed 1
  assert "--resume: 2 of 4 rows kept" in capsys.readouterr().out
  assert _results(cut / "metrics.json") == _results(tmp_path / "whole" / "metrics.json")
  assert (cut / "table.md").read_text() == (tmp_path / "whole" / "table.md").read_text()

  (cut / "metrics.json").write_text('{"status": "interrupted", "per_se')  # damaged by hand
  err = usage_error(argv + ["--out", str(cut), "--resume"], capsys)
  assert f"--resume cannot read {cut}/metrics.json" in err and "delete it" in err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_init_error_in_one_row_keeps_the_finished_rows(tmp_path, monkeypatch, capsys):
  """A row that fails (here: the search refusing a singular kernel) used to lose every row
  finished before it; now they are in metrics.json (status "failed") and the one-line error
  says which seed and row failed."""
  from ntk_dynamics import init as ntk_init

  def singular(*a, **kw):
    raise ValueError("search_init_scales: Θ is singular")

  monkeypatch.setattr(ntk_init, "search_init_scales", singular)
  out = tmp_path / "run"
  err = usage_error(INIT + ["--tweaks", "default,scale_search", "--out", str(out)], capsys)
  assert "seed 0, row scale_search: search_init_scales: Θ is singular (1 row(s) finished " \
         f"before are in {out}/metrics.json, status 'failed'" in err
  m = runs.read_json(out / "metrics.json")
  assert m["status"] == "failed"
  assert len(m["per_seed"]["default"]) == 1 and m["per_seed"]["scale_search"] == []


def test_a_diverged_run_loses_every_comparison_and_scores_no_accuracy():
  """NaN losses used to count as "not lower" in both directions (a finite row had 0 wins
  against a diverged default) and a network with NaN outputs scored the share of class 0."""
  def entry(seed, loss):
    return {"seed": seed, "actual_loss": [1.0, loss], "predicted_loss": [1.0, 0.5],
            "condition_number": 10.0, "lambda_max": 1.0, "trace": 1.0,
            "effective_rank": 1.0, "learning_rate": 0.1, "test_accuracy": 0.5,
            "tweak_report": {}}

  per_seed = {"default": [entry(0, math.nan), entry(1, math.nan)],
              "spectral_lr": [entry(0, 0.5), entry(1, math.nan)]}
  summary = init_recipe._summary(per_seed, ["default", "spectral_lr"], 1)
  assert summary["spectral_lr"]["wins_vs_default"] == 1
  assert summary["spectral_lr"]["tail_wins_vs_default"] == 1
  assert summary["default"]["wins_vs_spectral_lr"] == 0
  assert summary["default"]["actual_final_loss_median"] == math.inf
  table = init_recipe._table(summary, ["default", "spectral_lr"], 1)
  assert "| default | 10 | 1 | 1 | 0.1 | 0.5 | diverges | diverges |" in table
  assert "nan" not in table

  x = np.ones((4, 3), np.float32)
  y = np.ones((4, 2), np.float32)
  _, accuracy, _ = init_recipe._train(lambda p, x: x @ p, np.ones((3, 2), np.float32), x, y,
                                      x, np.zeros(4, np.int32), 1e30, None, 3)
  assert accuracy == 0.0
