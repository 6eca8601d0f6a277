"""Blocked kernel evaluation (`kernels/blocks.py`): blocked == unblocked, in float64."""
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_dynamics.kernels import api, blocks


@pytest.fixture(autouse=True, scope="module")
def _x64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


RNG = np.random.default_rng(0)
D_IN, HIDDEN, K = 4, 8, 3
PARAMS = {"w1": RNG.normal(size=(D_IN, HIDDEN)) / 2, "b1": RNG.normal(size=(HIDDEN,)),
          "w2": RNG.normal(size=(HIDDEN, K)) / 3}
X10 = RNG.normal(size=(10, D_IN))
X10B = RNG.normal(size=(10, D_IN))
X7 = RNG.normal(size=(7, D_IN))


def mlp(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


_FULL_NTK = api.empirical_ntk_fn(mlp, trace_axes=())


def assert_close(out, ref, rtol=1e-12):
  out_leaves, ref_leaves = jax.tree.leaves(out), jax.tree.leaves(ref)
  assert len(out_leaves) == len(ref_leaves)
  for o, r in zip(out_leaves, ref_leaves):
    o, r = np.asarray(o), np.asarray(r)
    assert o.shape == r.shape
    assert o.dtype == np.float64
    scale = max(np.max(np.abs(r)), 1e-300)
    assert np.max(np.abs(o - r)) <= rtol * scale, np.max(np.abs(o - r)) / scale


AXES = [((-1,), ()),     # (N1, N2)
        ((), ()),        # (N1, N2, K1, K2)
        ((), (-1,)),     # (N1, N2, K)
        ((-1,), (0,)),   # (N,)
        ((), (0,)),      # (N, K1, K2)
        ((0,), ())]      # (K1, K2): batch axis traced


@pytest.mark.parametrize("trace_axes,diagonal_axes", AXES)
def test_blocked_matches_unblocked(trace_axes, diagonal_axes):
  ntk_fn = api.empirical_ntk_fn(mlp, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
  batch_full = 0 not in trace_axes and 0 not in diagonal_axes
  x2 = X7 if batch_full else X10B
  on_device = blocks.batch(ntk_fn, 3)
  on_host = blocks.batch(ntk_fn, 3, store_on_host=True)

  ref = ntk_fn(X10, None, PARAMS)
  out = on_device(X10, None, PARAMS)           # 10 = 3 + 3 + 3 + 1
  assert isinstance(out, jax.Array)
  assert_close(out, ref)
  plan = on_device.plan(X10, None, PARAMS)
  if batch_full:
    assert plan.mirrored and plan.roles == ("full",)
    assert plan.blocks == tuple((i, j) for i in range(4) for j in range(i, 4))
  else:
    assert plan.roles == ("diagonal",) if 0 in diagonal_axes else ("traced",)
    assert plan.blocks == ((0, 0), (1, 1), (2, 2), (3, 3))

  ref = ntk_fn(X10, x2, PARAMS)
  out = on_host(X10, x2, PARAMS)
  assert isinstance(out, np.ndarray)
  assert_close(out, ref)
  n_blocks = len(on_host.plan(X10, x2, PARAMS).blocks)
  assert n_blocks == (4 * 3 if batch_full else 4)



@pytest.mark.parametrize("n,batch_size", [(9, 4), (5, 2), (10, 50), (10, 1)])
def test_any_n_and_block_size(n, batch_size):
  ntk_fn = _FULL_NTK
  blocked = blocks.batch(ntk_fn, batch_size, store_on_host=n % 2 == 1)
  x = X10[:n]
  assert_close(blocked(x, None, PARAMS), ntk_fn(x, None, PARAMS))
  assert_close(blocked(x, X7, PARAMS), ntk_fn(x, X7, PARAMS))


_EVALUATED = []


def _record(x1, x2):
  _EVALUATED.append((int(x1), None if x2 < 0 else int(x2)))


def test_symmetric_call_evaluates_only_upper_triangle():
  ntk_fn = api.empirical_ntk_fn(mlp, trace_axes=())

  def counting(x1, x2, params):
    jax.debug.callback(_record, x1[0, 0], -1.0 if x2 is None else x2[0, 0])
    return ntk_fn(x1, x2, params)

  x = X10.copy()
  x[:, 0] = np.arange(10)  # the first feature names the example
  _EVALUATED.clear()
  blocked = blocks.batch(counting, 3, devices=jax.devices()[:1], trace_axes=())
  out = blocked(x, None, PARAMS)
  assert_close(out, ntk_fn(x, None, PARAMS))
  starts = [0, 3, 6, 7]  # the last block is shifted back to end at N = 10
  expected = {(starts[i], None if i == j else starts[j])
              for i in range(4) for j in range(i, 4)}
  assert len(_EVALUATED) == 10 and set(_EVALUATED) == expected


_HIDDEN_KERNEL = None


def _opaque(x1, x2, params):  # hides which kernel function it calls
  return getattr(sys.modules[__name__], "_HIDDEN" + "_KERNEL")(x1, x2, params)


def test_unknown_layout_falls_back_to_all_blocks_or_uses_given_axes():
  global _HIDDEN_KERNEL
  _HIDDEN_KERNEL = api.empirical_ntk_fn(mlp, trace_axes=())
  ref = _HIDDEN_KERNEL(X10, None, PARAMS)
  blocked = blocks.batch(_opaque, 4)
  with pytest.warns(UserWarning, match="trace_axes"):
    out = blocked(X10, None, PARAMS)
  assert_close(out, ref)
  assert not blocked.plan(X10, None, PARAMS).mirrored
  assert len(blocked.plan(X10, None, PARAMS).blocks) == 9
  told = blocks.batch(_opaque, 4, trace_axes=())
  assert told.plan(X10, None, PARAMS).mirrored
  assert_close(told(X10, None, PARAMS), ref)


def test_kernel_fn_get_pytree_outputs_pytree_inputs_and_kwargs(capsys):
  def f(params, x, scale=1.0, shift=None):
    h = jnp.tanh(x["u"] @ params["w1"] + x["v"].sum(-1, keepdims=True) + params["b1"])
    out = scale * (h @ params["w2"]) + shift
    return {"logits": out, "energy": out[:, 0] * out[:, 1]}

  # trace_axes=(-1,) traces the logits and, for the rank-1 'energy', the batch axis itself.
  kernel_fn = api.empirical_kernel_fn(f, trace_axes=(-1,))
  x1 = {"u": X10, "v": X10B[:, :2]}
  x2 = {"u": jnp.asarray(X10B), "v": jnp.asarray(X10[:, 2:])}  # jax arrays work too
  kw = dict(scale=0.5, shift=np.arange(K, dtype=np.float64))
  blocked = blocks.batch(kernel_fn, 4, progress=True)
  for second in (None, x2):
    ref = kernel_fn(x1, second, ("nngp", "ntk"), PARAMS, **kw)
    out = blocked(x1, second, ("nngp", "ntk"), PARAMS, **kw)
    assert out._fields == ("nngp", "ntk")
    assert set(out.ntk) == {"logits", "energy"} and out.ntk["energy"].shape == ()
    assert_close(tuple(out), tuple(ref))
  assert blocked.plan(x1, None, "ntk", PARAMS, **kw).roles == ("traced", "full")
  capsys.readouterr()  # progress bar disabled when not a terminal; nothing to check


def test_nngp_and_rectangular_block_sizes():
  nngp_fn = api.empirical_nngp_fn(mlp, trace_axes=())
  blocked = blocks.batch(nngp_fn, (4, 2), store_on_host=True)
  assert_close(blocked(X10, X7, PARAMS), nngp_fn(X10, X7, PARAMS))
  assert blocked.plan(X10, X7, PARAMS).block_size == (4, 2)
  assert_close(blocked(X10, None, PARAMS), nngp_fn(X10, None, PARAMS))
  assert blocked.plan(X10, None, PARAMS).block_size == (2, 2)


def test_memory_budget_picks_a_fitting_block():
  ntk_fn = api.empirical_ntk_fn(mlp, trace_axes=())
  x = RNG.normal(size=(12, D_IN))
  whole = blocks.batch(ntk_fn, memory_bytes=1e12).plan(x, None, PARAMS)
  assert whole.block_size == (12, 12)
  budget = whole.bytes_per_block - 1
  blocked = blocks.batch(ntk_fn, memory_bytes=budget)
  plan = blocked.plan(x, None, PARAMS)
  assert plan.block_size[0] < 12 and plan.bytes_per_block <= budget
  assert_close(blocked(x, None, PARAMS), ntk_fn(x, None, PARAMS))
  with pytest.raises(ValueError, match=r"`memory_bytes`=16 is too small"):
    blocks.batch(ntk_fn, memory_bytes=16)(x, None, PARAMS)


def test_bad_arguments_name_the_argument():
  ntk_fn = api.empirical_ntk_fn(mlp)
  for bad in (0, -3, (4, 0)):
    with pytest.raises(ValueError, match="batch_size"):
      blocks.batch(ntk_fn, bad)
  for bad in (2.5, True, (3,)):
    with pytest.raises((TypeError, ValueError), match="batch_size"):
      blocks.batch(ntk_fn, bad)
  for bad in (0, 0.5, -1.0, float("inf")):
    with pytest.raises(ValueError, match="memory_bytes"):
      blocks.batch(ntk_fn, memory_bytes=bad)
  with pytest.raises(ValueError, match="batch_size.*memory_bytes"):
    blocks.batch(ntk_fn)
  with pytest.raises(ValueError, match="either"):
    blocks.batch(ntk_fn, 2, memory_bytes=1e9)
  with pytest.raises(ValueError, match="precision"):
    blocks.batch(ntk_fn, 2, precision="very-high")
  with pytest.raises(ValueError, match="devices.*mesh"):
    blocks.batch(ntk_fn, 2, devices=jax.devices(), mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("a",)))
  blocked = blocks.batch(ntk_fn, 2)
  with pytest.raises(ValueError, match="batch axis"):
    blocked({"a": X10, "b": X7}, None, PARAMS)
  with pytest.raises(ValueError, match="no examples"):
    blocked(X10[:0], None, PARAMS)
  with pytest.raises(ValueError, match=r"feature shapes: x1 \(10, 4\) vs x2 \(7, 5\)"):
    blocked(X10, np.ones((7, D_IN + 1)), PARAMS)
  diag = blocks.batch(api.empirical_ntk_fn(mlp, diagonal_axes=(0,)), 2)
  with pytest.raises(ValueError, match="as many examples"):
    diag(X10, X7, PARAMS)


_SEEN_PRECISION = []


def test_precision_reaches_every_block_and_every_kernel():
  ntk_fn = api.empirical_ntk_fn(mlp)

  def spying(x1, x2, params):
    _SEEN_PRECISION.append(jax.config.jax_default_matmul_precision)
    return ntk_fn(x1, x2, params)

  blocks.batch(spying, 5, precision="highest")(X10, None, PARAMS)
  assert set(_SEEN_PRECISION) == {"highest"}
  _SEEN_PRECISION.clear()
  with jax.default_matmul_precision("float32"):
    blocks.batch(spying, 5)(X10, None, PARAMS)
  assert set(_SEEN_PRECISION) == {"float32"}

  # The kernels have no hard-coded precision: every dot follows the context.
  x = jnp.ones((3, D_IN), jnp.float32)
  p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), PARAMS)
  for fn in (api.empirical_ntk_fn(mlp, implementation=api.NtkImplementation.JACOBIAN_CONTRACTION),
             api.empirical_ntk_fn(mlp, implementation=api.NtkImplementation.NTK_VECTOR_PRODUCTS),
             api.empirical_nngp_fn(mlp)):
    with jax.default_matmul_precision("highest"):
      text = jax.jit(lambda a: fn(a, None, p32)).lower(x).as_text()
    dots = re.findall(r"dot_general[^\n]*", text)
    assert dots and all("HIGHEST" in d for d in dots)


