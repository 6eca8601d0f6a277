"""Inner loops of `ntk_dynamics.meta`: exactness of the closed forms, meta-gradients, MAML
orders, ANIL, batching and the cost of a meta-step against the number of inner steps."""
import functools

import jax

jax.config.update("jax_enable_x64", True)

import haiku as hk  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import ntk_dynamics as nd  # noqa: E402
from ntk_dynamics import meta, models  # noqa: E402
from ntk_dynamics.dynamics import gradient_descent_mse, gradient_descent_mse_steps  # noqa: E402
from ntk_dynamics.meta import _closed_forms  # noqa: E402


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@functools.lru_cache(maxsize=None)
def _regression(activation="tanh", width=16, n=6, m=7, seed=0):
  model = models.mlp([width, width], 1, activation=activation, w_std=0.8)
  f = nd.from_haiku(model)
  rng = np.random.default_rng(seed)
  x = rng.uniform(-2, 2, (n, 1))
  y = np.sin(x) * 1.5
  xq = rng.uniform(-2, 2, (m, 1))
  yq = np.sin(xq) * 1.5
  params = model.init(jax.random.PRNGKey(seed), x)
  return f, params, (jnp.asarray(x), jnp.asarray(y)), jnp.asarray(xq), jnp.asarray(yq)


@functools.lru_cache(maxsize=None)
def _classification(n_way=3, shots=2, m=5, seed=1):
  model = models.mlp([12], n_way, activation="tanh", w_std=0.8)
  f = nd.from_haiku(model)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n_way * shots, 4))
  y = np.repeat(np.arange(n_way), shots).astype(np.int32)
  xq = rng.normal(size=(m, 4))
  yq = rng.integers(0, n_way, m).astype(np.int32)
  params = model.init(jax.random.PRNGKey(seed), x)
  return f, params, (jnp.asarray(x), jnp.asarray(y)), jnp.asarray(xq), jnp.asarray(yq)


def _sgd_on_linearized(f, params, support, xq, steps, lr, one_hot_classes=None):
  f_lin = nd.linearize(f, params)
  x, y = support
  target = y if one_hot_classes is None else jax.nn.one_hot(y, one_hot_classes)
  opt = optax.sgd(lr)

  @jax.jit
  def run(p):
    state = opt.init(p)
    for _ in range(steps):  # unrolled: k explicit optax steps
      g = jax.grad(lambda q: jnp.mean((f_lin(q, x) - target) ** 2))(p)
      updates, state = opt.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return f_lin(p, xq)

  return run(params)


def _adapt(inner, params, support, xq):
  return jax.jit(inner.adapt)(params, support, xq)


@pytest.mark.parametrize("steps", [0, 1, 7])
def test_ntk_steps_equals_explicit_sgd_on_linearized_model(steps):
  f, params, support, xq, _ = _regression()
  lr = 0.05
  expected = _sgd_on_linearized(f, params, support, xq, steps, lr)
  got = _adapt(meta.ntk_steps(f, inner_steps=steps, inner_lr=lr), params, support, xq)
  assert got.shape == expected.shape == (xq.shape[0], 1)
  assert _rel(got, expected) < 1e-8


def test_ntk_steps_full_kernel_classification_equals_explicit_sgd():
  f, params, support, xq, _ = _classification()
  expected = _sgd_on_linearized(f, params, support, xq, 5, 0.1, one_hot_classes=3)
  got = _adapt(meta.ntk_steps(f, inner_steps=5, inner_lr=0.1, trace_axes=()), params, support,
               xq)
  assert _rel(got, expected) < 1e-8
  # The traced kernel (Θ ⊗ I) is an approximation for several outputs, not the same thing.
  traced = _adapt(meta.ntk_steps(f, inner_steps=5, inner_lr=0.1), params, support, xq)
  assert traced.shape == got.shape and _rel(traced, expected) > 1e-8


