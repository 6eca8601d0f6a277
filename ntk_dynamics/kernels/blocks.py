"""Memory-bounded, multi-device evaluation of empirical kernels in blocks of x1 × x2.

`batch(kernel_fn, ...)` wraps any kernel function of this package (`empirical_ntk_fn`,
`empirical_nngp_fn`, `empirical_kernel_fn`, per-parameter NTKs, or a function that wraps one)
and returns a function with the same signature that evaluates Θ(x1, x2) block by block:

  * the batch axis is axis 0 of every input leaf and of every output leaf of the model; in the
    kernel layout (see `axes.py`) it becomes the leading (N1, N2) axes, one (N,) axis when it
    is diagonal, or nothing when it is traced;
  * any N: when the block size does not divide N, the last block is shifted back so that it
    ends at N (it overlaps its neighbour and the overlap is written twice with the same
    values). This is "pad the last block and trim", with real examples as the padding, so the
    model never sees synthetic inputs (zero rows can make NaNs that NTK-vector products spread
    over the whole block) and the result is assembled in place without a trimming copy. When
    the batch axis is traced the last diagonal block is evaluated at its true size instead;
  * diagonal batch axis: only diagonal blocks are evaluated; traced batch axis: diagonal
    blocks are evaluated and averaged with weights (block size) / N;
  * `x2=None`: only blocks i <= j are evaluated (diagonal ones with `x2=None`, which lets the
    kernel differentiate once); block (j, i) is block (i, j) with its x1/x2 axes swapped for
    every output axis that keeps both (e.g. (N1, N2, K1, K2) -> (N2, N1, K2, K1));
  * blocks are spread over devices with `jax.shard_map` over a 1-D `Mesh` (axis
    `BLOCK_AXIS`): each device evaluates whole blocks, no communication is needed;
  * `store_on_host=True` copies each finished block into a host numpy array, so the kernel may
    exceed device memory; otherwise the kernel is assembled (in place, donated buffers) on the
    first device of the mesh.

Blocking is exact only for models whose outputs for one example do not depend on other
examples (no batch statistics, no attention across the batch) -- the same requirement as
`vmap_axes` and as neural-tangents' `nt.batch`. Stochastic models (an `rng` kwarg) are not
exact either: their noise depends on the block's shape, and the x2 side of an off-diagonal
block of an `x2=None` call gets `fold_in(rng, 1)` (see `empirical_ntk_fn`).

Keyword arguments are passed unchanged to every block unless `kwargs_axes` names their batch
axis. Such a per-example kwarg is sliced like the inputs and handed to `kernel_fn` in
neural-tangents' per-side form `(for_x1, for_x2)` (every leaf of a pytree is sliced):

  * given as a 2-tuple `(for_x1, for_x2)`: block (i, j) gets (rows i of for_x1, rows j of
    for_x2). With `x2=None` the kernel is then Θ((x, for_x1), (x, for_x2)), which is not
    symmetric unless the halves are equal, so every block is evaluated (none mirrored);
  * given as one array with `x2=None`: it belongs to both sides. Diagonal blocks (evaluated
    with `x2=None`) get rows i; off-diagonal blocks, evaluated with explicit x1 and x2 blocks,
    get the 2-tuple (rows i, rows j). Mirroring stays exact: the kernel is symmetric;
  * one array with `x2` given is ambiguous and refused (pass the 2-tuple).

Any 2-tuple kwarg whose halves differ (per-example or not) also turns mirroring off in an
`x2=None` call, since Θ is then not symmetric.

Blocked evaluation is host-driven (a Python loop over blocks, host copies, memory probing), so
a `Blocked` function runs eagerly and cannot be traced: calling it (or `plan`) inside
`jax.jit`, `jax.vmap` or `jax.grad` raises a `TypeError`. The wrapped kernel function is
jitted per block already.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ntk_dynamics.kernels import axes as axes_lib
from ntk_dynamics.kernels import precision as precision_lib

PyTree = Any

BLOCK_AXIS = "blocks"
"""Name of the mesh axis blocks are spread over (visible to `jax.lax.axis_index` inside the
wrapped kernel function)."""

FULL, DIAGONAL, TRACED = "full", "diagonal", "traced"

# Peak bytes of one block are measured at these block sizes and fitted by a quadratic.
_PROBE_SIZES = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """What a blocked call evaluates (see `Blocked.plan`).

  Attributes:
    n1, n2: number of examples in x1 and x2 (n2 == n1 when `symmetric`).
    symmetric: the call had `x2=None`.
    block_size: (b1, b2), examples per block along x1 and x2.
    roles: role of the batch axis in each kernel leaf (flattened order): 'full' (N1, N2
      axes), 'diagonal' (one N axis) or 'traced' (no N axis).
    mirrored: symmetric call whose lower-triangle blocks are copies (transposes) of evaluated
      upper-triangle blocks.
    blocks: (i, j) block indices that are evaluated, in evaluation order.
    devices: devices the blocks are spread over.
    bytes_per_block: for `memory_bytes`, the measured per-device memory of one block (see
      `batch`); None when `batch_size` was given.
  """
  n1: int
  n2: int
  symmetric: bool
  block_size: tuple[int, int]
  roles: tuple[str, ...]
  mirrored: bool
  blocks: tuple[tuple[int, int], ...]
  devices: tuple[Any, ...]
  bytes_per_block: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class _Task:
  kind: str         # "pair": kernel_fn(x1_i, x2_j); "sym": kernel_fn(x1_i, None)
  diag: bool        # i == j with matching blocks (diagonal/traced leaves are written)
  i: int
  j: int
  start1: int
  size1: int
  start2: int
  size2: int
  weight: float     # for traced leaves: size / N (0 for padding tasks)


# ----------------------------------------------------------------------------- arguments


def _check_batch_size(batch_size) -> Optional[tuple[int, int]]:
  if batch_size is None:
    return None
  sizes = batch_size if isinstance(batch_size, (tuple, list)) else (batch_size, batch_size)
  if len(sizes) != 2:
    raise ValueError(f"`batch_size` must be a positive int or a pair (b1, b2) of them, got "
                     f"{batch_size!r}.")
  out = []
  for b in sizes:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
      raise TypeError(f"`batch_size` must be a positive int or a pair (b1, b2) of them, got "
                      f"{batch_size!r}.")
    if b <= 0:
      raise ValueError(f"`batch_size` must be positive (examples per block), got "
                       f"{batch_size!r}.")
    out.append(int(b))
  return tuple(out)


def _check_memory_bytes(memory_bytes) -> Optional[int]:
  if memory_bytes is None:
    return None
  if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, (int, float, np.number)):
    raise TypeError(f"`memory_bytes` must be a positive number of bytes, got "
                    f"{memory_bytes!r}.")
  if not memory_bytes >= 1 or not math.isfinite(memory_bytes):
    raise ValueError(f"`memory_bytes` must be a finite number of bytes >= 1, got "
                     f"{memory_bytes!r}.")
  return int(memory_bytes)


def _resolve_devices(devices, mesh) -> tuple[Any, ...]:
  if devices is not None and mesh is not None:
    raise ValueError("Pass at most one of `devices` and `mesh`.")
  if mesh is not None:
    if not isinstance(mesh, Mesh):
      raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    return tuple(np.asarray(mesh.devices).flat)
  if devices is None:
    return tuple(jax.local_devices())
  devices = tuple(devices)
  if not devices:
    raise ValueError("`devices` is empty.")
  if len(set(devices)) != len(devices):
    raise ValueError(f"`devices` lists a device twice: {devices}.")
  return devices


def _num_examples(x: PyTree, name: str) -> int:
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError(f"`{name}` has no array leaves.")
  sizes = set()
  for leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) == 0:
      raise ValueError(f"`{name}` has a scalar leaf; every input leaf needs the batch axis 0.")
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(f"`{name}` leaves have different sizes {sorted(sizes)} along the batch "
                     "axis 0; blocking needs one batch size.")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"`{name}` has no examples (batch axis 0 has size 0).")
  return int(n)


def _split_args(args: tuple, kwargs: dict):
  """Array leaves of (args, kwargs) are traced; the rest (strings, flags, None) is static."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  dynamic_mask = tuple(isinstance(l, (jax.Array, np.ndarray)) for l in leaves)
  dynamic = [l for l, d in zip(leaves, dynamic_mask) if d]
  static = tuple(None if d else l for l, d in zip(leaves, dynamic_mask))

  def rebuild(dyn_leaves):
    it = iter(dyn_leaves)
    args_, kwargs_ = treedef.unflatten([next(it) if d else s
                                        for d, s in zip(dynamic_mask, static)])
    return args_, kwargs_

  try:
    key = (treedef, dynamic_mask, static)
    hash(key)
  except TypeError:
    key = None
  return dynamic, rebuild, key


