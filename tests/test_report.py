"""results.md and al_curves.png: timing table, paired statistics, figure
layout, TensorBoard text, gs:// workdirs."""
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader

from mmal_jax import fs
from mmal_jax import plots
from mmal_jax import report
from mmal_jax import sweep

METRICS = ("retrieval/i2t_r@1", "colorswap/group")
# Acquisition seconds of rounds 1..3 of each seed: compile, then steady state.
SECONDS = {0: (0.79, 0.014, 0.012), 1: (0.62, 0.016, 0.014),
           2: (0.70, 0.010, 0.014)}


def _rows(strategies=("random", "mmal"), seeds=(0, 1, 2), rounds=4):
  rows = []
  for i, strategy in enumerate(strategies):
    for seed in seeds:
      for t in range(rounds):
        row = {"strategy": strategy, "seed": seed, "round": t,
               "queries": 10 * t, "pairs": 10 * t, "percent": 5.0 * t,
               "modality_counts": {"image": 5, "text": 5},
               METRICS[0]: 10.0 + t * (2 + i) + seed,
               METRICS[1]: 25.0 - t + seed}
        if t:
          row["acquire_s"] = SECONDS[seed][t - 1] * (1 + i)
        rows.append(row)
  return rows


def test_first_round_and_steady_state_apart():
  text = report.markdown(_rows(), METRICS, METRICS[0])
  section = text[text.index("## Acquisition seconds"):]
  first = np.mean([s[0] for s in SECONDS.values()])
  later = np.mean([x for s in SECONDS.values() for x in s[1:]])
  assert f"| random | {first:.3f} | {later:.3f} | 6 |" in section
  assert f"| mmal | {2 * first:.3f} | {2 * later:.3f} | 6 |" in section
  assert "compil" in section


def test_resumed_run_times_its_first_round_as_first():
  # Rounds 1-2 of seed 0 were run before a restart (no acquire_s): round 3 is
  # the first this run timed, so it carries the compilation.
  rows = _rows(strategies=("mmal",), seeds=(0,))
  for r in rows:
    if r["round"] in (1, 2):
      del r["acquire_s"]
  text = report.markdown(rows, METRICS, METRICS[0])
  assert f"| mmal | {SECONDS[0][2]:.3f} | - | 0 |" in text


def test_figure_labels_legend_and_caption():
  fig = report.figure(_rows(), METRICS)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  axes = [ax for ax in fig.axes if ax.axison]
  assert [ax.get_ylabel() for ax in axes] == list(METRICS)
  assert all(ax.get_legend() is None for ax in axes)
  [legend] = fig.legends
  assert [t.get_text() for t in legend.get_texts()] == ["mmal", "random",
                                                        "chance"]
  # The chance line of the ColorSwap group panel, none on retrieval's.
  [chance] = [line for line in axes[1].lines if line.get_label() == "chance"]
  np.testing.assert_allclose(chance.get_ydata(), [100 / 6] * 2)
  assert not [line for line in axes[0].lines if line.get_label() == "chance"]
  box = legend.get_window_extent(renderer)
  for ax in axes:
    assert not box.overlaps(ax.get_tightbbox(renderer))
  caption = fig.get_suptitle()
  assert "± std over 3 seeds" in caption and "population std" in caption


def test_caption_with_uneven_seeds():
  rows = _rows(strategies=("random",)) + _rows(strategies=("mmal",),
                                               seeds=(0, 1))
  caption = report.figure(rows, METRICS).get_suptitle()
  assert "over 2-3 seeds" in caption


