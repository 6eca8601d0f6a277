"""Hypothesis-generated MLP/CNN shapes and axis choices against the brute-force reference.

Derandomized (the examples are a fixed function of the test source) and without an example
database, so CI cannot flake on a new random draw.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from ntk_dynamics import NtkImplementation, empirical_ntk_fn
from tests import zoo

# No shrinking: every example compiles a kernel, so shrinking a failure would take minutes;
# the failing example is printed as drawn (with a `note` spelling out the model and axes).
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

IMPLEMENTATIONS = [NtkImplementation.JACOBIAN_CONTRACTION, NtkImplementation.NTK_VECTOR_PRODUCTS,
                   NtkImplementation.AUTO]
TOL = 1e-10


@st.composite
def mlps(draw):
  """(f, params, input feature shape, description)."""
  depth = draw(st.integers(1, 3))
  widths = [draw(st.integers(1, 4)) for _ in range(depth + 1)]
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  params = [(rng.normal(size=(a, b)) / math.sqrt(a), 0.1 * rng.normal(size=b))
            for a, b in zip(widths[:-1], widths[1:])]

  def f(p, x):
    for i, (w, b) in enumerate(p):
      x = x @ w + b
      if i < len(p) - 1:
        x = jnp.tanh(x)
    return x

  return f, params, (widths[0],), f"MLP widths={widths}"


def _conv_out(size, k, s, padding):
  return -(-size // s) if padding == "SAME" else (size - k) // s + 1


@st.composite
def cnns(draw):
  """Conv stack (kernel sizes, strides, padding drawn), spatial outputs or a dense head."""
  h, w, c = draw(st.integers(2, 6)), draw(st.integers(2, 6)), draw(st.integers(1, 3))
  in_shape = (h, w, c)
  layers, weights = [], []
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  for _ in range(draw(st.integers(1, 2))):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from(["SAME", "VALID"]))
    if _conv_out(h, k[0], s[0], padding) < 1 or _conv_out(w, k[1], s[1], padding) < 1:
      padding = "SAME"
    h, w = _conv_out(h, k[0], s[0], padding), _conv_out(w, k[1], s[1], padding)
    c_out = draw(st.integers(1, 3))
    layers.append((k, s, padding))
    weights.append(rng.normal(size=k + (c, c_out)) / math.sqrt(k[0] * k[1] * c))
    c = c_out
  params = {"convs": weights}
  dense_head = draw(st.booleans())
  if dense_head:
    out_dim = draw(st.integers(1, 3))
    params["head"] = rng.normal(size=(h * w * c, out_dim)) / math.sqrt(h * w * c)

  def f(p, x):
    for (k, s, padding), wt in zip(layers, p["convs"]):
      x = jnp.tanh(jax.lax.conv_general_dilated(x, wt, window_strides=s, padding=padding,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")))
    if dense_head:
      x = x.reshape(x.shape[0], -1) @ p["head"]
    return x

  return f, params, in_shape, f"CNN in={in_shape} layers={layers} dense_head={dense_head}"


@st.composite
def axis_choices(draw, rank: int):
  """trace_axes / diagonal_axes: disjoint valid axes of an output of `rank`, each written
  non-negative or negative at random, in random order."""
  roles = [draw(st.sampled_from(["trace", "diagonal", "keep"])) for _ in range(rank)]

  def spell(a):
    return a - rank if draw(st.booleans()) else a

  trace = [spell(a) for a, r in enumerate(roles) if r == "trace"]
  diagonal = [spell(a) for a, r in enumerate(roles) if r == "diagonal"]
  trace = draw(st.permutations(trace)) if trace else trace
  diagonal = draw(st.permutations(diagonal)) if diagonal else diagonal
  return tuple(trace), tuple(diagonal)


def _check(data, model, n1, n2, with_x2, vmap, implementation):
  f, params, in_shape, desc = model
  rng = np.random.default_rng(n1 * 10 + n2)
  x1 = rng.normal(size=(n1,) + in_shape)
  rank = len(jax.eval_shape(f, params, x1).shape)
  trace_axes, diagonal_axes = data.draw(axis_choices(rank), label="axes")
  if 0 in [a % rank for a in trace_axes + diagonal_axes]:
    n2 = n1  # a traced or diagonal batch axis needs equal batch sizes
  x2 = rng.normal(size=(n2,) + in_shape) if with_x2 else None
  note(f"{desc} n1={n1} x2={None if x2 is None else x2.shape} vmap_axes={vmap} "
       f"trace_axes={trace_axes} diagonal_axes={diagonal_axes} {implementation.name}")

  got = empirical_ntk_fn(f, trace_axes=trace_axes, diagonal_axes=diagonal_axes, vmap_axes=vmap,
                         implementation=implementation)(x1, x2, params)
  want = zoo.reference_ntk(f, params, x1, x2, trace_axes, diagonal_axes)
  zoo.assert_close(got, want, TOL)


COMMON = dict(data=st.data(), n1=st.integers(1, 3), n2=st.integers(1, 4),
              with_x2=st.booleans(), vmap=st.sampled_from([None, 0]),
              implementation=st.sampled_from(IMPLEMENTATIONS))


@SETTINGS
@given(model=mlps(), **COMMON)
def test_random_mlp_matches_reference(data, model, n1, n2, with_x2, vmap, implementation):
  _check(data, model, n1, n2, with_x2, vmap, implementation)


@SETTINGS
@given(model=cnns(), **COMMON)
def test_random_cnn_matches_reference(data, model, n1, n2, with_x2, vmap, implementation):
  _check(data, model, n1, n2, with_x2, vmap, implementation)
