"""Vendor peak rates of accelerators, for the benchmarks' fractions of peak."""
from __future__ import annotations

import re

# Per chip: dense bfloat16 TFLOP/s and HBM GB/s, matched in order against the
# lower-cased `device_kind`. NVIDIA quotes tensor-core rates with 2:4
# sparsity; dense is half of that. Sources (vendor spec pages):
# https://www.nvidia.com/en-us/data-center/h100/ (SXM 1979/2 TFLOP/s,
#   3.35 TB/s; PCIe 1513/2, 2 TB/s; NVL 1671/2, 3.9 TB/s)
# https://www.nvidia.com/en-us/data-center/h200/ (SXM 1979/2, 4.8 TB/s;
#   NVL 1671/2, 4.8 TB/s)
# https://www.nvidia.com/en-us/data-center/a100/ (312 dense; 80GB SXM
#   2039 GB/s, 80GB PCIe 1935 GB/s, 40GB 1555 GB/s)
# https://www.nvidia.com/en-us/data-center/l4/ (242/2 TFLOP/s, 300 GB/s)
# https://cloud.google.com/tpu/docs/v4 (275, 1200), .../v5e (197, 819),
# .../v5p (459, 2765), .../v6e (918, 1640). JAX names v5e "TPU v5 lite",
# v5p "TPU v5" and v6e "TPU v6 lite".
PEAKS = (
    (r"h200.*nvl", 835.0, 4800.0),
    (r"h200", 989.0, 4800.0),
    (r"h100.*pcie", 756.0, 2000.0),
    (r"h100.*nvl", 835.0, 3900.0),
    (r"h100", 989.0, 3350.0),
    (r"a100.*40gb", 312.0, 1555.0),
    (r"a100.*pcie", 312.0, 1935.0),
    (r"a100", 312.0, 2039.0),
    (r"\bl4\b", 121.0, 300.0),
    (r"tpu v6 lite|tpu v6e", 918.0, 1640.0),
    (r"tpu v5 lite|tpu v5e", 197.0, 819.0),
    (r"tpu v5", 459.0, 2765.0),
    (r"tpu v4", 275.0, 1200.0),
)


def device_peak(device_kind: str) -> tuple[float, float] | None:
  """(dense bf16 TFLOP/s, HBM GB/s) of one `device_kind` chip, or None."""
  for pattern, tflops, gb_s in PEAKS:
    if re.search(pattern, device_kind.lower()):
      return tflops, gb_s
  return None
