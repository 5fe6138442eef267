"""The accelerator comparison: peaks, rows, appending (gs:// too), the plot."""
import json
import os
import subprocess
import sys

import jax
import pytest

from mmal_jax import fs
from mmal_jax.benchmarks import compare


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", (989.0, 3350.0)),
    ("NVIDIA H100 PCIe", (756.0, 2000.0)),
    ("NVIDIA H200", (989.0, 4800.0)),
    ("NVIDIA A100-SXM4-40GB", (312.0, 1555.0)),
    ("NVIDIA A100-SXM4-80GB", (312.0, 2039.0)),
    ("NVIDIA L4", (121.0, 300.0)),
    ("NVIDIA L40S", None),
    ("TPU v4", (275.0, 1200.0)),
    ("TPU v5 lite", (197.0, 819.0)),
    ("TPU v5", (459.0, 2765.0)),
    ("TPU v6 lite", (918.0, 1640.0)),
    ("cpu", None)])
def test_device_peak(kind, peak):
  assert compare.device_peak(kind) == peak


def _machine(**kw):
  machine = {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3",
             "device_count": 4, "jax": "0.10.2", "host": "h", "dtype":
             "bfloat16", "peak_tflops": 989.0, "peak_gb_s": 3350.0,
             "peak_source": "vendor spec", "quick": False,
             "date": "2026-01-01T00:00:00+00:00"}
  machine.update(kw)
  return machine


def _spread(median):
  return {"median": median, "min": median / 2, "max": 2 * median}


# The shape of `benchmarks.acquisition`'s results.json (medians are used).
ACQUISITION = {
    "dim": 256, "seconds_per_round": {"mmal": {"10000": _spread(0.5),
                                               "1000": _spread(0.1)}},
    "greedy_step": {"n": 1000, "dim": 512, "bytes_per_pass": 2_048_000,
                    "seconds": {
                        "kernel_one_pass_per_pick": _spread(1e-4),
                        "kernel_batched_per_pick": _spread(1e-5)}}}
TRAIN_STEP = {"model": "ViT-B/16 + text B", "res": 224, "batch": 1024,
              "dtype": "bfloat16", "num_devices": 4, "step_ms": 500.0,
              "model_gflop_per_step": 400_000.0}


def test_rows_against_peaks_of_every_device():
  rows = compare.acquisition_rows(ACQUISITION, _machine())
  assert [(r["benchmark"], r["n"]) for r in rows[:2]] == [
      ("acquisition/mmal", 1000), ("acquisition/mmal", 10000)]
  step = rows[2]
  assert step["benchmark"] == "kcenter_step"
  assert step["achieved"] == pytest.approx(20.48)  # GB/s
  assert step["peak"] == 4 * 3350.0  # The pool is split over 4 chips.
  assert step["fraction_of_peak"] == pytest.approx(20.48 / 13400)
  [train] = compare.train_step_rows(TRAIN_STEP, _machine())
  assert train["achieved"] == pytest.approx(800.0)  # 400 TFLOP / 0.5 s
  assert train["fraction_of_peak"] == pytest.approx(800 / (4 * 989))
  assert train["mesh"] == {"data": 4, "fsdp": 1}
  # A float32 step has no bf16 peak; a CPU's measured peak is the host's.
  [train] = compare.train_step_rows({**TRAIN_STEP, "dtype": "float32"},
                                    _machine())
  assert train["fraction_of_peak"] is None
  cpu = _machine(platform="cpu", device_kind="cpu", device_count=8,
                 dtype="float32", peak_tflops=0.4, peak_gb_s=20.0)
  [train] = compare.train_step_rows({**TRAIN_STEP, "dtype": "float32",
                                     "num_devices": 8, "step_ms": 1e7,
                                     "model_gflop_per_step": 800_000.0}, cpu)
  assert train["fraction_of_peak"] == pytest.approx(0.08 / 0.4)


@pytest.mark.skipif(jax.device_count() > 1, reason="1-device pass only: "
                    "the flag sets are built from machine dicts, not from "
                    "this process' devices")
