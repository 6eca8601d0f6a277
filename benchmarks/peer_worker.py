"""One measurement of neural-tangents (the peer), run with the peer venv's python.

    $(../shared/peer/setup.sh) benchmarks/peer_worker.py '{"case_dir": ..., "model": ...,
        "cfg": {...}, "kind": "full"|"traced", "impl": "STRUCTURED_DERIVATIVES",
        "vmap_axes": 0, "repeats": 5, "kernel_out": "path.npy"}'

Same models (benchmarks/models.py), same parameters and inputs (loaded from the .npz/.npy
files the benchmark wrote), same protocol (common.py). NT's `empirical_ntk_fn` returns an
un-jitted function; as NT's documentation does, it is wrapped in `jax.jit`.
"""
from __future__ import annotations

import common
import neural_tangents  # noqa: F401  (imported before the baseline RSS is read)


def build(apply, spec):
  import jax
  import neural_tangents as nt
  if (spec["impl"] in ("JACOBIAN_CONTRACTION", "AUTO") and spec["vmap_axes"] is None
      and spec["model"] != "mlp"):
    # NT's default on the CNN needs about 11 GB (shared/peer/README.md): never by accident.
    raise MemoryError(f"refused: NT {spec['impl']} without vmap_axes on {spec['model']} "
                      "is memory-heavy (about 11 GB on the CNN); not run by this benchmark.")
  fn = nt.empirical_ntk_fn(apply, trace_axes=common.trace_axes(spec["kind"]),
                           vmap_axes=spec["vmap_axes"],
                           implementation=nt.NtkImplementation[spec["impl"]])
  return jax.jit(fn), {"nt_version": nt.__version__}


if __name__ == "__main__":
  common.worker_main(build)
