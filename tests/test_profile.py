"""benchmarks.profile: the summary of a trace, by hand and from a real one."""
import gzip
import json

import jax
import jax.numpy as jnp

from mmal_jax.benchmarks import profile


def _trace(events):
  return gzip.compress(json.dumps({"traceEvents": events}).encode())


def _meta(pid, tid, process, thread):
  return [{"ph": "M", "name": "process_name", "pid": pid,
           "args": {"name": process}},
          {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
           "args": {"name": thread}}]


def _op(pid, tid, name, ts, dur):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts,
          "dur": dur}


def test_device_lanes_union_and_self_time_by_hand():
  events = (_meta(1, 1, "/host:CPU", "python") + _meta(1, 2, "/host:CPU",
                                                       "client") +
            _meta(7, 3, "/device:GPU:0", "Stream #14") +
            _meta(7, 4, "/device:GPU:0", "Stream #15"))
  events += [
      _op(1, 1, "PjitFunction(f)", 0, 1000),   # Host: left out on a device.
      _op(1, 2, "launch", 0, 900),
      # Stream 14: a module [0, 400) holding two ops (300 us of them), then
      # an op [500, 600): busy 500 us of the 1000 us wall time.
      _op(7, 3, "module", 0, 400), _op(7, 3, "gemm", 50, 200),
      _op(7, 3, "reduce", 250, 100), _op(7, 3, "reduce", 500, 100),
      _op(7, 4, "copy", 0, 50)]
  summary = profile.summarize(_trace(events), wall_s=1e-3)
  assert [lane["lane"] for lane in summary["lanes"]] == [
      "/device:GPU:0 Stream #14", "/device:GPU:0 Stream #15"]
  busiest = summary["lanes"][0]
  assert busiest["busy_ms"] == 0.5 and busiest["busy_fraction"] == 0.5
  # Self times: gemm 200, reduce 100 + 100, module 400 - 300.
  assert [(op["name"], op["ms"], op["count"]) for op in busiest["ops"]] == [
      ("gemm", 0.2, 1), ("reduce", 0.2, 2), ("module", 0.1, 1)]
  assert busiest["ops"][0]["share"] == 0.4
  assert profile.describe("k", summary) == (
      "k: /device:GPU:0 Stream #14 busy 50% of 1 ms; gemm 40%, reduce 40%, "
      "module 20%")


def test_host_lanes_without_a_device_leave_out_the_caller():
  events = _meta(1, 1, "/host:CPU", "python") + _meta(1, 2, "/host:CPU",
                                                      "client")
  events += [_op(1, 1, "PjitFunction(f)", 0, 1000), _op(1, 2, "fusion", 10,
                                                        800)]
  summary = profile.summarize(_trace(events), wall_s=2e-3, top_lanes=5)
  assert [lane["lane"] for lane in summary["lanes"]] == ["/host:CPU client"]
  assert summary["lanes"][0]["busy_fraction"] == 0.4
  assert profile.describe("k", profile.summarize(_trace([]), 1.0)) == (
      "k: no device or client ops in the trace")


def test_capture_of_a_compiled_product():
  x = jnp.ones((256, 256))
  f = jax.jit(lambda a: jnp.max(a @ a, axis=1))
  f(x).block_until_ready()
  trace, seconds = profile.capture(lambda: f(x), calls=2)
  summary = profile.summarize(trace, seconds)
  assert seconds > 0 and summary["wall_ms"] == seconds * 1e3
  lane = summary["lanes"][0]
  assert 0 < lane["busy_ms"] <= summary["wall_ms"]
  assert sum(op["count"] for op in lane["ops"]) >= 2


def test_a_profiler_that_cannot_trace_is_reported_not_fatal(monkeypatch,
                                                            tmp_path, capsys):
  def no_cupti(fn, calls=3):
    raise RuntimeError("CUPTI could not be loaded")

  monkeypatch.setattr(profile, "capture", no_cupti)
  out = profile.record({"k": lambda: 1}, str(tmp_path))
  assert out == {"k": {"error": "RuntimeError: CUPTI could not be loaded"}}
  assert "profile k failed: RuntimeError" in capsys.readouterr().out
  assert profile.record({"k": lambda: 1}, None) == {}
