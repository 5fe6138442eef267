"""The annotation page in a real browser (Debian's chromium driven by
Playwright): a tiny run waits for answers (exit 3), the page answers every
query (keys, clicks, a caption search, one undo, one "none"), and the
resumed run finishes with the annotated set a simulated oracle gives for the
same answers; captions holding HTML never run; two browsers on one round;
the server killed mid-round.

Chromium: `apt-get install -y chromium` (`.ci/run` does it); without it
these tests skip, except under CI (`CI` set), where they fail.

The time per answer the clicks took is printed (`pytest -s`) and written to
results.md's "Annotation in the browser" table of the resumed run. With
MMAL_ANNOTATE_SCREENSHOT=FILE.png the first test saves the page (a caption
search under way) there: docs/annotate_page.png was taken so.
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import jax
import pytest

import conftest
import test_annotate
from mmal_jax import fs
from mmal_jax.annotate import items as items_lib
from mmal_jax.annotate import store as store_lib
from mmal_jax.data import oracle as oracle_lib
from mmal_jax.data.annotation import Answer, AnnotationState

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-quic", "--no-first-run",
                 "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = os.path.join(_ROOT, "tests", "tiny_experiment.py") + ":mmal"
_TIMEOUT_MS = 30_000

if not os.path.exists(CHROMIUM) and os.environ.get("CI"):
  raise RuntimeError(f"{CHROMIUM} is missing: .ci/run installs chromium.")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(jax.device_count() > 1, reason="runs in the 1-device "
                       "pass only: the page does not depend on the device "
                       "count"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=(
        f"no {CHROMIUM}: apt-get install -y chromium"))]


synthetic = test_annotate.synthetic  # The module fixture.


@pytest.fixture(scope="module")
def browser():
  # pylint: disable-next=g-import-not-at-top
  from playwright.sync_api import sync_playwright
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()


def new_page(browser, url):
  """A fresh browser context (its own cookies) on `url`; JS errors fail."""
  context = browser.new_context(viewport={"width": 1280, "height": 860})
  context.set_default_timeout(_TIMEOUT_MS)
  page = context.new_page()
  errors = []
  page.on("pageerror", lambda e: errors.append(str(e)))
  page.errors = errors
  page.goto(url)
  page.wait_for_selector("#matches .card, #query-item .item")
  return page


def wait_for_query(page, k):
  page.wait_for_function(
      "k => document.getElementById('query-title').textContent"
      ".startsWith(`Query ${k} of`)", arg=k + 1)


def card(page, where, modality, index):
  return page.locator(f"{where} .card[data-modality='{modality}']"
                      f"[data-index='{index}']")


def wait_status(page, text):
  page.wait_for_function(
      "t => document.getElementById('query-status').textContent.includes(t)",
      arg=text)


class ServerProcess:
  """`python -m mmal_jax.annotate --workdir W --port 0` in a subprocess."""

  def __init__(self, workdir, tmp_path):
    self.out = tmp_path / f"server_{time.monotonic_ns()}.out"
    with open(self.out, "w") as out:
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "mmal_jax.annotate", "--workdir", workdir,
           "--port", "0"], cwd=_ROOT, stdout=out, stderr=subprocess.STDOUT,
          env=dict(os.environ, PYTHONPATH=_ROOT))
    deadline = time.monotonic() + 300
    while True:
      lines = [l for l in self.out.read_text().splitlines()
               if l.startswith("Open http://127.0.0.1:")]
      if lines:
        self.url = lines[0].split()[1]
        break
      assert self.proc.poll() is None, self.out.read_text()
      assert time.monotonic() < deadline, "the server did not start"
      time.sleep(0.2)

  def stop(self, sig=signal.SIGTERM):
    if self.proc.poll() is None:
      self.proc.send_signal(sig)
    self.proc.wait(timeout=60)


def _main(workdir):
  """The tiny file-oracle run: `python -m mmal_jax.main`; (status, stdout)."""
  env = dict(os.environ, PYTHONPATH=_ROOT,
             **conftest.child_cache_env(private=False))
  result = subprocess.run(
      [sys.executable, "-m", "mmal_jax.main", "--config", _CONFIG,
       "--workdir", workdir, "--config.oracle.kind=file",
       "--config.num_rounds=1"], cwd=_ROOT, env=env, capture_output=True,
      text=True, timeout=900)
  return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def waiting_workdir(tmp_path_factory):
  """A tiny run (one round, 8 queries) that stopped for answers."""
  workdir = str(tmp_path_factory.mktemp("run") / "workdir")
  status, output = _main(workdir)
  assert status == 3, output
  assert "Round 1 awaits annotations" in output
  assert fs.exists(os.path.join(workdir, "queries", "round_1.ranking.npz"))
  return workdir


def _find_by_search(page, other_kind, caption, modality, index,
                    screenshot=None):
  """Finds (modality, index) below the top K and clicks it: by its caption
  in the filter, or by browsing images by similarity to the query."""
  if other_kind == "text":
    page.fill("#filter", caption)
  else:
    page.click("#browse")
  target = card(page, "#results", modality, index)
  page.wait_for_selector("#results .card")
  while not target.count():
    shown = page.locator("#results .card").count()
    page.click("#results-more")
    page.wait_for_function(
        "n => document.querySelectorAll('#results .card').length > n",
        arg=shown)
  if screenshot:
    page.screenshot(path=screenshot, full_page=True)
  target.first.click()


def test_answer_every_query_then_the_run_resumes(browser, waiting_workdir,
                                                 tmp_path, record_property):
  workdir = str(tmp_path / "workdir")
  shutil.copytree(waiting_workdir, workdir)
  pool = items_lib.load_pool(items_lib.load_config(workdir))
  queries = oracle_lib.FileOracle(workdir, pool).pending_queries(1)
  none_query, undo_query, search_query = 2, 1, 3
  server = ServerProcess(workdir, tmp_path)
  try:
    page = new_page(browser, server.url)
    round_data = page.evaluate("() => fetch('/api/round', {headers: {"
                               "'X-Annotate-Token': document.querySelector("
                               "'meta[name=annotate-token]').content}})"
                               ".then(r => r.json())")
    expected = []
    for k, (m, i) in enumerate(queries):
      wait_for_query(page, k)
      ((pm, pi),) = pool.partners(m, i)
      matches = [(x["item"]["modality"], x["item"]["index"])
                 for x in round_data["queries"][k]["matches"]]
      if k == undo_query:  # A wrong click, undone with u.
        wrong = next(x for x in matches if x != (pm, pi))
        card(page, "#matches", *wrong).click()
        wait_for_query(page, k + 1)
        page.keyboard.press("u")
        wait_for_query(page, k)
        wait_status(page, "Not answered yet")
      if k == none_query:
        page.keyboard.press("0")
        partners = ()
      elif (pm, pi) in matches[:9] and k != search_query:
        if k % 2:
          card(page, "#matches", pm, pi).click()
        else:
          page.keyboard.press(str(matches.index((pm, pi)) + 1))
        partners = ((pm, pi),)
      else:
        other_kind = round_data["queries"][k]["other_kind"]
        _find_by_search(
            page, other_kind, items_lib.Items(pool).text(pm, pi)
            if other_kind == "text" else "", pm, pi,
            screenshot=os.environ.get("MMAL_ANNOTATE_SCREENSHOT")
            if k == search_query else None)
        partners = ((pm, pi),)
      expected.append(Answer(1, m, i, partners))
    page.wait_for_selector("#submit:not([disabled])")
    page.keyboard.press("Enter")
    page.wait_for_selector("#banner:has-text('Submitted')")
    assert not page.errors
  finally:
    server.stop()

  record = json.loads(fs.read_text(store_lib.record_path(workdir, 1)))
  seconds = [a["time_s"] for a in record["answers"].values()]
  assert len(seconds) == len(queries) and min(seconds) > 0
  assert len(record["undone"]) == 1
  assert record["answers"][str(none_query)]["via"] == "none"
  assert {a["input"] for a in record["answers"].values()} == {"click", "key"}
  assert record["answers"][str(search_query)]["via"] in ("search", "similar")
  median = statistics.median(seconds)
  record_property("seconds_per_answer_median", median)
  print(f"\nTime per answer, {len(seconds)} answers by the test's clicks and "
        f"keys: median {median:.2f} s, mean {statistics.mean(seconds):.2f} s "
        f"(os.getloadavg() = {os.getloadavg()})")

  status, output = _main(workdir)
  assert status == 0, output
  state = AnnotationState.load(
      os.path.join(workdir, "runs", "mmal", "seed_0", "annotation.json"), pool)
  # A simulated oracle told the same: its answers, with one "none".
  simulated = oracle_lib.SimulatedOracle(pool).answer(1, queries)
  simulated[none_query] = Answer(1, *queries[none_query], ())
  assert state.log == expected == simulated
  results = fs.read_text(os.path.join(workdir, "results.md"))
  assert "## Annotation in the browser" in results
  assert f"| 1 | {len(queries)}/{len(queries)} | {median:.1f}, " in results


def test_captions_are_text_never_html(browser, synthetic, tmp_path):
  live = test_annotate.LiveServer(test_annotate.fresh_copy(synthetic,
                                                           tmp_path),
                                  synthetic[1])
  try:
    page = new_page(browser, live.url)
    # Query 1 is the script caption, shown large; query 2's is an <img>
    # with an onerror handler; both are also candidates and search results.
    query = page.locator("#query-item .caption")
    assert query.text_content() == test_annotate.SCRIPT_CAPTION
    page.keyboard.press("ArrowRight")
    wait_for_query(page, 1)
    assert query.text_content() == test_annotate.IMG_CAPTION
    page.keyboard.press("ArrowRight")
    wait_for_query(page, 2)  # An image query: captions as candidates.
    page.fill("#filter", "square")
    page.wait_for_selector("#results .card >> nth=9")
    captions = page.locator("#results .caption").all_text_contents()
    assert test_annotate.SCRIPT_CAPTION in captions
    assert test_annotate.IMG_CAPTION in captions
    page.click("#browse")  # Browse by similarity renders them too.
    page.wait_for_selector("#results .card >> nth=9")
    page.locator("#matches .similar").first.click()
    page.wait_for_selector("#results-title:has-text('Similar to')")
    page.wait_for_timeout(300)  # Give an injected handler time to fire.
    assert page.evaluate("() => window.__xss") is None
    assert page.locator("script:not([src]), img[src='x'], "
                        "#results img:not([src^='/item/'])").count() == 0
    assert not page.errors
  finally:
    live.stop()


def test_two_browsers_never_answer_one_query_twice(browser, synthetic,
                                                   tmp_path):
  pool = synthetic[1]
  live = test_annotate.LiveServer(
      test_annotate.fresh_copy(synthetic, tmp_path), pool)
  try:
    first = new_page(browser, live.url)
    second = new_page(browser, live.url)
    # The second browser does not hear of the first's answers by polling:
    # its answer to the same query must be refused by the server.
    second.route("**/api/answers", lambda route: route.abort())
    first.keyboard.press("1")
    wait_for_query(first, 1)
    second.keyboard.press("2")
    second.wait_for_selector("#banner:has-text('answered in another "
                             "browser')")
    wait_status(second, "Answered by another browser")
    second.unroute("**/api/answers")
    # Both go on: the second answers the last query, the first the rest.
    second.keyboard.press("ArrowLeft")
    wait_for_query(second, 4)
    second.keyboard.press("1")
    wait_status(first, "Not answered yet")
    for k in range(1, 4):
      wait_for_query(first, k)
      first.keyboard.press("1")
    for page in (first, second):
      page.wait_for_function(
          "() => document.getElementById('answered').textContent === '5'")
    second.click("#submit")
    second.wait_for_selector("#banner:has-text('Submitted')")
    first.wait_for_function(
        "() => document.getElementById('submit').disabled")
    assert not first.errors and not second.errors
  finally:
    live.stop()
  answers = oracle_lib.FileOracle(live.annotator.workdir, pool).answer(
      1, test_annotate.QUERIES)
  record = json.loads(fs.read_text(live.annotator.store.path))
  # Query 0 kept the first browser's answer (its top match) alone.
  top = live.annotator.ranking.match_index
  assert answers[0].partners == (("image", int(top[0, 0])),)
  assert len({a["client"] for a in record["answers"].values()}) == 2
  assert len(record["answers"]) == 5 and not record["undone"]


def test_server_killed_mid_round_keeps_every_answer(browser, synthetic,
                                                    tmp_path):
  workdir = test_annotate.fresh_copy(synthetic, tmp_path)
  pool = synthetic[1]
  server = ServerProcess(workdir, tmp_path)
  try:
    page = new_page(browser, server.url)
    for k in range(2):
      wait_for_query(page, k)
      page.keyboard.press("1")
    wait_for_query(page, 2)
  finally:
    server.stop(signal.SIGKILL)
  record = json.loads(fs.read_text(store_lib.record_path(workdir, 1)))
  assert sorted(record["answers"]) == ["0", "1"]
  assert not fs.exists(store_lib.answers_path(workdir, 1))
  assert os.listdir(os.path.join(workdir, "annotate")) == ["round_1.json"]
  page.context.close()

  server = ServerProcess(workdir, tmp_path)
  try:
    page = new_page(browser, server.url)
    wait_for_query(page, 2)  # The first unanswered one.
    page.wait_for_function(
        "() => document.getElementById('answered').textContent === '2'")
    for k in range(2, 5):
      wait_for_query(page, k)
      page.keyboard.press("1")
    page.wait_for_selector("#submit:not([disabled])")
    page.click("#submit")
    page.wait_for_selector("#banner:has-text('Submitted')")
  finally:
    server.stop()
  final = json.loads(fs.read_text(store_lib.record_path(workdir, 1)))
  answers = oracle_lib.FileOracle(workdir, pool).answer(
      1, test_annotate.QUERIES)
  assert [list(map(list, a.partners)) for a in answers] == [
      final["answers"][str(k)]["partners"] for k in range(5)]
  assert final["answers"]["0"] == record["answers"]["0"]


def test_command_line_errors_are_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "mmal_jax.annotate", "--workdir",
       str(tmp_path / "none")], cwd=_ROOT, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=_ROOT), timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("mmal_jax.annotate: error: ")
  assert "config.json not found" in lines[-1]