@pytest.mark.parametrize("trace_axes", [(-1,), ()])
@pytest.mark.parametrize("query_kernel", ["explicit", "products"])
def test_closed_forms_equal_dynamics_with_explicit_kernels(trace_axes, query_kernel):
  """Both query sides (explicit Θ_qs, or dual coefficients + NTK-vector products) equal
  dynamics' `gradient_descent_mse` fed the Θ(query, support) of `empirical_ntk_fn`."""
  f, params, support, xq, _ = _classification()
  x, y = support
  lr, steps = 0.1, 4

  @jax.jit
  def both(params):
    ntk_fn = nd.empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=0)
    targets = jax.nn.one_hot(y, 3)
    predict = gradient_descent_mse(ntk_fn(x, None, params), targets, learning_rate=2 * lr,
                                   trace_axes=trace_axes)
    _, expected = predict(float(steps), f(params, x), f(params, xq), ntk_fn(xq, x, params))
    got = meta.ntk_flow(f, inner_steps=steps, inner_lr=lr, trace_axes=trace_axes,
                        query_kernel=query_kernel)(params, support, xq)
    return expected, got

  expected, got = both(params)
  assert _rel(got, expected) < 1e-10


@pytest.mark.parametrize("query_kernel", ["explicit", "products"])
def test_closed_forms_see_support_and_query_apart_when_examples_mix(query_kernel):
  """`vmap_axes=None` (outputs may mix examples, here through the batch mean): the support
  and query sets are evaluated separately, as dynamics is fed them; one joint pass over
  support ∪ query would change every output."""
  f0, params, support, xq, _ = _classification()
  f = lambda p, x: f0(p, x - x.mean(0))
  x, y = support
  lr, steps = 0.1, 4
  ntk_fn = nd.empirical_ntk_fn(f, vmap_axes=None)
  predict = gradient_descent_mse(ntk_fn(x, None, params), jax.nn.one_hot(y, 3),
                                 learning_rate=2 * lr)
  _, expected = predict(float(steps), f(params, x), f(params, xq), ntk_fn(xq, x, params))
  got = _adapt(meta.ntk_flow(f, inner_steps=steps, inner_lr=lr, vmap_axes=None,
                             query_kernel=query_kernel), params, support, xq)
  assert _rel(got, expected) < 1e-10


def test_steps_adapter_matches_dynamics_and_is_reverse_differentiable():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 9))
  k = jnp.asarray(a @ a.T)
  y = jnp.asarray(rng.normal(size=(5, 1)))
  k_test = jnp.asarray(rng.normal(size=(3, 9)) @ a.T)
  fx_test = jnp.asarray(rng.normal(size=(3, 1)))

  @jax.jit
  def both(k):
    ref = gradient_descent_mse_steps(k, y, learning_rate=0.05)(13, 0., fx_test, k_test)
    got = _closed_forms.steps_predictor(k, y, 0.05, 13, 0., (-1,))(13, 0., fx_test, k_test)
    return ref, got

  ref, got = both(k)
  assert _rel(got[1], ref[1]) < 1e-12 and _rel(got[0], ref[0]) < 1e-12

  def loss(scale):
    pred = _closed_forms.steps_predictor(scale * k, y, 0.05, 13, 0., (-1,))
    return jnp.sum(pred(13, 0., fx_test, scale * k_test)[1] ** 2)

  eps = 1e-6
  loss_jit = jax.jit(loss)
  fd = (loss_jit(1. + eps) - loss_jit(1. - eps)) / (2 * eps)
  assert abs(jax.jit(jax.grad(loss))(1.) - fd) < 1e-6 * max(1., abs(fd))


def test_ntk_flow_long_time_equals_ridge_with_vanishing_ridge():
  f, params, support, xq, _ = _regression(n=5)
  x, y = support
  both = jnp.concatenate([xq, x])
  flow = _adapt(meta.ntk_flow(f, inner_steps=10**12, inner_lr=0.05), params, support, both)
  ridge = _adapt(meta.ntk_ridge(f, ridge=1e-13), params, support, both)
  assert _rel(flow, ridge) < 1e-6
  # And the limit interpolates the support set.
  assert _rel(ridge[len(xq):], y) < 1e-6


def test_ntk_flow_approaches_ntk_steps_for_small_steps():
  f, params, support, xq, _ = _regression()
  steps = _adapt(meta.ntk_steps(f, inner_steps=20, inner_lr=1e-4), params, support, xq)
  flow = _adapt(meta.ntk_flow(f, inner_steps=20, inner_lr=1e-4), params, support, xq)
  start = f(params, xq)
  # Both move the predictions, and agree to first order in the step size.
  assert _rel(flow - start, steps - start) < 1e-2 and _rel(steps, start) > 1e-6


def _meta_loss(inner, params, support, xq, yq):
  out = inner(params, support, xq)
  return meta.mse(out, yq)


