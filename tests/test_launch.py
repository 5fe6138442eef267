"""The launchers: what --dry-run prints is what they run, quoted to paste."""
import json
import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.name=a b", "--config.seeds=0,1", "--config.note=it's"]
MAIN = ["python", "-m", "mmal_jax.main"]


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_")) and k not in (
             "DEVICES", "XLA_FLAGS", "PYTHONPATH", "PYTHON", "TFDS_DATA_DIR",
             "XLA_PYTHON_CLIENT_MEM_FRACTION")}
  env.update(extra)
  return env


def _launch(script, *args, check=True, **env):
  result = subprocess.run([os.path.join(REPO, "launch", script), *args],
                          env=_env(**env), capture_output=True, text=True,
                          cwd=REPO)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _commands(script, *args, **env):
  """The argv of each line a dry run prints."""
  out = _launch(script, "--dry-run", *args, **env).stdout
  return [shlex.split(line) for line in out.splitlines()]


def _fake(tmp_path, name):
  """An executable `name` that appends its argv (JSON) to tmp_path/calls."""
  path = tmp_path / "bin" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                  f"with open({str(tmp_path / 'calls')!r}, 'a') as f:\n"
                  "  f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
  path.chmod(0o755)
  return str(path)


def _calls(tmp_path):
  return [json.loads(line)
          for line in (tmp_path / "calls").read_text().splitlines()]


def test_local_dry_run_quotes_overrides():
  [command] = _commands("local.sh", "configs/demo.py", "/tmp/run", *OVERRIDES)
  assert command == ["env", f"PYTHONPATH={REPO}", *MAIN, "--config",
                     "configs/demo.py", "--workdir", "/tmp/run", *OVERRIDES]


def test_local_devices_split_the_cpu():
  for args, env in ((["--devices=8"], {}), ([], {"DEVICES": "8"})):
    [command] = _commands("local.sh", *args, "c.py", "w", **env)
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=8" in command
  result = _launch("local.sh", "--devices=0", "c.py", "w", check=False)
  assert result.returncode == 2 and "--devices" in result.stderr


def test_local_runs_what_the_dry_run_prints(tmp_path):
  python = _fake(tmp_path, "python")
  [printed] = _commands("local.sh", "c.py", "w", *OVERRIDES, PYTHON=python)
  _launch("local.sh", "c.py", "w", *OVERRIDES, PYTHON=python)
  assert _calls(tmp_path) == [printed[3:]]  # After env, PYTHONPATH, python.


@pytest.mark.parametrize("script,args", [
    ("local.sh", []), ("local.sh", ["configs/demo.py"]),
    ("gpu.sh", ["configs/demo.py"]), ("local.sh", ["--bogus", "c", "w"]),
    ("tpu_pod.sh", []), ("tpu_pod.sh", ["create"]),
    ("tpu_pod.sh", ["run", "tpu", "configs/demo.py"]),
    ("tpu_pod.sh", ["delete", "tpu", "extra"])])
def test_missing_arguments_give_usage_and_status_2(script, args):
  result = _launch(script, "--dry-run", *args, check=False)
  assert result.returncode == 2
  assert "usage:" in result.stderr and "error:" in result.stderr
  assert not result.stdout


def test_gpu_one_host_is_not_multihost():
  [command] = _commands("gpu.sh", "c.py", "w", *OVERRIDES)
  assert command[:3] == ["env", f"PYTHONPATH={REPO}",
                         "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]
  assert command[3:] == [*MAIN, "--config", "c.py", "--workdir", "w",
                         *OVERRIDES]


SLURM = {"SLURM_NTASKS": "16", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3", "SLURM_STEP_NODELIST": "gpu[01-02]"}


def test_gpu_under_slurm_is_multihost():
  [command] = _commands("gpu.sh", "c.py", "gs://b/run", *OVERRIDES, **SLURM)
  assert command[3:] == [*MAIN, "--config", "c.py", "--workdir", "gs://b/run",
                         "--multihost", *OVERRIDES]
  # One task of one node: no jax.distributed.
  [command] = _commands("gpu.sh", "c.py", "w", **{**SLURM, "SLURM_NTASKS": "1"})
  assert "--multihost" not in command


def test_gpu_multitask_outside_srun_is_refused():
  env = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
  result = _launch("gpu.sh", "--dry-run", "c.py", "w", check=False, **env)
  assert result.returncode == 2
  assert "SLURM_STEP_NODELIST" in result.stderr and "srun" in result.stderr


def test_gpu_sbatch_wraps_an_srun_of_this_script():
  [command] = _commands("gpu.sh", "--nodes=2", "--gpus-per-node=4",
                        "--partition=a100", "--time=4:00:00", "c.py",
                        "/shared/run", *OVERRIDES)
  assert command[0] == "sbatch"
  for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                 "--partition=a100", "--time=4:00:00"):
    assert option in command
  [wrap] = [c for c in command if c.startswith("--wrap=")]
  assert shlex.split(wrap[len("--wrap="):]) == [
      "srun", os.path.join(REPO, "launch", "gpu.sh"), "c.py", "/shared/run",
      *OVERRIDES]
  result = _launch("gpu.sh", "--dry-run", "--partition=a", "c", "w",
                   check=False)
  assert result.returncode == 2 and "--nodes" in result.stderr


def test_gpu_runs_what_the_dry_run_prints(tmp_path):
  python = _fake(tmp_path, "python")
  [printed] = _commands("gpu.sh", "c.py", "w", *OVERRIDES, PYTHON=python,
                        **SLURM)
  _launch("gpu.sh", "c.py", "w", *OVERRIDES, PYTHON=python, **SLURM)
  assert _calls(tmp_path) == [printed[4:]]


def test_tpu_create_defaults_and_options():
  [command] = _commands("tpu_pod.sh", "create", "my-tpu")
  assert command == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu",
                     "--zone=us-central2-b", "--accelerator-type=v4-32",
                     "--version=tpu-ubuntu2204-base"]
  [command] = _commands("tpu_pod.sh", "create", "my-tpu", "--spot",
                        TPU_ZONE="europe-west4-a",
                        TPU_ACCELERATOR_TYPE="v6e-64")
  assert command[6:] == ["--zone=europe-west4-a", "--accelerator-type=v6e-64",
                         "--version=v2-alpha-tpuv6e", "--spot"]
  [command] = _commands("tpu_pod.sh", "--accelerator-type=v5litepod-16",
                        "--version=custom", "create", "t")
  assert command[-2:] == ["--accelerator-type=v5litepod-16", "--version=custom"]


