"""STRUCTURED_DERIVATIVES on hypothesis-generated MLP and CNN shapes (float64, vs jacrev)."""
from __future__ import annotations

import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from jax import lax  # noqa: E402

from ntk_dynamics import NtkImplementation, empirical_ntk_fn  # noqa: E402
from tests import zoo  # noqa: E402

SD = NtkImplementation.STRUCTURED_DERIVATIVES
AXES = st.sampled_from([((), ()), ((-1,), ()), ((), (0,)), ((-1,), (0,))])


def _check(f, params, x1, x2, trace_axes, diagonal_axes, vmap_axes):
  fn = empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, SD)
  got = fn(x1, x2, params)
  ref = zoo.reference_ntk(f, params, x1, x2, trace_axes, diagonal_axes)
  zoo.assert_close(got, ref, 1e-10)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(widths=st.lists(st.integers(1, 5), min_size=2, max_size=4), n1=st.integers(1, 3),
       n2=st.integers(1, 3), axes=AXES, vmap=st.sampled_from([None, 0]),
       symmetric=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_mlp(widths, n1, n2, axes, vmap, symmetric, bias, seed):
  rng = np.random.default_rng(seed)
  params = [{"w": rng.normal(size=(a, b)) / math.sqrt(a), "b": rng.normal(size=b) * 0.1}
            if bias else {"w": rng.normal(size=(a, b)) / math.sqrt(a)}
            for a, b in zip(widths[:-1], widths[1:])]

  def f(p, x):
    for i, layer in enumerate(p):
      x = x @ layer["w"] + (layer["b"] if bias else 0.0)
      if i < len(p) - 1:
        x = jnp.tanh(x)
    return x

  trace_axes, diagonal_axes = axes
  if diagonal_axes:
    n2 = n1
  x1 = rng.normal(size=(n1, widths[0]))
  x2 = None if symmetric else rng.normal(size=(n2, widths[0]))
  _check(f, params, x1, x2, trace_axes, diagonal_axes, vmap)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.sampled_from(["SAME", "VALID", ((1, 0), (0, 2))]),
       groups=st.sampled_from([1, 2]), cin_per_group=st.integers(1, 2),
       cout_per_group=st.integers(1, 2), axes=AXES, vmap=st.sampled_from([None, 0]),
       symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_cnn(k, stride, dilation, padding, groups, cin_per_group, cout_per_group, axes, vmap,
             symmetric, seed):
  rng = np.random.default_rng(seed)
  cin, cout = groups * cin_per_group, groups * cout_per_group
  hw = (5, 6)
  w = rng.normal(size=k + (cin_per_group, cout)) / math.sqrt(cin_per_group * k[0] * k[1])
  conv = lambda x, w: lax.conv_general_dilated(
      x, w, stride, padding, rhs_dilation=dilation, feature_group_count=groups,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  out_shape = jax.eval_shape(conv, jnp.zeros((1,) + hw + (cin,)), jnp.asarray(w)).shape
  params = {"w": w, "b": rng.normal(size=cout) * 0.1,
            "head": rng.normal(size=(math.prod(out_shape[1:]), 2)) * 0.3}

  def f(p, x):
    h = jnp.tanh(conv(x, p["w"]) + p["b"])
    return h.reshape(h.shape[0], -1) @ p["head"]

  trace_axes, diagonal_axes = axes
  x1 = rng.normal(size=(2,) + hw + (cin,))
  x2 = None if symmetric else rng.normal(size=((2 if diagonal_axes else 3),) + hw + (cin,))
  _check(f, params, x1, x2, trace_axes, diagonal_axes, vmap)