def _check_fd(loss, params, rtol):
  grads = jax.jit(jax.grad(loss))(params)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(3)
  direction = treedef.unflatten([jnp.asarray(rng.normal(size=np.shape(p))) for p in leaves])
  eps = 1e-5
  shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
  fd = (loss(shift(eps)) - loss(shift(-eps))) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                  jax.tree.leaves(direction)))
  assert abs(float(analytic) - float(fd)) <= rtol * abs(float(fd)), (analytic, fd)


@pytest.mark.parametrize("name,kw", [("ntk_flow", {"inner_steps": 30, "inner_lr": 0.05}),
                                     ("ntk_steps", {"inner_steps": 30, "inner_lr": 0.05}),
                                     ("ntk_ridge", {"ridge": 1e-2})])
def test_closed_form_meta_gradients_match_finite_differences(name, kw):
  f, params, support, xq, yq = _regression()
  inner = meta.make_inner_loop(name, f, **kw)
  loss = jax.jit(lambda p: _meta_loss(inner, p, support, xq, yq))
  _check_fd(loss, params, 1e-6)


def test_full_kernel_classification_meta_gradient_matches_finite_differences():
  f, params, support, xq, yq = _classification()
  inner = meta.ntk_flow(f, inner_steps=10, inner_lr=0.1, trace_axes=())
  loss = jax.jit(lambda p: _meta_loss(inner, p, support, xq, yq))
  _check_fd(loss, params, 1e-6)


def _unrolled_maml(f, params, support, xq, yq, steps, lr, first_order):
  x, y = support
  inner = lambda p: jnp.mean((f(p, x) - y) ** 2)
  p = params
  for _ in range(steps):
    g = jax.grad(inner)(p)
    if first_order:
      g = jax.lax.stop_gradient(g)
    p = jax.tree.map(lambda a, b: a - lr * b, p, g)
  return jnp.mean((f(p, xq) - yq) ** 2)


def test_maml_second_order_matches_unrolled_loop_and_first_order_differs():
  f, params, support, xq, yq = _regression()
  steps, lr = 3, 0.05

  @jax.jit
  def all_grads(p):
    g = lambda loss: jax.grad(loss)(p)
    return (g(lambda q: _meta_loss(meta.maml(f, inner_steps=steps, inner_lr=lr), q, support,
                                   xq, yq)),
            g(lambda q: _meta_loss(meta.maml(f, inner_steps=steps, inner_lr=lr,
                                             first_order=True), q, support, xq, yq)),
            g(lambda q: _unrolled_maml(f, q, support, xq, yq, steps, lr, False)),
            g(lambda q: _unrolled_maml(f, q, support, xq, yq, steps, lr, True)))

  second, first, ref2, ref1 = all_grads(params)
  flat = lambda t: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(t)])
  assert _rel(flat(second), flat(ref2)) < 1e-10
  assert _rel(flat(first), flat(ref1)) < 1e-10
  assert _rel(flat(first), flat(second)) > 1e-3


def test_maml_zero_steps_is_the_unadapted_model_and_custom_optimizer():
  f, params, support, xq, _ = _regression()
  assert _rel(_adapt(meta.maml(f, inner_steps=0), params, support, xq), f(params, xq)) == 0.
  # An optax optimizer other than SGD.
  out = _adapt(meta.maml(f, inner_steps=1, optimizer=optax.adam(1e-3)), params, support, xq)
  assert out.shape == (xq.shape[0], 1) and _rel(out, f(params, xq)) > 0


def test_anil_adapts_only_the_head():
  f, params, support, xq, yq = _classification()
  x, y = support
  head = meta.head_names(params, f=f, x=x)
  assert head == ("readout",)
  steps, lr = 2, 0.3
  anil = meta.anil(f, inner_steps=steps, inner_lr=lr)

  @jax.jit
  def run(params):
    p = dict(params)
    for _ in range(steps):
      g = jax.grad(lambda h: meta.xent(f({**p, head[0]: h}, x), y))(p[head[0]])
      p[head[0]] = jax.tree.map(lambda a, b: a - lr * b, p[head[0]], g)
    # The meta-gradient reaches the body too (second order through the head's adaptation).
    grads = jax.grad(lambda q: meta.xent(anil(q, support, xq), yq))(params)
    return f(p, xq), anil(params, support, xq), grads

  expected, got, grads = run(params)
  assert _rel(got, expected) < 1e-12
  assert all(float(jnp.max(jnp.abs(g["w"]))) > 0 for g in grads.values())
  with pytest.raises(ValueError, match="must name layers"):
    jax.eval_shape(meta.anil(f, head="nope"), params, support, xq)