# ----------------------------------------------------------------------------- per-example kwargs

M10 = RNG.normal(size=(10, HIDDEN))
M10B = RNG.normal(size=(10, HIDDEN))
M7 = RNG.normal(size=(7, HIDDEN))


def masked_mlp(params, x, mask):  # the output of example n depends on mask[n]
  return jnp.tanh((x @ params["w1"] + params["b1"]) * mask) @ params["w2"]


def _masked_ntk(**axes):
  return api.empirical_ntk_fn(masked_mlp, vmap_axes=(0, 0, {"mask": 0}), **axes)


@pytest.mark.parametrize("trace_axes,diagonal_axes", AXES)
def test_per_example_kwargs_match_unblocked(trace_axes, diagonal_axes):
  ntk_fn = _masked_ntk(trace_axes=trace_axes, diagonal_axes=diagonal_axes)
  batch_full = 0 not in trace_axes and 0 not in diagonal_axes
  blocked = blocks.batch(ntk_fn, 3, kwargs_axes={"mask": 0})   # 10 = 3 + 3 + 3 + 1
  # x2=None with one array: it belongs to both sides; the kernel is symmetric and mirrored.
  assert_close(blocked(X10, None, PARAMS, mask=M10), ntk_fn(X10, None, PARAMS, mask=M10))
  plan = blocked.plan(X10, None, PARAMS, mask=M10)
  assert plan.mirrored and len(plan.blocks) == (10 if batch_full else 4)
  # x2 given: a 2-tuple (for_x1, for_x2).
  x2, m2 = (X7, M7) if batch_full else (X10B, M10B)
  assert_close(blocked(X10, x2, PARAMS, mask=(M10, m2)), ntk_fn(X10, x2, PARAMS, mask=(M10, m2)))


