"""Run folders that survive crashes: atomic writes, checkpoints and resume.

Every file is written to a temporary sibling and moved into place with `os.replace`, so a
reader (or a resumed run) never sees a half-written file, whatever interrupts the writer.

JSON is strict (RFC 8259): a non-finite float (NaN, +inf, -inf), which has no JSON literal, is
written as `null` (as JavaScript's `JSON.stringify` and pandas do), and when the document is an
object its top-level key "non_finite" maps the JSON Pointer of each such null to "nan", "inf"
or "-inf", e.g. `"non_finite": {"/evals/0/accuracy": "nan"}`. `read_json` puts the floats
back; other readers see null.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import pathlib
import signal
import tempfile
import threading
import zipfile
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

PyTree = Any


@contextlib.contextmanager
def interrupts_deferred():
  """Holds Ctrl-C (SIGINT) back until the block ends, then raises the KeyboardInterrupt.

  A KeyboardInterrupt raised inside `zipfile` or `np.savez` leaves the archive half-written
  and can be replaced by a `ValueError` from the archive's own cleanup, so the user sees a
  confusing error and loses the checkpoint being written. Only the main thread receives
  signals, and only Python's default handler is swapped: elsewhere this does nothing.
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  received = []
  signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if received:
    raise KeyboardInterrupt


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically (temporary file in the same folder, then rename).
  A Ctrl-C during the write is raised once the file is in place."""
  with interrupts_deferred():
    return _atomic_write_bytes(path, data)


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  try:
    # mkstemp creates 0600 files; give the result the permissions of an ordinary new file.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "wb") as fh:
      fh.write(data)
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  return path


class CorruptCheckpointError(ValueError):
  """A checkpoint file exists but cannot be read (truncated, not an `.npz`, damaged)."""


def _jsonable(obj):
  if isinstance(obj, (np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, (np.floating, np.integer, np.bool_)):
    return obj.item()
  if isinstance(obj, pathlib.Path):
    return str(obj)
  raise TypeError(f"cannot write {type(obj).__name__} as JSON")


NON_FINITE_KEY = "non_finite"
_NON_FINITE_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _non_finite_name(x: float) -> str:
  return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _pointer_token(key: Any) -> str:
  return str(key).replace("~", "~0").replace("/", "~1")


def to_strict_json(obj: Any, _path: str = "", _found: Optional[dict] = None) -> Any:
  """`obj` with arrays as lists, numpy scalars and paths as Python values, and every
  non-finite float (NaN, ±inf) replaced by None; with a dict `_found`, records there the JSON
  Pointer of each replaced float -> "nan", "inf" or "-inf". Raises TypeError for anything
  else JSON cannot hold."""
  if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
    return obj
  if isinstance(obj, float):
    if math.isfinite(obj):
      return float(obj)
    if _found is not None:
      _found[_path] = _non_finite_name(obj)
    return None
  if isinstance(obj, Mapping):
    return {k: to_strict_json(v, f"{_path}/{_pointer_token(k)}", _found)
            for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_strict_json(v, f"{_path}/{i}", _found) for i, v in enumerate(obj)]
  return to_strict_json(_jsonable(obj), _path, _found)


def strict_json_dumps(obj: Any, **kwargs: Any) -> str:
  """`json.dumps` with `allow_nan=False` after `to_strict_json`: never NaN or Infinity. For an
  object (dict) holding non-finite floats, adds the "non_finite" key (see the module
  docstring) unless `obj` already has one."""
  found: dict = {}
  encoded = to_strict_json(obj, "", found)
  if found and isinstance(encoded, dict) and NON_FINITE_KEY not in encoded:
    encoded[NON_FINITE_KEY] = found
  return json.dumps(encoded, allow_nan=False, **kwargs)


def restore_non_finite(obj: Any) -> Any:
  """Undoes `strict_json_dumps`' encoding in a parsed document: pops the top-level
  "non_finite" map and puts its floats back at their JSON Pointers (in place)."""
  if not isinstance(obj, dict) or not isinstance(obj.get(NON_FINITE_KEY), dict):
    return obj
  for pointer, name in obj.pop(NON_FINITE_KEY).items():
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
    if not tokens or name not in _NON_FINITE_NAMES:
      continue
    parent = obj
    try:
      for t in tokens[:-1]:
        parent = parent[int(t)] if isinstance(parent, list) else parent[t]
      last = int(tokens[-1]) if isinstance(parent, list) else tokens[-1]
      if parent[last] is None:
        parent[last] = _NON_FINITE_NAMES[name]
    except (KeyError, IndexError, ValueError, TypeError):
      continue  # a pointer that does not fit the document is ignored
  return obj


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file written by `atomic_write_json`, non-finite floats restored."""
  return restore_non_finite(json.loads(pathlib.Path(path).read_text()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  """Writes `obj` as indented strict JSON: arrays become lists, and non-finite floats (NaN,
  ±inf), which JSON cannot hold, become null, listed under "non_finite" (module docstring)."""
  text = strict_json_dumps(obj, indent=2, sort_keys=True)
  return atomic_write_bytes(path, (text + "\n").encode())


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str],
                     rows: Iterable[Sequence[Any]]) -> pathlib.Path:
  """Writes a CSV file with a header row."""
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(header)
  for row in rows:
    writer.writerow([_jsonable(v) if isinstance(v, (np.generic,)) else v for v in row])
  return atomic_write_bytes(path, buf.getvalue().encode())


