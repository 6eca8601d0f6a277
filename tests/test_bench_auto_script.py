"""The AUTO sweep (`benchmarks/bench_auto.py`) runs, measures every configuration, agrees
and resumes: at the tiny `--quick` shapes, in a subprocess (other test files switch on
float64 process-wide). Its timings are not asserted: they are the benchmark's business."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_auto.py"
CONFIGS = {"JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS", "STRUCTURED_DERIVATIVES", "AUTO",
           "DEFAULTS"}


def _run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--models", "gru",
                         "embedding", "--workdir", str(tmp_path), "--out",
                         str(tmp_path / "report.md"), "--budget-s", "2"],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return [json.loads(l) for l in (tmp_path / "auto.quick.jsonl").read_text().splitlines()]


def test_bench_auto_measures_every_configuration_and_resumes(tmp_path):
  records = _run(tmp_path)
  assert sorted((r["model"], r["kind"]) for r in records) == [
      ("embedding", "full"), ("embedding", "traced"), ("gru", "full"), ("gru", "traced")]
  for r in records:
    assert r["status"] == "ok", r
    assert set(r["configs"]) == CONFIGS
    for name, c in r["configs"].items():
      assert c["status"] == "ok" and c["rel_err"] <= 1e-4, (r["model"], name, c)
    assert r["auto_pick"] in CONFIGS - {"AUTO", "DEFAULTS"}
    assert r["git"] and r["finished"]   # a later report states when and what was measured
  report = (tmp_path / "report.md").read_text()
  times = sorted(r["finished"] for r in records)
  assert f"- measured: {times[0]} to {times[-1]}" in report
  assert "AUTO's pick is within 10% of the fastest method on" in report
  assert sum(line.startswith(("| gru |", "| embedding |")) for line in report.splitlines()) == 4
  assert _run(tmp_path) == records   # a rerun finds every record and measures nothing
