"""Every NTK implementation against a float64 brute-force reference, on the whole zoo:
implementation x trace_axes x diagonal_axes x vmap_axes x (x2 given or None).

Compilation dominates these tests, so the axis/x2 variants of one (model, vmap_axes,
implementation) are jit-compiled together as one program (the library's kernel functions are
jittable), and a failure lists every variant that disagrees. Per-parameter kernels, NNGP,
`empirical_kernel_fn` and `ntk_vp_fn` are in test_kernels_reference_api.py.
"""
from __future__ import annotations

import pytest

from ntk_dynamics import NtkImplementation, empirical_ntk_fn
from tests import zoo
from tests.zoo import (IMPLEMENTATIONS, MINIMAL_VARIANTS, PAIRWISE_VARIANTS, VARIANTS, ZOO,
                       ZOO_NAMES, check_variants, x2_mode, zoo_reference_ntk)

pytestmark = pytest.mark.usefixtures("fast_compile")


def _model_vmap_params():
  """(model, vmap_axes) pairs: vmap_axes=0 only for per-example models."""
  out = []
  for name in ZOO_NAMES:
    out.append(pytest.param(name, None, id=f"{name}-vmapNone"))
    if zoo.is_per_example(name):
      out.append(pytest.param(name, 0, id=f"{name}-vmap0"))
  return out


def _variants(name, vmap_axes, implementation):
  """The full grid of variants, except where the same code path already runs on it (this
  bounds compile time, which dominates):
    * AUTO dispatches to the methods tested on the full grid: pairwise coverage with the
      default vmap_axes=None (the most common call), two variants with vmap_axes=0;
    * vmap_axes=None on per-example models (the full grid runs there with vmap_axes=0, and
      the library may prove independence itself and take the per-example path anyway):
      pairwise coverage."""
  if implementation == NtkImplementation.AUTO:
    return PAIRWISE_VARIANTS if vmap_axes is None else MINIMAL_VARIANTS
  if vmap_axes is None and zoo.is_per_example(name):
    return PAIRWISE_VARIANTS
  return VARIANTS


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name,vmap_axes", _model_vmap_params())
def test_ntk_matches_reference(name, vmap_axes, implementation):
  """trace_axes in {(), (-1,)} x diagonal_axes in {(), (0,)} x x2 in {x2, None}."""
  e = ZOO[name]
  fns = {v: empirical_ntk_fn(e.f, trace_axes=v[0], diagonal_axes=v[1], vmap_axes=vmap_axes,
                             implementation=implementation)
         for v in _variants(name, vmap_axes, implementation)}
  got = zoo.call_variants(e, fns)
  want = {v: zoo_reference_ntk(name, x2_mode(v[2], v[1]), v[0], v[1]) for v in fns}
  check_variants(got, want)
