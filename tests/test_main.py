"""The command line: config files, presets and override keys, and their one-line errors."""

import os
import subprocess
import sys

import pytest

from gr2_jax import main
from gr2_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def test_precheck_accepts_valid_config_and_override():
  main.precheck([f"--config={CONFIGS}/eval.py:tiny", "--config.data.max_history=20",
                 "--workdir=/tmp/x"])


@pytest.mark.parametrize("argv, message", [
    ([f"--config={CONFIGS}/nope.py"], "valid configs in"),
    ([f"--config={CONFIGS}/data.py:huge"], "valid presets: default, tiny"),
    ([f"--config={CONFIGS}/data.py", "--config.data.max_histroy=3"], "valid fields: "),
    ([f"--config={CONFIGS}/data.py", "--config.dta.x=3"], "valid fields: data, preset, runtime, stage"),
    (["--workdir=/tmp/x"], "missing --config"),
])
def test_precheck_errors_list_the_valid_choices(argv, message):
  with pytest.raises(UserError, match=message):
    main.precheck(argv)


def test_cli_error_is_one_line_with_exit_status_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "gr2_jax.main", f"--config={CONFIGS}/data.py:huge",
       f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: unknown preset 'huge'; valid presets: default, tiny"]
