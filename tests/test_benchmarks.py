"""The benchmark scripts run end to end at toy sizes and write what they say."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmal_jax import fs


def _run(module, *args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  return subprocess.run([sys.executable, "-m", module, *args], env=env,
                        check=True, capture_output=True, text=True).stdout


def test_acquisition_benchmark(gcs_bucket):
  # Pool sizes in one shape bucket (one compile); part 4's subprocesses are
  # tested on their own below. Outputs go through mmal_jax.fs: a gs:// folder.
  out_dir = f"{gcs_bucket}/bench"
  out = _run("mmal_jax.benchmarks.acquisition", "--quick", "--rate_sizes=256",
             "--sizes=600,1000", "--dim=16", "--budget=8",
             "--coreset_size=32", "--step_n=2100", "--step_dim=16",
             "--parts=rates,rounds,greedy,compiles", f"--out={out_dir}")
  for line in ("Kernel rates", "slope", "numpy float32 step",
               "sklearn pairwise_distances", "bandwidth floor",
               "Compiles per mmal call", "Targets:"):
    assert line in out, line
  assert not os.path.exists("gs:")  # No local folder named after the URL.
  # The JSON is rewritten after each part: a stopped run keeps what it measured.
  wrote = f"Wrote {out_dir}/results.json"
  assert out.count(wrote) == 4
  assert out.index(wrote) < out.index("numpy float32 step")
  results = json.loads(fs.read_text(f"{out_dir}/results.json"))
  assert results["repeats"] >= 5 and results["machine"]["loadavg_after"]
  for name in ("mmal", "mmal_with_rebuild", "coreset", "uncertainty",
               "badge", "cache_rebuild"):
    assert set(results["seconds_per_round"][name]) == {"600", "1000"}
    assert results["loglog_slope"][name] is not None
  rates = results["kernel_rates"][0]
  for name in ("top2_margin", "min_distance", "jnp.dot", "jnp.dot+max"):
    assert rates["gflops"][name]["median"] > 0
  step = results["greedy_step"]["seconds"]
  assert step["kernel_one_pass_per_pick"]["median"] > 0
  assert step["numpy_float32_step"]["median"] > 0
  assert results["compile_counts"]["after_first"] == 0
  verdicts = [t["verdict"] for t in results["targets"]]
  assert set(verdicts) <= {"PASS", "MISS", "SKIP"} and len(verdicts) == 5
  assert fs.read_bytes(f"{out_dir}/acquisition_scaling.png")[:4] == b"\x89PNG"


@pytest.mark.skipif(jax.device_count() > 1, reason="1-device pass only: "
                    "the numpy probe uses no devices (CI time)")
def test_acquisition_benchmark_memory_probe():
  probe = json.loads(_run("mmal_jax.benchmarks.acquisition",
                          "--memory_probe=numpy", "--memory_n=3000",
                          "--dim=16").strip().splitlines()[-1])
  assert probe["feature_mb"] == 2 * 3000 * 16 * 4 / 2**20
  assert probe["peak_mb"] >= probe["before_call_mb"] > probe["runtime_mb"] > 0


def test_train_step_benchmark(tmp_path):
  out = _run("mmal_jax.benchmarks.train_step", "--variant=mu/8",
             "--text_variant=mu", "--res=16", "--batch=8", "--text_len=8",
             "--steps=2", "--warmup=1", "--mesh_data=1", "--mesh_fsdp=-1",
             "--memory_variants=B/16", "--peak_tflops=1",
             f"--compilation_cache={tmp_path / 'cache'}", f"--out={tmp_path}")
  assert "examples_per_s" in out and "fsdp=256 GiB/device" in out
  for line in ("initialised in", "compiled in", "warm-up step 1/1", "step 2/2",
               "Targets:"):
    assert line in out, line
  result = json.loads((tmp_path / "train_step.json").read_text())
  assert result["examples_per_s"] > 0
  assert result["xla_gflop_per_step_per_device"] > 0
  # Model FLOPs from mmal_jax.flops, MFU against the given peak (1 TFLOP/s).
  assert result["model_gflop_per_step"] > 0
  assert result["mfu"] == result["model_tflops_per_device"] > 0
  assert result["compilation_cache"] == str(tmp_path / "cache")
  assert 0 < result["first_step_s"] and result["step_ms_min"] <= result[
      "step_ms"] <= result["step_ms_max"]
  assert [t["verdict"] for t in result["targets"]] == ["SKIP", "SKIP"]
  assert result["mesh"]["data"] == 1 and result["state_bytes_per_device"] > 0
  scanned, unrolled = result["memory"]
  assert (scanned["variant"], scanned["scan"], unrolled["scan"]) == (
      "B/16", True, False)
  per_device = scanned["bytes_per_device"]
  # B/16's widths (768, 3072, 32000) all divide 256; arrays under 4 MiB
  # (biases, norms, position embeddings) stay whole.
  assert per_device["1"] > 6 * per_device["8"] > 6 * per_device["256"]
  assert per_device["256"] < per_device["1"] / 32


@pytest.mark.skipif(jax.device_count() > 1, reason="1-device pass only: "
                    "the input pipeline runs on the host (CI time)")
def test_input_pipeline_benchmark(gcs_bucket):
  """Also the buffer reads from gs:// (the emulator) against local files,
  the JSON written to gs:// through mmal_jax.fs (#17 items 16, 21)."""
  from mmal_jax import fs  # pylint: disable=g-import-not-at-top
  out = _run("mmal_jax.benchmarks.input_pipeline", "--quick",
             f"--gcs_dir={gcs_bucket}/shards", f"--out={gcs_bucket}/out")
  assert "pipeline / pil" in out and ("PASS" in out or "MISS" in out)
  assert "buffer repeat 5/5" in out and "load" in out.lower()
  result = json.loads(fs.read_text(f"{gcs_bucket}/out/input_pipeline.json"))
  assert result["num_images"] == 16 and result["repeats"] == 5
  for name in ("pil", "pipeline"):
    rates = result["images_per_s"][name]
    assert len(rates["all"]) == 5 and rates["min"] > 0
  for where in ("local", "gcs"):
    for reads in ("runs", "per_image"):
      assert result["buffer_images_per_s"][f"{where}/{reads}"]["min"] > 0
    assert result["buffer_runs_over_per_image"][where]["median"] > 0
  assert "gcs: runs / per-image" in out
  assert result["machine"]["cpu_count"] > 0 and result["load_after"]


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() > 1, reason="1-device pass only (one "
                    "run of every part; the kernels' meshes are tested "
                    "elsewhere)")