def test_every_flag_set_compare_builds_parses():
  machines = [_machine(), _machine(device_count=1),
              _machine(platform="cpu", device_kind="cpu", device_count=1,
                       dtype="float32")]
  argvs = [compare.benchmark_flags(machine, quick)
           for machine in machines for quick in (False, True)]
  compare.check_flags(compare.TRAIN_STEP,
                      [train + ["--out=x"] for _, train in argvs])
  # The acquisition flag sets, and one it must refuse, in one subprocess.
  bad = ["--quick", "--rebuild_cap=30"]
  with pytest.raises(compare.FlagsNotAccepted) as refused:
    compare.check_flags(compare.ACQUISITION, [
        acquisition + ["--out=x"] for acquisition, _ in argvs] + [bad])
  message = str(refused.value)
  assert message.count("Unknown command line flag 'rebuild_cap'") == 1
  assert "--sizes" not in message


def test_append_rows_to_gcs(gcs_bucket):
  path = f"{gcs_bucket}/compare/{compare.ROWS_FILE}"
  compare.append_rows(path, [{"a": 1}])
  compare.append_rows(path, [{"a": 2}, {"a": 3}])
  assert compare.read_rows([path]) == [{"a": 1}, {"a": 2}, {"a": 3}]


def _other_machine(rows):
  return [{**r, "device_kind": "NVIDIA H100 80GB HBM3", "host": "gpu-host",
           "fraction_of_peak": 0.5, "seconds": r["seconds"] / 10}
          for r in rows]


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() > 1, reason="1-device pass only: the "
                    "rows of several devices are checked without a run "
                    "(test_rows_against_peaks_of_every_device)")
def test_quick_run_then_plot_beside_another_machine(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  out = tmp_path / "cpu"
  printed = subprocess.run(
      [sys.executable, "-m", "mmal_jax.benchmarks.compare", "--quick",
       f"--out={out}"], check=True, env=env, capture_output=True,
      text=True).stdout
  # Progress as it goes: compare's own lines and the benchmarks' output.
  for line in ("[compare", "probing the devices",
               "mmal_jax.benchmarks.acquisition --quick", "Targets:",
               "mmal_jax.benchmarks.train_step", "examples_per_s"):
    assert line in printed, line
  rows = compare.read_rows([str(out / compare.ROWS_FILE)])
  benchmarks = {r["benchmark"] for r in rows}
  assert {"acquisition/mmal", "acquisition/uncertainty", "kcenter_step",
          "train_step"} <= benchmarks
  for r in rows:
    assert r["device_kind"] == jax.devices()[0].device_kind
    assert r["device_count"] == jax.device_count()
    assert r["jax"] == jax.__version__ and r["date"] and r["host"]
    assert r["seconds"] > 0 and r["quick"]
  for name in ("kcenter_step", "train_step"):
    [r] = [r for r in rows if r["benchmark"] == name]
    assert r["peak_source"] == "measured" and 0 < r["fraction_of_peak"]

  other = tmp_path / "gpu.jsonl"
  other.write_text("".join(json.dumps(r) + "\n" for r in _other_machine(rows)))
  subprocess.run([sys.executable, "-m", "mmal_jax.benchmarks.compare",
                  "--plot", f"--out={out}", f"--rows={other}"], check=True,
                 env=env, capture_output=True, text=True)
  assert fs.read_bytes(str(out / "compare.png"))[:4] == b"\x89PNG"


def test_figure_groups_bars_by_device():
  cpu = _machine(platform="cpu", device_kind="cpu", device_count=1)
  rows = (compare.acquisition_rows(ACQUISITION, cpu) +
          compare.train_step_rows(TRAIN_STEP, cpu))
  rows += _other_machine(rows)
  fig = compare.figure(rows)
  axes = [ax for ax in fig.axes if ax.axison]
  assert sorted(ax.get_title() for ax in axes) == sorted(
      {r["benchmark"] for r in rows})
  [legend] = fig.legends
  assert [t.get_text() for t in legend.get_texts()] == [
      "NVIDIA H100 80GB HBM3 x1", "cpu x1"]
  [mmal] = [ax for ax in axes if ax.get_title() == "acquisition/mmal"]
  assert len(mmal.patches) == 4  # 2 sizes x 2 devices.
  assert [t.get_text() for t in mmal.get_xticklabels()] == [
      "N=1,000, D=256", "N=10,000, D=256"]
  [step] = [ax for ax in axes if ax.get_title() == "kcenter_step"]
  assert "50%" in [t.get_text() for t in step.texts]
