"""Benchmark models as Haiku transforms, shared by the project's and the peer's workers.

Must import and behave identically under dm-haiku 0.0.17 / JAX 0.10 (this project) and
dm-haiku 0.0.12 / JAX 0.4.25 (the neural-tangents peer venv): only long-stable Haiku API
(hk.Linear, hk.Conv2D, hk.LayerNorm, hk.get_parameter, hk.transform, hk.without_apply_rng)
and jax.tree_util (not the newer jax.tree module).

Parameters are drawn once, in this project's environment, from a fixed seed and saved to a
.npz (`save_params`); both workers load that file, so the two libraries see bit-identical
float32 parameters even though the two JAX versions' PRNGs differ.

Each model also describes its linear algebra (`flop_ops`) for the FLOP floor (flops.py).
"""
from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# Full-size configurations (the benchmark) and tiny ones (--quick smoke test).
CONFIGS = {
    "mlp": dict(n=64, in_dim=784, width=512, depth=3, out=10),
    "cnn": dict(n=32, hw=28, in_ch=1, ch=64, depth=3, out=10),
    "wrn": dict(n=16, hw=16, ch=64, out=10),
    "vit": dict(n=16, hw=28, in_ch=1, patch=4, dim=64, heads=4, mlp=128, out=10),
}
QUICK_CONFIGS = {
    "mlp": dict(n=4, in_dim=784, width=32, depth=3, out=10),
    "cnn": dict(n=4, hw=8, in_ch=1, ch=4, depth=3, out=10),
    "wrn": dict(n=4, hw=4, ch=8, out=10),
    "vit": dict(n=4, hw=8, in_ch=1, patch=4, dim=8, heads=2, mlp=16, out=10),
}
MODEL_NAMES = tuple(CONFIGS)

DESCRIPTIONS = {
    "mlp": "MLP {in_dim}-{hidden}-{out}, ReLU",
    "cnn": "CNN {depth}x conv3x3 {ch}ch SAME ReLU on {hw}x{hw}x{in_ch}, flatten, dense {out}",
    "wrn": "WRN block: {hw}x{hw}x{ch}, relu-conv3x3-relu-conv3x3 + identity, relu, GAP, "
           "dense {out}",
    "vit": "ViT block: {patch}x{patch} patches of {hw}x{hw}x{in_ch} -> width {dim}, pre-LN "
           "MHSA {heads} heads + MLP {mlp}, mean-pool, dense {out}",
}


def describe(name: str, cfg: dict) -> str:
  hidden = "-".join([str(cfg.get("width"))] * cfg.get("depth", 0))
  return DESCRIPTIONS[name].format(hidden=hidden, **cfg) + f" (N={cfg['n']})"


def _bias_init():
  # Non-zero biases so that bias Jacobians are not trivially zero anywhere.
  return hk.initializers.RandomNormal(stddev=0.1)


# --------------------------------------------------------------------------------- networks


def _mlp(cfg):
  def net(x):
    h = x
    for i in range(cfg["depth"]):
      h = jax.nn.relu(hk.Linear(cfg["width"], b_init=_bias_init(), name=f"dense_{i}")(h))
    return hk.Linear(cfg["out"], b_init=_bias_init(), name="head")(h)
  return net


def _cnn(cfg):
  def net(x):
    h = x
    for i in range(cfg["depth"]):
      h = hk.Conv2D(cfg["ch"], kernel_shape=3, padding="SAME", b_init=_bias_init(),
                    name=f"conv_{i}")(h)
      h = jax.nn.relu(h)
    h = h.reshape(h.shape[0], -1)
    return hk.Linear(cfg["out"], b_init=_bias_init(), name="head")(h)
  return net


def _wrn(cfg):
  def net(x):
    conv = lambda name: hk.Conv2D(cfg["ch"], kernel_shape=3, padding="SAME",
                                  b_init=_bias_init(), name=name)
    h = conv("conv_0")(jax.nn.relu(x))
    h = conv("conv_1")(jax.nn.relu(h))
    h = jax.nn.relu(x + h)                 # identity shortcut, BN-free
    h = jnp.mean(h, axis=(1, 2))           # global average pool
    return hk.Linear(cfg["out"], b_init=_bias_init(), name="head")(h)
  return net


class _PosEmbed(hk.Module):
  def __call__(self, h):
    pos = hk.get_parameter("pos_embed", h.shape[1:], h.dtype,
                           init=hk.initializers.RandomNormal(stddev=0.02))
    return h + pos


def _vit(cfg):
  p, d, heads = cfg["patch"], cfg["dim"], cfg["heads"]
  g = cfg["hw"] // p
  t, dh = g * g, d // heads

  def net(x):
    n = x.shape[0]
    h = x.reshape(n, g, p, g, p, cfg["in_ch"]).transpose(0, 1, 3, 2, 4, 5)
    h = h.reshape(n, t, p * p * cfg["in_ch"])
    h = hk.Linear(d, b_init=_bias_init(), name="patch_embed")(h)
    h = _PosEmbed(name="pos")(h)
    # Pre-LN self-attention.
    y = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name="ln_attn")(h)
    q = hk.Linear(d, b_init=_bias_init(), name="query")(y).reshape(n, t, heads, dh)
    k = hk.Linear(d, b_init=_bias_init(), name="key")(y).reshape(n, t, heads, dh)
    v = hk.Linear(d, b_init=_bias_init(), name="value")(y).reshape(n, t, heads, dh)
    logits = jnp.einsum("nthd,nshd->nhts", q, k) / math.sqrt(dh)
    w = jax.nn.softmax(logits, axis=-1)
    a = jnp.einsum("nhts,nshd->nthd", w, v).reshape(n, t, d)
    h = h + hk.Linear(d, b_init=_bias_init(), name="attn_out")(a)
    # Pre-LN MLP.
    y = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name="ln_mlp")(h)
    y = jax.nn.gelu(hk.Linear(cfg["mlp"], b_init=_bias_init(), name="mlp_in")(y))
    h = h + hk.Linear(d, b_init=_bias_init(), name="mlp_out")(y)
    h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name="ln_final")(h)
    h = jnp.mean(h, axis=1)
    return hk.Linear(cfg["out"], b_init=_bias_init(), name="head")(h)
  return net


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "wrn": _wrn, "vit": _vit}