def _dtype(a) -> np.dtype:
  return np.dtype(a.dtype) if hasattr(a, "dtype") else np.result_type(a)


def _check_kwargs_axes(kwargs_axes) -> dict[str, int]:
  """`kwargs_axes` as {name: batch axis} for the batched kwargs only (None entries dropped)."""
  if kwargs_axes is None:
    return {}
  if not isinstance(kwargs_axes, Mapping):
    raise TypeError("`kwargs_axes` must be a dict {kwarg name: batch axis (int) or None}, got "
                    f"{type(kwargs_axes).__name__}.")
  out = {}
  for name, axis in kwargs_axes.items():
    if not isinstance(name, str):
      raise TypeError(f"`kwargs_axes` keys must be kwarg names (str), got {name!r}.")
    if axis is None:
      continue
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
      raise TypeError(f"`kwargs_axes['{name}']` must be a batch axis (int) or None, got "
                      f"{axis!r}.")
    out[name] = int(axis)
  return out


def _check_not_traced(x1, x2, args: tuple, kwargs: dict) -> None:
  """Blocked evaluation loops over blocks on the host: refuse traced inputs up front."""
  named = [("`x1`", x1), ("`x2`", x2)]
  named += [(f"`args[{i}]` (positional arguments after x2)", a) for i, a in enumerate(args)]
  named += [(f"kwarg `{k}`", v) for k, v in kwargs.items()]
  for name, tree in named:
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree)):
      raise TypeError(
          f"A `batch(...)` function got a traced value in {name}: it is being called inside "
          "`jax.jit`, `jax.vmap`, `jax.grad` or another transformation. Blocked evaluation "
          "runs eagerly, block by block (a Python loop over blocks, host copies, memory "
          "probing), so it cannot be traced: call it outside `jax.jit`/`vmap`/`grad`. The "
          "kernel function it wraps is already jitted per block.")


