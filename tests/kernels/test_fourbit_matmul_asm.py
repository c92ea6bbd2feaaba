"""The inline PTX of the 4-bit pair decode (``_pairs``), run by a small PTX interpreter on CPU.

The interpret-mode kernel tests emulate the PTX blocks with jnp, so they cannot catch a
mistake in the PTX text itself (a wrong byte selector, a swapped operand). Here each block is
executed instruction by instruction on random operands, packed the way Triton packs one
instance (``pack=4``: four uint8 in one register, two 16-bit floats per register, one register
per 32-bit element), and compared with the semantics ``_pairs`` documents.
"""

from __future__ import annotations

import math
import re

import ml_dtypes
import numpy as np
import pytest

from jaxquant import codebooks
from pallas_kernels.fourbit_matmul import _lut, _pairs

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _f32(bits: int) -> float:
  return float(np.uint32(bits).view(np.float32))


def _bits32(value: float) -> int:
  return int(np.float32(value).view(np.uint32))


def _round16(value: float, kind: str) -> int:
  """``value`` rounded to nearest-even bf16/f16, as 16 bits (computed independently of
  ``ml_dtypes``: bf16 by rounding the mantissa to 8 bits)."""
  if kind == "f16":
    return int(np.float16(value).view(np.uint16))
  if value == 0.0:
    return 0x8000 if math.copysign(1.0, value) < 0 else 0
  mant, exp = math.frexp(value)
  rounded = round(mant * 256) * 2.0 ** (exp - 8)  # round() is half-to-even
  return _bits32(rounded) >> 16


def _from16(bits: int, kind: str) -> float:
  if kind == "f16":
    return float(np.uint16(bits).view(np.float16))
  return _f32(bits << 16)


def _lanes(word: int, kind: str) -> tuple[float, float]:
  return _from16(word & 0xFFFF, kind), _from16(word >> 16, kind)


def _pack(lo: int, hi: int) -> int:
  return (hi << 16) | lo


def run_ptx(asm: str, operands: dict[int, int]) -> dict[int, int]:
  """Execute the PTX subset of ``_pairs`` with ``$n`` inputs given as 32-bit values;
  returns every ``$n`` written."""
  regs: dict[str, int] = {}
  out: dict[int, int] = {}

  def val(tok: str) -> int:
    tok = tok.strip()
    if tok.startswith("$"):
      return operands[int(tok[1:])]
    if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", tok):
      return int(tok, 0)
    return regs[tok]

  def put(tok: str, value: int) -> None:
    value &= 0xFFFFFFFF
    if tok.startswith("$"):
      out[int(tok[1:])] = value
    else:
      regs[tok] = value

  for line in asm.replace("{\n", "\n").replace("\n}", "\n").split(";"):
    line = line.strip()
    if not line or line.startswith(".reg") or line in "{}":
      continue
    op, rest = line.split(None, 1)
    if op == "mov.b32" and rest.startswith("{"):  # unpack into two 16-bit registers
      dst, src = rest.rsplit(",", 1)
      lo, hi = [t.strip() for t in dst.strip("{} ").split(",")]
      word = val(src)
      regs[lo], regs[hi] = word & 0xFFFF, word >> 16
      continue
    args = [t.strip() for t in rest.split(",")]
    d, src = args[0], [val(t) for t in args[1:]]
    kind = "bf16" if "bf16" in op else "f16"
    if op == "and.b32":
      put(d, src[0] & src[1])
    elif op == "shr.b32":
      put(d, src[0] >> src[1])
    elif op == "shl.b32":
      put(d, src[0] << src[1])
    elif op == "lop3.b32":
      a, b, c, lut = src
      put(d, sum(((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1))) & 1)
                 << i for i in range(32)))
    elif op == "prmt.b32":
      pool = [(src[0] >> (8 * i)) & 0xFF for i in range(4)]
      pool += [(src[1] >> (8 * i)) & 0xFF for i in range(4)]
      word = 0
      for i in range(4):
        sel = (src[2] >> (4 * i)) & 0xF
        byte = pool[sel & 7]
        if sel & 8:
          byte = 0xFF if byte & 0x80 else 0
        word |= byte << (8 * i)
      put(d, word)
    elif op in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):
      put(d, _pack(_round16(_f32(src[1]), kind), _round16(_f32(src[0]), kind)))
    elif op in ("mul.rn.bf16x2", "mul.rn.f16x2", "fma.rn.bf16x2", "fma.rn.f16x2"):
      a, b = _lanes(src[0], kind), _lanes(src[1], kind)
      c = _lanes(src[2], kind) if op.startswith("fma") else (0.0, 0.0)
      put(d, _pack(*(_round16(a[i] * b[i] + c[i], kind) for i in range(2))))
    elif op == "cvt.f32.f16":
      put(d, _bits32(float(np.uint16(src[0]).view(np.float16))))
    elif op == "fma.rn.f32":
      put(d, _bits32(_f32(src[0]) * _f32(src[1]) + _f32(src[2])))
    else:
      raise NotImplementedError(f"PTX op {op!r} is not interpreted")
  return out


