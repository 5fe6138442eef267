"""The annotation page's parts without a browser: the ranking kernel and
file, the round's answers (compare-and-set, undo, persistence, submit), the
items, the report table, and the server's access control over HTTP.

`synthetic_workdir` (also used by test_annotate_browser.py) builds, in a
second, a workdir waiting for round 1's answers without running a model: a
COCO-format pool of 10 PNG files whose captions include HTML and script, the
queries written by the real `FileOracle`, and a ranking file written by
`ranking.write` from made-up embeddings.
"""
import concurrent.futures
import http.client
import io
import json
import os
import secrets
import socket
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

import test_loop
from mmal_jax import config_lib
from mmal_jax import fs
from mmal_jax import report
from mmal_jax import sharding
from mmal_jax.annotate import items as items_lib
from mmal_jax.annotate import ranking
from mmal_jax.annotate import server
from mmal_jax.annotate import store as store_lib
from mmal_jax.data import oracle as oracle_lib
from mmal_jax.data import pool as pool_lib
from mmal_jax.data.annotation import Answer

ONE_DEVICE_ONLY = pytest.mark.skipif(
    jax.device_count() > 1, reason="runs in the 1-device pass only: the "
    "annotation server does not depend on the device count")

SCRIPT_CAPTION = "<script>window.__xss = 1</script>a red square"
IMG_CAPTION = '<img src=x onerror="window.__xss = 2">a green square'
_COLOURS = [(220, 30, 30), (30, 200, 60), (30, 60, 220), (240, 220, 30),
            (240, 130, 20), (150, 40, 200), (20, 200, 220), (250, 120, 200),
            (120, 120, 120), (90, 50, 20)]
_NAMES = ["red", "green", "blue", "yellow", "orange", "purple", "cyan", "pink",
          "grey", "brown"]
# Text queries first: the first query shown is the script caption.
QUERIES = [("text", 0), ("text", 1), ("image", 2), ("image", 3), ("image", 4)]


def synthetic_workdir(root) -> tuple[str, pool_lib.UnalignedPool]:
  """A workdir waiting for round 1's answers (see the module docstring);
  returns (workdir, pool)."""
  root = str(root)
  images = os.path.join(root, "data", "images")
  os.makedirs(images)
  captions = [SCRIPT_CAPTION, IMG_CAPTION] + [
      f"a {name} square" for name in _NAMES[2:]]
  for i, colour in enumerate(_COLOURS):
    Image.new("RGB", (12, 12), colour).save(os.path.join(images, f"{i}.png"))
  coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(10)],
          "annotations": [{"id": i, "image_id": i, "caption": c}
                          for i, c in enumerate(captions)]}
  captions_json = os.path.join(root, "data", "captions.json")
  with open(captions_json, "w") as f:
    json.dump(coco, f)
  config = config_lib.base_config()
  config.data.update(source="coco", train_json=captions_json,
                     train_images=images, eval_json=captions_json,
                     eval_images=images, image_size=0)
  config.oracle.update(kind="file", top_k=3, num_ranked=6, browse_dim=4)
  workdir = os.path.join(root, "workdir")
  fs.write_text(os.path.join(workdir, "config.json"),
                config.to_json_best_effort(sort_keys=True))
  pool = items_lib.load_pool(items_lib.load_config(workdir))
  rng = np.random.default_rng(0)
  image = np.eye(10, 8, dtype=np.float32) + 0.3 * rng.standard_normal(
      (10, 8)).astype(np.float32)
  text = np.zeros_like(image)
  for t in range(pool.num_items("text")):
    ((_, i),) = pool.partners("text", t)
    text[t] = image[i] + 0.2 * rng.standard_normal(8)
  embeddings = {"image": image, "text": text}
  ranking.write(ranking.path(workdir, 1), embeddings,
                {m: np.arange(10) for m in embeddings}, QUERIES,
                mesh=sharding.make_mesh(), top_k=3, num_ranked=6,
                browse_dim=4)
  with pytest.raises(oracle_lib.AwaitingAnnotations):
    oracle_lib.FileOracle(workdir, pool).answer(1, QUERIES)
  return workdir, pool


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  return synthetic_workdir(tmp_path_factory.mktemp("synthetic"))