@pytest.mark.parametrize("name", meta.INNER_LOOPS)
def test_batched_equals_per_task(name):
  f, params, support, xq, _ = _regression()
  x, y = support
  xs = jnp.stack([x, x[::-1] * 0.5])
  ys = jnp.stack([y, -y])
  xqs = jnp.stack([xq, xq * 0.3])
  ridge = {"ridge": 1e-2} if name in meta.CLOSED_FORMS else {}
  inner = meta.make_inner_loop(name, f, inner_steps=2, inner_lr=0.05, **ridge)

  @jax.jit
  def both(params):
    return (inner.batched(params, (xs, ys), xqs),
            jnp.stack([inner(params, (xs[i], ys[i]), xqs[i]) for i in range(2)]))

  batched, single = both(params)
  assert batched.shape == (2, xq.shape[0], 1)
  assert _rel(batched, single) < 1e-10


def test_bad_inner_loop_arguments():
  f, params, support, xq, _ = _regression()
  with pytest.raises(ValueError, match="inner"):
    meta.make_inner_loop("reptile", f)
  with pytest.raises(ValueError, match="inner_steps"):
    meta.maml(f, inner_steps=-1)
  with pytest.raises(ValueError, match="inner_lr"):
    meta.ntk_flow(f, inner_lr=float("nan"))
  with pytest.raises(ValueError, match="ridge"):
    meta.ntk_ridge(f, ridge=0.)
  with pytest.raises(ValueError, match="trace_axes"):
    meta.ntk_flow(f, trace_axes=(0,))
  with pytest.raises(ValueError, match="query_kernel"):
    meta.ntk_steps(f, query_kernel="dense")


def _linear(p, x):
  return x @ p["w"] + p["b"]