def _instance(rng, code, dtype_name: str):
  """Random operands of one instance: bytes, absmax, tables, even/odd x, accumulators."""
  dt = DTYPES[dtype_name]
  packed = rng.integers(0, 256, 4)
  scale = rng.uniform(0.01, 2.0, 4).astype(np.float32)
  tables = [int(t) for t in np.asarray(_lut.code_tables(code, dtype_name))]
  return packed, scale, tables, dt


def _codes():
  rng = np.random.default_rng(5)
  return {"nf4": codebooks.get_codebook("nf4"), "fp4": codebooks.get_codebook("fp4"),
          "random": np.sort(rng.uniform(-1, 1, 16)).astype(np.float32)}


def _common_operands(first: int, packed, scale, tables) -> tuple[dict[int, int], int]:
  ops = {first: int(sum(int(b) << (8 * i) for i, b in enumerate(packed)))}
  i = first + 1
  for s in scale:
    ops[i] = _bits32(s)
    i += 1
  for t in tables:
    for _ in range(4):
      ops[i] = t
      i += 1
  return ops, i


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("code_name", ["nf4", "fp4", "random"])
def test_decode_asm(dtype_name, code_name):
  code = _codes()[code_name]
  rng = np.random.default_rng(len(code_name) * 7 + len(dtype_name))
  asm, constraints = _pairs.decode_asm(DTYPES[dtype_name])
  assert constraints.count(",") + 1 == 4 + 1 + 4 + 32
  for _ in range(50):
    packed, scale, tables, dt = _instance(rng, code, dtype_name)
    ops, _ = _common_operands(4, packed, scale, tables)
    got = run_ptx(asm, ops)
    c16 = code.astype(dt).astype(np.float32)
    s16 = scale.astype(dt).astype(np.float32)
    for j in range(4):
      even = (c16[packed[j] >> 4] * s16[j]).astype(dt).view(np.uint16)
      odd = (c16[packed[j] & 0xF] * s16[j]).astype(dt).view(np.uint16)
      reg, lane = divmod(j, 2)
      assert (got[reg] >> (16 * lane)) & 0xFFFF == even, (j, "even")
      assert (got[2 + reg] >> (16 * lane)) & 0xFFFF == odd, (j, "odd")


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_dot_asm(dtype_name, rows):
  code = _codes()["nf4"]
  rng = np.random.default_rng(rows * 11 + len(dtype_name))
  tol = 2.0 ** -7 if dtype_name == "bfloat16" else 2.0 ** -9
  asm, constraints = _pairs.dot_asm(DTYPES[dtype_name], rows)
  assert constraints.count(",") + 1 == 4 * rows + 1 + 4 + 32 + 8 * rows
  for _ in range(50):
    packed, scale, tables, dt = _instance(rng, code, dtype_name)
    ops, i = _common_operands(4 * rows, packed, scale, tables)
    xs, accs = [], []
    for _ in range(rows):
      xe = rng.standard_normal(4).astype(dt)
      xo = rng.standard_normal(4).astype(dt)
      acc = rng.standard_normal(4).astype(np.float32)
      for x in (xe, xo):
        bits = x.view(np.uint16).astype(int)
        ops[i], ops[i + 1] = _pack(bits[0], bits[1]), _pack(bits[2], bits[3])
        i += 2
      for a in acc:
        ops[i] = _bits32(a)
        i += 1
      xs.append((xe.astype(np.float64), xo.astype(np.float64)))
      accs.append(acc.astype(np.float64))
    got = run_ptx(asm, ops)
    c16 = code.astype(dt).astype(np.float64)
    for r, ((xe, xo), acc) in enumerate(zip(xs, accs)):
      for j in range(4):
        terms = c16[packed[j] >> 4] * xe[j], c16[packed[j] & 0xF] * xo[j]
        want = acc[j] + scale[j] * (terms[0] + terms[1])
        bound = tol * scale[j] * (abs(terms[0]) + abs(terms[1])) + 1e-6 * (abs(acc[j]) + 1)
        assert abs(_f32(got[4 * r + j]) - want) <= bound, (r, j)


def test_interpreter_catches_a_wrong_selector():
  """The check above can fail: the decode with even and odd selectors swapped is rejected."""
  asm, _ = _pairs.decode_asm(ml_dtypes.bfloat16)
  swapped = asm.replace("0x7351", "0xTMP").replace("0x6240", "0x7351").replace("0xTMP", "0x6240")
  code = _codes()["nf4"]
  rng = np.random.default_rng(0)
  packed, scale, tables, dt = _instance(rng, code, "bfloat16")
  packed[0] = 0x0F  # hi nibble 0, lo nibble 15: different codes
  ops, _ = _common_operands(4, packed, scale, tables)
  good, bad = run_ptx(asm, ops), run_ptx(swapped, ops)
  even = (code.astype(dt).astype(np.float32)[0] * scale.astype(dt).astype(np.float32)[0])
  assert good[0] & 0xFFFF == even.astype(dt).view(np.uint16)
  assert bad[0] & 0xFFFF != good[0] & 0xFFFF
