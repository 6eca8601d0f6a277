"""`ntk-dynamics` error handling: one-line user errors with exit status 2, tracebacks for bugs,
130 on Ctrl-C, and strict JSON (non-finite floats as null, listed under "non_finite")."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ntk_dynamics import runs
from recipes import cli
from tests.cli_common import usage_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def test_the_entry_point_exits_2_with_one_line():
  proc = subprocess.run([sys.executable, "-m", "recipes.cli", "meta", "--checkpoint-every", "0"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr == ("ntk-dynamics meta: error: argument --checkpoint-every: must be a "
                         "positive integer, got '0' (see ntk-dynamics meta --help)\n")


def test_data_errors_are_one_line(tmp_path, capsys, monkeypatch):
  err = usage_error(["ntk", "--n", "5000"], capsys)
  assert "--n must be an int in [1, 1347]" in err and "got 5000" in err
  assert "'foo'" in usage_error(["ntk", "--dataset", "foo"], capsys)
  # init's own checks live in recipes/init.py; the entry point words its errors the same way.
  assert "got 5000" in usage_error(["init", "--n-train", "5000", "--n-search", "16",
                                     "--out", str(tmp_path / "init")], capsys)

  from tasks import _sources

  def cannot_prepare(name, split, data_dir):
    raise ModuleNotFoundError("No module named 'importlib_resources'")

  monkeypatch.setattr(_sources.tfds, "data_source", cannot_prepare)
  empty = tmp_path / "empty"
  err = usage_error(["ntk", "--dataset", "tfds:mnist", "--data-dir", str(empty)], capsys)
  assert f"not prepared in {empty}" in err and f"tfds build mnist --data_dir {empty}" in err


def test_parse_errors_are_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([])
  assert e.value.code == 2 and capsys.readouterr().err == (
      "ntk-dynamics: error: the following arguments are required: COMMAND "
      "(see ntk-dynamics --help)\n")
  for argv, expected in ((["ntk", "--n", "0"], "argument --n: must be a positive integer"),
                         (["ntk", "--depth", "-1"], "argument --depth: must be an integer >= 0"),
                         (["curves", "--widths", ""], "argument --widths: must list at least"),
                         (["meta", "--inner", "nope"], "argument --inner: invalid choice")):
    assert expected in usage_error(argv, capsys)


def test_bugs_keep_their_traceback_and_interrupts_exit_130(monkeypatch, tmp_path, capsys):
  from recipes import ntk

  def bug(args):
    raise RuntimeError("a real bug")

  monkeypatch.setattr(ntk, "run", bug)
  with pytest.raises(RuntimeError, match="a real bug"):
    cli.main(["ntk"])

  def user_error(args):
    raise ValueError("bad value")

  monkeypatch.setattr(ntk, "run", user_error)
  assert "ntk-dynamics ntk: error: bad value" == usage_error(["ntk"], capsys)
  monkeypatch.setenv("NTK_DYNAMICS_TRACEBACK", "1")
  with pytest.raises(ValueError, match="bad value"):
    cli.main(["ntk"])
  monkeypatch.delenv("NTK_DYNAMICS_TRACEBACK")

  def unwritable(args):
    return open(tmp_path / "missing" / "metrics.json", "w")

  monkeypatch.setattr(ntk, "run", unwritable)
  assert "No such file or directory" in usage_error(["ntk"], capsys)

  def interrupted(args):
    raise KeyboardInterrupt

  monkeypatch.setattr(ntk, "run", interrupted)
  assert cli.main(["ntk"]) == 130
  assert "ntk-dynamics ntk: interrupted" in capsys.readouterr().err


def _strict(text: str):
  return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON literal {c}"))


def test_json_files_are_strict_and_round_trip(tmp_path):
  obj = {"loss": math.nan, "curve": np.array([1.0, np.inf, -np.inf]), "n": np.int64(3),
         "a/b": {"~x": float("nan")}, "none": None, "ok": 0.5}
  path = runs.atomic_write_json(tmp_path / "m.json", obj)
  data = _strict(path.read_text())
  assert data["loss"] is None and data["curve"] == [1.0, None, None] and data["none"] is None
  assert data["non_finite"] == {"/loss": "nan", "/curve/1": "inf", "/curve/2": "-inf",
                                "/a~1b/~0x": "nan"}
  back = runs.read_json(path)
  assert "non_finite" not in back and math.isnan(back["loss"]) and back["none"] is None
  assert back["curve"][1:] == [math.inf, -math.inf] and math.isnan(back["a/b"]["~x"])
  assert back["n"] == 3 and back["ok"] == 0.5
  # A top-level list has nowhere to list them: plain nulls.
  listed = runs.atomic_write_json(tmp_path / "l.json", [math.nan, 1.0])
  assert _strict(listed.read_text()) == [None, 1.0]
  # Finite documents are unchanged: no "non_finite" key.
  assert "non_finite" not in _strict(runs.atomic_write_json(tmp_path / "f.json",
                                                            {"x": 1.0}).read_text())
