"""Per-parameter NTKs, the NNGP, `empirical_kernel_fn`, `ntk_vp_fn` and kwargs handling
against the float64 brute-force reference (the NTK grid is in test_kernels_reference.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_dynamics import (EmpiricalKernel, NtkImplementation, empirical_kernel_fn,
                          empirical_nngp_fn, empirical_ntk_fn, ntk_vp_fn)
from tests import zoo
from tests.zoo import (IMPLEMENTATIONS, REFERENCE_TOL as TOL, VARIANTS, ZOO, ZOO_NAMES,
                       assert_close, check_variants, max_rel_err, x2_input, x2_mode,
                       zoo_reference_ntk)

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize("name", ["mlp", "batchnorm_state"])
def test_ntk_eager_call(name):
  """The plain (non-nested) call path: the kernel function's own jit and its cache."""
  e = ZOO[name]
  for impl in (NtkImplementation.AUTO, NtkImplementation.NTK_VECTOR_PRODUCTS):
    ntk_fn = empirical_ntk_fn(e.f, trace_axes=(), vmap_axes=0, implementation=impl)
    for _ in range(2):  # second call hits the cache
      assert_close(ntk_fn(e.x1, e.x2, e.params, **e.kwargs),
                   zoo_reference_ntk(name, "x2", (), ()), TOL)
    assert_close(ntk_fn(e.x1, None, e.params, **e.kwargs),
                 zoo_reference_ntk(name, "none", (), ()), TOL)


def _per_parameter_params():
  """Every implementation on the whole zoo, except AUTO (a dispatch) on three models."""
  out = []
  for name in ZOO_NAMES:
    for impl in IMPLEMENTATIONS:
      if impl.values[0] == NtkImplementation.AUTO and name not in ("mlp", "pytree_io",
                                                                   "attention"):
        continue
      out.append(pytest.param(name, impl.values[0], id=f"{name}-{impl.id}", marks=impl.marks))
  return out


@pytest.mark.parametrize("name,implementation", _per_parameter_params())
def test_per_parameter(name, implementation):
  e = ZOO[name]
  ntk_fn = empirical_ntk_fn(e.f, implementation=implementation, per_parameter=True)
  got = ntk_fn(e.x1, e.x2, e.params, **e.kwargs)
  # A params-structured pytree whose leaves are output-structured kernels.
  per_leaf = jax.tree.structure(e.params).flatten_up_to(got)
  cols = zoo.zoo_jacobians(name)["x1"].col_slices()
  assert len(per_leaf) == len(cols)
  want_total = zoo_reference_ntk(name, "x2", (-1,), ())
  scale = max(float(np.max(np.abs(k))) for k in jax.tree.leaves(want_total))
  total = None
  for i, (part, c) in enumerate(zip(per_leaf, cols)):
    # Relative to the whole kernel: a leaf's contribution may be zero (e.g. a bias that a
    # softmax or a normalization cancels).
    err = max_rel_err(part, zoo_reference_ntk(name, "x2", (-1,), (), c), scale)
    assert err < TOL, f"parameter leaf {i}: relative error {err:.3e}"
    total = part if total is None else jax.tree.map(np.add, total, part)
  assert_close(total, want_total, TOL)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_nngp_matches_reference(name):
  e = ZOO[name]
  fns = {v: empirical_nngp_fn(e.f, v[0], v[1]) for v in VARIANTS}
  got = zoo.call_variants(e, fns)
  want = {v: zoo.reference_nngp(e.f, e.params, e.x1, x2_input(e, x2_mode(v[2], v[1])), v[0],
                                v[1], e.kwargs) for v in VARIANTS}
  check_variants(got, want)