def test_per_example_kwargs_sided_with_x2_none_is_not_mirrored():
  ntk_fn = _masked_ntk(trace_axes=())
  blocked = blocks.batch(ntk_fn, 3, kwargs_axes={"mask": 0}, store_on_host=True)
  # Different halves: Θ((x, m), (x, m')) is not symmetric, so every block is evaluated.
  ref = ntk_fn(X10, None, PARAMS, mask=(M10, M10B))
  assert not np.allclose(ref, np.transpose(ref, (1, 0, 3, 2)))
  assert_close(blocked(X10, None, PARAMS, mask=(M10, M10B)), ref)
  plan = blocked.plan(X10, None, PARAMS, mask=(M10, M10B))
  assert not plan.mirrored and len(plan.blocks) == 16
  # Equal halves (even as different objects) keep the symmetric plan.
  assert blocked.plan(X10, None, PARAMS, mask=(M10, M10.copy())).mirrored
  assert_close(blocked(X10, None, PARAMS, mask=(M10, M10)), ntk_fn(X10, None, PARAMS, mask=M10))


def test_unbatched_sided_kwarg_turns_mirroring_off():
  # A per-side kwarg without a batch axis (one hidden-unit mask per side) also makes the
  # x2=None kernel asymmetric; before, its blocks were mirrored (wrongly).
  ntk_fn = api.empirical_ntk_fn(masked_mlp, trace_axes=())
  side = (M10[0], M10B[0])
  ref = ntk_fn(X10, None, PARAMS, mask=side)
  assert not np.allclose(ref, np.transpose(ref, (1, 0, 3, 2)))
  blocked = blocks.batch(ntk_fn, 4)
  assert not blocked.plan(X10, None, PARAMS, mask=side).mirrored
  assert_close(blocked(X10, None, PARAMS, mask=side), ref)