def test_tpu_run_copies_installs_and_starts_on_every_worker(tmp_path):
  tar, scp, ssh = _commands(
      "tpu_pod.sh", "run", "my-tpu", "configs/demo.py", "gs://bucket/run",
      *OVERRIDES, "--zone=us-east5-b", TFDS_DATA_DIR="gs://bucket/tfds",
      TMPDIR=str(tmp_path))
  archive = str(tmp_path / "mmal_jax-my-tpu.tgz")
  assert tar[:3] == ["tar", "-czf", archive] and REPO in tar
  assert scp[4:] == ["scp", archive, "my-tpu:mmal_jax.tgz",
                     "--zone=us-east5-b", "--worker=all"]
  assert ssh[4:8] == ["ssh", "my-tpu", "--zone=us-east5-b", "--worker=all"]
  [remote] = [c[len("--command="):] for c in ssh if c.startswith("--command=")]
  lexer = shlex.shlex(remote, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  words = list(lexer)
  start = words.index("nohup")
  assert words[start + 1:start + 15] == [
      "env", "TFDS_DATA_DIR=gs://bucket/tfds", *MAIN, "--config",
      "configs/demo.py", "--workdir", "gs://bucket/run", "--multihost",
      *OVERRIDES, ">"]
  assert "jax[tpu]==" + _jax_pin() in words


def _jax_pin():
  with open(os.path.join(REPO, "requirements.txt")) as f:
    return next(line.split("==")[1].strip() for line in f
                if line.startswith("jax=="))


def test_tpu_run_needs_a_gcs_workdir_and_a_config_in_the_checkout(tmp_path):
  result = _launch("tpu_pod.sh", "--dry-run", "run", "t", "configs/demo.py",
                   "/tmp/run", check=False)
  assert result.returncode == 2 and "gs://" in result.stderr
  outside = tmp_path / "c.py"
  outside.write_text("")
  result = _launch("tpu_pod.sh", "--dry-run", "run", "t", str(outside),
                   "gs://b/r", check=False)
  assert result.returncode == 2 and "inside" in result.stderr
  # A config given by absolute path runs as the checkout's relative copy.
  *_, ssh = _commands("tpu_pod.sh", "run", "t",
                      os.path.join(REPO, "configs", "demo.py:arg"), "gs://b/r")
  assert "--config configs/demo.py:arg " in ssh[-1]


def test_tpu_logs_delete_and_unknown_subcommand():
  [logs] = _commands("tpu_pod.sh", "logs", "t", "--worker=all")
  assert logs[4:8] == ["ssh", "t", "--zone=us-central2-b", "--worker=all"]
  assert "mmal_jax.log" in logs[-1]
  [logs] = _commands("tpu_pod.sh", "logs", "t")
  assert "--worker=0" in logs
  [delete] = _commands("tpu_pod.sh", "delete", "t")
  assert delete[4:] == ["delete", "t", "--zone=us-central2-b", "--quiet"]
  result = _launch("tpu_pod.sh", "--dry-run", "start", "t", check=False)
  assert result.returncode == 2
  assert "unknown subcommand 'start'" in result.stderr


def test_tpu_runs_what_the_dry_run_prints(tmp_path):
  path = os.path.dirname(_fake(tmp_path, "gcloud")) + os.pathsep + os.environ[
      "PATH"]
  args = ["run", "t", "configs/demo.py", "gs://b/r", *OVERRIDES]
  printed = _commands("tpu_pod.sh", *args, PATH=path, TMPDIR=str(tmp_path))
  _launch("tpu_pod.sh", *args, PATH=path, TMPDIR=str(tmp_path))
  assert _calls(tmp_path) == [c[1:] for c in printed if c[0] == "gcloud"]
  archive = tmp_path / "mmal_jax-t.tgz"
  listing = subprocess.run(["tar", "-tzf", str(archive)], check=True,
                           capture_output=True, text=True).stdout.split()
  assert "./mmal_jax/main.py" in listing and "./requirements.txt" in listing
  assert not any(name.startswith("./.git/") for name in listing)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed")
def test_shellcheck_clean():
  scripts = [os.path.join("launch", f) for f in sorted(os.listdir(
      os.path.join(REPO, "launch"))) if f.endswith(".sh")]
  result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