@pytest.mark.parametrize("name", meta.INNER_LOOPS)
def test_empty_support_sets_are_refused_under_jit_too(name):
  """With no support example the gradient of the support loss is 0: MAML and ANIL returned
  the unadapted model's outputs as if they had adapted."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  kw = {"head": "b"} if name == "anil" else {}
  inner = meta.make_inner_loop(name, _linear, inner_steps=1, inner_lr=0.1, **kw)
  empty = (jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32))
  for adapt in (inner.adapt, jax.jit(inner.adapt)):
    with pytest.raises(ValueError, match=rf"{name}: the support set holds no examples "
                                         r"\(support x of shape \(0, 3\)\)"):
      adapt(params, empty, jnp.ones((2, 3)))


@pytest.mark.parametrize("name", meta.CLOSED_FORMS)
def test_closed_forms_name_support_and_query_shapes_that_cannot_share_a_pass(name):
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  support = (jnp.ones((4, 3)), jnp.array([0, 1, 0, 1]))
  with pytest.raises(ValueError, match=rf"{name}: support x \(4, 3\) and query_x \(5, 4\) "
                                       r"must hold examples of one shape \(3,\)"):
    meta.make_inner_loop(name, _linear).adapt(params, support, jnp.ones((5, 4)))


@pytest.mark.parametrize("name", meta.CLOSED_FORMS)
def test_closed_forms_refuse_query_of_another_kind_of_dtype(name):
  """The joint pass casts the query to the support's dtype: float query points must not turn
  into integer ids (0.7 -> 0) without a word, nor ids into floats."""
  def embed(p, ids):
    return p["table"][ids].sum(axis=1)
  params = {"table": jnp.ones((5, 2))}
  support = (jnp.array([[0, 1], [2, 3]]), jnp.array([0, 1]))
  with pytest.raises(ValueError, match=rf"{name}: support x has dtype int\d+ and query_x "
                                       r"float\d+; both must be integer"):
    meta.make_inner_loop(name, embed).adapt(params, support, jnp.full((3, 2), 0.7))
  float_support = (jnp.ones((4, 3)), jnp.array([0, 1, 0, 1]))
  with pytest.raises(ValueError, match=rf"{name}: support x has dtype float\d+ and query_x int\d+"):
    meta.make_inner_loop(name, _linear).adapt(
        {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}, float_support, jnp.ones((5, 3), jnp.int32))
  out = meta.make_inner_loop(name, embed).adapt(params, support, jnp.array([[1, 4], [0, 0]]))
  assert out.shape == (2, 2) and bool(jnp.all(jnp.isfinite(out)))


def test_closed_forms_record_vmap_axes_off_the_default():
  """`vmap_axes=None` changes the closed forms' math for a model that mixes examples, so the
  checkpoint fingerprint (built from `config`) must see it; the default stays unrecorded so
  that existing checkpoints keep resuming."""
  for name in meta.CLOSED_FORMS:
    assert "vmap_axes" not in meta.make_inner_loop(name, _linear).config
    assert meta.make_inner_loop(name, _linear, vmap_axes=None).config["vmap_axes"] is None


def _torso_head(x):
  # Keys "head" < "torso": sorted (as jit and optax leave them), the head comes first.
  h = jnp.tanh(hk.Linear(8, name="torso")(x))
  return hk.Linear(2, name="head")(h)


def test_anil_finds_the_head_in_the_graph_whatever_the_order_of_the_keys():
  """The default head is the module of the last parameterised operation before the output,
  not the last key: jit, optax and jax.tree sort dict keys, which put models.resnet's stem
  last (block_0_a, block_0_b, readout, stem) and a torso/head model's head first."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 6, 6, 1)))
  y = jnp.asarray(np.repeat(np.arange(3), 2).astype(np.int32))
  xq = jnp.asarray(rng.normal(size=(4, 6, 6, 1)))
  resnet = models.resnet(2, 1, 3, activation="tanh")
  f = nd.from_haiku(resnet)
  params = resnet.init(jax.random.PRNGKey(0), x)
  assert list(params)[-1] == "readout" and sorted(params)[-1] == "stem"
  shuffled = jax.tree.map(lambda a: a, params)  # sorted keys, as under jit
  assert list(shuffled)[-1] == "stem"
  for p in (params, shuffled):
    assert meta.head_names(p, f=f, x=x) == ("readout",)
  default = meta.anil(f, inner_steps=1, inner_lr=0.5)
  readout = meta.anil(f, inner_steps=1, inner_lr=0.5, head="readout")
  stem = meta.anil(f, inner_steps=1, inner_lr=0.5, head="stem")
  expected = readout(params, (x, y), xq)
  assert _rel(stem(params, (x, y), xq), expected) > 1e-3  # the choice matters
  assert _rel(jax.jit(default.adapt)(params, (x, y), xq), expected) < 1e-12
  assert _rel(default(params, (x, y), xq), expected) < 1e-12
  assert _rel(default(shuffled, (x, y), xq), expected) < 1e-12

  model = hk.without_apply_rng(hk.transform(_torso_head))
  f = nd.from_haiku(model)
  x2 = jnp.linspace(-1, 1, 4)[:, None]
  y2 = jnp.asarray([0, 1, 0, 1], jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x2)
  opt = optax.sgd(0.1)
  updates, _ = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
  stepped = optax.apply_updates(params, updates)
  assert list(stepped) == ["head", "torso"]
  assert meta.head_names(stepped, f=f, x=x2) == ("head",)
  default = meta.anil(f, inner_steps=2, inner_lr=0.3)
  expected = meta.anil(f, inner_steps=2, inner_lr=0.3, head="head")(stepped, (x2, y2), x2)
  assert _rel(jax.jit(default.adapt)(stepped, (x2, y2), x2), expected) < 1e-12
  assert _rel(default(stepped, (x2, y2), x2), expected) < 1e-12

  # Without the model no head can be found; a one-layer model has no body to keep.
  with pytest.raises(ValueError, match=r"needs the model `f` and an input `x`.*\['head', "
                                       r"'torso'\]"):
    meta.head_names(stepped)
  linear = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(2, name="only")(x)))
  p1 = linear.init(jax.random.PRNGKey(0), x2)
  with pytest.raises(ValueError, match="every layer's parameters.*pass `head`"):
    meta.anil(nd.from_haiku(linear))(p1, (x2, y2), x2)


def test_make_inner_loop_refuses_arguments_the_loop_does_not_take():
  f, params, support, xq, _ = _regression()
  with pytest.raises(TypeError, match=r"maml got unexpected arguments \['inner_lrr'\] "
                                      r"\(`inner_lrr` is an argument of no inner loop "
                                      r"\(`inner_lr`\?\)\); maml takes \["):
    meta.make_inner_loop("maml", f, inner_lrr=0.5)
  # The closed forms solve the support MSE: loss="xent" would be silently ignored.
  with pytest.raises(TypeError, match=r"ntk_flow got unexpected arguments \['loss'\] "
                                      r"\(`loss` is an argument of maml, anil\)"):
    meta.make_inner_loop("ntk_flow", f, loss="xent")
  with pytest.raises(TypeError, match="first_order"):
    meta.make_inner_loop("ntk_steps", f, first_order=True)
  with pytest.raises(TypeError, match="ridge"):
    meta.make_inner_loop("anil", f, ridge=1e-3)
  # ntk_ridge takes and ignores inner_steps / inner_lr, as documented.
  assert meta.make_inner_loop("ntk_ridge", f, inner_steps=3, inner_lr=0.1).name == "ntk_ridge"