def test_nngp_eager_call():
  e = ZOO["pytree_io"]
  got = empirical_nngp_fn(e.f)(e.x1, e.x2, e.params)
  want = zoo.reference_nngp(e.f, e.params, e.x1, e.x2, (-1,), ())
  assert_close(got, want, TOL)
  # Default trace over the logits: (N1, N2) per output leaf; the definition in one line.
  out1, out2 = e.f(e.params, e.x1), e.f(e.params, e.x2)
  np.testing.assert_allclose(got[0], out1[0] @ out2[0].T / out1[0].shape[-1], rtol=1e-12)


@pytest.mark.parametrize("get", ["ntk", "nngp", ("nngp", "ntk"), ("ntk", "nngp"), ("ntk",),
                                 None], ids=str)
@pytest.mark.parametrize("name", ["mlp", "pytree_io"])
def test_empirical_kernel_fn(name, get):
  e = ZOO[name]
  kernel_fn = empirical_kernel_fn(e.f, trace_axes=(), vmap_axes=0,
                                  implementation=NtkImplementation.NTK_VECTOR_PRODUCTS)
  got = kernel_fn(e.x1, e.x2, get, e.params, **e.kwargs)
  refs = {"ntk": zoo_reference_ntk(name, "x2", (), ()),
          "nngp": zoo.reference_nngp(e.f, e.params, e.x1, e.x2, (), (), e.kwargs)}
  if isinstance(get, str):
    assert_close(got, refs[get], TOL)
    return
  names = ("nngp", "ntk") if get is None else tuple(get)
  assert isinstance(got, tuple) and got._fields == names
  for field in names:
    assert_close(getattr(got, field), refs[field], TOL)
  if get is None:  # the public namedtuple's fields, in its order
    assert got._fields == EmpiricalKernel._fields


@pytest.mark.parametrize("with_x2", [True, False], ids=["x2", "x2None"])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_ntk_vp_fn(name, with_x2):
  e = ZOO[name]
  x2 = e.x2 if with_x2 else None
  jacs = zoo.zoo_jacobians(name)
  j1 = jacs["x1"]
  j2 = jacs["x2"] if with_x2 else j1
  out2 = jax.eval_shape(lambda: e.apply(e.params, e.x1 if x2 is None else x2))
  rng = np.random.default_rng(0)
  vs = [jax.tree.map(lambda o: rng.normal(size=o.shape), out2) for _ in range(2)]

  def reference(v):
    v_flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(v)])
    out = j1.matrix @ (j2.matrix.T @ v_flat)
    return j1.out_def.unflatten([out[r].reshape(s)
                                 for r, s in zip(j1.row_slices(), j1.out_shapes)])

  # Built and applied under jit (one compilation), with vmap over a stack of v's.
  stacked = jax.tree.map(lambda *a: np.stack(a), *vs)
  batched = jax.jit(lambda p, x1, x2, vs: jax.vmap(ntk_vp_fn(e.f, x1, x2, p, **e.kwargs))(vs))(
      e.params, e.x1, x2, stacked)
  for i, v in enumerate(vs):
    assert_close(jax.tree.map(lambda a: a[i], batched), reference(v), TOL)


@pytest.mark.parametrize("with_x2", [True, False], ids=["x2", "x2None"])
@pytest.mark.parametrize("name", ["mlp", "pytree_io"])
def test_ntk_vp_fn_eager(name, with_x2):
  """Eager construction and calls; the stand-alone reference helper for other test files."""
  e = ZOO[name]
  x2 = e.x2 if with_x2 else None
  out2 = e.apply(e.params, e.x1 if x2 is None else x2)
  v = jax.tree.map(lambda o: np.random.default_rng(1).normal(size=o.shape), out2)
  vp = ntk_vp_fn(e.f, e.x1, x2, e.params, **e.kwargs)
  assert_close(vp(v), zoo.reference_ntk_vp(e.f, e.params, e.x1, x2, v, e.kwargs), TOL)


