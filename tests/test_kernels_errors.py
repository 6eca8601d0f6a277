"""Bad input raises a clear error that names the offending argument; valid odd input works."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from ntk_dynamics import (NtkImplementation, empirical_kernel_fn, empirical_nngp_fn,
                          empirical_ntk_fn, ntk_vp_fn, taylor_expand)
from tests import zoo
from tests.zoo import ZOO

IMPLS = [NtkImplementation.JACOBIAN_CONTRACTION, NtkImplementation.NTK_VECTOR_PRODUCTS,
         NtkImplementation.AUTO]


@pytest.fixture(scope="module")
def mlp():
  return ZOO["mlp"]


# ------------------------------------------------------------------ inputs


@pytest.mark.parametrize("implementation", IMPLS, ids=lambda i: i.name)
def test_x1_x2_feature_shapes_differ(mlp, implementation):
  x2 = np.ones((4, 6))  # mlp takes (N, 5)
  with pytest.raises(ValueError, match=r"(?s)`x1` and `x2`.*feature shapes"):
    empirical_ntk_fn(mlp.f, implementation=implementation)(mlp.x1, x2, mlp.params)


def test_x1_x2_feature_shapes_differ_nngp_and_vp(mlp):
  x2 = np.ones((4, 6))
  with pytest.raises(ValueError, match=r"(?s)`x1` and `x2`.*feature shapes"):
    empirical_nngp_fn(mlp.f)(mlp.x1, x2, mlp.params)
  with pytest.raises(ValueError, match=r"(?s)`x1` and `x2`.*feature shapes"):
    ntk_vp_fn(mlp.f, mlp.x1, x2, mlp.params)


def test_x1_x2_feature_shapes_differ_with_vmap_axes(mlp):
  with pytest.raises(ValueError, match=r"(?s)`x1` and `x2`.*feature shapes"):
    empirical_ntk_fn(mlp.f, vmap_axes=0)(mlp.x1, np.ones((4, 6)), mlp.params)


def test_x1_x2_pytree_structures_differ():
  e = ZOO["pytree_io"]
  x2 = {"a": e.x2["a"]}
  with pytest.raises(ValueError, match=r"(?s)`x1`.*structure.*`x2`"):
    empirical_ntk_fn(e.f)(e.x1, x2, e.params)


def test_x1_x2_pytree_leaf_feature_shapes_differ():
  e = ZOO["pytree_io"]
  x2 = {"a": e.x2["a"], "b": np.ones((4, 2, 4))}  # b's features are (2, 3) in x1
  with pytest.raises(ValueError, match=r"(?s)`x1` and `x2`.*feature shapes"):
    empirical_ntk_fn(e.f)(e.x1, x2, e.params)


def test_integer_token_inputs_are_valid():
  e = ZOO["embedding"]
  assert np.issubdtype(np.asarray(e.x1).dtype, np.integer)
  want = zoo.reference_ntk(e.f, e.params, e.x1, e.x2)
  for impl in IMPLS:
    for vmap_axes in (None, 0):
      got = empirical_ntk_fn(e.f, vmap_axes=vmap_axes, implementation=impl)(e.x1, e.x2,
                                                                              e.params)
      zoo.assert_close(got, want)
  zoo.assert_close(empirical_nngp_fn(e.f)(e.x1, e.x2, e.params),
                   zoo.reference_nngp(e.f, e.params, e.x1, e.x2))


# ------------------------------------------------------------------ axes


@pytest.mark.parametrize("trace_axes,diagonal_axes", [((-1,), (1,)), ((0, 1), (0,)),
                                                      ((1,), (-1,))])
def test_trace_and_diagonal_axes_overlap(mlp, trace_axes, diagonal_axes):
  with pytest.raises(ValueError, match=r"(?s)`trace_axes`.*`diagonal_axes`.*overlap"):
    empirical_ntk_fn(mlp.f, trace_axes, diagonal_axes)(mlp.x1, mlp.x2, mlp.params)
  with pytest.raises(ValueError, match=r"(?s)`trace_axes`.*`diagonal_axes`.*overlap"):
    empirical_nngp_fn(mlp.f, trace_axes, diagonal_axes)(mlp.x1, mlp.x2, mlp.params)


@pytest.mark.parametrize("kwargs,name", [({"trace_axes": (2,)}, "trace_axes"),
                                         ({"trace_axes": (-3,)}, "trace_axes"),
                                         ({"diagonal_axes": (5,)}, "diagonal_axes"),
                                         ({"trace_axes": (), "diagonal_axes": (-3,)},
                                          "diagonal_axes")])
def test_axes_out_of_range(mlp, kwargs, name):
  # mlp outputs are (N, 3): rank 2, valid axes -2..1.
  with pytest.raises(ValueError, match=rf"(?s)`{name}`.*out of range.*rank 2"):
    empirical_ntk_fn(mlp.f, **kwargs)(mlp.x1, mlp.x2, mlp.params)
  with pytest.raises(ValueError, match=rf"(?s)`{name}`.*out of range"):
    empirical_nngp_fn(mlp.f, **kwargs)(mlp.x1, mlp.x2, mlp.params)


def test_axes_out_of_range_for_one_output_leaf():
  # pytree_io outputs have ranks 2 and 3: axis 2 fits the second head only.
  e = ZOO["pytree_io"]
  with pytest.raises(ValueError, match=r"(?s)`trace_axes`.*out of range.*rank 2"):
    empirical_ntk_fn(e.f, trace_axes=(2,))(e.x1, e.x2, e.params)


def test_axis_named_twice(mlp):
  with pytest.raises(ValueError, match=r"(?s)`trace_axes`.*same output axis twice"):
    empirical_ntk_fn(mlp.f, trace_axes=(1, -1))(mlp.x1, mlp.x2, mlp.params)


@pytest.mark.parametrize("bad", ["1", 1.0, (0, "a"), (True,), object()])
def test_axes_of_wrong_type(bad):
  with pytest.raises(TypeError, match=r"(?s)`trace_axes`"):
    empirical_ntk_fn(lambda p, x: x, trace_axes=bad)
  with pytest.raises(TypeError, match=r"(?s)`diagonal_axes`"):
    empirical_nngp_fn(lambda p, x: x, diagonal_axes=bad)


def test_diagonal_batch_axis_needs_equal_batch_sizes(mlp):
  with pytest.raises(ValueError, match=r"(?s)[Oo]utput axis 0.*diagonal.*size 3.*4"):
    empirical_ntk_fn(mlp.f, diagonal_axes=(0,))(mlp.x1, mlp.x2, mlp.params)


# ------------------------------------------------------------------ params


def test_params_missing_key(mlp):
  params = {k: v for k, v in mlp.params.items() if k != "b2"}
  with pytest.raises(ValueError, match=r"(?s)`params`"):
    empirical_ntk_fn(mlp.f)(mlp.x1, mlp.x2, params)
  with pytest.raises(ValueError, match=r"(?s)`params`"):
    empirical_nngp_fn(mlp.f)(mlp.x1, mlp.x2, params)
  with pytest.raises(ValueError, match=r"(?s)`params`"):
    ntk_vp_fn(mlp.f, mlp.x1, mlp.x2, params)


def test_params_wrong_shape(mlp):
  params = dict(mlp.params, w1=np.ones((4, 6)))  # mlp takes 5 input features
  with pytest.raises(ValueError, match=r"(?s)f\(params, x1\) failed.*`params`"):
    empirical_ntk_fn(mlp.f)(mlp.x1, mlp.x2, params)


def test_params_of_haiku_model_wrong_shape():
  e = ZOO["cnn_haiku"]
  params = jax.tree.map(lambda a: a, e.params)
  params["linear"] = dict(params["linear"], w=np.ones((5, 3)))
  with pytest.raises(ValueError, match=r"(?s)`params`"):
    empirical_ntk_fn(e.f)(e.x1, e.x2, params)


def test_params_all_integer(mlp):
  # Integer leaves are constants (tests/test_haiku.py); with no floating-point leaf at all
  # there is nothing to differentiate.
  with pytest.raises(ValueError, match=r"(?s)`params` has no floating-point leaf.*int32"):
    empirical_ntk_fn(lambda p, x: x * p["n"])(mlp.x1, mlp.x2, {"n": np.int32(2)})


def test_params_empty(mlp):
  with pytest.raises(ValueError, match=r"(?s)`params` has no array leaves"):
    empirical_ntk_fn(lambda p, x: x * 1.0)(mlp.x1, mlp.x2, {})


def test_integer_outputs(mlp):
  with pytest.raises(ValueError, match=r"(?s)output leaf of dtype int"):
    empirical_ntk_fn(lambda p, x: (x > 0).astype(np.int32))(mlp.x1, mlp.x2, mlp.params)


# ------------------------------------------------------------------ vmap_axes


@pytest.mark.parametrize("vmap_axes", [2, -3, 5])
def test_vmap_axes_do_not_fit_input_rank(mlp, vmap_axes):
  with pytest.raises(ValueError, match=r"(?s)`vmap_axes.*does not fit.*rank 2"):
    empirical_ntk_fn(mlp.f, vmap_axes=vmap_axes)(mlp.x1, mlp.x2, mlp.params)


def test_vmap_axes_out_axes_do_not_fit_output_rank(mlp):
  # in_axes fit the (N, 5) inputs, out_axes=2 does not fit the (N, 3) outputs.
  with pytest.raises(ValueError, match=r"(?s)`vmap_axes \(out_axes\)`.*does not fit.*rank 2"):
    empirical_ntk_fn(mlp.f, vmap_axes=(0, 2, {}))(mlp.x1, mlp.x2, mlp.params)


def test_vmap_axes_structure_does_not_match_inputs():
  e = ZOO["pytree_io"]
  with pytest.raises(ValueError, match=r"(?s)`vmap_axes \(in_axes\)`.*structure"):
    empirical_ntk_fn(e.f, vmap_axes=({"a": 0}, 0, {}))(e.x1, e.x2, e.params)


def test_vmap_axes_select_different_batch_sizes():
  e = ZOO["pytree_io"]
  # axis 1 of "b" has size 2, axis 0 of "a" size 3.
  with pytest.raises(ValueError, match=r"(?s)`vmap_axes`.*batch sizes"):
    empirical_ntk_fn(e.f, vmap_axes=({"a": 0, "b": 1}, 0, {}))(e.x1, e.x2, e.params)


@pytest.mark.parametrize("bad", ["0", 1.5, (0, 0), True])
def test_vmap_axes_of_wrong_type(bad):
  with pytest.raises(TypeError, match=r"(?s)`vmap_axes`"):
    empirical_ntk_fn(lambda p, x: x, vmap_axes=bad)


# ------------------------------------------------------------------ other arguments


def test_unknown_implementation():
  with pytest.raises(ValueError):
    empirical_ntk_fn(lambda p, x: x, implementation=17)


@pytest.mark.parametrize("get", ["ntk_", ("ntk", "cov"), (), ""])
def test_empirical_kernel_fn_bad_get(mlp, get):
  kernel_fn = empirical_kernel_fn(mlp.f)
  with pytest.raises(ValueError, match=re.escape(f"`get`={get!r}")):
    kernel_fn(mlp.x1, mlp.x2, get, mlp.params)


def test_ntk_vp_fn_bad_v(mlp):
  vp = ntk_vp_fn(mlp.f, mlp.x1, mlp.x2, mlp.params)
  with pytest.raises(ValueError, match=r"(?s)`v` has a leaf of shape \(3, 3\).*\(4, 3\)"):
    vp(np.ones((3, 3)))  # shaped like f(x1), not f(x2)
  with pytest.raises(ValueError, match=r"(?s)`v` has structure"):
    vp((np.ones((4, 3)),))


@pytest.mark.parametrize("degree", [-1, -5, 1.0, 2.5, True, "2", None])
def test_taylor_expand_bad_degree(mlp, degree):
  error = ValueError if isinstance(degree, int) and not isinstance(degree, bool) else TypeError
  with pytest.raises(error, match=r"(?s)`degree`.*non-negative integer"):
    taylor_expand(mlp.f, mlp.params, degree)


@pytest.mark.parametrize("implementation", list(NtkImplementation), ids=lambda i: i.name)
@pytest.mark.parametrize("vmap_axes", [None, 0])
def test_empty_batch(mlp, implementation, vmap_axes):
  fn = empirical_ntk_fn(mlp.f, implementation=implementation, vmap_axes=vmap_axes)
  with pytest.raises(ValueError, match=r"`x1` has no examples.*\(0, 5\)"):
    fn(mlp.x1[:0], None, mlp.params)
  with pytest.raises(ValueError, match=r"`x2` has no examples"):
    fn(mlp.x1, mlp.x2[:0], mlp.params)


def test_numpy_integer_axes_and_list_vmap_axes(mlp):
  ref = empirical_ntk_fn(mlp.f, trace_axes=(-1,), vmap_axes=0)(mlp.x1, mlp.x2, mlp.params)
  for trace_axes, vmap_axes in ((np.int64(-1), np.int64(0)), ((np.int32(-1),), [0, 0, None])):
    got = empirical_ntk_fn(mlp.f, trace_axes=trace_axes, vmap_axes=vmap_axes)(
        mlp.x1, mlp.x2, mlp.params)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize("bad", [True, np.bool_(False)])
def test_boolean_axes_are_not_axis_numbers(bad):
  with pytest.raises(TypeError, match="`trace_axes`"):
    empirical_ntk_fn(lambda p, x: x, trace_axes=bad)
  with pytest.raises(TypeError, match="`vmap_axes`"):
    empirical_ntk_fn(lambda p, x: x, vmap_axes=bad)


def test_unbatched_output_leaf_needs_structured_derivatives():
  r = np.random.RandomState(0)
  params = {"w": r.randn(4, 3), "b": r.randn(3)}

  def f(p, x):
    return {"per": x @ p["w"], "glob": np.tanh(1.0) * p["b"]}

  x1, x2 = r.randn(5, 4), r.randn(3, 4)
  vmap_axes = (0, {"per": 0, "glob": None}, None)
  whole = empirical_ntk_fn(f, trace_axes=())(x1, x2, params)
  for impl in (NtkImplementation.AUTO, NtkImplementation.STRUCTURED_DERIVATIVES):
    got = empirical_ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes, implementation=impl)(
        x1, x2, params)
    for k in whole:
      np.testing.assert_allclose(got[k], whole[k], rtol=1e-12, atol=1e-12)
  for impl in (NtkImplementation.JACOBIAN_CONTRACTION, NtkImplementation.NTK_VECTOR_PRODUCTS):
    with pytest.raises(ValueError, match=r"unbatched \(out_axes None\).*vmap_axes=None"):
      empirical_ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes, implementation=impl)(
          x1, x2, params)