def test_integer_scalars_of_any_kind_are_steps_and_bools_are_not():
  f, params, support, xq, _ = _regression()
  for steps in (np.int64(3), jnp.int32(3), np.array(3)):
    for build in (meta.maml, meta.anil, meta.ntk_steps, meta.ntk_flow):
      config = build(f, inner_steps=steps, inner_lr=0.05).config
      assert config["inner_steps"] == 3 and type(config["inner_steps"]) is int
  for bad in (True, 2.0, -1, np.array([3])):
    with pytest.raises(ValueError, match="maml: `inner_steps` must be a >= 0 integer"):
      meta.maml(f, inner_steps=bad)


def test_losses_check_label_shapes_and_ranges():
  out = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
  labels = jnp.array([0, 1, 0], jnp.int32)
  column = labels[:, None]  # (n, 1) would broadcast to (n, n, K)
  for fn in (meta.mse, meta.xent, meta.accuracy):
    assert np.isfinite(float(fn(out, labels)))
    with pytest.raises(ValueError, match=rf"{fn.__name__}: integer labels must have shape "
                                         r"\(3,\) .*got \(3, 1\)"):
      fn(out, column)
    with pytest.raises(ValueError, match="integer labels must have shape"):
      jax.jit(fn)(out, column)  # shapes are static: refused under jit too
    # Concrete labels past the outputs would one-hot to zeros or index past the logits.
    with pytest.raises(ValueError, match=rf"{fn.__name__}: labels must lie in \[0, 2\) "
                                         r"\(the model's 2 outputs\), got values from 0 to 4"):
      fn(out, jnp.array([0, 4, 1], jnp.int32))
  # Float targets: the outputs' shape ((n,) too for one output).
  assert float(meta.mse(out, jnp.zeros((3, 2)))) > 0
  assert float(meta.mse(out[:, :1], jnp.zeros(3))) > 0
  with pytest.raises(ValueError, match=r"float targets must have the shape of the outputs "
                                       r"\(3, 2\), got \(3, 1\)"):
    meta.mse(out, jnp.zeros((3, 1)))


def test_second_order_maml_through_adam_needs_eps_root():
  """What maml's docstring says of optax.adam: the derivative of sqrt(v) at v = 0 (dead ReLU
  units have zero gradients) makes second-order meta-gradients NaN; eps_root avoids it."""
  f, params, support, xq, yq = _regression(activation="relu")

  def meta_grad(optimizer):
    inner = meta.maml(f, inner_steps=2, optimizer=optimizer)
    grads = jax.jit(jax.grad(lambda p: meta.mse(inner(p, support, xq), yq)))(params)
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

  assert not np.all(np.isfinite(meta_grad(optax.adam(0.01))))
  assert np.all(np.isfinite(meta_grad(optax.adam(0.01, eps_root=1e-12))))


def test_closed_form_memory_does_not_grow_with_inner_steps():
  """XLA's temporary memory of a compiled meta-step: flat in k for the closed forms, growing
  with k for second-order MAML."""
  from ntk_dynamics.meta.profile import profile_meta_step
  f, params, support, xq, yq = _regression(width=32)
  x, y = support
  batch = {"support": (np.stack([x] * 2), np.stack([y] * 2)),
           "query": (np.stack([xq] * 2), np.stack([yq] * 2))}
  temp = {}
  for name, k in [("ntk_steps", 1), ("ntk_steps", 1000), ("maml", 1), ("maml", 40)]:
    inner = meta.make_inner_loop(name, f, inner_steps=k, inner_lr=0.01)
    temp[name, k] = profile_meta_step(inner, params, batch, repeats=0)["temp_bytes"]
  if temp["maml", 1] is None:
    pytest.skip("this backend reports no memory analysis")
  assert temp["ntk_steps", 1000] <= 1.1 * temp["ntk_steps", 1]
  assert temp["maml", 40] > 5 * temp["maml", 1]