def test_kwargs_static_and_dynamic():
  """Array kwargs are traced, flags are static; both reach f."""
  e = ZOO["mlp"]

  def f(p, x, scale, negate=False):
    y = e.f(p, x) * scale
    return -y if negate else y

  scale = np.array(1.7)
  want = zoo.reference_ntk(f, e.params, e.x1, e.x2, (), (), {"scale": scale})
  for impl in (NtkImplementation.JACOBIAN_CONTRACTION, NtkImplementation.NTK_VECTOR_PRODUCTS):
    ntk_fn = empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl)
    assert_close(ntk_fn(e.x1, e.x2, e.params, scale=scale), want, TOL)
    assert_close(ntk_fn(e.x1, e.x2, e.params, scale=scale, negate=True), want, TOL)
    assert_close(ntk_fn(e.x1, e.x2, e.params, scale=2 * scale),
                 jax.tree.map(lambda k: 4 * k, want), TOL)


def _batch_axis_cases():
  """(name, f, x1, x2, vmap_axes, trace_axes, diagonal_axes, kwargs): batch axes other than 0,
  negative axes, per-leaf in/out axes, unbatched inputs and batched kwargs."""
  rng = np.random.default_rng(5)
  x1, x2 = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
  ctx = rng.normal(size=3)
  mask = rng.normal(size=3)

  def out_t(p, x):  # outputs (K, N): the batch is output axis 1
    return jnp.tanh(x @ p["w"]).T

  def in_t(p, x):  # inputs (D, N): the batch is input axis 1
    return jnp.tanh(x.T @ p["w"]) @ p["v"]

  def two_heads(p, x):  # outputs ((N, 2), (K, N))
    h = jnp.tanh(x @ p["w"])
    return h @ p["v"], h.T

  def with_ctx(p, x):  # x["ctx"] is shared by all examples
    return jnp.tanh(x["a"] @ p["w"] + x["ctx"]) @ p["v"]

  def masked(p, x, mask):  # a kwarg batched like the inputs
    return (jnp.tanh(x @ p["w"]) @ p["v"]) * mask[:, None]

  return [
      ("out_axes=1", out_t, x1, x2, (0, 1, {}), (0,), (), {}),
      ("out_axes=-1 diagonal", out_t, x1, x2[:3], (0, -1, {}), (), (-1,), {}),
      ("in_axes=1", in_t, x1.T, x2.T, (1, 0, {}), (-1,), (), {}),
      ("in_axes=-1 diagonal x2=None", in_t, x1.T, None, (-1, 0, {}), (), (0,), {}),
      ("out_axes per leaf", two_heads, x1, x2, (0, (0, 1), {}), (), (), {}),
      ("in_axes None leaf", with_ctx, {"a": x1, "ctx": ctx}, {"a": x2, "ctx": ctx},
       ({"a": 0, "ctx": None}, 0, {}), (), (), {}),
      ("kwargs_axes x2=None", masked, x1, None, (0, 0, {"mask": 0}), (), (), {"mask": mask}),
  ]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vmap_axes_batch_axes_anywhere(implementation):
  rng = np.random.default_rng(6)
  params = {"w": rng.normal(size=(5, 3)) / 2, "v": rng.normal(size=(3, 2))}
  bad = []
  for name, f, x1, x2, vmap_axes, trace_axes, diagonal_axes, kwargs in _batch_axis_cases():
    ntk_fn = empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation)
    want = zoo.reference_ntk(f, params, x1, x2, trace_axes, diagonal_axes, kwargs)
    try:
      err = max_rel_err(ntk_fn(x1, x2, params, **kwargs), want)
    except Exception as e:  # report every case, not just the first
      bad.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}")
      continue
    if not err < TOL:
      bad.append(f"{name}: relative error {err:.3e}")
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("vmap_axes", [None, 0], ids=["vmapNone", "vmap0"])
def test_ntk_vector_products_in_chunks(vmap_axes):
  """A memory budget below all columns at once: columns mapped in chunks (lax.map with a
  remainder), same kernel."""
  from ntk_dynamics.kernels import axes as axes_lib
  from ntk_dynamics.kernels import batching
  from ntk_dynamics.kernels import ntk_vector_products

  e = ZOO["pytree_io"]
  param_bytes = sum(np.size(p) * 8 for p in jax.tree.leaves(e.params))
  output_axes = axes_lib.OutputAxes.create((), (0,))
  x2 = e.x2_same_batch
  fx1, fx2 = (jax.eval_shape(e.f, e.params, x) for x in (e.x1, x2))
  for x2_, fx2_ in ((x2, fx2), (None, fx1)):
    got = jax.jit(lambda p, a, b: ntk_vector_products.ntk(
        e.f, p, a, b, {}, output_axes, batching.VmapAxes.create(vmap_axes), fx1, fx2_,
        chunk_bytes=4 * param_bytes))(e.params, e.x1, x2_)
    want = zoo_reference_ntk("pytree_io", "none" if x2_ is None else "x2_same_batch", (),
                             (0,))
    assert_close(got, want, TOL)