def _shapes(value) -> Any:
  """Leaf shape(s) of a kwarg value, for error messages."""
  shapes = [tuple(np.shape(l)) for l in jax.tree.leaves(value)]
  return shapes[0] if len(shapes) == 1 and not isinstance(value, (dict, list, tuple)) \
      else shapes


def _batch_axis_first(a, where: str, axis: int, n: int, source: str):
  """Checks a leaf of a per-example kwarg and moves its batch axis to 0 (blocks slice axis 0)."""
  shape = tuple(np.shape(a))
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"{where} has a leaf of shape {shape}, which has no batch axis {axis} "
                     "(`kwargs_axes`).")
  if shape[axis] != n:
    raise ValueError(f"{where} has a leaf of shape {shape} whose batch axis {axis} "
                     f"(`kwargs_axes`) has length {shape[axis]}; expected {n}, the number of "
                     f"examples in {source}.")
  axis %= len(shape)
  if axis == 0:
    return a
  return np.moveaxis(a, axis, 0) if isinstance(a, np.ndarray) else jnp.moveaxis(a, axis, 0)


def _split_kwargs(kwargs: dict, kwargs_axes: dict, symmetric: bool, n1: int, n2: int):
  """Separates the per-example kwargs (named in `kwargs_axes`) from those passed unchanged.

  Returns (plain kwargs, side1, side2, spec): side1/side2 map each per-example kwarg to its
  x1/x2 value with the batch axis moved to 0 (for a single array with `x2=None`, the same
  value on both sides); spec is ((name, given as a 2-tuple, axis), ...), with which a block
  rebuilds them.
  """
  plain, side1, side2, spec = {}, {}, {}, []
  for name, value in kwargs.items():
    axis = kwargs_axes.get(name)
    if axis is None or not jax.tree.leaves(value):
      plain[name] = value
      continue
    sided = isinstance(value, tuple) and len(value) == 2
    if not sided and not symmetric:
      raise ValueError(
          f"kwarg `{name}` is per-example (kwargs_axes={{'{name}': {axis}}}) but is given as "
          f"one value of shape {_shapes(value)} while x2 is given, so which rows go with x2 is "
          f"ambiguous. Pass a 2-tuple (for_x1, for_x2) with {n1} and {n2} examples along "
          f"axis {axis}.")
    halves = value if sided else (value,)
    sources = ("x1", "x2" if not symmetric else "x1 (x2=None)")
    moved = [jax.tree.map(functools.partial(
        _batch_axis_first, where=f"kwarg `{name}`" + (f" (its {side} half)" if sided else ""),
        axis=axis, n=n, source=source), half)
        for half, side, n, source in zip(halves, ("x1", "x2"), (n1, n2), sources)]
    side1[name], side2[name] = moved[0], moved[-1]
    spec.append((name, sided, axis))
  return plain, side1, side2, tuple(spec)


def _same(a, b) -> bool:
  """Whether two kwarg values are equal (the halves of a 2-tuple kwarg)."""
  if a is b:
    return True
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  if ta != tb:
    return False
  for x, y in zip(la, lb):
    if x is y:
      continue
    if isinstance(x, (jax.Array, np.ndarray)) or isinstance(y, (jax.Array, np.ndarray)):
      if (np.shape(x) != np.shape(y) or _dtype(x) != _dtype(y)
          or not np.array_equal(np.asarray(x), np.asarray(y))):
        return False
    else:
      try:
        if not bool(x == y):
          return False
      except Exception:  # pylint: disable=broad-except
        return False
  return True


def _asymmetric_kwarg(kwargs: dict) -> Optional[str]:
  """A kwarg given per side with different halves, which makes an x2=None kernel asymmetric."""
  for name, value in kwargs.items():
    if isinstance(value, tuple) and len(value) == 2 and not _same(*value):
      return name
  return None


