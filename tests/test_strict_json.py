"""strict_json: what every run output is written with."""
import json
import math

import numpy as np
import pytest

from mmal_jax import strict_json


def test_non_finite_floats_become_null_everywhere():
  obj = {"a": float("nan"), "b": [np.float32("inf"), 1.5, (np.float64(-np.inf),
                                                          2)],
         "c": {"d": np.int64(3), "e": "NaN"}, "f": None}
  text = strict_json.dumps(obj, sort_keys=True)
  assert strict_json.loads(text) == {"a": None, "b": [None, 1.5, [None, 2]],
                                     "c": {"d": 3, "e": "NaN"}, "f": None}
  assert "NaN" not in text.replace('"NaN"', "")
  assert "Infinity" not in text


@pytest.mark.parametrize("bare", ["NaN", "Infinity", "-Infinity"])
def test_loads_refuses_bare_constants(bare):
  text = json.dumps({"x": float(bare.replace("Infinity", "inf"))})
  assert bare in text  # What Python's json writes by default.
  with pytest.raises(ValueError, match="not JSON"):
    strict_json.loads(text)


def test_finite_values_are_unchanged():
  row = {"strategy": "mmal", "round": 2, "percent": 12.5,
         "modality_counts": {"image": 3, "text": 5}}
  assert strict_json.finite_or_none(row) == row
  assert math.isclose(strict_json.loads(strict_json.dumps(0.1)), 0.1)
