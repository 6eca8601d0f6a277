"""Markdown tables of a `meta_evidence.sh` output folder (stdlib only).

    python benchmarks/meta_table.py runs/meta-evidence

One row per finished run (`*/metrics.json`): the held-out loss (and accuracy) ± 95% CI at the
end of meta-training; then, per `profile-*/profile.json`, wall time and XLA temporary memory of
one meta-step against the number of inner steps.
"""
from __future__ import annotations

import glob
import json
import os
import sys


def _ms(value) -> str:
  return "—" if value is None else f"{value:.1f}"


def run_rows(out: str) -> list[str]:
  lines = ["| task | inner loop | meta-steps | query loss (±95% CI) | accuracy % (±95% CI) | "
           "ms / meta-step | held-out tasks |", "|---|---|---|---|---|---|---|"]
  for path in sorted(glob.glob(os.path.join(out, "*", "metrics.json"))):
    with open(path) as fh:
      m = json.load(fh)   # non-finite numbers are null (ntk_dynamics.runs)
    if "final" not in m:  # interrupted before its final evaluation
      continue
    r, last = m["final"], m["evals"][-1]
    acc = ("—" if r.get("accuracy") is None or r["accuracy"] != r["accuracy"] else
           f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_ci95']:.1f}")
    status = "" if m["status"] == "completed" else f" (stopped: {m['status']})"
    if m["config"].get("outer_loss", "auto") != "auto":
      status += f", outer loss {m['config']['outer_loss']}"
    lines.append(f"| {r['task']} | {r['inner']}{status} | {r['meta_steps']} | "
                 f"{r['loss']:.3f} ± {r['loss_ci95']:.3f} | {acc} | {_ms(r['ms_per_step'])} | "
                 f"{last['tasks']} |")
  return lines


def profile_rows(out: str) -> list[str]:
  lines = []
  for path in sorted(glob.glob(os.path.join(out, "profile-*", "profile.json"))):
    with open(path) as fh:
      p = json.load(fh)
    rows = p["rows"]
    steps = sorted({r["inner_steps"] for r in rows})
    names = []
    for r in rows:
      name = r["inner"] + (" (1st order)" if r["first_order"] else "")
      if name not in names:
        names.append(name)
    cfg = p["config"]
    lines += ["", f"{cfg['task']}, meta-batch {cfg['meta_batch']}, {cfg['k_shot']}-shot: "
              "ms per meta-step / XLA temporary MiB", "",
              "| inner loop | " + " | ".join(f"k = {k}" for k in steps) + " |",
              "|---|" + "---|" * len(steps)]
    for name in names:
      cells = []
      for k in steps:
        hit = [r for r in rows if r["inner"] + (" (1st order)" if r["first_order"] else "")
               == name and r["inner_steps"] == k]
        if not hit:
          cells.append("(same)" if name == "ntk_ridge" else "")
          continue
        r = hit[0]
        temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.2f}"
        cells.append(f"{1e3 * r['step_s']:.2f} / {temp}")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or not os.path.isdir(argv[0]):
    print(__doc__.strip(), file=sys.stderr)
    return 2
  print("\n".join(run_rows(argv[0]) + profile_rows(argv[0])))
  return 0


if __name__ == "__main__":
  sys.exit(main())
