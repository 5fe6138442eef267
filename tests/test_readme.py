"""README.md states what the code does (#17 items 17, 18, 20)."""
import pathlib
import re

import pytest

from mmal_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def configs_table() -> dict[str, str]:
  """Config file -> its row of the Experiments table."""
  table = README.split("| config | regime | data | model | per round |")[1]
  table = table.split("\n\n")[0]
  rows = re.findall(r"^\| `(\w+\.py)` \|(.*)\|$", table, re.M)
  assert len(rows) >= 5
  return dict(rows)


def test_configs_table_gives_lr_and_wd_in_the_code_convention():
  """Each row's lr and `optim.wd` (big_vision's decoupled decay, not
  multiplied by lr) are the config's own values."""
  assert "not* multiplied by the\nlearning rate" in README
  shown = {}
  for name, row in configs_table().items():
    assert not re.search(r"\bwd \d", row), (name, row)  # No bare "wd 0.1".
    match = re.search(r"lr ([\d.e-]+), `optim.wd` ([\d.e-]+)", row)
    if match is None:
      assert "lr, `optim.wd` as demo" in row, (name, row)
      shown[name] = shown["demo.py"]
    else:
      shown[name] = tuple(float(x) for x in match.groups())
    config = config_lib.from_file(str(ROOT / "configs" / name))
    assert (config.optim.lr, config.optim.wd) == pytest.approx(
        shown[name], rel=1e-6), name