def fresh_copy(synthetic, tmp_path) -> str:
  """A private copy of the synthetic workdir (its data stays shared)."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "workdir")
  shutil.copytree(synthetic[0], workdir)
  return workdir


class LiveServer:
  """`server.create_app` on 127.0.0.1 in a thread of this process."""

  def __init__(self, workdir: str, pool, top_k: int = 0):
    import uvicorn  # pylint: disable=g-import-not-at-top
    self.annotator = server.Annotator(workdir, pool, top_k=top_k)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    self.port = sock.getsockname()[1]
    self.token = secrets.token_urlsafe(16)
    self.cookie = f"mmal_annotate_{self.port}"
    self.url = f"http://127.0.0.1:{self.port}/?token={self.token}"
    self.server = uvicorn.Server(uvicorn.Config(
        server.create_app(self.annotator, self.token, self.cookie),
        log_level="warning", access_log=False))
    self.thread = threading.Thread(target=self.server.run,
                                   kwargs={"sockets": [sock]}, daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      assert time.monotonic() < deadline, "the server did not start"
      time.sleep(0.02)

  def request(self, method: str, path: str, body=None, headers=None):
    """(status, headers, body bytes); `path` is sent exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return out

  def api(self, method: str, path: str, body=None):
    status, _, data = self.request(
        method, path, body, {server.TOKEN_HEADER: self.token,
                             "Content-Type": "application/json"})
    return status, json.loads(data)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(timeout=30)


@pytest.fixture
def live(synthetic, tmp_path):
  live = LiveServer(fresh_copy(synthetic, tmp_path), synthetic[1])
  yield live
  live.stop()


def _true_partner(pool, modality, index):
  ((m, i),) = pool.partners(modality, index)
  return [m, i]


# ----------------------------------------------------------------------
# The ranking.


def _brute_force(queries, keys, k):
  sims = queries @ keys.T
  order = np.lexsort((np.broadcast_to(np.arange(keys.shape[0]), sims.shape),
                      -sims))[:, :k]
  return np.take_along_axis(sims, order, 1), order


@pytest.mark.parametrize("num_keys,k", [(2500, 40), (37, 37), (5, 3)])
def test_top_k_matches_equal_a_full_sort(num_keys, k):
  # 2500 rows: three 1024-row tiles on one device (the last one shifted
  # back), 313 rows per device on 8; equal rows test the tie order.
  rng = np.random.default_rng(num_keys)
  keys = rng.standard_normal((num_keys, 16)).astype(np.float32)
  keys[num_keys // 2] = keys[1]
  pool = rng.standard_normal((11, 16)).astype(np.float32)
  rows = np.array([7, 0, 10, 3])
  mesh = sharding.make_mesh()
  scores, index = ranking.top_k_matches(
      ranking.lay_out(keys, mesh), num_keys, rows,
      ranking.lay_out(pool, mesh), k, mesh)
  want_scores, want_index = _brute_force(pool[rows], keys, k)
  np.testing.assert_array_equal(index, want_index)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_ranking_file(synthetic):
  workdir, pool = synthetic
  r = ranking.load(ranking.path(workdir, 1))
  assert r.queries == QUERIES and r.top_k == 3
  assert r.match_modality == ["image", "image", "text", "text", "text"]
  assert r.match_index.shape == (5, 6)
  # Every query's partner is its best match (the embeddings say so), and
  # rank_of finds it.
  for k, (m, i) in enumerate(QUERIES):
    partner = tuple(_true_partner(pool, m, i))
    assert r.match_index[k, 0] == partner[1]
    assert r.rank_of(k, [partner]) == 1
    assert r.rank_of(k, [(m, i)]) is None  # Its own modality: not ranked.
  assert np.all(np.diff(r.match_score, axis=1) <= 0)
  # Browse vectors: projected from 8 to 4 dimensions, normalised, float16.
  vectors = r.browse_vectors["text"]
  assert vectors.shape == (10, 4) and vectors.dtype == np.float16
  np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32),
                                            axis=1), 1, atol=2e-3)
  index, scores = r.similar("text", r.vector("text", 5))
  assert index[0] == 5 and abs(scores[0] - 1) < 3e-3
  assert r.vector("text", 99) is None
  assert ranking.load(os.path.join(workdir, "nothing.npz")) is None


