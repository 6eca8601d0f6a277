"""The prepared accelerator check (`benchmarks/gpu_bench.py`) runs, agrees and resumes.

A device is lent to few sessions and for minutes, so the script must work the first time it
meets one: this runs it on CPU at the tiny `--quick` shapes, in a subprocess (other test files
switch on float64 process-wide).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"


def _run(out):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--quick",
                         "--models", "mlp", "--kinds", "traced"],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def _records(out):
  return [json.loads(line) for line in (out / "gpu_results.jsonl").read_text().splitlines()]


def test_gpu_bench_measures_every_configuration_and_resumes(tmp_path):
  first = _run(tmp_path)
  records = _records(tmp_path)
  configs = [(r["config"], r["precision"]) for r in records]
  assert configs == [("JC vmap=0", "highest"), ("defaults", "default"),
                     ("SD vmap=0", "default"), ("AUTO vmap=0", "default"),
                     ("JC vmap=0", "default"), ("defaults", "highest")], first
  for r in records:
    assert r["status"] == "ok", r
    assert r["median_s"] > 0 and r["first_call_s"] >= r["median_s"], r
    assert r["xla_bytes"] > 0, r
    # float32 on CPU: every kernel equals the reference Jacobian contraction to round-off.
    assert r["rel_err"] < 1e-5, r
  report = (tmp_path / "GPU_RESULTS.md").read_text()
  assert sum(line.startswith("| mlp | traced |") for line in report.splitlines()) == 6

  # A rerun keeps what was measured: only the reference kernel is computed again.
  second = _run(tmp_path)
  assert second.count("cached") == 5, second
  assert _records(tmp_path) == records