_MASK_FORMS = set()


def test_per_example_kwargs_reach_blocks_in_per_side_form():
  ntk_fn = _masked_ntk(trace_axes=())

  def spying(x1, x2, params, mask):  # runs when a block is traced
    _MASK_FORMS.add((x2 is None, type(mask).__name__ if isinstance(mask, tuple) else "array",
                     tuple(np.shape(m) for m in (mask if isinstance(mask, tuple) else (mask,)))))
    return ntk_fn(x1, x2, params, mask=mask)

  blocked = blocks.batch(spying, 4, kwargs_axes={"mask": 0}, trace_axes=())
  assert_close(blocked(X10, None, PARAMS, mask=M10), ntk_fn(X10, None, PARAMS, mask=M10))
  # Diagonal blocks (x2=None) get one array of their rows; off-diagonal ones the 2-tuple.
  assert ((True, "array", ((4, HIDDEN),)) in _MASK_FORMS
          and (False, "tuple", ((4, HIDDEN), (4, HIDDEN))) in _MASK_FORMS)
  assert all(not x2_none or form == "array" for x2_none, form, _ in _MASK_FORMS)


def test_per_example_kwargs_pytree_other_axis_and_memory_budget():
  def gated(params, x, gate):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return (h * gate["scale"] + gate["shift"]) @ params["w2"]

  ntk_fn = api.empirical_ntk_fn(gated, trace_axes=())
  g10 = {"scale": M10, "shift": jnp.asarray(M10B)}   # numpy and jax leaves
  g7 = {"scale": M7, "shift": M7[::-1].copy()}
  blocked = blocks.batch(ntk_fn, (4, 3), kwargs_axes={"gate": 0}, store_on_host=True)
  assert_close(blocked(X10, X7, PARAMS, gate=(g10, g7)), ntk_fn(X10, X7, PARAMS, gate=(g10, g7)))
  assert_close(blocked(X10, None, PARAMS, gate=g10), ntk_fn(X10, None, PARAMS, gate=g10))

  # Batch axis 1 (or -1): mask of shape (HIDDEN, N).
  def masked_t(params, x, mask):
    return masked_mlp(params, x, mask.T)

  ntk_t = api.empirical_ntk_fn(masked_t, vmap_axes=(0, 0, {"mask": 1}), trace_axes=())
  for axis in (1, -1):
    blocked = blocks.batch(ntk_t, 3, kwargs_axes={"mask": axis, "unused": None})
    assert_close(blocked(X10, X7, PARAMS, mask=(M10.T, M7.T)),
                 ntk_t(X10, X7, PARAMS, mask=(M10.T, M7.T)))
    assert_close(blocked(X10, None, PARAMS, mask=M10.T), ntk_t(X10, None, PARAMS, mask=M10.T))

  # The memory-budget path probes blocks with the sliced kwargs too.
  kw = dict(gate=(g10, g7))
  whole = blocks.batch(ntk_fn, memory_bytes=1e12, kwargs_axes={"gate": 0}).plan(
      X10, X7, PARAMS, **kw)
  assert whole.block_size == (10, 7)
  budgeted = blocks.batch(ntk_fn, memory_bytes=whole.bytes_per_block - 1,
                          kwargs_axes={"gate": 0})
  plan = budgeted.plan(X10, X7, PARAMS, **kw)
  assert plan.block_size[0] < 10 and plan.bytes_per_block < whole.bytes_per_block
  assert_close(budgeted(X10, X7, PARAMS, **kw), ntk_fn(X10, X7, PARAMS, **kw))