def test_bad_ranking_file_is_named(tmp_path):
  path = str(tmp_path / "round_1.ranking.npz")
  fs.write_bytes(path, b"not a zip")
  with pytest.raises(ValueError, match="round_1.ranking.npz cannot be read"):
    ranking.load(path)


def test_oracle_config_is_checked():
  for overrides, words in (({"oracle.top_k": 0}, "oracle.top_k must be"),
                           ({"oracle.browse_dim": -1}, "oracle.browse_dim"),
                           ({"oracle.top_k": 9, "oracle.num_ranked": 4},
                            "num_ranked=4 must be >= config.oracle.top_k=9")):
    with pytest.raises(ValueError, match=words):
      test_loop.tiny_config(**overrides)


# ----------------------------------------------------------------------
# One round's answers.


def _store(workdir, pool):
  r = ranking.load(ranking.path(workdir, 1))
  return store_lib.RoundStore(workdir, 1, QUERIES, pool.sizes,
                              rank_of=r.rank_of, true_partners=pool.partners)


def _answer(store, k, partners, via="ranking", **kw):
  return store.answer(k, [tuple(p) for p in partners], time_s=1.5, via=via,
                      shown=3, **kw)


def test_compare_and_set_undo_and_submit(synthetic, tmp_path):
  workdir = fresh_copy(synthetic, tmp_path)
  pool = synthetic[1]
  store = _store(workdir, pool)
  first = _answer(store, 0, [_true_partner(pool, "text", 0)])
  assert first["rank"] == 1 and first["true_rank"] == 1
  with pytest.raises(store_lib.Conflict) as conflict:
    _answer(store, 0, [["image", 5]])
  assert conflict.value.answer["id"] == first["id"]
  with pytest.raises(store_lib.Conflict):
    store.undo(0, "not-its-id")
  store.undo(0, first["id"])
  with pytest.raises(store_lib.Conflict):  # Undone already.
    store.undo(0, first["id"])
  for bad, words in (([["text", 3]], "own modality"),
                     ([["image", 10]], "outside"),
                     ([["image", 1], ["image", 1]], "listed twice")):
    with pytest.raises(ValueError, match=words):
      _answer(store, 0, bad)
  with pytest.raises(ValueError, match="via 'none'"):
    _answer(store, 0, [], via="ranking")
  with pytest.raises(ValueError, match="time_s"):
    store.answer(0, [], time_s=float("nan"), via="none")
  with pytest.raises(ValueError, match="query must be"):
    _answer(store, 5, [])
  expected = []
  for k, (m, i) in enumerate(QUERIES):
    partners = [] if k == 3 else [_true_partner(pool, m, i)]
    _answer(store, k, partners, via="none" if k == 3 else "search")
    expected.append(Answer(1, m, i, tuple(tuple(p) for p in partners)))
    # A kill after any confirmed answer: a new server finds them all.
    assert _store(workdir, pool).answers == store.answers
    assert not fs.exists(store.answers_path)
  store.submit()
  assert oracle_lib.FileOracle(workdir, pool).answer(1, QUERIES) == expected
  with pytest.raises(store_lib.Conflict, match="submitted"):
    store.undo(4, store.answers[4]["id"])
  with pytest.raises(store_lib.Conflict, match="exists already"):
    _store(workdir, pool).submit()
  record = json.loads(fs.read_text(store.path))
  assert len(record["undone"]) == 1 and record["submitted_at"]
  summary = store_lib.summary(record)
  assert summary == {
      "round": 1, "queries": 5, "answered": 5, "median_s": 1.5,
      "mean_s": 1.5, "chosen": 4, "in_top_k": 4, "searched": 4, "none": 1,
      "undos": 1, "true_known": 5, "true_in_top_k": 5, "submitted": True}


