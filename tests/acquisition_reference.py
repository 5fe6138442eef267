"""Plain numpy (float64) references for the acquisition kernels and strategies."""
import numpy as np


def distances(x, c, metric="euclidean"):
  x = np.asarray(x, np.float64)
  c = np.asarray(c, np.float64)
  if metric == "cosine":  # sklearn's cosine_distances.
    return 1.0 - normalize(x) @ normalize(c).T
  return np.sqrt(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1))


def min_distance(x, c, metric="euclidean"):
  if len(c) == 0:
    return np.full(len(x), np.inf)
  return distances(x, c, metric).min(axis=1)


def kcenter_greedy(x, k, selected=None, metric="euclidean", eligible=None):
  """Algorithm 2; with nothing selected, starts from the farthest from the mean."""
  x = np.asarray(x, np.float64)
  n = len(x)
  selected = np.zeros(n, bool) if selected is None else selected
  eligible = ~selected if eligible is None else eligible & ~selected
  picks = []
  if selected.any():
    dist = min_distance(x, x[selected], metric)
  else:
    mean = x[eligible].mean(axis=0)
    dist = distances(x, mean[None], metric)[:, 0]
    dist[~eligible] = -np.inf
    first = int(np.argmax(dist))
    picks.append(first)
    dist = distances(x, x[first][None], metric)[:, 0]
    eligible = eligible.copy()
    eligible[first] = False
  dist = np.where(eligible, dist, -np.inf)
  while len(picks) < k:
    j = int(np.argmax(dist))
    picks.append(j)
    dist = np.minimum(dist, distances(x, x[j][None], metric)[:, 0])
    eligible[j] = False
    dist[~eligible] = -np.inf
  return np.asarray(picks[:k])


def top2_margin(queries, keys, key_mask=None):
  sims = np.asarray(queries, np.float64) @ np.asarray(keys, np.float64).T
  if key_mask is not None:
    sims = sims[:, key_mask]
  if sims.shape[1] < 2:
    return np.full(len(queries), np.inf)
  top = np.sort(sims, axis=1)
  return top[:, -1] - top[:, -2]


def normalize(z):
  z = np.asarray(z, np.float64)
  return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def mmal(embeddings, annotated, budget, coreset_size, modality, metric="euclidean"):
  """Algorithm 1 with a fixed modality choice rule ('auto' needs no ties)."""
  z = {m: normalize(e) for m, e in embeddings.items()}
  available = {m: ~annotated[m] for m in z}
  if modality == "auto":
    radius = {m: min_distance(z[m][available[m]], z[m][annotated[m]],
                              metric).max() for m in z}
    modality = max(z, key=lambda m: radius[m])
  coreset = kcenter_greedy(z[modality], coreset_size, annotated[modality],
                           metric, eligible=available[modality])
  margins = np.zeros(len(coreset))
  for other in z:
    if other != modality:
      margins += top2_margin(z[modality][coreset], z[other], available[other])
  return [(modality, int(i))
          for i in coreset[np.argsort(margins, kind="stable")[:budget]]]


def uncertainty(embeddings, annotated, budget):
  z = {m: normalize(e) for m, e in embeddings.items()}
  scored = []
  for order, m in enumerate(z):
    items = np.flatnonzero(~annotated[m])
    margins = np.zeros(len(items))
    for other in z:
      if other != m:
        margins += top2_margin(z[m][items], z[other], ~annotated[other])
    scored += [(margins[i], order, int(items[i]), m) for i in range(len(items))]
  scored.sort()
  return [(m, i) for _, _, i, m in scored[:budget]]