def test_accelerator_check_quick(gcs_bucket, capsys):
  from mmal_jax.benchmarks import accelerator_check  # pylint: disable=g-import-not-at-top
  out = f"{gcs_bucket}/check"
  accelerator_check.main([
      f"--out={out}", "--quick", "--parts=memory,train,kernels,round",
      "--pallas=yes", "--kernel_n=256", "--dim=16", "--dot_n=64",
      "--greedy_n=2048", "--round_sizes=1500", "--memory_sizes=4096,16384",
      "--train_flags=--variant=mu/8 --text_variant=mu --res=16 "
      "--batch={batch} --text_len=8 --steps=1 --warmup=1"])
  printed = capsys.readouterr().out
  for line in ("kernels: Q = N = 256", "greedy k-center: N = 2,048",
               "mmal round with cache rebuild: N = 1,500",
               "memory probe: one mmal round at N = 16,384", "train step:",
               "Targets:"):
    assert line in printed, line
  results = json.loads(fs.read_text(f"{out}/accelerator_check.json"))
  assert results["device_kind"] == jax.devices()[0].device_kind
  assert results["kernels"]["tflops"]["jnp.dot"]["median"] > 0
  assert results["kernels"]["greedy"]["picks_per_pass"] >= 1
  assert results["round"]["1500"]["matmul_s_at_dot_rate"] > 0
  assert results["train"]["step_ms"] > 0
  assert results["train"]["batch"] == 8 * results["device_count"] == 8
  assert results["dtype"] == "float32" and results["platform"] == "cpu"
  assert [t["target"] for t in results["targets"]][:3] == [
      "mmal round fits this device at the largest N predicted for it",
      "train step fraction of peak >= 0.45",
      "train step: first step within 45.0 s of its process' start"]
  # CPU: the probes ran (host resident set), no device budget is claimed.
  memory = results["memory"]
  assert [p["padded_rows"] for p in memory["probes"]] == [4096, 16384]
  assert {p["source"] for p in memory["probes"]} == {"host RSS"}
  assert "largest_n" not in memory
  rows = [json.loads(line) for line in
          fs.read_text(f"{out}/compare.jsonl").splitlines()]
  assert {r["benchmark"] for r in rows} == {
      "accelerator_check/top2_margin", "accelerator_check/min_distance",
      "accelerator_check/jnp.dot", "accelerator_check/top2_margin_pallas",
      "accelerator_check/min_distance_pallas",
      "accelerator_check/greedy_one_pass_per_pick",
      "accelerator_check/greedy_default_per_pick",
      "accelerator_check/mmal_round_rebuild", "train_step"}
  # Profiles (--profile yes, the default) of every timed contender, on gs://.
  for name in ("top2_margin", "min_distance_pallas", "jnp.dot",
               "greedy_one_many", "greedy_default_many", "mmal_round_1500",
               "train_step"):
    trace = fs.read_bytes(f"{out}/profiles/{name}.trace.json.gz")
    assert trace[:2] == b"\x1f\x8b", name  # gzip
  for summary in (results["kernels"]["profiles"]["top2_margin"],
                  results["kernels"]["greedy"]["profiles"]["greedy_one_many"],
                  results["round"]["1500"]["profiles"]["mmal_round_1500"],
                  results["train"]["profile"]):
    assert summary["lanes"][0]["busy_ms"] > 0 and summary["lanes"][0]["ops"]
  assert "  profile top2_margin: /host:CPU " in printed
  verdicts = [t["verdict"] for t in results["targets"]]
  assert not results["kernels"]["pallas_errors"]
  assert len(verdicts) == 10 and set(verdicts) <= {"PASS", "MISS", "SKIP"}
  assert printed.count("[PASS]") + printed.count("[MISS]") >= 2 * (
      verdicts.count("PASS") + verdicts.count("MISS"))