def test_submit_needs_every_answer_and_records_match_queries(synthetic,
                                                             tmp_path):
  workdir = fresh_copy(synthetic, tmp_path)
  store = _store(workdir, synthetic[1])
  _answer(store, 0, [["image", 0]])
  with pytest.raises(store_lib.Conflict, match="4 of 5 queries are not"):
    store.submit()
  other = store_lib.RoundStore.__new__(store_lib.RoundStore)
  with pytest.raises(ValueError, match="other queries"):
    other.__init__(workdir, 1, QUERIES[::-1], synthetic[1].sizes)
  fs.write_text(store.path, "{torn")
  with pytest.raises(ValueError, match="round_1.json cannot be read"):
    _store(workdir, synthetic[1])


def test_racing_answers_to_one_query_keep_one(synthetic, tmp_path):
  workdir = fresh_copy(synthetic, tmp_path)
  store = _store(workdir, synthetic[1])

  def attempt(i):
    try:
      return _answer(store, 2, [["text", i]])["partners"]
    except store_lib.Conflict:
      return None

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    won = [p for p in pool.map(attempt, range(8)) if p is not None]
  assert len(won) == 1
  assert json.loads(fs.read_text(store.path))["answers"]["2"]["partners"] == (
      won[0])


def test_report_shows_the_page_measurements(synthetic, tmp_path):
  workdir = fresh_copy(synthetic, tmp_path)
  pool = synthetic[1]
  store = _store(workdir, pool)
  ranked = ranking.load(ranking.path(workdir, 1)).match_index
  for k, (m, i) in enumerate(QUERIES):
    # Query 4 answered with the match ranked second.
    partner = _true_partner(pool, m, i)
    chosen = (partner[0], int(ranked[k, 1])) if k == 4 else tuple(partner)
    store.answer(k, [chosen], time_s=2.0 * (k + 1), via="ranking", shown=1)
  row = {"strategy": "mmal", "seed": 0, "round": 1, "queries": 5, "pairs": 5,
         "percent": 50.0, "accuracy": 1.0}
  text = report.write(workdir, "accuracy", save=False, rows=[row])
  assert "## Annotation in the browser" in text
  # Median of 2, 4, 6, 8, 10 s; 4 of 5 chosen partners in the top 1 shown;
  # the dataset's partner was in it for all 5; not submitted.
  assert ("| 1 | 5/5 (open) | 6.0, 6.0 | 4/5 (80%) | 0 | 0 | 0 | 5/5 (100%) |"
          in text)


# ----------------------------------------------------------------------
# Items.


def test_items_as_the_page_shows_them(synthetic):
  pixels = np.random.default_rng(0).integers(0, 255, (3, 5, 5, 3), np.uint8)
  bmp = io.BytesIO()
  Image.fromarray(pixels[0]).save(bmp, format="BMP")
  png = io.BytesIO()
  Image.fromarray(pixels[1]).save(png, format="PNG")
  pool = pool_lib.UnalignedPool({
      "image": pool_lib.BytesRefs([bmp.getvalue(), png.getvalue(),
                                   b"<svg onload=alert(1)>"]),
      "text": ("A Red circle", "a blue Square", "red square")})
  items = items_lib.Items(pool)
  assert (items.kind("image"), items.kind("text")) == ("image", "text")
  body, media_type = items.image("image", 0)  # BMP: re-encoded as PNG.
  assert media_type == "image/png"
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))),
                                pixels[0])
  assert items.image("image", 1) == (png.getvalue(), "image/png")
  with pytest.raises(ValueError, match="not an image"):
    items.image("image", 2)  # Never served as it is.
  assert items.search("text", "red SQUARE") == [2]
  assert items.search("text", "square") == [1, 2]
  assert not items.has("image", 3) and not items.has("image", -1)
  assert not items.has("../image", 0) and not items.has("image", True)
  shapes = items_lib.Items(pool_lib.UnalignedPool(
      {"image": pixels, "text": ("a", "b", "c")}))
  body, _ = shapes.image("image", 2)  # In-memory pixels: PNG on the fly.
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))),
                                pixels[2])
  files = items_lib.Items(synthetic[1])  # FileRefs: the file's own bytes.
  body, media_type = files.image("image", 4)
  assert media_type == "image/png" and body == fs.read_bytes(
      synthetic[1].items["image"][4])
  assert files.describe("text", 0) == {"modality": "text", "index": 0,
                                       "kind": "text", "text": SCRIPT_CAPTION}