def test_per_example_kwargs_errors():
  ntk_fn = _masked_ntk(trace_axes=())
  blocked = blocks.batch(ntk_fn, 3, kwargs_axes={"mask": 0})
  with pytest.raises(ValueError, match=r"kwarg `mask` is per-example .* shape \(10, 8\) while "
                                       r"x2 is given.*2-tuple \(for_x1, for_x2\)"):
    blocked(X10, X7, PARAMS, mask=M10)
  with pytest.raises(ValueError, match=r"kwarg `mask` \(its x2 half\) has a leaf of shape "
                                       r"\(5, 8\) .* length 5; expected 7, .* in x2"):
    blocked(X10, X7, PARAMS, mask=(M10, M7[:5]))
  with pytest.raises(ValueError, match=r"kwarg `mask` has a leaf of shape \(7, 8\) .* length "
                                       r"7; expected 10, .* in x1"):
    blocked.plan(X10, None, PARAMS, mask=M7)
  with pytest.raises(ValueError, match=r"kwarg `mask` has a leaf of shape \(10, 8\), which has "
                                       r"no batch axis 2"):
    blocks.batch(ntk_fn, 3, kwargs_axes={"mask": 2})(X10, None, PARAMS, mask=M10)
  for bad in ([0], {"mask": 1.5}, {"mask": True}, {0: 0}):
    with pytest.raises(TypeError, match="kwargs_axes"):
      blocks.batch(ntk_fn, 3, kwargs_axes=bad)


# ----------------------------------------------------------------------------- tracing


def test_blocked_refuses_to_be_traced():
  blocked = blocks.batch(_FULL_NTK, 4)
  eager = r"outside `jax.jit`/`vmap`/`grad`.*jitted per block"
  with pytest.raises(TypeError, match=r"traced value in `x1`.*" + eager):
    jax.jit(lambda x: blocked(x, None, PARAMS))(X10)
  with pytest.raises(TypeError, match=r"traced value in `x2`"):
    jax.jit(lambda x: blocked.plan(X10, x, PARAMS))(X7)
  with pytest.raises(TypeError, match=r"traced value in `args\[0\]`"):
    jax.grad(lambda p: blocked(X10, None, p).sum())(PARAMS)
  with pytest.raises(TypeError, match=r"traced value in `x1`"):
    jax.vmap(lambda x: blocked(x, None, PARAMS))(X10[None])
  masked = blocks.batch(_masked_ntk(trace_axes=()), 4, kwargs_axes={"mask": 0})
  with pytest.raises(TypeError, match=r"traced value in kwarg `mask`"):
    jax.jit(lambda m: masked(X10, None, PARAMS, mask=m))(M10)
