"""The memorised toy model, trained once for the package's tests."""

import pytest

from tests.rerank import toy


@pytest.fixture(scope="package")
def memorised(tmp_path_factory):
  return toy.memorise(str(tmp_path_factory.mktemp("tok")))
