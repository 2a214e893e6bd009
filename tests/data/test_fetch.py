"""Tests of the wheel cache helpers that need no network."""

import os
import zipfile

import pytest

from gr2_jax.data import fetch
from gr2_jax.errors import UserError


@pytest.fixture
def wheel(tmp_path):
  path = tmp_path / "pkg-1.0-py3-none-any.whl"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("pkg/data.bin", b"abc" * 1000)
  return str(path)


def test_extract_member_checks_size_and_sha256_before_the_file_appears(wheel, tmp_path):
  data = b"abc" * 1000
  dest = str(tmp_path / "out" / "data.bin")
  with pytest.raises(UserError, match="has 3000 bytes, expected 3001"):
    fetch.extract_member(wheel, "pkg/data.bin", dest, fetch.sha256_of(data=data), size=3001)
  with pytest.raises(UserError, match="fails its sha256 check"):
    fetch.extract_member(wheel, "pkg/data.bin", dest, fetch.sha256_of(data=b"x"))
  with pytest.raises(UserError, match="has no file pkg/other.bin"):
    fetch.extract_member(wheel, "pkg/other.bin", dest, fetch.sha256_of(data=data))
  assert os.listdir(tmp_path / "out") == []  # no partial or temporary file left
  assert fetch.extract_member(wheel, "pkg/data.bin", dest, fetch.sha256_of(data=data),
                              size=3000) == dest
  with open(dest, "rb") as f:
    assert f.read() == data
  os.remove(wheel)  # a second call finds the file and never opens the wheel
  assert fetch.extract_member(wheel, "pkg/data.bin", dest, "unused") == dest
