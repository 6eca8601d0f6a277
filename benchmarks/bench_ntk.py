#!/usr/bin/env python
"""Empirical-NTK benchmark: ntk_dynamics against neural-tangents, against a FLOP floor, and
its scaling in width and batch size. Writes RESULTS.md (see README.md beside this file).

    .venv/bin/python benchmarks/bench_ntk.py                 # full run (quiet machine!)
    .venv/bin/python benchmarks/bench_ntk.py --quick         # tiny smoke test, a few minutes

Every measurement runs in its own worker process (our_worker.py with this project's python,
peer_worker.py with the neural-tangents venv's python), watched for memory and time, and is
appended to a JSON-lines file as soon as it finishes; a rerun resumes from that file
(measurements are keyed by model, shapes, settings and a hash of the library sources, so a
library change re-measures only our side).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402
import flops  # noqa: E402
import models  # noqa: E402

OUR_IMPLS = ("AUTO", "JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS", "STRUCTURED_DERIVATIVES")
PEER_CONFIG = ("STRUCTURED_DERIVATIVES", 0)   # the peer at its fastest
# Configurations the summary compares closely (best, AUTO / best, defaults / peer): measured
# in `--rounds` separate processes, a later round after all others, and the lowest median is
# kept. One process's median of 20 ms calls still moves by 10-20% between processes.
CONTENDERS = (("peer",) + PEER_CONFIG, ("ours", "DEFAULTS", None), ("ours", "AUTO", 0),
              ("ours", "STRUCTURED_DERIVATIVES", 0))
KINDS = ("full", "traced")
REL_TOL = 1e-4    # max|ours - ref| / max|ref| accepted for float32 kernels

SHORT = {"DEFAULTS": "defaults", "AUTO": "AUTO", "JACOBIAN_CONTRACTION": "JC",
         "NTK_VECTOR_PRODUCTS": "VP", "STRUCTURED_DERIVATIVES": "SD"}


# ------------------------------------------------------------------------------- utilities


def sha(*parts) -> str:
  h = hashlib.sha1()
  for p in parts:
    h.update(p if isinstance(p, bytes) else str(p).encode())
  return h.hexdigest()[:12]


def file_hash(paths) -> str:
  h = hashlib.sha1()
  for p in sorted(paths):
    h.update(p.encode())
    with open(p, "rb") as fh:
      h.update(fh.read())
  return h.hexdigest()[:12]


def library_files():
  """The sources an NTK timing depends on: ntk_dynamics/*.py and ntk_dynamics/kernels/**
  (not the dynamics/meta/init subpackages, whose edits do not change a kernel)."""
  pkg = os.path.join(REPO, "ntk_dynamics")
  out = [os.path.join(pkg, f) for f in os.listdir(pkg) if f.endswith(".py")]
  for root, _, files in os.walk(os.path.join(pkg, "kernels")):
    out += [os.path.join(root, f) for f in files if f.endswith(".py")]
  return out


def git(*args) -> str:
  try:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=20).stdout.strip()
  except Exception:  # git missing or not a repository: the report says so
    return "?"


def machine_info() -> dict:
  cpu, flags = "?", ""
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name") and cpu == "?":
          cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
          flags = line.split(":", 1)[1]
  except OSError:
    pass
  mem = "?"
  try:
    with open("/proc/meminfo") as fh:
      for line in fh:
        if line.startswith("MemTotal"):
          mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
  except OSError:
    pass
  simd = [f for f in ("avx2", "fma", "avx512f") if f" {f} " in f" {flags} "]
  return {"cpu": cpu, "cores": os.cpu_count(),
          "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count(), "simd": " ".join(simd) or "?", "memory": mem,
          "platform": platform.platform(), "python": platform.python_version()}


def loadavg() -> str:
  try:
    return " ".join(open("/proc/loadavg").read().split()[:3])
  except OSError:
    return "?"


def fmt_s(t) -> str:
  if t is None or (isinstance(t, float) and math.isnan(t)):
    return "–"
  if t < 1e-3:
    return f"{t * 1e6:.0f} µs"
  if t < 1:
    return f"{t * 1e3:.3g} ms"
  return f"{t:.3g} s"


def fmt_x(r) -> str:
  if r is None:
    return "–"
  return f"{r:.3g}×"


def fmt_mb(m) -> str:
  if m is None:
    return "–"
  return f"{m / 1024:.2f} GB" if m >= 1024 else f"{m:.0f} MB"


def rss_mb(pid: int):
  try:
    with open(f"/proc/{pid}/status") as fh:
      for line in fh:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    return None
  return None


# ---------------------------------------------------------------------------- the plan


def config_label(impl: str, vmap) -> str:
  if impl == "DEFAULTS":
    return "defaults"
  return f"{SHORT[impl]} vmap={vmap}"


class Bench:
  def __init__(self, args):
    self.args = args
    self.quick = args.quick
    self.workdir = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(self.workdir, "cases"), exist_ok=True)
    os.makedirs(os.path.join(self.workdir, "kernels"), exist_ok=True)
    os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)
    self.jsonl = os.path.join(self.workdir, "results.jsonl")
    self.repeats = args.repeats if args.repeats is not None else (1 if self.quick else 5)
    self.configs = models.QUICK_CONFIGS if self.quick else models.CONFIGS
    self.bench_files = bench_files = [os.path.join(HERE, f) for f in ("models.py", "common.py")]
    self.our_fp = file_hash(library_files() + bench_files + [os.path.join(HERE,
                                                                         "our_worker.py")])
    self.peer_python = None if args.skip_peer else self._peer_python()
    self.peer_fp = file_hash(bench_files + [os.path.join(HERE, "peer_worker.py")]) + \
        sha(self.peer_python or "")
    self.records = self._load()
    self.cases = {}
    self.plan = []
    self.started = time.time()
    self.load_start = loadavg()

  # ---------------------------------------------------------------- resume file

  def _load(self) -> dict:
    recs = {}
    if self.args.fresh and os.path.exists(self.jsonl):
      os.replace(self.jsonl, self.jsonl + f".{int(time.time())}.bak")
    if os.path.exists(self.jsonl):
      with open(self.jsonl) as fh:
        for line in fh:
          line = line.strip()
          if not line:
            continue
          try:
            r = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut by a crash: ignored, that measurement reruns
          recs[r["key"]] = r
    return recs

  def _append(self, rec: dict) -> None:
    self.records[rec["key"]] = rec
    with open(self.jsonl, "a") as fh:
      fh.write(json.dumps(rec) + "\n")
      fh.flush()
      os.fsync(fh.fileno())

  def _peer_python(self):
    if self.args.peer_python:
      return self.args.peer_python
    setup = os.path.join(REPO, "..", "shared", "peer", "setup.sh")
    if not os.path.exists(setup):
      print(f"! peer setup script not found ({setup}); peer skipped", flush=True)
      return None
    try:
      out = subprocess.run(["bash", setup], capture_output=True, text=True, timeout=3600)
      py = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
      if out.returncode == 0 and os.path.exists(py):
        return py
      print(f"! peer setup failed (rc={out.returncode}): {out.stderr[-500:]}", flush=True)
    except Exception as e:  # the benchmark goes on without the peer
      print(f"! peer setup failed: {e}", flush=True)
    return None

  # ---------------------------------------------------------------- cases (params + inputs)

  def case(self, model: str, cfg: dict) -> str:
    """Directory with params.npz, x1.npy, x2.npy for this model/config (made once)."""
    cid = f"{model}-{sha(json.dumps(cfg, sort_keys=True), file_hash([os.path.join(HERE, 'models.py')]))}"
    d = os.path.join(self.workdir, "cases", cid)
    if not os.path.exists(os.path.join(d, "done")):
      import numpy as np
      os.makedirs(d, exist_ok=True)
      params = models.init_params(model, cfg, seed=0)
      models.save_params(params, os.path.join(d, "params.npz"))
      x1, x2 = models.make_inputs(model, cfg, seed=1)
      np.save(os.path.join(d, "x1.npy"), x1)
      np.save(os.path.join(d, "x2.npy"), x2)
      info = {"num_params": models.num_params(params), "xla_forward_flops": None}
      try:  # XLA's FLOP count of one forward pass, to validate models.flop_ops
        import jax
        ca = jax.jit(models.transform(model, cfg).apply).lower(params, x1).compile() \
            .cost_analysis()
        if isinstance(ca, (list, tuple)):
          ca = ca[0]
        info["xla_forward_flops"] = float(ca.get("flops"))
      except Exception as e:  # informational only
        info["xla_forward_error"] = f"{type(e).__name__}: {e}"
      with open(os.path.join(d, "info.json"), "w") as fh:
        json.dump(info, fh)
      open(os.path.join(d, "done"), "w").close()
    return d

  def case_info(self, model, cfg) -> dict:
    with open(os.path.join(self.case(model, cfg), "info.json")) as fh:
      return json.load(fh)

  # ---------------------------------------------------------------- planning

  def add(self, group, lib, model, cfg, kind, impl, vmap, round=1, **extra):
    key = self.key(lib, model, cfg, kind, impl, vmap, round)
    m = dict(key=key, groups=[group], lib=lib, model=model, cfg=cfg, kind=kind, impl=impl,
             vmap_axes=vmap, **extra)
    for p in self.plan:
      if p["key"] == key:
        if group not in p["groups"]:
          p["groups"].append(group)
        return p
    self.plan.append(m)
    return m

  def build_plan(self):
    a = self.args
    self.plan.append(dict(key=f"peak|{sha(self.sizes())}|r{max(self.repeats, 3)}|{self.our_fp}",
                          groups=["peak"], lib="ours", task="peak"))
    for model in a.models:
      cfg = self.configs[model]
      for kind in a.kinds:
        if self.peer_python:
          self.add("main", "peer", model, cfg, kind, *PEER_CONFIG)
        self.add("main", "ours", model, cfg, kind, "DEFAULTS", None)
        for impl in OUR_IMPLS:
          self.add("main", "ours", model, cfg, kind, impl, 0)
    for rnd in range(2, a.rounds + 1):
      for model in a.models:
        for kind in a.kinds:
          for lib, impl, vmap in CONTENDERS:
            if lib == "ours" or self.peer_python:
              self.add(f"round {rnd}", lib, model, self.configs[model], kind, impl, vmap,
                       round=rnd)
    if not a.no_scaling:
      for axis, grid in self.scaling_grids().items():
        for value in grid:
          cfg = dict(self.configs["mlp"])
          cfg.update(self.scaling_base())
          cfg["width" if axis == "W" else "n"] = value
          for kind in a.scaling_kinds:
            if self.peer_python:
              self.add(f"scaling-{axis}", "peer", "mlp", cfg, kind, *PEER_CONFIG)
            for impl, vmap in self.scaling_configs():
              self.add(f"scaling-{axis}", "ours", "mlp", cfg, kind, impl, vmap)

  def sizes(self):
    return [256, 512] if self.quick else [1024, 2048, 4096]

  def scaling_base(self):
    return dict(n=4, width=32) if self.quick else dict(n=64, width=512)

  def scaling_grids(self):
    if self.quick:
      return {"W": [16, 32, 64], "N": [2, 4, 8]}
    return {"W": [128, 256, 512, 1024, 2048], "N": [16, 32, 64, 128, 256]}

  def scaling_configs(self):
    if self.quick:
      return [("DEFAULTS", None)]
    return [("DEFAULTS", None), ("JACOBIAN_CONTRACTION", 0), ("NTK_VECTOR_PRODUCTS", 0),
            ("STRUCTURED_DERIVATIVES", 0)]

  # ---------------------------------------------------------------- running

  def run_all(self):
    total = len(self.plan)
    for i, m in enumerate(self.plan, 1):
      label = self.label(m)
      prev = self.records.get(m["key"])
      retry = self.args.retry_failed and prev and prev["status"] not in ("ok", "n/a")
      if prev and not retry:
        print(f"[{i:3d}/{total}] {label:58s} cached: {self.summary(prev)}", flush=True)
        continue
      print(f"[{i:3d}/{total}] {label:58s} ...", end="", flush=True)
      rec = self.run_one(m)
      print(f"\r[{i:3d}/{total}] {label:58s} {self.summary(rec)}", flush=True)
      self._append(rec)
      self.write_report()   # the report is always current, even if a later case crashes

  def label(self, m):
    if m.get("task") == "peak":
      return "matmul peak (jnp.dot, float32)"
    g = m["groups"][0]
    shape = f"N={m['cfg']['n']}" + (f" W={m['cfg']['width']}" if m["model"] == "mlp" else "")
    who = "peer NT" if m["lib"] == "peer" else "ours"
    return f"{g:9s} {m['model']} {shape:12s} {m['kind']:6s} {who:7s} " \
           f"{config_label(m['impl'], m['vmap_axes'])}"

  @staticmethod
  def summary(r):
    if r.get("task") == "peak" and r["status"] == "ok":
      return f"ok {r['peak_gflops']:.1f} GFLOP/s"
    if r["status"] == "ok":
      s = f"ok {fmt_s(r['median_s'])} (1st {fmt_s(r['first_call_s'])}), " \
          f"peak {fmt_mb(r.get('peak_rss_mb'))}"
      if r.get("auto_choice"):
        s += f", AUTO→{SHORT[r['auto_choice']]}"
      if r.get("per_example_proved") is not None:
        s += f", per-example {'proved' if r['per_example_proved'] else 'not proved'}"
      return s
    return f"{r['status']}: {(r.get('message') or '')[:90]}"

  def run_one(self, m) -> dict:
    rec = {k: v for k, v in m.items()}
    if m.get("task") == "peak":
      spec = {"task": "peak", "sizes": self.sizes(), "repeats": max(self.repeats, 3)}
      python, script = sys.executable, os.path.join(HERE, "our_worker.py")
    else:
      case_dir = self.case(m["model"], m["cfg"])
      kernel = os.path.join(self.workdir, "kernels", sha(m["key"]) + ".npy")
      spec = {"case_dir": case_dir, "model": m["model"], "cfg": m["cfg"], "kind": m["kind"],
              "impl": m["impl"], "vmap_axes": m["vmap_axes"], "repeats": self.repeats,
              "budget_s": self.args.budget_s, "kernel_out": kernel}
      if m["lib"] == "peer":
        python, script = self.peer_python, os.path.join(HERE, "peer_worker.py")
      else:
        python, script = sys.executable, os.path.join(HERE, "our_worker.py")
    log = os.path.join(self.workdir, "logs", sha(m["key"]) + ".log")
    if m["lib"] == "ours":
      now = file_hash(library_files() + self.bench_files + [os.path.join(HERE,
                                                                        "our_worker.py")])
      rec["source_hash_at_run"] = now
      if now != self.our_fp:
        print(f"\n! ntk_dynamics changed since this run started (source hash {self.our_fp} -> "
              f"{now}): this measurement runs the new code; rerun for consistent results",
              flush=True)
    rec.update(self.watch(python, script, spec, log))
    rec["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    rec["loadavg"] = loadavg()
    return rec

  @staticmethod
  def _kill(proc) -> None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)   # the worker's own process group, by its id
    except ProcessLookupError:
      pass
    proc.wait()

  def _poll(self, proc, t0, cap_mb):
    """Waits for the worker; returns why it was killed, or None when it exited."""
    self._max_rss = 0.0
    while proc.poll() is None:
      r = rss_mb(proc.pid)
      if r is not None:
        self._max_rss = max(self._max_rss, r)
      killed = None
      if r is not None and r > cap_mb:
        killed = f"killed: RSS {r / 1024:.1f} GB over the --mem-cap-gb {self.args.mem_cap_gb:g}"
      elif time.time() - t0 > self.args.timeout:
        killed = f"killed: over the --timeout {self.args.timeout:g} s"
      if killed:
        self._kill(proc)
        return killed
      time.sleep(0.2)
    return None

  def watch(self, python, script, spec, log) -> dict:
    """Runs one worker; kills it past the memory cap or the time limit."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONUNBUFFERED="1")
    cap_mb = self.args.mem_cap_gb * 1024
    t0 = time.time()
    with open(log, "w") as fh:
      proc = subprocess.Popen([python, script, json.dumps(spec)], stdout=fh,
                              stderr=subprocess.STDOUT, cwd=REPO, env=env,
                              start_new_session=True)
      try:
        killed = self._poll(proc, t0, cap_mb)
      except BaseException:  # Ctrl-C or a driver error: do not leave the worker running
        self._kill(proc)
        raise
    wall = time.time() - t0
    out = {"wall_s": wall, "sampled_max_rss_mb": self._max_rss, "rc": proc.returncode}
    if killed:
      out.update(status="killed-mem" if "RSS" in killed else "timeout", message=killed)
      return out
    result = None
    with open(log, errors="replace") as fh:
      text = fh.read()
    for line in text.splitlines():
      if line.startswith(common.RESULT_MARK):
        result = json.loads(line[len(common.RESULT_MARK):])
    if result is None:
      out.update(status="crashed", message=f"rc={proc.returncode}; log tail: " +
                 text[-600:].replace("\n", " | "))
      return out
    out.update(result)
    return out

  # ---------------------------------------------------------------- report

  def key(self, lib, model, cfg, kind, impl, vmap, round=1) -> str:
    """Identity of a measurement: what runs, how often, the code it runs, and the round."""
    fp = self.our_fp if lib == "ours" else self.peer_fp
    parts = [lib, model, json.dumps(cfg, sort_keys=True), kind, impl, str(vmap),
             f"r{self.repeats}b{self.args.budget_s:g}", fp]
    return "|".join(parts + ([f"round{round}"] if round > 1 else []))

  @staticmethod
  def key_hash(key: str) -> str:
    """The source hash a measurement key names (before any round suffix)."""
    parts = key.split("|")
    return parts[-2] if parts[-1].startswith("round") else parts[-1]

  def rec(self, lib, model, cfg, kind, impl, vmap):
    """The measurement of this configuration: of several rounds, the lowest median."""
    recs = [r for rnd in range(1, self.args.rounds + 1)
            if (r := self.records.get(self.key(lib, model, cfg, kind, impl, vmap, rnd)))]
    ok = [r for r in recs if r["status"] == "ok"]
    if ok:
      best = dict(min(ok, key=lambda r: r["median_s"]))
      best["processes"] = len(ok)
      return best
    return recs[0] if recs else None

  def peak_gflops(self):
    for m in self.plan:
      if m.get("task") == "peak":
        r = self.records.get(m["key"])
        if r and r["status"] == "ok":
          return r["peak_gflops"], r
    return None, None

  def reference(self, model, cfg, kind):
    """(kernel array, name): the peer's kernel, else our Jacobian contraction (vmap=0)."""
    import numpy as np
    for lib, impl, vmap, name in (("peer", *PEER_CONFIG, "peer NT SD vmap=0"),
                                  ("ours", "JACOBIAN_CONTRACTION", 0, "ours JC vmap=0")):
      r = self.rec(lib, model, cfg, kind, impl, vmap)
      if r and r["status"] == "ok" and r.get("kernel_path") and os.path.exists(r["kernel_path"]):
        return np.load(r["kernel_path"]), name
    return None, None

  def check(self, r, ref):
    """Max relative error of r's kernel against `ref` (None when not comparable)."""
    import numpy as np
    if ref is None or not r or r["status"] != "ok" or not r.get("kernel_path"):
      return None, ""
    if not os.path.exists(r["kernel_path"]):
      return None, "kernel file missing"
    k = np.load(r["kernel_path"])
    if k.shape != ref.shape:
      return None, f"shape {k.shape} ≠ reference {ref.shape}"
    err = float(np.max(np.abs(k.astype(np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))
    return err, ("✓" if err <= REL_TOL else "✗ MISMATCH")

  def write_report(self):
    try:
      text = self.report()
    except Exception as e:  # never lose the measurements over a report bug
      import traceback
      text = f"# report failed\n\n```\n{traceback.format_exc()}\n```\n"
      print(f"! report generation failed: {e}", flush=True)
    out = os.path.abspath(self.args.out)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
      fh.write(text)
    os.replace(tmp, out)

  def report(self) -> str:
    a = self.args
    mi = machine_info()
    peak, peak_rec = self.peak_gflops()
    L = []
    w = L.append
    w("# Empirical NTK benchmark: ntk_dynamics vs neural-tangents\n")
    if self.quick:
      w("> **--quick smoke test**: tiny shapes, one repeat, a shared machine. These numbers only "
        "prove that every path runs; they say nothing about performance.\n")
    done = sum(1 for m in self.plan if m["key"] in self.records)
    w(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')} "
      f"({done}/{len(self.plan)} measurements done)")
    w(f"- command: `{' '.join(shlex.quote(x) for x in [os.path.relpath(sys.executable, REPO)] + [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}`")
    w(f"- machine: {mi['cpu']}, {mi['cores']} cores ({mi['usable_cores']} usable), "
      f"{mi['memory']}, SIMD {mi['simd']}; {mi['platform']}, Python {mi['python']}")
    w(f"- load average at start / now: {self.load_start} / {loadavg()} (timings are only "
      "meaningful on a quiet machine)")
    import jax
    import haiku
    w(f"- ours: ntk_dynamics at git {git('rev-parse', '--short', 'HEAD')}"
      f"{' + uncommitted changes' if git('status', '--porcelain', '--', 'ntk_dynamics') else ''}"
      f" (source hash {self.our_fp}), JAX {jax.__version__}, dm-haiku {haiku.__version__}")
    peer_v = next((r for r in self.records.values() if r.get("lib") == "peer"
                   and r.get("nt_version")), None)
    changed = sorted({r["source_hash_at_run"] for m in self.plan
                      if (r := self.records.get(m["key"])) and r.get("source_hash_at_run")
                      and r["source_hash_at_run"] != self.key_hash(r["key"])})
    if changed:
      w(f"- **warning: ntk_dynamics changed while this run was going on** (source hashes "
        f"{', '.join(changed)} differ from {self.our_fp}); rerun with --fresh for one "
        "consistent library version")
    w(f"- peer: " + (f"neural-tangents {peer_v['nt_version']} on JAX {peer_v['jax_version']} "
                     f"(`{self.peer_python}`)" if peer_v else
                     ("not run (--skip-peer)" if a.skip_peer else "no successful peer run yet")))
    w(f"- protocol: x1 ≠ x2 (two batches of the same size), float32, parameters from a fixed "
      f"seed saved once and loaded by both libraries; first call = compile + run; then "
      f"median of at least {self.repeats} timed calls (more, up to 200, until they add up to "
      f"1 s), each to `jax.block_until_ready` (fewer, shown "
      f"as n=, when they would exceed {a.budget_s:g} s); each measurement in its own "
      f"process (memory cap {a.mem_cap_gb:g} GB, time limit {a.timeout:g} s). "
      f"The peer, our defaults, AUTO and SD (vmap=0) are measured in {a.rounds} processes, "
      "the later rounds after all other measurements; their lowest median is reported "
      "(with that process's memory).")
    w(f"- float32 matmul peak (jnp.dot, square): "
      + (f"**{peak:.1f} GFLOP/s** (" + ", ".join(
          f"{n}: {v['gflops_median']:.1f}" for n, v in peak_rec["sizes"].items()) +
         " GFLOP/s, median per size)" if peak else "not measured") + "\n")

    # ---- summary
    w("## Summary\n")
    w("Per model and kernel: the peer at its fastest (NT STRUCTURED_DERIVATIVES, vmap_axes=0), "
      "our defaults (`empirical_ntk_fn(f)`; `trace_axes=()` for the full kernel), our fastest "
      "configuration, and the FLOP floor. AUTO / best: `implementation=AUTO, vmap_axes=0` "
      "against our fastest configuration; memory: peak RSS of our defaults over the peer's.\n")
    w("| model | kernel | floor GFLOP | floor time | peer NT | ours defaults | defaults / peer "
      "| ours best (config) | best / peer | best / floor | peer / floor | AUTO / best "
      "| memory / peer | kernels agree |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for model in a.models:
      cfg = self.configs[model]
      for kind in a.kinds:
        fl = flops.floor_flops(model, cfg, kind)
        floor_s = fl["total"] / (peak * 1e9) if peak else None
        pr = self.rec("peer", model, cfg, kind, *PEER_CONFIG)
        pt = pr["median_s"] if pr and pr["status"] == "ok" else None
        dr = self.rec("ours", model, cfg, kind, "DEFAULTS", None)
        dt = dr["median_s"] if dr and dr["status"] == "ok" else None
        best = None
        for impl in OUR_IMPLS:
          r = self.rec("ours", model, cfg, kind, impl, 0)
          if r and r["status"] == "ok" and (best is None or r["median_s"] < best[1]):
            best = (config_label(impl, 0) + (f"→{SHORT[r['auto_choice']]}"
                                             if r.get("auto_choice") else ""), r["median_s"])
        if dt is not None and (best is None or dt < best[1]):
          best = ("defaults", dt)
        ar = self.rec("ours", model, cfg, kind, "AUTO", 0)
        at = ar["median_s"] if ar and ar["status"] == "ok" else None
        mem = (dr["peak_rss_mb"] / pr["peak_rss_mb"] if dt is not None and pt is not None
               else None)
        if dt is not None and pt is not None:
          ratios.append(dt / pt)
        ref, _ = self.reference(model, cfg, kind)
        verdicts = []
        for impl, vmap in [("DEFAULTS", None)] + [(i, 0) for i in OUR_IMPLS]:
          err, v = self.check(self.rec("ours", model, cfg, kind, impl, vmap), ref)
          if v:
            verdicts.append(v.split()[0])
        agree = ("–" if not verdicts else
                 ("all ✓" if all(v == "✓" for v in verdicts) else "**NO** (see below)"))
        if pr is None or pr["status"] != "ok":
          agree += " (ref: ours JC)" if verdicts else ""
        w(f"| {model} | {kind} | {fl['total'] / 1e9:.3g} | {fmt_s(floor_s)} | {fmt_s(pt)} | "
          f"{fmt_s(dt)} | {fmt_x(dt / pt if dt and pt else None)} | "
          f"{(fmt_s(best[1]) + ' (' + best[0] + ')') if best else '–'} | "
          f"{fmt_x(best[1] / pt if best and pt else None)} | "
          f"{fmt_x(best[1] / floor_s if best and floor_s else None)} | "
          f"{fmt_x(pt / floor_s if pt and floor_s else None)} | "
          f"{fmt_x(at / best[1] if at and best else None)} | {fmt_x(mem)} | {agree} |")
    if ratios:
      gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
      w(f"\nGeometric mean of defaults / peer over the {len(ratios)} rows: **{gm:.3g}×**.")
    w("")

    # ---- details
    w("## All measurements\n")
    w("| model | kernel | library / config | median | first call (compile + run) | peak RSS "
      "| Δ RSS | ours / peer | × floor | max rel. err vs ref | status |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models:
      cfg = self.configs[model]
      for kind in a.kinds:
        fl = flops.floor_flops(model, cfg, kind)
        floor_s = fl["total"] / (peak * 1e9) if peak else None
        ref, ref_name = self.reference(model, cfg, kind)
        pr = self.rec("peer", model, cfg, kind, *PEER_CONFIG)
        pt = pr["median_s"] if pr and pr["status"] == "ok" else None
        rows = ([("peer", *PEER_CONFIG)] if self.peer_python or pr else []) + \
            [("ours", "DEFAULTS", None)] + [("ours", i, 0) for i in OUR_IMPLS]
        for lib, impl, vmap in rows:
          r = self.rec(lib, model, cfg, kind, impl, vmap)
          name = ("peer NT " if lib == "peer" else "ours ") + config_label(impl, vmap)
          if r and r.get("auto_choice"):
            name += f" (→{SHORT[r['auto_choice']]})"
          if r and impl == "DEFAULTS" and "per_example_proved" in r:
            name += " [per-example: " + ("proved]" if r["per_example_proved"] else "no]")
          if r is None:
            w(f"| {model} | {kind} | {name} | | | | | | | | not run yet |")
            continue
          ok = r["status"] == "ok"
          t = r.get("median_s") if ok else None
          err, v = self.check(r, ref)
          if lib == "peer" and ref_name and ref_name.startswith("peer"):
            errs = "(reference)"
          else:
            errs = (f"{err:.1e} {v}" if err is not None else v) or "–"
          delta = (r["peak_rss_mb"] - r["baseline_rss_mb"]) if ok and r.get(
              "baseline_rss_mb") is not None else None
          status = r["status"] if ok else f"**{r['status']}**: {(r.get('message') or '')[:120]}"
          nrep = len(r.get("times_s") or [])
          nnote = f" (n={nrep})" if ok and nrep < self.repeats else ""
          if ok and r.get("processes", 1) > 1:
            nnote += f" (best of {r['processes']} processes)"
          w(f"| {model} | {kind} | {name} | {fmt_s(t)}{nnote} | "
            f"{fmt_s(r.get('first_call_s')) if ok else '–'} | "
            f"{fmt_mb(r.get('peak_rss_mb') if ok else r.get('sampled_max_rss_mb'))} | "
            f"{fmt_mb(delta)} | "
            f"{fmt_x(t / pt if t and pt and lib == 'ours' else None)} | "
            f"{fmt_x(t / floor_s if t and floor_s else None)} | {errs} | {status} |")
    w("")
    w(f"Reference for the error column: the peer's kernel when it ran, else ours JC vmap=0. "
      f"Error = max|K − K_ref| / max|K_ref| (float32; ✓ when ≤ {REL_TOL:g}). Agreement "
      "with the peer validates API compatibility: output layout (N1, N2, O1, O2) for "
      "`trace_axes=()`, (N1, N2) for `trace_axes=(-1,)`, and trace-as-mean.\n")

    # ---- floor
    w("## FLOP floor\n")
    w("```")
    w(flops.__doc__.strip())
    w("```\n")
    w("| model | kernel | params | forward GFLOP/side (ours; XLA) | forward | cotangents | "
      "contraction | total GFLOP | order per weight | floor time at peak |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models:
      cfg = self.configs[model]
      info = self.case_info(model, cfg)
      for kind in a.kinds:
        fl = flops.floor_flops(model, cfg, kind)
        xla = info.get("xla_forward_flops")
        w(f"| {model} | {kind} | {info['num_params']:,} | {fl['forward_flops_per_side'] / 1e9:.3g}; "
          f"{(xla / 1e9) if xla else float('nan'):.3g} | {fl['forward'] / 1e9:.3g} | "
          f"{fl['cotangents'] / 1e9:.3g} | {fl['contraction'] / 1e9:.3g} | "
          f"{fl['total'] / 1e9:.3g} | {fl['orders']} | "
          f"{fmt_s(fl['total'] / (peak * 1e9)) if peak else '–'} |")
    w("\nModels: " + "; ".join(f"**{m}**: {models.describe(m, self.configs[m])}"
                              for m in a.models) + ".\n")

    # ---- scaling
    if not a.no_scaling:
      w("## Scaling (MLP, " + ", ".join(a.scaling_kinds) + " kernel)\n")
      w("Novak et al. (2022) time complexities (unit constants), for dense layers l with "
        "fan-in K_l and fan-out C_l, one forward pass per example [FP] = Σ K_l·C_l ≈ P "
        "(parameters), O_eff = O² (full) or O (traced):\n")
      w("| method | cost | L-layer width-W MLP |")
      w("|---|---|---|")
      w("| Jacobian contraction | N·O·[FP] + N²·O_eff·P | N·O·L·W² + N²·O²·L·W² |")
      w("| NTK-vector products | N²·O·[FP] | N²·O·L·W² |")
      w("| structured derivatives | N·O·[FP] + N²·O_eff·Σ C_l + N²·Σ K_l | "
        "N·O·L·W² + N²·O²·L·W (+ N²·L·W) |\n")
      w("Derivation: JC builds O per-example Jacobian rows per side (N·O backward passes) and "
        "contracts them over all P parameters for every (example, output) pair; VP evaluates "
        "one column of Θ per (example of x2, output) with a VJP and then a JVP through all N "
        "examples of x1 (N²·O forward-pass equivalents, no contraction); SD propagates the same "
        "N·O cotangents as JC but contracts each dense layer as (X1 X2ᵀ) ⊙ (G1 G2ᵀ), so the "
        "contraction costs the layer's width, not its parameter count (W instead of W²).\n")
      w("Time against each axis is fitted as time ∝ x^k (least squares in log-log). The "
        "'formula' rows give the same fit of the formula itself over the same grid (the "
        "local exponent, which lies between the exponents of its terms); 'floor' fits our "
        "FLOP floor (flops.py). AUTO's choice (defaults) is compared to the formula of the "
        "method it picked.\n")
      base = self.scaling_base()
      for axis, grid in self.scaling_grids().items():
        for kind in a.scaling_kinds:
          fixed = f"N={base['n']}" if axis == "W" else f"W={base['width']}"
          w(f"### {kind} kernel against {'width W' if axis == 'W' else 'batch size N'} "
            f"({fixed}, O=10, 3 hidden layers)\n")
          cols = ([("peer", *PEER_CONFIG)] if self.peer_python else []) + \
              [("ours", i, v) for i, v in self.scaling_configs()]
          names = [("peer NT " if l == "peer" else "ours ") + config_label(i, v)
                   for l, i, v in cols]
          w(f"| {axis} | params | floor | " + " | ".join(names) + " |")
          w("|---" * (3 + len(cols)) + "|")
          series = {c: [] for c in cols}
          floors, formulas = [], {k: [] for k in ("JACOBIAN_CONTRACTION",
                                                  "NTK_VECTOR_PRODUCTS",
                                                  "STRUCTURED_DERIVATIVES")}
          chosen = {}
          for value in grid:
            cfg = dict(self.configs["mlp"])
            cfg.update(base)
            cfg["width" if axis == "W" else "n"] = value
            fl = flops.floor_flops("mlp", cfg, kind)
            floors.append(fl["total"])
            for k, v in flops.paper_costs(cfg["n"], cfg["out"], flops.mlp_layers(cfg),
                                          kind).items():
              formulas[k].append(v)
            cells = []
            for c in cols:
              r = self.rec(c[0], "mlp", cfg, kind, c[1], c[2])
              if r and r["status"] == "ok":
                series[c].append((value, r["median_s"]))
                cells.append(fmt_s(r["median_s"]))
                if r.get("auto_choice"):
                  chosen[c] = r["auto_choice"]
              else:
                cells.append("–" if r is None else r["status"])
            params = sum(k * c + c for k, c in flops.mlp_layers(cfg))
            w(f"| {value} | {params:,} | {fmt_s(fl['total'] / (peak * 1e9)) if peak else '–'} "
              f"| " + " | ".join(cells) + " |")
          fits = []
          for c in cols:
            pts = series[c]
            k = flops.loglog_slope([p[0] for p in pts], [p[1] for p in pts])
            fits.append("–" if k is None else f"**{k:.2f}** ({len(pts)} pts)")
          w(f"| fitted exponent (floor: of the FLOP count) | | {flops.loglog_slope(grid, floors):.2f} | "
            + " | ".join(fits) + " |")
          pred = []
          for c in cols:
            method = c[1]
            if method == "DEFAULTS" or method == "AUTO":
              method = chosen.get(c)
            if method in formulas:
              pred.append(f"{flops.loglog_slope(grid, formulas[method]):.2f} "
                          f"({SHORT[method]})")
            else:
              pred.append("–")
          w(f"| formula exponent | | | " + " | ".join(pred) + " |")
          w("")

    # ---- failures
    bad = [r for m in self.plan if (r := self.records.get(m["key"])) and r["status"] not in
           ("ok",)]
    w("## Not available, failed or guarded\n")
    if not bad:
      w("None.\n")
    for r in bad:
      if r.get("task") == "peak":
        w(f"- matmul peak: {r['status']}: {r.get('message', '')}")
        continue
      w(f"- {r['lib']} {r['model']} N={r['cfg']['n']}"
        f"{' W=' + str(r['cfg']['width']) if r['model'] == 'mlp' else ''} {r['kind']} "
        f"{config_label(r['impl'], r['vmap_axes'])}: **{r['status']}** — "
        f"{(r.get('message') or '').strip()[:300]}")
    w("")
    w("## Columns\n")
    w("- **median**: median wall time of the timed calls (after the first call), each "
      "blocked with `jax.block_until_ready`.\n"
      "- **first call**: the first call's wall time: tracing + XLA compilation + one run.\n"
      "- **peak RSS**: VmHWM of the worker process (a fresh process per measurement): "
      "the process's whole peak resident memory, including the Python/JAX runtime (and, for "
      "the peer, TensorFlow, which neural-tangents imports), XLA compilation, parameters, "
      "inputs and the kernel. (Not `ru_maxrss`: on Linux it survives exec and would include "
      "the benchmark driver's own RSS.) For killed runs: the largest RSS the watchdog "
      "sampled.\n"
      "- **Δ RSS**: peak RSS minus the RSS after imports and loading parameters and inputs "
      "(before building the kernel function): the memory the NTK computation (with its "
      "compilation) added.\n"
      "- **ours / peer**: our median over the peer's median on the same model and kernel "
      "(< 1: we are faster).\n"
      "- **× floor**: median over the floor time (FLOP floor / measured matmul peak).\n"
      "- configs: `defaults` = `empirical_ntk_fn(f)` (traced) or `empirical_ntk_fn(f, "
      "trace_axes=())` (full): AUTO, `vmap_axes=None`; `X vmap=0` = `implementation=X, "
      "vmap_axes=0`; AUTO's pick is shown as →X; [per-example: proved] = the library proved "
      "that outputs depend only on their own example and took the per-example path although "
      "`vmap_axes=None`. JC/VP/SD = JACOBIAN_CONTRACTION / "
      "NTK_VECTOR_PRODUCTS / STRUCTURED_DERIVATIVES. `n/a` = NotImplementedError.\n")
    w(f"Raw records: `{os.path.relpath(self.jsonl, REPO)}` (one JSON object per "
      "measurement; worker logs beside it).")
    return "\n".join(L) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="tiny shapes and one repeat: a smoke test of every path (minutes)")
  p.add_argument("--models", default=",".join(models.MODEL_NAMES),
                 help=f"comma-separated subset of {','.join(models.MODEL_NAMES)}")
  p.add_argument("--kinds", default=",".join(KINDS), help="full,traced")
  p.add_argument("--skip-peer", action="store_true", help="do not run neural-tangents")
  p.add_argument("--peer-python", default=os.environ.get("NTK_PEER_PY"),
                 help="the peer venv's python (default: ../shared/peer/setup.sh's answer)")
  p.add_argument("--out", default=None,
                 help="report path (default benchmarks/RESULTS.md; --quick: "
                      "benchmarks/RESULTS.quick.md)")
  p.add_argument("--workdir", default=None,
                 help="raw results, kernels, logs (default benchmarks/.bench/ or "
                      "benchmarks/.bench-quick/)")
  p.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; quick 1)")
  p.add_argument("--rounds", type=int, default=2,
                 help="processes per compared configuration (peer, defaults, AUTO, SD)")
  p.add_argument("--no-scaling", action="store_true", help="skip the MLP scaling study")
  p.add_argument("--scaling-kinds", default="full", help="kernels for the scaling study")
  p.add_argument("--mem-cap-gb", type=float, default=8.0,
                 help="kill a measurement whose RSS exceeds this (default 8)")
  p.add_argument("--timeout", type=float, default=None,
                 help="kill a measurement after this many seconds (default 1800; quick 300)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="stop timing a measurement after fewer than --repeats calls when the "
                      "timed calls would exceed this many seconds (default 300; quick 60)")
  p.add_argument("--fresh", action="store_true",
                 help="ignore (and back up) earlier results instead of resuming")
  p.add_argument("--retry-failed", action="store_true",
                 help="re-run cached measurements that failed (not ok and not n/a)")
  p.add_argument("--report-only", action="store_true",
                 help="only rewrite the report from the recorded results")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  args.kinds = [k for k in args.kinds.split(",") if k]
  args.scaling_kinds = [k for k in args.scaling_kinds.split(",") if k]
  for m in args.models:
    if m not in models.MODEL_NAMES:
      p.error(f"unknown model {m!r}; choose from {models.MODEL_NAMES}")
  for k in args.kinds + args.scaling_kinds:
    if k not in KINDS:
      p.error(f"unknown kernel kind {k!r}; choose from {KINDS}")
  if args.out is None:
    args.out = os.path.join(HERE, "RESULTS.quick.md" if args.quick else "RESULTS.md")
  if args.workdir is None:
    args.workdir = os.path.join(HERE, ".bench-quick" if args.quick else ".bench")
  if args.timeout is None:
    args.timeout = 300.0 if args.quick else 1800.0
  if args.budget_s is None:
    args.budget_s = 60.0 if args.quick else 300.0

  os.makedirs(args.workdir, exist_ok=True)
  lock = open(os.path.join(args.workdir, "lock"), "w")
  try:  # one driver per results file: two would interleave their records and their timings
    import fcntl
    if not args.report_only:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    p.error(f"another bench_ntk.py is running on {args.workdir}")
  bench = Bench(args)
  bench.build_plan()
  print(f"{len(bench.plan)} measurements; results -> {os.path.relpath(bench.jsonl)}; "
        f"report -> {os.path.relpath(args.out)}; peer: {bench.peer_python or 'skipped'}",
        flush=True)
  if not args.report_only:
    bench.run_all()
  bench.write_report()
  print(f"done in {time.time() - bench.started:.0f} s; report: {os.path.relpath(args.out)}",
        flush=True)


if __name__ == "__main__":
  main()
