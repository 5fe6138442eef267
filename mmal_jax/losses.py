"""Contrastive losses for two towers, also over a data-parallel mesh.

Conventions (big_vision's): row i of `zimg` and of `ztxt` form a positive pair,
every other (image, text) combination in the global batch is a negative;
embeddings are L2-normalised (B, D); `t` is the temperature multiplier
(exp of the learned parameter), `b` the SigLIP bias.

Sharded use: call inside `jax.shard_map` with the batch split over `axis_name`
(zimg, ztxt: the local (B/n, D) rows; t, b replicated). The result is the loss
of the *global* batch, identical on every device:
- `method="all_gather"` gathers the other devices' embeddings and computes the
  local rows of the full (B, B) logits: memory O(B * D + B/n * B).
- `method="ring"` (SigLIP paper, Sec. 3.3) passes text chunks round the ring
  with `ppermute`, n steps of (B/n, B/n) logits: memory O(B/n * (D + B/n)).
Arithmetic is in float32 at least (bfloat16 embeddings are promoted).

Padding. `valid` (B,) bool (the local rows under `shard_map`) marks the real
rows of a batch padded up to a multiple of the device count
(`data.pipeline.train_batches`): padded rows take part in no pair, as image
nor as text, and the normalisation counts real rows only, so the loss and its
gradients equal those of the unpadded batch. `valid=None`: every row is real.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def _promote(zimg, ztxt, *scalars):
  """Embeddings and scalar parameters (shape () or (1,)) in >= float32."""
  dtype = jnp.promote_types(zimg.dtype, jnp.float32)
  return (zimg.astype(dtype), ztxt.astype(dtype),
          *(jnp.reshape(jnp.asarray(s, dtype), ()) for s in scalars))


def _sigmoid_nll(zimg, ztxt, t, b, offset=None, img_valid=None,
                 txt_valid=None):
  """Sum of -log sigmoid(l_ij (t <zimg_i, ztxt_j> + b)) over the block.

  l_ij = +1 at j = offset + i (the positives), -1 elsewhere; offset=None: the
  block holds negatives only. `img_valid` / `txt_valid`: bool masks of the
  block's rows / columns; a pair counts when both are valid.
  """
  logits = t * (zimg @ ztxt.T) + b
  labels = -jnp.ones_like(logits)
  if offset is not None:
    rows, cols = jnp.indices(logits.shape)
    labels = jnp.where(cols == rows + offset, 1., labels)
  nll = jax.nn.log_sigmoid(labels * logits)
  if img_valid is not None:
    nll = jnp.where(img_valid[:, None] & txt_valid[None, :], nll, 0.)
  return -jnp.sum(nll)


def _num_rows(zimg, valid, axis_name):
  """Real rows of the global batch (a traced count when `valid` is given)."""
  if valid is None:
    n = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    return zimg.shape[0] * n
  count = jnp.sum(valid, dtype=zimg.dtype)
  return count if axis_name is None else jax.lax.psum(count, axis_name)


def siglip_loss(zimg, ztxt, t, b, valid=None, *,
                axis_name: Optional[str] = None, method: str = "all_gather"):
  """SigLIP sigmoid loss, normalised as big_vision's siglip trainer.

  loss = -1/B * sum_{i,j} log sigmoid(l_ij * (t <zimg_i, ztxt_j> + b)),
  l_ij = 2 * [i == j] - 1 (mean over images of the sum over texts).
  Args: zimg, ztxt (B, D) (local rows when `axis_name` is set); t, b scalars
  or (1,); valid: optional (B,) bool, the real rows (see module: i, j and B
  then range over real rows only). Returns a scalar (float32; float64 for
  float64 inputs). Cost: 2 * B^2 * D FLOPs over all devices.
  """
  zimg, ztxt, t, b = _promote(zimg, ztxt, t, b)
  if valid is not None:
    valid = jnp.asarray(valid, bool)
  global_batch = _num_rows(zimg, valid, axis_name)
  if axis_name is None:
    return _sigmoid_nll(zimg, ztxt, t, b, 0, valid, valid) / global_batch

  n = jax.lax.axis_size(axis_name)
  if method == "all_gather":
    ztxt_all = jax.lax.all_gather(ztxt, axis_name, tiled=True)
    valid_all = (None if valid is None else
                 jax.lax.all_gather(valid, axis_name, tiled=True))
    offset = jax.lax.axis_index(axis_name) * zimg.shape[0]
    nll = _sigmoid_nll(zimg, ztxt_all, t, b, offset, valid, valid_all)
  elif method == "ring":
    shift = [(i, (i + 1) % n) for i in range(n)]

    def negatives(_, carry):
      chunk, chunk_valid, nll = carry
      chunk = jax.lax.ppermute(chunk, axis_name, shift)
      if chunk_valid is not None:
        chunk_valid = jax.lax.ppermute(chunk_valid, axis_name, shift)
      return (chunk, chunk_valid,
              nll + _sigmoid_nll(zimg, chunk, t, b, None, valid, chunk_valid))

    nll = _sigmoid_nll(zimg, ztxt, t, b, 0, valid, valid)
    _, _, nll = jax.lax.fori_loop(1, n, negatives, (ztxt, valid, nll))
  else:
    raise ValueError(f"Unknown method {method!r}: 'all_gather' or 'ring'.")
  return jax.lax.psum(nll, axis_name) / global_batch


def _softmax_nll(queries, keys, t, offset, query_valid=None, key_valid=None):
  """Sum over queries i of -log softmax_j(t <q_i, k_j>) at j = offset + i;
  with masks, over valid queries and valid keys j only."""
  logits = t * (queries @ keys.T)
  positives = jnp.arange(queries.shape[0]) + offset
  positive_logits = jnp.take_along_axis(logits, positives[:, None], axis=1)
  if key_valid is not None:
    logits = jnp.where(key_valid[None, :], logits, -jnp.inf)
  nll = jax.nn.logsumexp(logits, axis=1) - positive_logits[:, 0]
  if query_valid is not None:
    nll = jnp.where(query_valid, nll, 0.)
  return jnp.sum(nll)


def clip_loss(zimg, ztxt, t, valid=None, *, axis_name: Optional[str] = None):
  """CLIP symmetric softmax contrastive loss (InfoNCE), mean over the batch.

  loss = 1/2B * sum_i [-log softmax_j(t <zimg_i, ztxt_j>)_i
                       -log softmax_j(t <ztxt_i, zimg_j>)_i].
  With `axis_name`, gathers both towers' embeddings (a softmax row needs every
  column). valid: optional (B,) bool, the real rows (i, j and B range over
  them; see module). Returns a scalar. Cost: 4 * B^2 * D FLOPs.
  """
  zimg, ztxt, t = _promote(zimg, ztxt, t)
  if valid is not None:
    valid = jnp.asarray(valid, bool)
  global_batch = _num_rows(zimg, valid, axis_name)
  if axis_name is None:
    zimg_all, ztxt_all, offset, valid_all = zimg, ztxt, 0, valid
  else:
    zimg_all = jax.lax.all_gather(zimg, axis_name, tiled=True)
    ztxt_all = jax.lax.all_gather(ztxt, axis_name, tiled=True)
    valid_all = (None if valid is None else
                 jax.lax.all_gather(valid, axis_name, tiled=True))
    offset = jax.lax.axis_index(axis_name) * zimg.shape[0]
  nll = (_softmax_nll(zimg, ztxt_all, t, offset, valid, valid_all) +
         _softmax_nll(ztxt, zimg_all, t, offset, valid, valid_all))
  if axis_name is not None:
    nll = jax.lax.psum(nll, axis_name)
  return nll / (2 * global_batch)


# MMCSAL (Shen et al. 2024, docs/algorithms.md): Stage 1 objective.


def prototype_concentration(embeddings, prototypes, assignments,
                            alpha: float = 10.):
  """Per-cluster concentration (MMCSAL eq. 3).

  phi_c = mean_{r in C_c} ||r - p_c|| / log(|C_c| + alpha).

  Args: embeddings (N, D), prototypes (C, D) (the K-means centroids the
  distances are measured to), assignments (N,) int in [0, C).
  Returns phi (C,). Clusters with fewer than two members have no
  spread to measure (phi would be 0); as in PCL (Li et al. 2021) they get the
  largest phi of the other clusters. Cost: O(N * D).
  """
  embeddings = embeddings.astype(jnp.promote_types(embeddings.dtype,
                                                   jnp.float32))
  num_clusters = prototypes.shape[0]
  dist = jnp.linalg.norm(embeddings - prototypes[assignments], axis=-1)
  size = jnp.zeros(num_clusters).at[assignments].add(1.)
  total = jnp.zeros(num_clusters).at[assignments].add(dist)
  phi = total / jnp.maximum(size, 1.) / jnp.log(size + alpha)
  measured = size >= 2
  fallback = jnp.max(jnp.where(measured, phi, 0.))
  return jnp.where(measured, phi, fallback)


def prototypical_loss(embeddings, prototypes, assignments, phi, valid=None):
  """One modality's prototypical loss (MMCSAL eq. 2, PCL's ProtoNCE term).

  loss = -mean_i log softmax_c(cos(r_i, p_c) / phi_c) at c = assignments[i]:
  each sample is pulled to its own cluster's prototype and pushed from the
  others, every prototype's logit scaled by its own concentration (as PCL
  implements the per-cluster phi of eq. 2). Args: embeddings (B, D),
  prototypes (C, D), assignments (B,) int, phi (C,); valid: optional (B,)
  bool, the mean over valid rows only (padding, see module).
  Cost: 2 * B * C * D FLOPs.
  """
  embeddings = embeddings.astype(jnp.promote_types(embeddings.dtype,
                                                   jnp.float32))
  r = embeddings / (jnp.linalg.norm(embeddings, axis=-1, keepdims=True) + 1e-8)
  p = prototypes / (jnp.linalg.norm(prototypes, axis=-1, keepdims=True) + 1e-8)
  logits = (r @ p.T) / phi[None, :]
  nll = (jax.nn.logsumexp(logits, axis=1)
         - jnp.take_along_axis(logits, assignments[:, None], axis=1)[:, 0])
  if valid is None:
    return jnp.mean(nll)
  valid = jnp.asarray(valid, bool)
  return jnp.sum(jnp.where(valid, nll, 0.)) / jnp.sum(valid, dtype=nll.dtype)


def mmcsal_loss(z1, z2, prototypes, assignments, phis, tau: float = 0.07,
                valid=None):
  """MMCSAL Stage-1 loss L = 1/2 L_cross + 1/2 L_uni (eqs. 1, 2, 4).

  Args: z1, z2 (B, D) paired embeddings of the two modalities; prototypes,
  assignments, phis: a pair (one per modality) of (C, D), (B,), (C,) arrays;
  valid: optional (B,) bool, the real rows of a padded batch.
  L_cross is `clip_loss` at fixed temperature 1/tau; L_uni the mean of the two
  modalities' `prototypical_loss`. Returns a float32 scalar.
  """
  cross = clip_loss(z1, z2, 1. / tau, valid)
  uni = 0.5 * sum(prototypical_loss(z, p, a, phi, valid) for z, p, a, phi in
                  zip((z1, z2), prototypes, assignments, phis))
  return 0.5 * cross + 0.5 * uni