def _abstract_block(x: PyTree, n: int, lead: bool = False) -> PyTree:
  """Abstract block of `n` examples of `x` (with a leading axis of 1 when `lead`)."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((1,) * lead + (n,) + tuple(np.shape(a))[1:],
                                     jax.dtypes.canonicalize_dtype(_dtype(a))), x)


# ----------------------------------------------------------------------------- layout


def _mirror_perm(shape: Sequence[int], output_axes: Optional[axes_lib.OutputAxes]
                 ) -> Optional[tuple[int, ...]]:
  """Permutation taking the kernel block of (x1_i, x2_j) to that of (x2_j, x1_i).

  `shape` is a kernel leaf whose batch axis is 'full' (kernel axes 0 and 1). Every output
  axis that keeps an x1 and an x2 axis has them swapped; diagonal axes stay. Returns None when
  the layout of the other axes cannot be determined.
  """
  rank = len(shape)
  if rank == 2:
    return (1, 0)
  if output_axes is None:
    return None
  candidates = []
  for ndim in range(1, rank + 2 * len(output_axes.trace_axes) + 2):
    try:
      trace, diagonal = output_axes.for_rank(ndim)
    except ValueError:
      continue
    if 0 in trace or 0 in diagonal:
      continue
    if 2 * ndim - 2 * len(trace) - len(diagonal) != rank:
      continue
    perm, k, ok = [], 0, True
    for a in range(ndim):
      if a in trace:
        continue
      if a in diagonal:
        perm.append(k)
        k += 1
      else:
        ok &= shape[k] == shape[k + 1] or a == 0
        perm += [k + 1, k]
        k += 2
    if ok:
      candidates.append(tuple(perm))
  return candidates[0] if len(candidates) == 1 else None


def _roles(out_a: PyTree, out_c: PyTree, a: int, c: int) -> list[str]:
  roles = []
  for sa, sc in zip(jax.tree.leaves(out_a), jax.tree.leaves(out_c)):
    sa, sc = tuple(sa.shape), tuple(sc.shape)
    if sa == sc:
      roles.append(TRACED)
    elif len(sa) >= 2 and sa[:2] == (a, a) and sc[:2] == (c, c) and sa[2:] == sc[2:]:
      roles.append(FULL)
    elif len(sa) >= 1 and sa[0] == a and sc[0] == c and sa[1:] == sc[1:]:
      roles.append(DIAGONAL)
    else:
      raise ValueError(
          f"Cannot locate the batch axes in a kernel leaf: its shape is {sa} for blocks of "
          f"{a} examples and {sc} for {c}. `batch` needs the batch axis at axis 0 of the "
          "inputs and outputs (kernel axes (N1, N2, ...), (N, ...) or none).")
  return roles


# ----------------------------------------------------------------------------- the wrapper


class Blocked:
  """`kernel_fn` evaluated in blocks; build with `batch`. Call like `kernel_fn`."""

  def __init__(self, kernel_fn: Callable, batch_size, memory_bytes, store_on_host: bool,
               devices: tuple, precision: Optional[str], progress: bool,
               output_axes: Optional[axes_lib.OutputAxes],
               kwargs_axes: Optional[Mapping[str, Optional[int]]] = None):
    self.kernel_fn = kernel_fn
    self.kwargs_axes = _check_kwargs_axes(kwargs_axes)
    self.batch_size = batch_size
    self.memory_bytes = memory_bytes
    self.store_on_host = bool(store_on_host)
    self.devices = devices
    self.mesh = Mesh(np.asarray(devices, dtype=object), (BLOCK_AXIS,))
    self._probe_mesh = Mesh(np.asarray(devices[:1], dtype=object), (BLOCK_AXIS,))
    self.precision = precision
    self.progress = progress
    self._explicit_axes = output_axes
    self._round_cache: dict = {}
    self._update_cache: dict = {}
    self._size_cache: dict = {}
    self._layout_cache: dict = {}
    self._warned = False
    functools.update_wrapper(self, kernel_fn, assigned=("__module__", "__name__",
                                                        "__qualname__", "__doc__"),
                             updated=())

  # -- helpers -------------------------------------------------------------------------

  def _precision_ctx(self):
    return precision_lib.matmul_precision(self.precision)

  def _output_axes(self) -> Optional[axes_lib.OutputAxes]:
    if self._explicit_axes is not None:
      return self._explicit_axes
    found = getattr(self.kernel_fn, "output_axes", None)
    return found if isinstance(found, axes_lib.OutputAxes) else None

  def _round_fn(self, key, rebuild, spec: tuple, kind: str, mesh: Mesh) -> Callable:
    """jit(shard_map(...)) evaluating one block per device; leaves (D, block...) in and out.

    Inputs are sides `(x, per-example kwargs)` (see `_split_kwargs`; `spec` says how to
    rebuild those kwargs). A "sym" block gets side 1 and the x2 halves of the kwargs given as
    2-tuples, sliced at the same rows. Probes (shapes, memory) use the same function on a
    one-device mesh, so `kernel_fn` always runs with the mesh axis `BLOCK_AXIS` bound.
    """
    cache_key = None if key is None else (key, kind, mesh)
    fn = self._round_cache.get(cache_key) if cache_key is not None else None
    if fn is not None:
      return fn
    kernel_fn = self.kernel_fn

    def unlead(tree):
      return jax.tree.map(lambda a: a[0], tree)

    def restore(tree, axis):  # batch axis back where kernel_fn expects it
      return jax.tree.map(lambda a: jnp.moveaxis(a, 0, axis % a.ndim), tree)

    if kind == "sym":
      def local(s1r, k2r, dyn):
        args, kwargs = rebuild(dyn)
        (x1b, k1b), k2b = unlead(s1r), unlead(k2r)
        for name, sided, axis in spec:
          kw1 = restore(k1b[name], axis)
          kwargs[name] = (kw1, restore(k2b[name], axis)) if sided else kw1
        out = kernel_fn(x1b, None, *args, **kwargs)
        return jax.tree.map(lambda o: o[None], out)
    else:
      def local(s1r, s2r, dyn):
        args, kwargs = rebuild(dyn)
        (x1b, k1b), (x2b, k2b) = unlead(s1r), unlead(s2r)
        for name, _, axis in spec:
          kwargs[name] = (restore(k1b[name], axis), restore(k2b[name], axis))
        out = kernel_fn(x1b, x2b, *args, **kwargs)
        return jax.tree.map(lambda o: o[None], out)
    in_specs = (P(BLOCK_AXIS), P(BLOCK_AXIS), P())

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                               out_specs=P(BLOCK_AXIS), check_vma=False))
    if cache_key is not None:
      self._round_cache[cache_key] = fn
    return fn

  def _measure(self, probe, s1, s2, dyn, b: int) -> dict:
    x1a = _abstract_block(s1, b, lead=True)
    x2a = _abstract_block(s2, b, lead=True)
    with self._precision_ctx():
      compiled = probe.lower(x1a, x2a, dyn).compile()
    stats = compiled.memory_analysis()
    if stats is None:
      raise ValueError("`memory_bytes`: this backend reports no compiled memory statistics; "
                       "pass `batch_size` instead.")
    args = int(stats.argument_size_in_bytes)
    out = int(stats.output_size_in_bytes)
    temp = int(stats.temp_size_in_bytes)
    alias = int(stats.alias_size_in_bytes)
    # One more finished output block per device may be alive while the next one runs.
    return dict(total=args + temp + 2 * out - alias, arguments=args, temporaries=temp,
                outputs=out)

  def _block_from_memory(self, probe, s1, s2, dyn, nmax: int) -> tuple[int, int]:
    budget = self.memory_bytes
    measured = {}

    def measure(b):
      if b not in measured:
        measured[b] = self._measure(probe, s1, s2, dyn, b)
      return measured[b]["total"]

    one = self._measure(probe, s1, s2, dyn, 1)
    measured[1] = one
    if one["total"] > budget:
      raise ValueError(
          f"`memory_bytes`={budget} is too small: one block of a single example needs about "
          f"{one['total']} bytes per device (arguments incl. parameters {one['arguments']}, "
          f"temporaries {one['temporaries']}, output {one['outputs']} counted twice).")
    sizes = [s for s in _PROBE_SIZES if s <= nmax]
    ys = [measure(s) for s in sizes]
    if len(sizes) >= 3:
      c2, c1, c0 = np.polyfit(sizes, ys, 2)
    elif len(sizes) == 2:
      c2, (c1, c0) = 0.0, np.polyfit(sizes, ys, 1)
    else:
      return 1, ys[0]
    c2, c1 = max(c2, 0.0), max(c1, 0.0)
    c0 = ys[0] - c1 * sizes[0] - c2 * sizes[0] ** 2
    lo, hi = 1, nmax  # largest b with model(b) <= budget
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if c0 + c1 * mid + c2 * mid * mid <= budget:
        lo = mid
      else:
        hi = mid - 1
    b = lo
    # Verify by compiling at b (extrapolation can be off); shrink until it fits.
    while b > 1 and measure(b) > budget:
      fits = [s for s, m in measured.items() if m["total"] <= budget and s < b]
      shrink = int(b * math.sqrt(budget / measure(b)) * 0.95)
      b = max(max(fits), min(shrink, b - 1))
    return b, measure(b)

  # -- planning ------------------------------------------------------------------------

  def _prepare(self, x1, x2, args, kwargs):
    _check_not_traced(x1, x2, args, kwargs)
    n1 = _num_examples(x1, "x1")
    symmetric = x2 is None
    n2 = n1 if symmetric else _num_examples(x2, "x2")
    if not symmetric and jax.tree.structure(x1) != jax.tree.structure(x2):
      raise ValueError(f"`x1` has pytree structure {jax.tree.structure(x1)} but `x2` has "
                       f"{jax.tree.structure(x2)}; they must match.")
    if not symmetric:  # checked here, on the user's arrays, not later on blocks of them
      for a, b in zip(jax.tree.leaves(x1), jax.tree.leaves(x2)):
        if np.shape(a)[1:] != np.shape(b)[1:]:
          raise ValueError(f"`x1` and `x2` have different feature shapes: x1 {np.shape(a)} "
                           f"vs x2 {np.shape(b)} (they may differ only along the batch axis "
                           "0).")
    plain, kw1, kw2, spec = _split_kwargs(kwargs, self.kwargs_axes, symmetric, n1, n2)
    # Blocks take sides (x, per-example kwargs with their batch axis at 0).
    side1, side2 = (x1, kw1), (x1 if symmetric else x2, kw2)
    extra = {name: kw2[name] for name, sided, _ in spec if sided}  # for "sym" blocks
    dyn, rebuild, key = _split_args(args, plain)
    key = None if key is None else (key, spec)
    probe = self._round_fn(key, rebuild, spec, "pair", self._probe_mesh)
    sig = lambda tree: (jax.tree.structure(tree),
                        tuple((tuple(np.shape(l))[1:], str(_dtype(l)))
                              for l in jax.tree.leaves(tree)))
    dyn_sig = tuple((np.shape(l), str(_dtype(l))) for l in dyn)
    layout_key = None if key is None else (key, sig(side1), sig(side2), dyn_sig,
                                           jax.config.jax_enable_x64)
    layout = self._layout_cache.get(layout_key) if layout_key is not None else None
    if layout is None:
      a, c = 2, 3  # block sizes whose kernel shapes reveal the batch axes
      with self._precision_ctx():
        out_a, out_c = (jax.tree.map(
            lambda o: jax.ShapeDtypeStruct(o.shape[1:], o.dtype),
            jax.eval_shape(probe, _abstract_block(side1, n, True),
                           _abstract_block(side2, n, True), dyn))
            for n in (a, c))
      layout = (_roles(out_a, out_c, a, c), jax.tree.structure(out_a), jax.tree.leaves(out_a))
      if layout_key is not None:
        self._layout_cache[layout_key] = layout
    roles, treedef, leaves_a = layout
    if any(r != FULL for r in roles) and n1 != n2:
      raise ValueError(f"x1 has {n1} examples and x2 {n2}, but the kernel's batch axis is "
                       "diagonal or traced, which needs as many examples in both.")

    output_axes = self._output_axes()
    perms = [(_mirror_perm(l.shape, output_axes) if r == FULL else None)
             for l, r in zip(leaves_a, roles)]
    layout_known = all(p is not None for p, r in zip(perms, roles) if r == FULL)
    # A kwarg given per side with different halves makes Θ(x, x) asymmetric: no mirroring.
    mirrored = symmetric and layout_known and _asymmetric_kwarg(kwargs) is None
    if symmetric and not layout_known and not self._warned:
      self._warned = True
      warnings.warn("batch: cannot tell the layout of the kernel's non-batch axes, so the "
                    "lower-triangle blocks of this x2=None call are evaluated rather than "
                    "mirrored; pass `trace_axes`/`diagonal_axes` to `batch` to mirror them.",
                    stacklevel=3)

    bytes_per_block = None
    if self.batch_size is not None:
      b1, b2 = self.batch_size
    else:
      size_key = None if layout_key is None else (layout_key, n1, n2)
      cached = self._size_cache.get(size_key) if size_key is not None else None
      if cached is None:
        cached = self._block_from_memory(probe, side1, side2, dyn, max(n1, n2))
        if size_key is not None:
          self._size_cache[size_key] = cached
      b, bytes_per_block = cached
      b1 = b2 = b
    if symmetric or any(r != FULL for r in roles):  # square blocks
      b1 = b2 = min(b1, b2)
    b1, b2 = min(b1, n1), min(b2, n2)

    # Blocks are shifted back to end at N (no divisibility rule). A traced batch axis
    # averages over the examples of each diagonal block, so the last diagonal block is then
    # evaluated at its true size instead (off-diagonal blocks keep equal sizes, which kernels
    # with traced/diagonal leaves require).
    exact_tail = TRACED in roles
    nb1, nb2 = -(-n1 // b1), -(-n2 // b2)
    has_full = FULL in roles
    tasks = []
    for i in range(nb1):
      for j in range(nb2):
        if not has_full and i != j:
          continue
        if symmetric and mirrored and j < i:
          continue
        diag = i == j and (symmetric or b1 == b2)
        if diag and exact_tail:
          s1 = s2 = i * b1
          z1 = z2 = min(b1, n1 - s1)
        else:
          s1, z1, s2, z2 = min(i * b1, n1 - b1), b1, min(j * b2, n2 - b2), b2
        kind = "sym" if symmetric and i == j else "pair"
        tasks.append(_Task(kind, diag, i, j, s1, z1, s2, z2, z1 / n1 if diag else 0.0))
    plan = BlockPlan(n1=n1, n2=n2, symmetric=symmetric, block_size=(b1, b2),
                     roles=tuple(roles), mirrored=mirrored,
                     blocks=tuple((t.i, t.j) for t in tasks), devices=self.devices,
                     bytes_per_block=None if bytes_per_block is None else int(bytes_per_block))
    return dict(plan=plan, tasks=tasks, treedef=treedef, leaves=leaves_a, roles=roles,
                perms=perms, dyn=dyn, rebuild=rebuild, key=key, spec=spec,
                sides=(side1, side2), extra=extra)

  def plan(self, x1: PyTree, x2: Optional[PyTree], *args, **kwargs) -> BlockPlan:
    """The blocks a call with these arguments evaluates (nothing is evaluated; the memory
    path compiles a few small blocks to measure them). Like the call, it must run outside
    `jax.jit`/`vmap`/`grad` (a `TypeError` otherwise)."""
    return self._prepare(x1, x2, args, kwargs)["plan"]

  # -- assembly ------------------------------------------------------------------------

  def _result_shapes(self, leaves, roles, n1, n2):
    shapes = []
    for l, r in zip(leaves, roles):
      if r == FULL:
        shapes.append((n1, n2) + tuple(l.shape[2:]))
      elif r == DIAGONAL:
        shapes.append((n1,) + tuple(l.shape[1:]))
      else:
        shapes.append(tuple(l.shape))
    return shapes

  def _device_update(self, roles, perms, diag: bool, mirror: bool) -> Callable:
    key = (tuple(roles), tuple(perms), diag, mirror)
    fn = self._update_cache.get(key)
    if fn is not None:
      return fn

    def update(results, outs, s1, s2, w):
      new = []
      for res, out, role, perm in zip(results, outs, roles, perms):
        zeros = (jnp.zeros((), jnp.int32),) * (res.ndim - 2)
        for d in range(out.shape[0]):
          blk = out[d].astype(res.dtype)
          if role == FULL:
            res = jax.lax.dynamic_update_slice(res, blk, (s1[d], s2[d]) + zeros)
            if mirror:
              res = jax.lax.dynamic_update_slice(res, jnp.transpose(blk, perm),
                                                 (s2[d], s1[d]) + zeros)
          elif role == DIAGONAL and diag:
            res = jax.lax.dynamic_update_slice(
                res, blk, (s1[d],) + (jnp.zeros((), jnp.int32),) * (res.ndim - 1))
          elif role == TRACED and diag:
            res = res + w[d].astype(res.dtype) * blk
        new.append(res)
      return new

    fn = self._update_cache[key] = jax.jit(update, donate_argnums=0)
    return fn

  @staticmethod
  def _host_write(results, outs, tasks, roles, perms, diag: bool, mirror: bool):
    for res, out, role, perm in zip(results, outs, roles, perms):
      for d, t in enumerate(tasks):
        blk = out[d]
        if role == FULL:
          res[t.start1:t.start1 + t.size1, t.start2:t.start2 + t.size2] = blk
          if mirror:
            res[t.start2:t.start2 + t.size2, t.start1:t.start1 + t.size1] = \
                np.transpose(blk, perm)
        elif role == DIAGONAL and diag:
          res[t.start1:t.start1 + t.size1] = blk
        elif role == TRACED and diag:
          res += np.asarray(t.weight, res.dtype) * blk

  @staticmethod
  def _fetch(outs):
    """Round outputs as host numpy arrays (gathered across processes when multi-host)."""
    if all(o.is_fully_addressable for o in outs):
      return [np.asarray(o) for o in outs]
    from jax.experimental import multihost_utils
    return [np.asarray(o) for o in multihost_utils.process_allgather(outs, tiled=True)]

  # -- call ----------------------------------------------------------------------------

  def __call__(self, x1: PyTree, x2: Optional[PyTree], *args, **kwargs) -> PyTree:
    """Θ(x1, x2) assembled from blocks. Runs eagerly: a `TypeError` inside `jax.jit` (or any
    other transformation); `kernel_fn` itself is jitted per block."""
    prep = self._prepare(x1, x2, args, kwargs)
    plan, tasks, roles, perms = prep["plan"], prep["tasks"], prep["roles"], prep["perms"]
    n_dev = len(self.devices)
    dev0 = self.devices[0]
    shapes = self._result_shapes(prep["leaves"], roles, plan.n1, plan.n2)
    dtypes = [l.dtype for l in prep["leaves"]]
    if self.store_on_host:
      results = [np.zeros(s, d) if r == TRACED else np.empty(s, d)
                 for s, d, r in zip(shapes, dtypes, roles)]
    else:
      results = [jnp.zeros(s, d, device=dev0) for s, d in zip(shapes, dtypes)]

    sharded = NamedSharding(self.mesh, P(BLOCK_AXIS))
    dyn = jax.device_put(prep["dyn"], NamedSharding(self.mesh, P()))
    side1, side2 = prep["sides"]

    groups: dict = {}
    for t in tasks:
      groups.setdefault((t.kind, t.diag, t.size1, t.size2), []).append(t)

    bar = None
    if self.progress:
      try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tasks), desc="kernel blocks", unit="block", disable=None,
                   file=sys.stderr)
      except ImportError:
        bar = None

    def gather(x, starts, size):
      idx = np.asarray(starts)[:, None] + np.arange(size)[None, :]
      return jax.device_put(jax.tree.map(lambda a: a[idx], x), sharded)

    def write(pending):
      outs, chunk, padded, diag, mirror = pending
      if self.store_on_host:
        self._host_write(results, self._fetch(outs), chunk, roles, perms, diag, mirror)
      else:
        outs = [jax.device_put(o, dev0) if o.is_fully_addressable
                else jax.device_put(self._fetch([o])[0], dev0) for o in outs]
        s1 = np.asarray([t.start1 for t in padded], np.int32)
        s2 = np.asarray([t.start2 for t in padded], np.int32)
        w = np.asarray([t.weight for t in padded], np.float64 if jax.config.jax_enable_x64
                       else np.float32)
        results[:] = self._device_update(roles, perms, diag, mirror)(results, outs, s1, s2, w)
      if bar is not None:
        bar.update(len(chunk))

    pending = None
    try:
      with self._precision_ctx():
        for (kind, diag, size1, size2), group in groups.items():
          fn = self._round_fn(prep["key"], prep["rebuild"], prep["spec"], kind, self.mesh)
          mirror = plan.mirrored and kind == "pair"
          for start in range(0, len(group), n_dev):
            chunk = group[start:start + n_dev]
            padded = chunk + [dataclasses.replace(chunk[-1], weight=0.0)] * (n_dev - len(chunk))
            starts1 = [t.start1 for t in padded]
            s1r = gather(side1, starts1, size1)
            if kind == "sym":
              outs = fn(s1r, gather(prep["extra"], starts1, size1), dyn)
            else:
              outs = fn(s1r, gather(side2, [t.start2 for t in padded], size2), dyn)
            outs = jax.tree.leaves(outs)
            if pending is not None:
              write(pending)
            pending = (outs, chunk, padded, diag, mirror)
        if pending is not None:
          write(pending)
    finally:
      if bar is not None:
        bar.close()
    return prep["treedef"].unflatten(results)


def batch(kernel_fn: Callable[..., PyTree], batch_size: Union[None, int, tuple[int, int]] = None,
          *, memory_bytes: Optional[float] = None, store_on_host: bool = False,
          devices: Optional[Sequence[Any]] = None, mesh: Optional[Mesh] = None,
          precision: precision_lib.Precision = None, progress: bool = False,
          trace_axes: Any = None, diagonal_axes: Any = None,
          kwargs_axes: Optional[Mapping[str, Optional[int]]] = None) -> Blocked:
  """Evaluates `kernel_fn` in blocks of x1 × x2, bounded in memory and spread over devices.

  Args:
    kernel_fn: `fn(x1, x2, *args, **kwargs)` returning a pytree of kernels in this package's
      layout, e.g. `empirical_ntk_fn(f)` (args: params), `empirical_nngp_fn(f)` or
      `empirical_kernel_fn(f)` (args: get, params). The batch axis must be axis 0 of every
      input leaf and of every model output leaf (so kernels are (N1, N2, ...), (N, ...) with
      a diagonal batch axis, or have no N axis with a traced one).
    batch_size: examples per block, an int or a pair (b1, b2) for x1 and x2; any positive
      value works for any N (no divisibility rule). Symmetric (`x2=None`) calls and kernels
      with a diagonal or traced batch axis use square blocks of min(b1, b2).
    memory_bytes: instead of `batch_size`, a per-device memory budget for evaluating one
      block. The block size is the largest b (b × b blocks) whose compiled memory fits:
      XLA's `memory_analysis()` of one block (arguments including the parameters, plus
      temporaries, plus twice the output block since one finished block may still be held
      while the next runs) is measured at b = 1, 2, 4, fitted by a quadratic in b, and the
      chosen b is compiled and checked again (shrunk until it fits). It bounds XLA's buffer
      assignment for one block; it does not count the assembled kernel on device (use
      `store_on_host=True` to keep that off the device), other live arrays of your program,
      allocator fragmentation, or runtime workspace outside XLA's accounting (e.g. cuDNN /
      cuBLAS scratch), so leave headroom (e.g. half the device memory).
    store_on_host: gather finished blocks into host numpy arrays (the result is numpy), so the
      kernel may be larger than device memory. Otherwise the result is a jax array on the
      first device.
    devices / mesh: devices to spread blocks over (default: `jax.local_devices()`); a mesh is
      flattened to its devices. Each round evaluates one block per device with `shard_map`.
    precision: matmul precision for every block (`jax.default_matmul_precision` names such as
      'highest', or a `jax.lax.Precision`); None keeps the ambient setting.
    progress: show a tqdm bar over blocks (only on a terminal).
    trace_axes, diagonal_axes: the axes `kernel_fn` was built with. Only needed to mirror
      blocks of `x2=None` calls when they cannot be read from `kernel_fn` (this package's
      kernel functions, and functions that close over them, are recognised); giving one
      implies the neural-tangents default for the other ((-1,) and ()).
    kwargs_axes: {kwarg name: batch axis, or None} for per-example keyword arguments (default:
      none; other kwargs go unchanged to every block). A per-example kwarg is sliced along its
      axis like the inputs (every leaf of a pytree), and its batch axis must have N1 (N2)
      entries. Give it as a 2-tuple `(for_x1, for_x2)`; with `x2=None` one array also works
      (it belongs to both sides). Each block hands it to `kernel_fn` in neural-tangents'
      per-side form: the 2-tuple (rows of block i, rows of block j), or, for a diagonal block
      of an `x2=None` call given one array, its rows alone (see the module docstring). This
      matches `empirical_ntk_fn(f, vmap_axes=(in_axes, out_axes, kwargs_axes))`.

  Returns:
    `blocked(x1, x2, *args, **kwargs)` with `kernel_fn`'s signature and result (pytree and
    layout), plus `blocked.plan(x1, x2, *args, **kwargs)` returning the `BlockPlan`. Both run
    eagerly, block by block, and raise a `TypeError` when called inside `jax.jit`, `jax.vmap`
    or `jax.grad` (call them outside; `kernel_fn` is already jitted per block).
  """
  sizes = _check_batch_size(batch_size)
  budget = _check_memory_bytes(memory_bytes)
  if sizes is None and budget is None:
    raise ValueError("batch() needs `batch_size` (examples per block) or `memory_bytes` (a "
                     "per-device memory budget).")
  if sizes is not None and budget is not None:
    raise ValueError("Pass either `batch_size` or `memory_bytes`, not both.")
  if not callable(kernel_fn):
    raise TypeError(f"`kernel_fn` must be callable, got {type(kernel_fn).__name__}.")
  output_axes = None
  if trace_axes is not None or diagonal_axes is not None:
    output_axes = axes_lib.OutputAxes.create((-1,) if trace_axes is None else trace_axes,
                                             () if diagonal_axes is None else diagonal_axes)
  return Blocked(kernel_fn, sizes, budget, store_on_host, _resolve_devices(devices, mesh),
                 precision_lib.canonical_precision(precision), bool(progress), output_axes,
                 kwargs_axes)