def test_write_local_files_are_0644(tmp_path):
  text = report.write(str(tmp_path), METRICS[0], rows=_rows())
  assert (tmp_path / "results.md").read_text() == text
  assert (tmp_path / "al_curves.png").read_bytes()[:4] == b"\x89PNG"
  for name in ("results.md", "al_curves.png", "modality_queries.png",
               "seconds_per_round.png"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644
  # The same Markdown, paired statistics included, as TensorBoard text.
  assert "## Paired differences vs random" in text
  [path] = (tmp_path / "tensorboard" / "report").glob("events.out.*")
  [value] = [v for e in event_file_loader.LegacyEventFileLoader(
      str(path)).Load() for v in e.summary.value]
  assert value.tag == "results"
  assert value.metadata.plugin_data.plugin_name == "text"
  assert value.tensor.string_val[0].decode() == text


def test_write_to_gcs(gcs_bucket):
  workdir = f"{gcs_bucket}/run"
  text = report.write(workdir, METRICS[0], METRICS, rows=_rows())
  assert fs.read_text(f"{workdir}/results.md") == text
  assert fs.read_bytes(f"{workdir}/al_curves.png")[:4] == b"\x89PNG"
  assert "## Acquisition seconds per round" in text


def test_write_without_save_writes_nothing(tmp_path):
  report.write(str(tmp_path), METRICS[0], rows=_rows(), save=False)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("metrics", [(), ("not/a_metric",)])
def test_figure_without_curves(metrics):
  fig = report.figure(_rows(), metrics)
  assert not fig.legends


def test_a_strategy_keeps_its_colour_across_panels():
  rows = _rows(strategies=("coreset", "mmal", "random"))
  for r in rows:
    if r["strategy"] == "coreset":
      del r[METRICS[1]]  # No colorswap/group for coreset.
  fig = report.figure(rows, METRICS)
  colours = [{line.get_label(): line.get_color() for line in ax.lines
              if line.get_label() != "chance"}
             for ax in fig.axes if ax.axison]
  assert colours[1] == {s: colours[0][s] for s in ("mmal", "random")}


def _noisy_rows():
  """3 seeds of random, mmal (+1/round) and coreset (+2/round) with seeded
  noise; mmal's seed 2 has no value at round 2 (a NaN written as null)."""
  rng = np.random.default_rng(0)
  rows = _rows(strategies=("random", "mmal", "coreset"), seeds=(0, 1, 2))
  for r in rows:
    r[METRICS[0]] += float(rng.normal(0, 1.5))
    if (r["strategy"], r["seed"], r["round"]) == ("mmal", 2, 2):
      r[METRICS[0]] = None
  return rows


def test_paired_statistics_equal_numpy():
  rows = _noisy_rows()
  value = {(r["strategy"], r["seed"], r["round"]): r[METRICS[0]] for r in rows}
  paired = report.paired_differences(rows, METRICS[0])
  areas = report.area_differences(rows, METRICS[0])
  assert set(paired) == set(areas) == {"mmal", "coreset"}
  for strategy in ("mmal", "coreset"):
    per_seed_area = []
    for seed in range(3):
      rounds = [t for t in range(4) if value[strategy, seed, t] is not None]
      gap = np.array([value[strategy, seed, t] - value["random", seed, t]
                      for t in rounds])
      x = 5.0 * np.array(rounds)
      per_seed_area.append(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(x))
                           / (x[-1] - x[0]))
    np.testing.assert_allclose(areas[strategy]["mean"], np.mean(per_seed_area))
    np.testing.assert_allclose(areas[strategy]["se"], np.std(
        per_seed_area, ddof=1) / np.sqrt(3))
    assert areas[strategy]["positive"] == np.sum(np.array(per_seed_area) > 0)
    for t in range(4):
      d = np.array([value[strategy, s, t] - value["random", s, t]
                    for s in range(3) if value[strategy, s, t] is not None])
      np.testing.assert_allclose(paired[strategy]["mean"][t], d.mean())
      np.testing.assert_allclose(paired[strategy]["se"][t],
                                 d.std(ddof=1) / np.sqrt(len(d)))
      assert paired[strategy]["positive"][t] == np.sum(d > 0)
      assert paired[strategy]["seeds"][t] == len(d)
      assert paired[strategy]["percent"][t] == 5.0 * t
  assert paired["mmal"]["seeds"][2] == 2
  text = report.markdown(rows, METRICS, METRICS[0])
  d = paired["coreset"]
  assert (f"| coreset | {d['mean'][0]:+.2f} ± {d['se'][0]:.2f} "
          f"({d['positive'][0]}/3) |") in text


