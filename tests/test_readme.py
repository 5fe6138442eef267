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


def requirement_lines(name: str) -> list[str]:
  lines = (ROOT / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


def test_requirements_files_parse_pin_and_agree():
  """Every requirements file README names exists, parses, pins exact
  versions, and the accelerator files add jax's plugin at the CPU jax pin;
  pyarrow (ColorSwap) is pinned; tensorflow-cpu is only asked for where it
  has wheels (x86_64), tensorflow elsewhere (aarch64)."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  named = set(re.findall(r"requirements[\w-]*\.txt", README))
  assert {"requirements.txt", "requirements-gpu.txt",
          "requirements-tpu.txt"} <= named
  pins = {}
  for name in sorted(named):
    assert (ROOT / name).is_file(), name
    for line in requirement_lines(name):
      if line.startswith("-r "):
        assert (ROOT / line[3:]).is_file(), (name, line)
        continue
      req = Requirement(line)
      assert len(req.specifier) == 1 and next(iter(
          req.specifier)).operator == "==", (name, line)
      pins.setdefault(name, []).append(req)
  cpu = {r.name: r for r in pins["requirements.txt"]}
  assert "pyarrow" in cpu
  jax_pin = str(cpu["jax"].specifier)
  for name, extra in (("requirements-gpu.txt", "cuda12"),
                      ("requirements-tpu.txt", "tpu")):
    (jax,) = [r for r in pins[name] if r.name == "jax"]
    assert jax.extras == {extra} and str(jax.specifier) == jax_pin
  for machine, wanted in (("x86_64", "tensorflow-cpu"),
                          ("aarch64", "tensorflow")):
    chosen = [r.name for r in pins["requirements.txt"]
              if r.name.startswith("tensorflow") and r.name != (
                  "tensorflow-datasets") and r.marker is not None
              and r.marker.evaluate({"platform_machine": machine})]
    assert chosen == [wanted], machine


def test_first_command_names_a_python_the_pins_install_on():
  """The install command's `python3.X` satisfies Requires-Python of every
  pinned package installed here."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.specifiers import SpecifierSet  # pylint: disable=g-import-not-at-top
  command = README.split("<!-- main-command -->")[1].split("```")[1]
  version = re.search(r"\bpython(3\.\d+) -m venv", command)
  assert version, command
  checked = 0
  for line in requirement_lines("requirements.txt"):
    try:
      meta = importlib.metadata.metadata(Requirement(line).name)
    except importlib.metadata.PackageNotFoundError:
      continue  # Not installed here (another platform's marker).
    if meta.get("Requires-Python"):
      assert version.group(1) in SpecifierSet(meta["Requires-Python"]), line
      checked += 1
  assert checked >= 10


def test_documentation_stays_inside_the_repository():
  """README links no file outside the checkout; the algorithms page it
  points to exists and cites both papers by arXiv number."""
  assert "../shared" not in README
  for link in re.findall(r"\]\(([\w./-]+)\)", README):
    if "://" not in link:
      assert (ROOT / link).exists(), link
  algorithms = (ROOT / "docs" / "algorithms.md").read_text()
  assert "docs/algorithms.md" in README
  for arxiv in ("2510.03247", "2412.09126"):
    assert f"arXiv {arxiv}" in algorithms
