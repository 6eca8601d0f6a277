"""One measurement of this project's empirical NTK (run by bench_ntk.py in its own process).

    .venv/bin/python benchmarks/our_worker.py '{"case_dir": ..., "model": "mlp", "cfg": {...},
        "kind": "full"|"traced", "impl": "DEFAULTS"|"AUTO"|"JACOBIAN_CONTRACTION"|...,
        "vmap_axes": 0|null, "repeats": 5, "kernel_out": "path.npy"}'

"DEFAULTS" is `empirical_ntk_fn(f)` with no other argument (traced kind) or with only
`trace_axes=()` (full kind): what a user gets without tuning.
"""
from __future__ import annotations

import common
import ntk_dynamics  # noqa: F401  (imported before the baseline RSS is read)


def build(apply, spec):
  import ntk_dynamics as nd
  from ntk_dynamics.kernels import choice

  info = {}
  # Read-only instrumentation: record which method AUTO picks (the library is not changed).
  original = choice.choose

  def recording_choose(*args, **kwargs):
    picked = original(*args, **kwargs)
    info["auto_choice"] = nd.NtkImplementation(picked).name
    return picked

  choice.choose = recording_choose
  try:  # and whether `vmap_axes=None` was upgraded to the per-example path (if the library
    from ntk_dynamics.kernels import independence  # proves independence; newer versions)
    original_proof = independence.is_per_example

    def recording_proof(*args, **kwargs):
      proved = original_proof(*args, **kwargs)
      info["per_example_proved"] = bool(proved) and info.get("per_example_proved", True)
      return proved

    independence.is_per_example = recording_proof
  except (ImportError, AttributeError):
    pass
  f = nd.from_haiku(common_transform(spec))
  if spec["impl"] == "DEFAULTS":
    fn = nd.empirical_ntk_fn(f) if spec["kind"] == "traced" else nd.empirical_ntk_fn(
        f, trace_axes=())
  else:
    fn = nd.empirical_ntk_fn(f, trace_axes=common.trace_axes(spec["kind"]),
                             vmap_axes=spec["vmap_axes"],
                             implementation=nd.NtkImplementation[spec["impl"]])
  return fn, info


def common_transform(spec):
  import models
  return models.transform(spec["model"], spec["cfg"])


if __name__ == "__main__":
  common.worker_main(build, {"peak": common.matmul_peak})
