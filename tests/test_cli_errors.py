"""`ntk-dynamics` error handling: one-line user errors with exit status 2, tracebacks for bugs,
130 on Ctrl-C, and strict JSON (non-finite floats as null, listed under "non_finite")."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_dynamics import runs
from recipes import cli
from tests.cli_common import usage_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["recipes.cli", "recipes"])
def test_the_entry_point_exits_2_with_one_line(module):
  proc = subprocess.run([sys.executable, "-m", module, "meta", "--checkpoint-every", "0"],
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


NTK_ARGV = ["ntk", "--n", "16", "--width", "8", "--depth", "1", "--repeats", "1"]
NTK_FIGURES = ("shape", "trace", "lambda_min", "lambda_max", "condition_number")


def test_ntk_keeps_its_timings_on_ctrl_c(monkeypatch, tmp_path, capsys):
  """Ctrl-C while timing the third implementation: metrics.json holds the first two timings
  (status "interrupted", no kernel figures yet) and the entry point exits with 130."""
  from recipes import ntk
  real_time, timed = ntk._time, []

  def interrupt_third(fn, repeats):
    if len(timed) == 2:
      raise KeyboardInterrupt
    out = real_time(fn, repeats)
    timed.append(out[0])
    return out

  monkeypatch.setattr(ntk, "_time", interrupt_third)
  out = tmp_path / "cut"
  capsys.readouterr()
  assert cli.main(NTK_ARGV + ["--out", str(out)]) == 130
  err = capsys.readouterr().err
  assert f"ntk: interrupted after 2 of 5 implementations; their timings are in {out}" in err
  assert "ntk-dynamics ntk: interrupted" not in err  # one note, the recipe's
  metrics = _strict((out / "metrics.json").read_text())
  assert metrics["status"] == "interrupted" and metrics["config"]["n"] == 16
  assert metrics["seconds"] == {"default (AUTO, vmap_axes=None)": timed[0],
                                "AUTO, vmap_axes=0": timed[1]}
  assert all(s > 0 for s in timed) and not set(NTK_FIGURES) & set(metrics)

  # Without --out nothing is written; the note gives the timings measured so far.
  timed.clear()
  monkeypatch.setattr(ntk, "_time", interrupt_third)
  assert cli.main(NTK_ARGV) == 130
  err = capsys.readouterr().err
  assert re.search(r"ntk: interrupted after 2 of 5 implementations \(default \(AUTO, "
                   r"vmap_axes=None\): [0-9.e-]+ s, AUTO, vmap_axes=0: [0-9.e-]+ s\); "
                   r"nothing written \(no --out\)", err), err


def test_ntk_implementation_out_of_memory_is_a_row_not_a_crash(monkeypatch, capsys):
  from recipes import ntk
  real_time = ntk._time

  calls = []

  def jc_out_of_memory(fn, repeats):  # the third call times JACOBIAN_CONTRACTION
    calls.append(fn)
    if len(calls) == 3:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 43 GB")
    return real_time(fn, repeats)

  monkeypatch.setattr(ntk, "_time", jc_out_of_memory)
  assert cli.main(NTK_ARGV) == 0
  assert re.search(r"JACOBIAN_CONTRACTION, vmap_axes=0 +n/a +out of memory: RESOURCE_EXHAUSTED",
                   capsys.readouterr().out)


def test_ntk_interrupted_after_the_kernel_figures_keeps_them(monkeypatch, tmp_path, capsys):
  from recipes import ntk

  def print_until_the_table(*a, **kw):  # Ctrl-C as the timing table starts
    if a and str(a[0]).startswith("implementation"):
      raise KeyboardInterrupt
    print(*a, **kw)

  monkeypatch.setattr(ntk, "print", print_until_the_table, raising=False)
  out = tmp_path / "late"
  assert cli.main(NTK_ARGV + ["--out", str(out)]) == 130
  metrics = _strict((out / "metrics.json").read_text())
  assert metrics["status"] == "interrupted" and len(metrics["seconds"]) == 5
  assert set(NTK_FIGURES) <= set(metrics) and metrics["shape"] == [16, 16]
  assert "after 5 of 5 implementations" in capsys.readouterr().err


def test_ntk_completed_run_says_so(tmp_path, capsys):
  out = tmp_path / "done"
  assert cli.main(NTK_ARGV + ["--out", str(out)]) == 0
  metrics = _strict((out / "metrics.json").read_text())
  assert metrics["status"] == "completed" and len(metrics["seconds"]) == 5
  assert metrics["seconds"]["default (AUTO, vmap_axes=None)"] > 0
  assert metrics["shape"] == [16, 16] and metrics["lambda_min"] <= metrics["lambda_max"]
  assert "implementation" in capsys.readouterr().out


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


def test_checkpoint_leaves_load_only_into_their_own_dtype_and_shape(tmp_path):
  """A template leaf of another dtype or PRNG key shape is refused, naming the leaf: before,
  float64 values were silently rounded to a float32 template (1.1 -> int 1 for an integer one)
  and four saved keys came back where the template held one. bfloat16 leaves, which `.npy`
  stores as raw bytes, could not be loaded at all."""
  path = tmp_path / "c.npz"
  saved = {"w": jnp.array([1.1, 2.7], jnp.float64), "h": jnp.array([1.5, -2.0], jnp.bfloat16),
           "key": jax.random.split(jax.random.key(0), 4)}
  runs.save_checkpoint(path, saved, step=2)
  step, tree, _ = runs.load_checkpoint(path, saved)
  assert step == 2 and tree["h"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(tree["h"], np.float32), [1.5, -2.0])
  np.testing.assert_array_equal(jax.random.key_data(tree["key"]),
                                jax.random.key_data(saved["key"]))
  for leaf, other, expected in (  # leaves in key order: h, key, w
      ("w", jnp.ones(2, jnp.float32), rf"checkpoint {path}: leaf 2 is stored with shape \(2,\) "
                                      r"and dtype float64; the template expects an array "
                                      r"stored with shape \(2,\) and dtype float32"),
      ("w", jnp.ones(2, jnp.int32), "leaf 2 .* dtype float64; .* dtype int32"),
      ("h", jnp.ones(2, jnp.float16), "leaf 0 .* dtype bfloat16; .* dtype float16"),
      ("key", jax.random.key(0), r"leaf 1 is stored with shape \(4, 2\) .* a PRNG key array "
                                 r"of shape \(\) .* stored with shape \(2,\)")):
    with pytest.raises(ValueError, match=expected):
      runs.load_checkpoint(path, dict(saved, **{leaf: other}))