def test_saving_needs_the_lower_confidence_bound():
  from scipy import stats
  rows = _noisy_rows()
  value = {(r["strategy"], r["seed"], r["round"]): r[METRICS[0]] for r in rows}
  target = np.mean([value["random", s, 3] for s in range(3)])
  saved = report.savings(rows, METRICS[0])
  expected = {}
  for strategy in ("random", "mmal", "coreset"):
    expected[strategy] = None
    for t in range(4):
      v = np.array([value[strategy, s, t] for s in range(3)
                    if value[strategy, s, t] is not None])
      bound = v.mean() - stats.t.ppf(0.975, len(v) - 1) * v.std(
          ddof=1) / np.sqrt(len(v))
      if bound >= target:
        expected[strategy] = 5.0 * t
        break
    assert saved[strategy]["percent"] == expected[strategy], strategy
    assert saved[strategy]["target"] == pytest.approx(target)
  # Built so that one strategy's bound reaches the target and one's does not
  # although its mean does.
  assert expected["coreset"] is not None and expected["mmal"] is None
  assert np.mean([value["mmal", s, 3] for s in range(3)]) > target
  assert saved["coreset"]["saving"] == pytest.approx(
      1 - expected["coreset"] / 15.0)
  # One seed gives no bound: never reached.
  one_seed = [r for r in rows if r["seed"] == 0]
  assert report.savings(one_seed, METRICS[0])["coreset"]["percent"] is None



def _workdir(path, coreset_size, rows):
  """A hand-made workdir: config.json and metrics.jsonl only."""
  os.makedirs(path)
  config = {"data": {"source": "shapes"}, "seeds": [0, 1, 2],
            "report": {"main_metric": METRICS[0], "metrics": []},
            "strategy_hparams": {"mmal": {"coreset_size": coreset_size}}}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _sweep_workdirs(tmp_path):
  small = _noisy_rows()
  large = [dict(r) for r in small]
  for r in large:
    if r["strategy"] == "mmal" and r[METRICS[0]] is not None:
      r[METRICS[0]] += 3.0 * r["round"]
  return [_workdir(tmp_path / "small", 16, small),
          _workdir(tmp_path / "large", 32, large)], [small, large]


def test_sweep_compares_workdirs_differing_in_one_key(tmp_path):
  paths, rows = _sweep_workdirs(tmp_path)
  workdirs = [sweep.load(p) for p in paths]
  key = "strategy_hparams.mmal.coreset_size"
  assert sweep.swept_keys([w.config for w in workdirs]) == [key]
  assert sweep.labels(workdirs) == [f"{key}=16", f"{key}=32"]
  text = sweep.markdown(workdirs, METRICS[0])
  assert f"| {key} | strategy |" in text
  for size, workdir_rows in zip((16, 32), rows):
    d = report.paired_differences(workdir_rows, METRICS[0])["mmal"]
    area = report.area_differences(workdir_rows, METRICS[0])["mmal"]
    final = report.curves(workdir_rows, METRICS[0])["mmal"]
    assert (f"| {size} | mmal | 15 | {final['mean'][-1]:.2f} ± "
            f"{final['std'][-1]:.2f} (3) | "
            + report.paired_cell(d["mean"][-1], d["se"][-1], d["positive"][-1],
                                 d["seeds"][-1]) + " | "
            + report.paired_cell(area["mean"], area["se"], area["positive"],
                                 area["seeds"]) + " |") in text
  fig = sweep.figure(workdirs, METRICS[0])
  panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
  assert sorted(panels) == ["coreset", "mmal", "random"]
  for line, workdir_rows in zip(panels["mmal"].lines, rows):
    c = report.curves(workdir_rows, METRICS[0])["mmal"]
    np.testing.assert_allclose(line.get_xdata(), c["percent"])
    np.testing.assert_allclose(line.get_ydata(), c["mean"])
  [legend] = fig.legends
  assert legend.get_title().get_text() == key
  assert [t.get_text() for t in legend.get_texts()] == sweep.labels(workdirs)


