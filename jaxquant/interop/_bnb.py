"""bitsandbytes / transformers state-dict keys <-> QuantStates, byte for byte.

4-bit (``Linear4bit``, ``QuantState.as_dict(packed=True)``), for a parameter ``W`` (e.g.
``model.layers.0.mlp.up_proj.weight``):

===========================================  ================================================
``W``                                        packed codes, ``uint8 [(n+1)//2, 1]`` (or an
                                             int8/float16/bfloat16/float32 view of the bytes)
``W.absmax``                                 ``float32 [n_blocks]`` (``uint8`` when nested)
``W.quant_map``                              ``float32 [16]``
``W.nested_absmax``, ``W.nested_quant_map``  double quantization only
``W.quant_state.bitsandbytes__<nf4|fp4>``    ``uint8``: UTF-8 of ``json.dumps({"quant_type",
                                             "blocksize", "dtype", "shape"[, "nested_blocksize",
                                             "nested_dtype", "nested_offset"]})``
===========================================  ================================================

8-bit (``Linear8bitLt``), module prefix ``P``: ``P.weight`` ``int8 [N, K]``, ``P.SCB``
``float32 [N]`` (row absmax), ``P.weight_format`` ``uint8 []`` = 0 (row-major).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxquant import _validate
from jaxquant.functional import _layout
from jaxquant.quant_state import FOUR_BIT_TYPES, QuantState

BLOB = "quant_state.bitsandbytes__"
AUX_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
JSON_KEYS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
             "nested_offset"}
JSON_DTYPES = ("float16", "bfloat16", "float32")
# bnb's quant_storage: any dtype of its dtype2bytes table (transformers' bnb_4bit_quant_storage).
STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32")
WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


@dataclasses.dataclass(frozen=True)
class Group:
  """The checkpoint keys that make up one parameter."""

  name: str                  # parameter name, e.g. "model.layers.0.mlp.up_proj.weight"
  kind: str                  # "4bit", "int8" or "plain"
  keys: dict[str, str]       # role -> checkpoint key ("weight", "absmax", "SCB", "blob", ...)


def group_keys(keys: list[str]) -> list[Group]:
  """Group the keys of a bitsandbytes checkpoint by parameter, in first-key order.

  Raises:
    ValueError: 4-bit statistics without their quant_state blob, an 8-bit weight_format without
      SCB (or SCB without its weight), keys under a 4-bit parameter that bitsandbytes does not
      write.
  """
  keyset = set(keys)
  claimed: dict[str, Group] = {}
  groups: dict[str, Group] = {}
  for k in keys:
    if BLOB in k:
      base, _, _ = k.partition("." + BLOB) if ("." + BLOB) in k else ("", "", "")
      if not base:
        raise ValueError(f"tensor {k!r}: a quant_state blob must follow a parameter name "
                         f"('<name>.{BLOB}<type>')")
      roles = {"weight": base, "blob": k}
      for aux in AUX_4BIT:
        if f"{base}.{aux}" in keyset:
          roles[aux] = f"{base}.{aux}"
      if base not in keyset:
        raise ValueError(f"tensor {base!r} (the packed 4-bit weight) is missing; the checkpoint "
                         f"has its quant state {k!r}")
      extra = [o for o in keys if o.startswith(base + ".") and o not in roles.values()]
      if extra:
        raise ValueError(f"tensor(s) {extra} under the 4-bit parameter {base!r} are not part of "
                         "the bitsandbytes format (expected .absmax, .quant_map, "
                         f".nested_absmax, .nested_quant_map, .{BLOB}<nf4|fp4>)")
      groups[base] = Group(base, "4bit", roles)
  for k in keys:
    if k == "SCB" or k.endswith(".SCB"):
      prefix = k[:-3]
      weight = prefix + "weight"
      if weight not in keyset:
        raise ValueError(f"tensor {weight!r} (the int8 weight) is missing; the checkpoint has its "
                         f"scales {k!r}")
      roles = {"weight": weight, "SCB": k}
      if prefix + "weight_format" in keyset:
        roles["weight_format"] = prefix + "weight_format"
      groups[weight] = Group(weight, "int8", roles)
    elif k == "weight_format" or k.endswith(".weight_format"):
      if k[: -len("weight_format")] + "SCB" not in keyset:
        raise ValueError(f"tensor {k[:-len('weight_format')] + 'SCB'!r} (the int8 row scales) is "
                         f"missing; the checkpoint has {k!r} of a Linear8bitLt")
  for g in groups.values():
    for key in g.keys.values():
      claimed[key] = g
  for k in keys:
    for aux in AUX_4BIT:
      if k.endswith("." + aux) and k not in claimed:
        base = k[: -len(aux) - 1]
        raise ValueError(f"tensor {base}.{BLOB}<nf4|fp4> is missing: the checkpoint has the 4-bit "
                         f"statistics {k!r} but not the quant_state JSON that describes them")
  out: list[Group] = []
  done: set[str] = set()
  for k in keys:
    g = claimed.get(k)
    if g is None:
      out.append(Group(k, "plain", {"weight": k}))
    elif g.name not in done:
      done.add(g.name)
      out.append(g)
  return out


def _err(key: str, msg: str) -> ValueError:
  return ValueError(f"tensor {key!r}: {msg}")


def _need(key: str, a: np.ndarray, count: int, dtypes: tuple[str, ...], what: str) -> None:
  got = int(math.prod(a.shape))
  if np.dtype(a.dtype).name not in dtypes or got != count:
    raise _err(key, f"{what} must hold {count} values of dtype {' or '.join(dtypes)}, got shape "
                    f"{list(a.shape)} dtype {np.dtype(a.dtype).name}")


def _is_int(v: Any) -> bool:
  """A JSON integer (not a float such as ``64.0``, not a bool)."""
  return isinstance(v, int) and not isinstance(v, bool)


def decode_blob(key: str, blob: np.ndarray) -> dict[str, Any]:
  """The JSON dict of a quant_state blob, validated."""
  if np.dtype(blob.dtype) != np.uint8 or blob.ndim != 1:
    raise _err(key, f"a quant_state blob must be a 1-D uint8 tensor, got {blob.dtype} "
                    f"{list(blob.shape)}")
  try:
    d = json.loads(bytes(blob).decode("utf-8"))
    assert isinstance(d, dict)
  except (UnicodeDecodeError, ValueError, AssertionError):
    raise _err(key, "is not the UTF-8 JSON dict bitsandbytes writes (corrupted?)") from None
  unknown = sorted(set(d) - JSON_KEYS)
  if unknown:
    raise _err(key, f"unknown quant_state fields {unknown}; accepted: {sorted(JSON_KEYS)}")
  qt = key.rsplit(BLOB, 1)[1]
  if qt not in FOUR_BIT_TYPES:
    raise _err(key, f"unknown quant type {qt!r}; accepted: {FOUR_BIT_TYPES}")
  if d.get("quant_type") != qt:
    raise _err(key, f"quant_type {d.get('quant_type')!r} in the JSON disagrees with the key's "
                    f"{qt!r}")
  for field in ("blocksize", "dtype", "shape"):
    if field not in d:
      raise _err(key, f"the quant_state JSON lacks {field!r}")
  if not _is_int(d["blocksize"]) or d["blocksize"] not in _validate.BLOCKSIZES_4BIT:
    raise _err(key, f"blocksize must be one of {_validate.BLOCKSIZES_4BIT}, got {d['blocksize']!r}")
  if d["dtype"] not in JSON_DTYPES:
    raise _err(key, f"dtype must be one of {JSON_DTYPES}, got {d['dtype']!r}")
  shape = d["shape"]
  if not (isinstance(shape, list) and shape and all(_is_int(s) and s > 0 for s in shape)):
    raise _err(key, f"shape must be a list of positive ints, got {shape!r}")
  nested = [f for f in ("nested_blocksize", "nested_dtype", "nested_offset") if f in d]
  if nested and len(nested) != 3:
    raise _err(key, f"double quantization needs nested_blocksize, nested_dtype and nested_offset, "
                    f"got only {nested}")
  if nested:
    if d["nested_dtype"] != "float32":
      raise _err(key, f"nested_dtype must be 'float32', got {d['nested_dtype']!r}")
    if not _is_int(d["nested_blocksize"]) or d["nested_blocksize"] <= 0:
      raise _err(key, f"nested_blocksize must be a positive int, got {d['nested_blocksize']!r}")
    if not isinstance(d["nested_offset"], (int, float)) or not math.isfinite(d["nested_offset"]):
      raise _err(key, f"nested_offset must be a finite number, got {d['nested_offset']!r}")
  return d


def encode_blob(state: QuantState) -> np.ndarray:
  """The quant_state blob bitsandbytes writes for ``state`` (same key order and separators)."""
  d: dict[str, Any] = {"quant_type": state.quant_type, "blocksize": int(state.blocksize),
                       "dtype": state.dtype.name, "shape": [int(s) for s in state.shape]}
  if state.nested:
    offset = np.asarray(state.offset, np.float32).reshape(())
    d.update({"nested_blocksize": int(state.nested_blocksize), "nested_dtype": "float32",
              "nested_offset": float(offset)})
  return np.frombuffer(json.dumps(d).encode("utf-8"), np.uint8).copy()


def _finite(key: str, a: np.ndarray, what: str, *, nonneg: bool = False) -> None:
  a32 = a.astype(np.float32)
  if not np.isfinite(a32).all() or (nonneg and (a32 < 0).any()):
    raise _err(key, f"{what} holds {'negative or ' if nonneg else ''}non-finite values "
                    "(corrupted file?)")


def state_from_4bit(g: Group, read: Callable[[str], np.ndarray],
                    put: Callable[[np.ndarray], Any]) -> QuantState:
  """A 4-bit QuantState from the tensors of group ``g`` (``read(key)`` gives each)."""
  blob_key = g.keys["blob"]
  d = decode_blob(blob_key, read(blob_key))
  shape, bs = tuple(d["shape"]), d["blocksize"]
  n = math.prod(shape)
  n_blocks = -(-n // bs)
  nested = "nested_blocksize" in d
  for role in ("absmax", "quant_map") + (("nested_absmax", "nested_quant_map") if nested else ()):
    if role not in g.keys:
      kind = "double-quantized " if nested else ""
      raise _err(f"{g.name}.{role}", f"is missing (needed by the {kind}4-bit parameter "
                                     f"{g.name!r}, {d['quant_type']} {list(shape)})")
  wkey = g.keys["weight"]
  raw = read(wkey)
  if np.dtype(raw.dtype).name not in STORAGE_DTYPES:
    raise _err(wkey, f"packed 4-bit data must be stored as {STORAGE_DTYPES} (bnb quant_storage), "
                     f"got {np.dtype(raw.dtype).name}")
  data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)  # bitcast, never a value cast
  _need(wkey, data, (n + 1) // 2, ("uint8",), f"packed data of shape {list(shape)} (as bytes)")
  absmax = read(g.keys["absmax"])
  _need(g.keys["absmax"], absmax, n_blocks, ("uint8",) if nested else ("float32",),
        f"absmax of {n_blocks} blocks of {bs}")
  code = read(g.keys["quant_map"])
  _need(g.keys["quant_map"], code, 16, ("float32",), "the 4-bit code")
  _finite(g.keys["quant_map"], code, "the code")
  fields: dict[str, Any] = dict(nested_absmax=None, nested_code=None, offset=None,
                                nested_blocksize=None)
  if nested:
    nbs = d["nested_blocksize"]
    nabs = read(g.keys["nested_absmax"])
    _need(g.keys["nested_absmax"], nabs, -(-n_blocks // nbs), ("float32",),
          f"nested absmax of {n_blocks} blocks in blocks of {nbs}")
    _finite(g.keys["nested_absmax"], nabs, "nested absmax", nonneg=True)
    ncode = read(g.keys["nested_quant_map"])
    _need(g.keys["nested_quant_map"], ncode, 256, ("float32",), "the nested code")
    _finite(g.keys["nested_quant_map"], ncode, "the nested code")
    fields = dict(nested_absmax=put(nabs.reshape(-1)), nested_code=put(ncode.reshape(-1)),
                  offset=put(np.asarray(d["nested_offset"], np.float32)), nested_blocksize=nbs)
  else:
    _finite(g.keys["absmax"], absmax, "absmax", nonneg=True)
  return QuantState(
      data=put(data.reshape(_layout.packed_shape(shape, bs))),
      absmax=put(absmax.reshape(_layout.absmax_shape(shape, bs))),
      code=put(code.reshape(-1)), shape=shape, dtype=jnp.dtype(d["dtype"]), blocksize=bs,
      quant_type=d["quant_type"], **fields)


def state_from_int8(g: Group, read: Callable[[str], np.ndarray], put: Callable[[np.ndarray], Any],
                    dtype: Any) -> QuantState:
  """An ``int8_rowwise`` QuantState from ``P.weight``, ``P.SCB`` (and ``P.weight_format``)."""
  wkey, skey = g.keys["weight"], g.keys["SCB"]
  w = read(wkey)
  if np.dtype(w.dtype) != np.int8 or w.ndim != 2:
    raise _err(wkey, f"an LLM.int8() weight must be int8 [out, in], got {w.dtype} {list(w.shape)}")
  scb = read(skey)
  _need(skey, scb, w.shape[0], ("float32",), f"row scales of the int8 weight {list(w.shape)}")
  _finite(skey, scb, "SCB", nonneg=True)
  if "weight_format" in g.keys:
    fkey = g.keys["weight_format"]
    f = read(fkey)
    if f.size != 1 or np.dtype(f.dtype).kind not in "iu":
      raise _err(fkey, f"must be an integer scalar, got {f.dtype} {list(f.shape)}")
    fmt = int(f.reshape(()))
    if fmt != 0:
      raise _err(fkey, f"weight format {fmt} ({WEIGHT_FORMATS.get(fmt, 'unknown')}) is not "
                       "supported; only row-major (0) weights, as bitsandbytes >= 0.43 writes")
  return QuantState(data=put(np.ascontiguousarray(w)), absmax=put(scb.reshape(-1)), code=None,
                    nested_absmax=None, nested_code=None, offset=None, shape=tuple(w.shape),
                    dtype=jnp.dtype(dtype), blocksize=int(w.shape[1]), quant_type="int8_rowwise")


def _np(a: Any) -> np.ndarray:
  import jax
  return np.asarray(jax.device_get(a))


def state_to_tensors(name: str, state: QuantState, quant_storage: str = "uint8"
                     ) -> dict[str, np.ndarray]:
  """The bitsandbytes tensors of one quantized parameter, in the order bitsandbytes lists them.

  Raises:
    ValueError: a quant type bitsandbytes cannot store as a weight (blockwise8), an int8 weight
      whose name does not end in ``weight``, a storage dtype that does not divide the bytes.
  """
  state.check()
  if state.quant_type in FOUR_BIT_TYPES:
    try:  # a name or a dtype (jnp.bfloat16, np.uint8, ...)
      storage = jnp.dtype(quant_storage).name
    except TypeError:
      storage = None
    if storage not in STORAGE_DTYPES:
      raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage!r}")
    quant_storage = storage
    data = _np(state.data).reshape(-1)
    item = np.dtype(jnp.dtype(quant_storage)).itemsize
    if data.size % item:
      raise ValueError(f"{name!r}: {data.size} packed bytes are not a multiple of "
                       f"{quant_storage}'s {item} bytes; save with quant_storage='uint8'")
    data = data.view(jnp.dtype(quant_storage)).reshape(-1, 1)
    out = {name: data, f"{name}.absmax": _np(state.absmax).reshape(-1),
           f"{name}.quant_map": _np(state.code).reshape(-1)}
    if state.nested:
      out[f"{name}.nested_absmax"] = _np(state.nested_absmax).reshape(-1)
      out[f"{name}.nested_quant_map"] = _np(state.nested_code).reshape(-1)
    out[f"{name}.{BLOB}{state.quant_type}"] = encode_blob(state)
    return out
  if state.quant_type == "int8_rowwise":
    if not (name == "weight" or name.endswith(".weight")):
      raise ValueError(f"{name!r}: bitsandbytes stores an LLM.int8() weight as '<module>.weight' "
                       "beside '<module>.SCB'; name the parameter '<module>.weight'")
    prefix = name[: -len("weight")]
    return {name: _np(state.data), f"{prefix}SCB": _np(state.absmax).reshape(-1),
            f"{prefix}weight_format": np.asarray(0, np.uint8)}
  raise ValueError(f"{name!r}: a {state.quant_type} QuantState has no bitsandbytes checkpoint "
                   "format (bitsandbytes saves nf4/fp4 and LLM.int8() weights); save optimizer "
                   "states with jaxquant.checkpoint")
