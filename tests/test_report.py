"""results.md and al_curves.png: timing table, figure layout, gs:// workdirs."""
import os
import stat

import numpy as np
import pytest

from mmal_jax import fs
from mmal_jax import report

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
  assert [t.get_text() for t in legend.get_texts()] == ["mmal", "random"]
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
  for name in ("results.md", "al_curves.png"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644


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
  colours = [{line.get_label(): line.get_color() for line in ax.lines}
             for ax in fig.axes if ax.axison]
  assert colours[1] == {s: colours[0][s] for s in ("mmal", "random")}