def test_sweep_command_writes_table_and_figure(tmp_path):
  paths, _ = _sweep_workdirs(tmp_path)
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  subprocess.run([sys.executable, "-m", "mmal_jax.report", "--workdirs",
                  ",".join(paths), "--out", str(out)], check=True, env=env)
  assert (out / "sweep.md").read_text() == sweep.markdown(
      [sweep.load(p) for p in paths], METRICS[0])
  assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_bad_workdir_is_one_line_and_exit_2(tmp_path, capsys):
  paths, _ = _sweep_workdirs(tmp_path)
  out = tmp_path / "out"
  missing = str(tmp_path / "nowhere")
  assert sweep.command([*paths, missing], str(out)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and missing in err[0] and "config.json" in err[0]
  assert not out.exists()
  assert sweep.command(paths, str(out), "not/a_metric") == 2
  assert "not/a_metric" in capsys.readouterr().err
  assert sweep.command(paths, str(out)) == 0


def test_modality_bars_are_the_mean_queries_per_round():
  rows = _rows(seeds=(0, 1))
  for r in rows:  # mmal: seed s buys r + s texts per round, random 5 / 5.
    if r["strategy"] == "mmal":
      r["modality_counts"] = {"image": 10 - r["round"] - r["seed"],
                              "text": r["round"] + r["seed"]}
  fig = plots.modality_figure(rows)
  panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
  assert sorted(panels) == ["mmal", "random"]
  image, text = panels["mmal"].containers  # Stacked: image below text.
  rounds = np.arange(1, 4)
  np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in image],
                             rounds)
  np.testing.assert_allclose([b.get_height() for b in image],
                             10 - rounds - 0.5)
  np.testing.assert_allclose([b.get_height() for b in text], rounds + 0.5)
  np.testing.assert_allclose([b.get_y() for b in text], 10 - rounds - 0.5)
  assert [b.get_height() for b in panels["random"].containers[1]] == [5] * 3
  assert [t.get_text() for t in fig.legends[0].get_texts()] == ["image",
                                                                "text"]


def test_seconds_per_round_lines():
  rows = _rows()
  for r in rows:
    if r["round"]:
      r["train_s"] = 2.0 * r["round"] + r["seed"]
  fig = plots.seconds_figure(rows)
  acquire, train = fig.axes
  for ax, key in ((acquire, "acquire_s"), (train, "train_s")):
    for line in ax.lines:
      strategy = line.get_label()
      np.testing.assert_allclose(line.get_xdata(), [1, 2, 3])
      np.testing.assert_allclose(line.get_ydata(), [np.mean(
          [r[key] for r in rows if (r["strategy"], r["round"]) ==
           (strategy, t)]) for t in (1, 2, 3)])
    assert sorted(l.get_label() for l in ax.lines) == ["mmal", "random"]


def test_stage1_loss_lines():
  losses = {"with_prototypes seed 0": np.array([3.0, 2.5, 2.0]),
            "without_prototypes seed 0": np.array([3.1, 2.9])}
  [ax] = plots.stage1_loss_figure(losses).axes
  drawn = {line.get_label(): line for line in ax.lines}
  assert set(drawn) == set(losses)
  for label, loss in losses.items():
    np.testing.assert_allclose(drawn[label].get_ydata(), loss)
    np.testing.assert_allclose(drawn[label].get_xdata(),
                               np.arange(1, len(loss) + 1))