def input_shape(name: str, cfg: dict) -> tuple:
  """Shape of one batch of inputs (N first)."""
  if name == "mlp":
    return (cfg["n"], cfg["in_dim"])
  if name in ("cnn", "vit"):
    return (cfg["n"], cfg["hw"], cfg["hw"], cfg["in_ch"])
  if name == "wrn":
    return (cfg["n"], cfg["hw"], cfg["hw"], cfg["ch"])
  raise KeyError(name)


def transform(name: str, cfg: dict) -> hk.Transformed:
  """`hk.without_apply_rng(hk.transform(net))`: apply(params, x) -> logits (N, out)."""
  return hk.without_apply_rng(hk.transform(_BUILDERS[name](cfg)))


def init_params(name: str, cfg: dict, seed: int = 0):
  x = jnp.zeros(input_shape(name, cfg), jnp.float32)
  return transform(name, cfg).init(jax.random.PRNGKey(seed), x)


def make_inputs(name: str, cfg: dict, seed: int = 0):
  """Two different batches x1 != x2 of the same size (numpy's PCG64: same in both envs)."""
  rng = np.random.default_rng(seed)
  shape = input_shape(name, cfg)
  x1 = rng.standard_normal(shape).astype(np.float32)
  x2 = rng.standard_normal(shape).astype(np.float32)
  return x1, x2


def save_params(params, path: str) -> None:
  flat = {f"{m}/{p}": np.asarray(v, np.float32) for m, d in params.items() for p, v in d.items()}
  np.savez(path, **flat)


def load_params(path: str) -> dict:
  """Loads `save_params` output as Haiku's {module: {param: array}} mapping (jnp arrays)."""
  out: dict = {}
  with np.load(path) as z:
    for key in z.files:
      module, _, param = key.rpartition("/")
      out.setdefault(module, {})[param] = jnp.asarray(z[key])
  return out


def num_params(params) -> int:
  return int(sum(np.size(v) for v in jax.tree_util.tree_leaves(params)))


# ------------------------------------------------------------------- structure for FLOP counts


def flop_ops(name: str, cfg: dict) -> list:
  """The model's multiply-add structure, per example, in forward order.

  Entries:
    {"op": "linear", "K", "C", "S", "bias", "first", "top"}: a weight of shape (K, C) applied
      at S positions (S=1 dense; S=spatial positions for a conv with K=k*k*C_in; S=tokens for a
      token-wise dense). "first": its input does not depend on any parameter, so no cotangent
      is propagated below it. "top": the final dense layer; the cotangent at its input is the
      weight row itself, independent of the example.
    {"op": "bilinear", "macs"}: a product of two parameter-dependent activations (attention
      scores, attention-weighted values); its backward pass costs 2*macs (both operands).
    {"op": "elementwise_param", "D", "S", "kind"}: a parameter of size D (LayerNorm scale or
      offset) broadcast over S positions; or kind="additive_table" with D=S*width (pos embed).
  """
  o = cfg["out"]
  if name == "mlp":
    ops, k = [], cfg["in_dim"]
    for i in range(cfg["depth"]):
      ops.append(dict(op="linear", K=k, C=cfg["width"], S=1, bias=True, first=i == 0,
                      top=False))
      k = cfg["width"]
    ops.append(dict(op="linear", K=k, C=o, S=1, bias=True, first=False, top=True))
    return ops
  if name == "cnn":
    s, ops, cin = cfg["hw"] ** 2, [], cfg["in_ch"]
    for i in range(cfg["depth"]):
      ops.append(dict(op="linear", K=9 * cin, C=cfg["ch"], S=s, bias=True, first=i == 0,
                      top=False))
      cin = cfg["ch"]
    ops.append(dict(op="linear", K=s * cfg["ch"], C=o, S=1, bias=True, first=False, top=True))
    return ops
  if name == "wrn":
    s, c = cfg["hw"] ** 2, cfg["ch"]
    return [dict(op="linear", K=9 * c, C=c, S=s, bias=True, first=True, top=False),
            dict(op="linear", K=9 * c, C=c, S=s, bias=True, first=False, top=False),
            dict(op="linear", K=c, C=o, S=1, bias=True, first=False, top=True)]
  if name == "vit":
    d, m = cfg["dim"], cfg["mlp"]
    t = (cfg["hw"] // cfg["patch"]) ** 2
    pin = cfg["patch"] ** 2 * cfg["in_ch"]
    lin = lambda k, c: dict(op="linear", K=k, C=c, S=t, bias=True, first=False, top=False)
    ln = [dict(op="elementwise_param", D=d, S=t, kind="scale"),
          dict(op="elementwise_param", D=d, S=t, kind="offset")]
    return ([dict(op="linear", K=pin, C=d, S=t, bias=True, first=True, top=False),
             dict(op="elementwise_param", D=t * d, S=1, kind="additive_table")] + ln +
            [lin(d, d), lin(d, d), lin(d, d),
             dict(op="bilinear", macs=t * t * d), dict(op="bilinear", macs=t * t * d),
             lin(d, d)] + ln + [lin(d, m), lin(m, d)] + ln +
            [dict(op="linear", K=d, C=o, S=1, bias=True, first=False, top=True)])
  raise KeyError(name)
