"""Blocks spread over 4 CPU devices. The device count must be set before jax is imported, so
the check runs in a fresh interpreter."""
import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json
import jax
import jax.numpy as jnp
import numpy as np
jax.config.update("jax_enable_x64", True)
from ntk_dynamics.kernels import api, blocks

assert len(jax.devices()) == 4, jax.devices()
rng = np.random.default_rng(1)
params = {"w1": rng.normal(size=(4, 8)) / 2, "w2": rng.normal(size=(8, 3)) / 3}
x1, x2 = rng.normal(size=(11, 4)), rng.normal(size=(9, 4))

def mlp(p, x):
  return jnp.tanh(x @ p["w1"]) @ p["w2"]

ran = []
def record(position):
  ran.append(int(position))

def counted(kernel_fn):
  def fn(a, b, p):
    jax.debug.callback(record, jax.lax.axis_index(blocks.BLOCK_AXIS))
    return kernel_fn(a, b, p)
  return fn

def rel_err(out, ref):
  return float(np.max(np.abs(np.asarray(out) - np.asarray(ref))) / np.max(np.abs(ref)))

full = api.empirical_ntk_fn(mlp, trace_axes=())
diag = api.empirical_ntk_fn(mlp, diagonal_axes=(0,))
report = {"errors": [], "positions": []}
for kernel_fn, second, host, kw in [
    (full, None, False, {}), (full, x2, True, {}), (diag, None, True, {}),
    (full, None, True, {"mesh": jax.sharding.Mesh(np.array(jax.devices()[:2]), ("rows",))})]:
  ran.clear()
  blocked = blocks.batch(counted(kernel_fn), 3, store_on_host=host, **kw)
  out = blocked(x1, second, params)
  report["errors"].append(rel_err(out, kernel_fn(x1, second, params)))
  report["positions"].append(sorted(set(ran)))
  report.setdefault("devices", []).append(len(blocked.plan(x1, second, params).devices))

# Per-example kwargs (kwargs_axes) sliced per block on every device; the memory path probes too.
def masked(p, x, mask):
  return jnp.tanh((x @ p["w1"]) * mask) @ p["w2"]
masked_fn = api.empirical_ntk_fn(masked, vmap_axes=(0, 0, {"mask": 0}), trace_axes=())

def counted_masked(a, b, p, mask):
  jax.debug.callback(record, jax.lax.axis_index(blocks.BLOCK_AXIS))
  return masked_fn(a, b, p, mask=mask)

m1, m2, m1b = rng.normal(size=(11, 8)), rng.normal(size=(9, 8)), rng.normal(size=(11, 8))
report["mask_errors"], report["mask_mirrored"] = [], []
whole = blocks.batch(masked_fn, memory_bytes=1e12, kwargs_axes={"mask": 0}).plan(
    x1, x2, params, mask=(m1, m2))
for second, mask, kw in [(None, m1, {"batch_size": 3}),
                         (x2, (m1, m2), {"batch_size": 3, "store_on_host": True}),
                         (None, (m1, m1b), {"batch_size": 3}),
                         (x2, (m1, m2), {"memory_bytes": whole.bytes_per_block - 1})]:
  ran.clear()
  blocked = blocks.batch(counted_masked, kwargs_axes={"mask": 0}, trace_axes=(), **kw)
  out = blocked(x1, second, params, mask=mask)
  report.setdefault("mask_positions", []).append(sorted(set(ran)))
  report["mask_errors"].append(rel_err(out, masked_fn(x1, second, params, mask=mask)))
  plan = blocked.plan(x1, second, params, mask=mask)
  report["mask_mirrored"].append(plan.mirrored)
  report.setdefault("mask_blocks", []).append(len(plan.blocks))
print("REPORT" + json.dumps(report))
"""


def test_blocks_run_on_four_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT")][-1]
  report = json.loads(line[len("REPORT"):])
  assert all(e <= 1e-12 for e in report["errors"]), report
  assert report["devices"] == [4, 4, 4, 2]
  # Every device evaluated blocks (mesh positions 0..3; 0..1 for the 2-device mesh).
  assert report["positions"] == [[0, 1, 2, 3]] * 3 + [[0, 1]], report
  assert all(e <= 1e-12 for e in report["mask_errors"]), report
  assert report["mask_mirrored"] == [True, False, False, False], report
  assert min(report["mask_blocks"]) > 1, report
  assert report["mask_positions"] == [[0, 1, 2, 3]] * 4, report
