"""Codebooks equal bitsandbytes' tables bit for bit (bnb_maps.npz)."""

import numpy as np
import pytest

from jaxquant import codebooks
from tests.helpers import golden


def _bits(a):
  return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("signed,key", [(True, "dynamic_signed"), (False, "dynamic_unsigned")])
def test_dynamic_map_bit_identical(signed, key):
  np.testing.assert_array_equal(_bits(codebooks.create_dynamic_map(signed)), _bits(golden("bnb_maps")[key]))
  np.testing.assert_array_equal(_bits(codebooks.dynamic_map(signed)), _bits(golden("bnb_maps")[key]))


def test_4bit_tables_bit_identical():
  np.testing.assert_array_equal(_bits(codebooks.NF4), _bits(golden("bnb_maps")["nf4"]))
  np.testing.assert_array_equal(_bits(codebooks.FP4), _bits(golden("bnb_maps")["fp4"]))


def test_normal_map_regenerates_nf4():
  table = codebooks.create_normal_map()
  assert table.shape == (256,)
  np.testing.assert_array_equal(_bits(np.concatenate([table[:8], table[-8:]])), _bits(codebooks.NF4))
  assert np.count_nonzero(table) == 15


def test_linear_map():
  table = codebooks.create_linear_map(signed=True)
  assert table.shape == (256,) and table.dtype == np.float32
  assert table[0] == -1.0 and table[-1] == 1.0
  np.testing.assert_allclose(np.diff(table[table != 0][:10]), 2 / 254, rtol=1e-5)
  unsigned = codebooks.create_linear_map(signed=False)
  assert unsigned[0] == 0.0 and unsigned[-1] == 1.0 and np.all(np.diff(unsigned) > 0)
  small = codebooks.create_linear_map(signed=True, total_bits=4)
  assert np.sum(np.abs(small) > 1e-6) == 14  # 15 values, the middle one ~0, zero padded


def test_thresholds_are_nf4_midpoints():
  mids = ((codebooks.NF4[:-1].astype(np.float64) + codebooks.NF4[1:]) / 2).astype(np.float32)
  np.testing.assert_allclose(codebooks.NF4_THRESHOLDS, mids, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", codebooks.CODEBOOK_NAMES)
def test_get_codebook(name):
  assert codebooks.get_codebook(name).dtype == np.float32


def test_bad_arguments():
  with pytest.raises(ValueError, match="codebook name"):
    codebooks.get_codebook("nf5")
  with pytest.raises(ValueError, match="total_bits"):
    codebooks.create_dynamic_map(total_bits=9)
  with pytest.raises(ValueError, match="offset"):
    codebooks.create_normal_map(offset=1.5)