def test_accelerator_check_starts_no_client_before_its_subprocesses(
    tmp_path):
  """The memory probes run while the check's own process holds no
  accelerator client (on a GPU it would hold 75% of the memory)."""
  code = (
      "import json, sys\n"
      "from jax._src import xla_bridge\n"
      "from mmal_jax.benchmarks import accelerator_check as check\n"
      "seen = []\n"
      "def probe(n, dim, dtype):\n"
      "  seen.append(len(xla_bridge._backends))\n"
      "  return {'n': n, 'error': 'stubbed'}\n"
      "check.run_memory_probe = probe\n"
      "check.main(['--out', sys.argv[1], '--quick', '--parts=memory'])\n"
      "print('clients during probes', json.dumps(seen))\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env,
                       check=True, capture_output=True, text=True).stdout
  assert "clients during probes [0, 0]" in out


def test_largest_fitting_rows_by_hand():
  from mmal_jax.benchmarks import accelerator_check  # pylint: disable=g-import-not-at-top
  largest = accelerator_check.largest_fitting_rows
  pow2 = [1 << j for j in range(40)]  # Pools that pad to themselves.
  # (60e9 - 2e9) / 3000 = 19.3M rows: 2^24 = 16.8M fits, 2^25 does not;
  # (105.75e9 - 2e9) / 3000 = 34.6M: 2^25 = 33.6M fits.
  assert largest(60e9, 2e9, 3000, pow2) == 1 << 24
  assert largest(105.75e9, 2e9, 3000, pow2) == 1 << 25
  assert largest(1e9, 2e9, 3000, pow2) is None
  # Padding to whole blocks: 2^j rows pad to 3 * 2^j (say); 2^23 pads to
  # 25.2M > 19.3M, so 3 * 2^22 = 12.6M is the largest.
  assert largest(60e9, 2e9, 3000, [3 * p for p in pow2]) == 3 << 22


def test_memory_part_on_a_device(monkeypatch):
  """Part 4 with a device's memory stats (probes stubbed: CPU has none): a
  line through the probes' peaks, the largest N per budget, then a round at
  this device's largest N, which fits or reports its error."""
  from mmal_jax.benchmarks import accelerator_check  # pylint: disable=g-import-not-at-top
  limit = 60e9
  asked = []

  def probe(n, dim, dtype, oom=False):
    asked.append(n)
    if oom and n > 1 << 22:
      return {"n": n, "error": "RESOURCE_EXHAUSTED: Out of memory"}
    return {"n": n, "padded_rows": n, "peak_bytes": 2e9 + 3000 * n,
            "limit_bytes": limit, "source": "device", "device_count": 1,
            "dtype": dtype, "padded_rows_of_pow2": [1 << j for j in range(40)]}

  monkeypatch.setattr(accelerator_check, "run_memory_probe", probe)
  out = accelerator_check.round_memory([1 << 20, 1 << 22], 768, "bfloat16")
  assert asked == [1 << 20, 1 << 22, 1 << 24]
  np.testing.assert_allclose(
      [out["fixed_bytes"], out["bytes_per_padded_row"]], [2e9, 3000])
  assert out["largest_n"] == {"80 GB device x 0.75": 1 << 24,
                              "141 GB device x 0.75": 1 << 25,
                              "this device's limit": 1 << 24}
  assert "padded_rows_of_pow2" not in out["check"]
  assert out["check_fits"] is True
  monkeypatch.setattr(accelerator_check, "run_memory_probe",
                      lambda n, dim, dtype: probe(n, dim, dtype, oom=True))
  out = accelerator_check.round_memory([1 << 20, 1 << 22], 768, "bfloat16")
  assert out["check_fits"] is False
  assert out["check"]["error"].startswith("RESOURCE_EXHAUSTED")


def test_accelerator_check_refuses_bad_flags(capsys, tmp_path):
  from mmal_jax.benchmarks import accelerator_check  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as exit_info:
    accelerator_check.parse_args(["--out=x", "--parts=kernels,gpu"])
  assert exit_info.value.code == 2
  assert "unknown --parts ['gpu']" in capsys.readouterr().err
  (tmp_path / "file").write_text("not a folder")
  for argv, message in ((["--parts=kernels"], "--out is required"),
                        (["--out=x", "--memory_sizes=1024"],
                         "at least two sizes"),
                        (["--out=x", "--memory_sizes=1024,2k"],
                         "'1024,2k' is not a comma-separated list"),
                        (["--out=x", "--round_sizes=0"],
                         "'0' is not a comma-separated list of whole "
                         "numbers >= 1"),
                        ([f"--out={tmp_path / 'file' / 'check'}"],
                         "--out: .*file/check cannot be written: .*; give a "
                         "folder this process can write")):
    with pytest.raises(SystemExit) as exit_info:
      accelerator_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err), message

