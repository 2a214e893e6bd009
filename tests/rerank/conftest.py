"""The memorised toy model, trained once for the package's tests."""

import pytest

from tests.rerank import toy


@pytest.fixture(scope="package")
def memorised(tmp_path_factory):
  return toy.memorise(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="package")
def memorised_positions(tmp_path_factory):
  return toy.memorise(str(tmp_path_factory.mktemp("tok_positions")), toy.POSITIONS_ANSWER,
                      toy.POSITIONS_PROMPT, toy.POSITIONS_EXAMPLE)