# ----------------------------------------------------------------------
# The server over HTTP.


@ONE_DEVICE_ONLY
def test_every_request_needs_the_token(live):
  paths = ["/", "/static/app.js", "/item/image/0", "/api/round",
           "/api/answers", "/api/search?modality=text&q=red", "/favicon.ico"]
  for path in paths:
    for headers in ({}, {server.TOKEN_HEADER: "wrong"},
                    {"Cookie": f"{live.cookie}=wrong"}):
      status, _, body = live.request("GET", path, headers=headers)
      assert status == 403, (path, headers)
      assert b"token" in body
    status, _, _ = live.request("GET", f"{path}{'&' if '?' in path else '?'}"
                                f"token=x{live.token}")
    assert status == 403, path
  # The printed address: a cookie, and the token leaves the address bar.
  status, headers, _ = live.request("GET", f"/?token={live.token}")
  assert status == 303 and headers["location"] == "/"
  cookie = headers["set-cookie"].split(";")[0]
  assert cookie == f"{live.cookie}={live.token}"
  assert "HttpOnly" in headers["set-cookie"]
  assert "samesite=strict" in headers["set-cookie"].lower()
  for path in paths:
    status, headers, _ = live.request("GET", path, headers={"Cookie": cookie})
    assert status in (200, 204), path
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
  # A POST needs the header: another site's form carries only the cookie.
  body = {"query": 0, "partners": [], "via": "none", "time_s": 1.0}
  status, _, _ = live.request("POST", "/api/answer", body,
                              {"Cookie": cookie,
                               "Content-Type": "application/json"})
  assert status == 403
  assert live.annotator.store.answers == {}
  assert live.api("POST", "/api/answer", body)[0] == 200


@ONE_DEVICE_ONLY
def test_only_pool_items_and_the_page_assets_are_served(live):
  secret = os.path.join(os.path.dirname(live.annotator.workdir), "secret.txt")
  with open(secret, "w") as f:
    f.write("TOP SECRET")
  workdir = live.annotator.workdir
  attempts = [
      "/static/../server.py", "/static/..%2fserver.py",
      "/static/%2e%2e%2fserver.py",
      "/static/%2e%2e/%2e%2e/config.json", "/static//etc/passwd",
      "/static/%2fetc%2fpasswd", "/static/index.html/..", "/static/.",
      "/item/image/0/../../config.json", "/item/image/..%2f..%2fconfig.json",
      "/item/%2e%2e/0", "/item/image/%2e%2e%2fsecret.txt", "/item/text/0",
      "/item/image/10", "/item/image/-1", "/item/image/1e1", "/item/image/%30x",
      "/item/..%2fdata/0", f"/item/{workdir}/0", "//etc/passwd",
      "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", f"/{secret}",
      f"/static/{secret}", "/api/../config.json", "/config.json",
      "/queries/round_1.jsonl", "/annotate/round_1.json"]
  for path in attempts:
    status, _, body = live.request("GET", path,
                                   headers={server.TOKEN_HEADER: live.token})
    assert status in (400, 404), (path, status)
    assert b"SECRET" not in body and b"root:" not in body, path
    assert b"import" not in body and b"oracle" not in body, path
  for path, media_type in (("/static/app.js", "text/javascript"),
                           ("/static/app.css", "text/css"),
                           ("/item/image/3", "image/png")):
    status, headers, _ = live.request(
        "GET", path, headers={server.TOKEN_HEADER: live.token})
    assert status == 200 and headers["content-type"].startswith(media_type)


