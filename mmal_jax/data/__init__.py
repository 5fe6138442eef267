"""Data: unaligned pools, their sources, oracles, annotation state and model inputs."""
from mmal_jax.data.annotation import Answer, AnnotationState
from mmal_jax.data.coco import load_coco
from mmal_jax.data.features import load_features
from mmal_jax.data.oracle import AwaitingAnnotations, FileOracle, Oracle, SimulatedOracle
from mmal_jax.data.pool import (BytesRefs, FileRefs, ItemRefs, RangeRefs,
                                UnalignedPool, group_layout, matching_components,
                                split_groups, stream_buffers)
from mmal_jax.data.preprocess import item_batches, pair_batches, prepare_items
from mmal_jax.data.shapes import make_colorswap, make_single_objects