def test_half_precision_weights_accumulate_in_the_output_dtype():
  # float16 weights of a float32 model: every implementation returns a float32 kernel (the
  # Jacobian-contraction sum used to stay in float16 and overflow to inf).
  r = np.random.RandomState(0)
  params = {"w": jnp.asarray(r.randn(64, 8) * .1, jnp.float16),
            "v": jnp.asarray(r.randn(8, 3), jnp.float16)}
  x = jnp.asarray(r.randn(3, 64) * 30, jnp.float32)

  def f(p, x):
    return (x @ p["w"].astype(jnp.float32)) @ p["v"].astype(jnp.float32)

  p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
  j = jax.jacrev(f)(p64, jnp.asarray(x, jnp.float64))
  want = sum(jnp.einsum("ak...,bk...->ab", j[k], j[k]) for k in j) / 3
  assert float(jnp.max(want)) > 7e5   # beyond float16's 65504
  for impl in NtkImplementation:
    k = empirical_ntk_fn(f, implementation=impl)(x, None, params)
    assert k.dtype == jnp.float32
    np.testing.assert_allclose(k, want, rtol=0, atol=1e-4 * float(jnp.max(want)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kwargs_given_per_side_as_in_neural_tangents(implementation):
  # A kwarg given as a 2-tuple is split: the first part goes with x1, the second with x2.
  r = np.random.RandomState(0)
  params = {"w": jnp.asarray(r.randn(4, 6)), "v": jnp.asarray(r.randn(6, 3))}

  def f(p, x, mask=None, scale=1.0):
    return scale * (jnp.tanh(x @ p["w"]) * mask) @ p["v"]

  x1, x2 = jnp.asarray(r.randn(5, 4)), jnp.asarray(r.randn(3, 4))
  m1, m2 = (jnp.asarray(r.rand(n, 6) > .5, x1.dtype) for n in (5, 3))

  def reference(xa, ma, xb, mb):
    ja = jax.jacrev(lambda q: f(q, xa, mask=ma, scale=2.))(params)
    jb = jax.jacrev(lambda q: f(q, xb, mask=mb, scale=2.))(params)
    return sum(jnp.einsum("ak...,bk...->ab", ja[k], jb[k]) for k in ja) / 3

  for vmap_axes in (None, (0, 0, {"mask": 0})):
    fn = empirical_ntk_fn(f, vmap_axes=vmap_axes, implementation=implementation)
    zoo.assert_close(fn(x1, x2, params, mask=(m1, m2), scale=2.), reference(x1, m1, x2, m2),
                     TOL)
    zoo.assert_close(fn(x1, None, params, mask=(m1, m1[::-1]), scale=2.),
                     reference(x1, m1, x1, m1[::-1]), TOL)
  with pytest.raises(ValueError, match=r"kwarg `mask` is given per side.*kwargs_axes"):
    empirical_ntk_fn(f, vmap_axes=0, implementation=implementation)(
        x1, x2, params, mask=(m1, m2))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rng_kwarg_is_split_between_sides_as_in_neural_tangents(implementation):
  # Dropout: x2 gets fold_in(rng, 1) unless x2 equals x1, so different inputs see independent
  # masks and equal inputs the same mask (x2=None keeps one key).
  r = np.random.RandomState(1)
  params = {"w": jnp.asarray(r.randn(3, 16)), "v": jnp.asarray(r.randn(16, 2))}

  def f(p, x, rng=None):
    h = jnp.tanh(x @ p["w"])
    return jnp.where(jax.random.bernoulli(rng, 0.5, h.shape), 2 * h, 0.) @ p["v"]

  def reference(xa, ka, xb, kb):
    ja = jax.jacrev(lambda q: f(q, xa, rng=ka))(params)
    jb = jax.jacrev(lambda q: f(q, xb, rng=kb))(params)
    return sum(jnp.einsum("ak...,bk...->ab", ja[k], jb[k]) for k in ja) / 2

  x1, x2 = jnp.asarray(r.randn(5, 3)), jnp.asarray(r.randn(4, 3))
  fn = empirical_ntk_fn(f, implementation=implementation)
  # Raw uint32 keys once; typed keys for every implementation.
  keys = [jax.random.key(0)]
  if implementation == NtkImplementation.AUTO:
    keys.append(jax.random.PRNGKey(0))
  for key in keys:
    other = jax.random.fold_in(key, 1)
    zoo.assert_close(fn(x1, x2, params, rng=key), reference(x1, key, x2, other), TOL)
    same = reference(x1, key, x1, key)
    zoo.assert_close(fn(x1, None, params, rng=key), same, TOL)
    zoo.assert_close(fn(x1, x1 + 0., params, rng=key), same, TOL)
    # An explicit pair of keys is used as given.
    zoo.assert_close(fn(x1, x2, params, rng=(key, key)), reference(x1, key, x2, key), TOL)
  zoo.assert_close(empirical_nngp_fn(f)(x1, x2, params, rng=jax.random.PRNGKey(0)),
                   jnp.einsum("ak,bk->ab", f(params, x1, rng=jax.random.PRNGKey(0)),
                              f(params, x2, rng=jax.random.fold_in(jax.random.PRNGKey(0), 1)))
                   / 2, TOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_pytree_kwarg_with_one_batch_axis(implementation):
  # kwargs_axes gives one axis for a whole pytree kwarg, per side (2-tuple) or shared.
  r = np.random.RandomState(2)
  params = {"w": jnp.asarray(r.randn(4, 6)), "v": jnp.asarray(r.randn(6, 3))}

  def f(p, x, cond=None):
    return (jnp.tanh(x @ p["w"]) * cond["m"] + cond["b"][:, None]) @ p["v"]

  def reference(xa, ca, xb, cb):
    ja = jax.jacrev(lambda q: f(q, xa, cond=ca))(params)
    jb = jax.jacrev(lambda q: f(q, xb, cond=cb))(params)
    return sum(jnp.einsum("ak...,bk...->ab", ja[k], jb[k]) for k in ja) / 3

  x1, x2 = jnp.asarray(r.randn(5, 4)), jnp.asarray(r.randn(3, 4))
  c1, c2 = ({"m": jnp.asarray(r.rand(n, 6)), "b": jnp.asarray(r.randn(n))} for n in (5, 3))
  fn = empirical_ntk_fn(f, vmap_axes=(0, 0, {"cond": 0}), implementation=implementation)
  zoo.assert_close(fn(x1, x2, params, cond=(c1, c2)), reference(x1, c1, x2, c2), TOL)
  zoo.assert_close(fn(x1, None, params, cond=c1), reference(x1, c1, x1, c1), TOL)