@ONE_DEVICE_ONLY
def test_api_answers_by_compare_and_set(live):
  status, data = live.api("GET", "/api/round")
  assert status == 200 and len(data["queries"]) == 5 and data["shown"] == 3
  assert data["queries"][0]["item"]["text"] == SCRIPT_CAPTION
  assert [m["rank"] for m in data["queries"][2]["matches"]] == [1, 2, 3]

  def post(i):
    return live.api("POST", "/api/answer", {
        "query": 2, "partners": [["text", i]], "via": "ranking",
        "time_s": 0.5, "client": f"c{i}"})

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    results = list(pool.map(post, range(6)))
  assert sorted(s for s, _ in results) == [200] + [409] * 5
  winner = next(d["answer"] for s, d in results if s == 200)
  assert all(d["answer"] == winner for s, d in results if s == 409)
  assert live.api("GET", "/api/answers")[1]["answers"]["2"] == winner
  assert "true_rank" not in winner  # The page never sees the truth.
  assert live.api("POST", "/api/undo", {"query": 2, "id": "x"})[0] == 409
  assert live.api("POST", "/api/undo", {"query": 2,
                                        "id": winner["id"]})[0] == 200
  assert live.api("POST", "/api/submit", {})[0] == 409  # Not complete.
  for body in ({"query": 2, "partners": "text 3"}, {"query": "2"}, [1]):
    assert live.api("POST", "/api/answer", body)[0] == 400
  status, found = live.api("GET", "/api/search?modality=text&q=square&limit=3")
  assert status == 200 and found["total"] == 10 and len(found["items"]) == 3
  assert live.api("GET", "/api/search?modality=image&q=x")[0] == 400
  status, more = live.api("GET", "/api/more?query=2&offset=3")
  assert [m["rank"] for m in more["items"]] == [4, 5, 6]
  status, similar = live.api("GET", "/api/similar?modality=text&of=image:4")
  assert status == 200 and similar["total"] == 10
  assert live.api("GET", "/api/similar?modality=text&of=image:99")[0] == 400


@ONE_DEVICE_ONLY
def test_a_gcs_workdir(synthetic, gcs_bucket):
  local, pool = synthetic
  workdir = f"{gcs_bucket}/run"
  for name in ("config.json", "queries/round_1.jsonl",
               "queries/round_1.ranking.npz"):
    fs.write_bytes(f"{workdir}/{name}", fs.read_bytes(os.path.join(local,
                                                                   name)))
  annotator = server.Annotator(workdir, items_lib.load_pool(
      items_lib.load_config(workdir)), top_k=2)
  assert annotator.round_index == 1 and annotator.shown == 2
  for k, (m, i) in enumerate(QUERIES):
    annotator.store.answer(k, [tuple(_true_partner(pool, m, i))], time_s=1.0,
                           via="ranking", shown=2)
  restarted = server.Annotator(workdir, annotator.pool)
  assert restarted.store.answers == annotator.store.answers
  restarted.store.submit()
  answers = oracle_lib.FileOracle(workdir, pool).answer(1, QUERIES)
  assert [a.partners for a in answers] == [
      (tuple(_true_partner(pool, m, i)),) for m, i in QUERIES]
  assert "| 1 | 5/5 |" in "\n".join(store_lib.markdown(workdir))


def test_the_server_follows_the_run_to_its_next_round(synthetic, tmp_path):
  workdir = fresh_copy(synthetic, tmp_path)
  pool = synthetic[1]
  annotator = server.Annotator(workdir, pool)
  assert annotator.round_index == 1 and annotator.warning is None
  # The resumed run asks for round 2 (written by an older version: no
  # ranking file).
  with pytest.raises(oracle_lib.AwaitingAnnotations):
    oracle_lib.FileOracle(workdir, pool).answer(2, [("image", 7)])
  annotator.refresh(force=True)
  assert annotator.round_index == 2 and annotator.ranking is None
  assert "No ranking file for round 2" in annotator.warning
  assert annotator.round_json()["queries"][0]["matches"] == []
  assert annotator.store.queries == [("image", 7)]


def test_a_workdir_without_queries_is_refused(synthetic, tmp_path):
  workdir = fresh_copy(synthetic, tmp_path)
  fs.rmtree(os.path.join(workdir, "queries"))
  with pytest.raises(ValueError, match="No round of .* awaits answers"):
    server.Annotator(workdir, synthetic[1])
  with pytest.raises(ValueError, match="config.json not found"):
    items_lib.load_config(str(tmp_path / "nothing"))