def save_checkpoint(path: str | os.PathLike, tree: PyTree, *, step: int,
                    extra: Optional[Mapping[str, Any]] = None) -> pathlib.Path:
  """Saves the leaves of `tree` (params, optimizer state, PRNG keys) and the step, atomically.

  Restoring needs a template with the same structure (`load_checkpoint`), which keeps the
  file format plain `.npz` and independent of JAX's internal pytree classes. A Ctrl-C during
  the save is raised once the file is in place.
  """
  with interrupts_deferred():
    return _save_checkpoint(path, tree, step=step, extra=extra)


def _save_checkpoint(path, tree, *, step, extra):
  leaves = jax.tree.leaves(tree)
  arrays = {f"leaf_{i:05d}": np.asarray(jax.random.key_data(x)
                                        if _is_typed_key(x) else x)
            for i, x in enumerate(leaves)}
  # `.npy` has no code for ml_dtypes' types (bfloat16, float8_*): they are stored as raw bytes
  # ("V2"), and their names here let `load_checkpoint` tell them apart.
  dtypes = [str(arrays[f"leaf_{i:05d}"].dtype) for i in range(len(leaves))]
  meta = {"step": int(step), "num_leaves": len(leaves), "dtypes": dtypes,
          "extra": dict(extra or {})}
  arrays["__meta__"] = np.frombuffer(strict_json_dumps(meta).encode(), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return atomic_write_bytes(path, buf.getvalue())


def _is_typed_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def load_checkpoint(path: str | os.PathLike, template: PyTree
                    ) -> Optional[tuple[int, PyTree, dict]]:
  """Returns `(step, tree, extra)` from `save_checkpoint`, or None if `path` does not exist.

  `template` fixes the pytree structure, leaf shapes and dtypes (PRNG key leaves: their key
  implementation and shape); a leaf that does not match raises ValueError naming it, since a
  cast would resume from values other than those saved. A file that cannot be read
  (truncated, damaged, not written by `save_checkpoint`) raises `CorruptCheckpointError`.
  Non-finite floats in `extra` round-trip.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return None
  try:
    with np.load(path) as data:
      arrays = {name: data[name] for name in data.files}
    # Older checkpoints hold bare NaN, which json.loads also accepts.
    meta = restore_non_finite(json.loads(bytes(arrays["__meta__"]).decode()))
    num_leaves, step, extra = int(meta["num_leaves"]), int(meta["step"]), dict(meta["extra"])
    stored = [arrays[f"leaf_{i:05d}"] for i in range(num_leaves)]
    # Older checkpoints have no names; an ml_dtypes leaf of theirs could never be loaded.
    names = meta.get("dtypes") or [str(a.dtype) for a in stored]
    stored = [a.view(jax.numpy.dtype(name)) if a.dtype.kind == "V" and str(a.dtype) != name
              else a for a, name in zip(stored, names)]
  except (zipfile.BadZipFile, EOFError, OSError, KeyError, TypeError, ValueError) as e:
    raise CorruptCheckpointError(
        f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); delete it to "
        "start over, or use another output folder.") from e
  t_leaves, treedef = jax.tree.flatten(template)
  if num_leaves != len(t_leaves):
    raise ValueError(f"checkpoint {path} holds {num_leaves} leaves but the template "
                     f"has {len(t_leaves)}: it was written by a different configuration.")
  leaves = []
  for i, (arr, t) in enumerate(zip(stored, t_leaves)):
    # What `save_checkpoint` would have stored for the template's leaf.
    expected = jax.random.key_data(t) if _is_typed_key(t) else t
    shape = np.shape(expected)
    dtype = np.dtype(expected.dtype if hasattr(expected, "dtype") else
                     np.asarray(expected).dtype)
    if arr.shape != shape or arr.dtype != dtype:
      what = (f"a PRNG key array of shape {np.shape(t)} ({jax.random.key_impl(t)})"
              if _is_typed_key(t) else "an array")
      raise ValueError(f"checkpoint {path}: leaf {i} is stored with shape {arr.shape} and "
                       f"dtype {arr.dtype}; the template expects {what} stored with shape "
                       f"{shape} and dtype {dtype}: it was written by a different "
                       "configuration.")
    if _is_typed_key(t):
      leaves.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(t)))
      continue
    leaves.append(jax.numpy.asarray(arr, dtype=jax.numpy.result_type(t)))
  return step, treedef.unflatten(leaves), extra
