"""The annotation page's web application (Starlette; see `__main__`).

Routes (every one needs the access token: `?token=` once, then the cookie
that visit sets; POSTs also need it in the `X-Annotate-Token` header, which
the page sends, so another site cannot post through the cookie):

  GET  /                      the page (`static/index.html`)
  GET  /static/<name>         the page's own assets, from a fixed list
  GET  /item/<modality>/<i>   the image of pool item i (nothing else is read)
  GET  /api/round             the round: queries, their top-K matches
  GET  /api/answers           the answers so far (polled by the page)
  GET  /api/more?query=k      more of query k's ranked matches
  GET  /api/search?modality=m&q=words      captions holding every word
  GET  /api/similar?modality=m&of=m2:i     m ranked by similarity to m2:i
  POST /api/answer {query, partners, via, input, client, time_s, shown}
  POST /api/undo {query, id}
  POST /api/submit            writes the run's answers file

The server never takes the run's workdir lock (the run is not running while
it waits for answers): it writes only `annotate/round_T.json` and, on submit,
`answers/round_T.jsonl` if absent, each atomically, and follows the newest
`queries/round_T.jsonl` when a resumed run asks for the next round.
"""
from __future__ import annotations

import hmac
import importlib.resources
import os
import re
import threading
import time
import urllib.parse

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from mmal_jax import fs
from mmal_jax.annotate import items as items_lib
from mmal_jax.annotate import ranking as ranking_lib
from mmal_jax.annotate import store as store_lib
from mmal_jax.data import oracle as oracle_lib

TOKEN_HEADER = "x-annotate-token"
_ASSETS = {"app.js": "text/javascript; charset=utf-8",
           "app.css": "text/css; charset=utf-8"}
_SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; "
     b"img-src 'self'; connect-src 'self'; base-uri 'none'; "
     b"form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY")]
_PAGE_SIZE = 60
_REFRESH_S = 2.0


def latest_round(workdir: str) -> int | None:
  """The highest T with a WORKDIR/queries/round_T.jsonl, None if none."""
  folder = os.path.join(workdir, "queries")
  if not fs.isdir(folder):
    return None
  rounds = [int(m.group(1)) for name in fs.listdir(folder)
            if (m := re.fullmatch(r"round_(\d+)\.jsonl", name))]
  return max(rounds, default=None)


class Annotator:
  """The round the page serves: its queries, ranking and answers.

  Follows the workdir: `refresh()` switches to a newer round when a resumed
  run has written one.
  """

  def __init__(self, workdir: str, pool, *, top_k: int = 0):
    self.workdir = workdir
    self.pool = pool
    self.items = items_lib.Items(pool)
    self.top_k = top_k
    self.oracle = oracle_lib.FileOracle(workdir, pool)
    self._lock = threading.Lock()
    self._checked = 0.0
    self.round_index = None
    self.store = self.ranking = None
    self.warning = None
    self.refresh(force=True)
    if self.round_index is None:
      raise ValueError(f"No round of {workdir} awaits answers (no "
                       f"{os.path.join(workdir, 'queries', 'round_T.jsonl')})"
                       f": run python -m mmal_jax.main with "
                       f"--config.oracle.kind=file first.")

  def refresh(self, force: bool = False) -> None:
    """Switches to the newest round (checked at most every 2 s)."""
    with self._lock:
      if not force and time.monotonic() - self._checked < _REFRESH_S:
        return
      self._checked = time.monotonic()
      t = latest_round(self.workdir)
      if t is None or t == self.round_index:
        return
      queries = self.oracle.pending_queries(t)
      ranking, warning = None, None
      try:
        ranking = ranking_lib.load(ranking_lib.path(self.workdir, t))
      except ValueError as e:
        warning = str(e)
      if ranking is None and warning is None:
        warning = (f"No ranking file for round {t} (written by runs since "
                   f"the annotation page exists): search to find partners.")
      elif ranking is not None and ranking.queries != queries:
        ranking, warning = None, (
            f"{ranking_lib.path(self.workdir, t)} ranks other queries than "
            f"the queries file: it is ignored; search to find partners.")
      self.store = store_lib.RoundStore(
          self.workdir, t, queries, self.pool.sizes,
          rank_of=ranking.rank_of if ranking else None,
          true_partners=self.pool.partners)
      self.round_index, self.ranking, self.warning = t, ranking, warning

  @property
  def shown(self) -> int:
    """How many ranked matches the page shows per query."""
    if self.ranking is None:
      return 0
    k = self.top_k or self.ranking.top_k
    return min(k, self.ranking.match_index.shape[1])

  def _match(self, query: int, rank: int) -> dict:
    r = self.ranking
    return {"rank": rank + 1,
            "score": round(float(r.match_score[query, rank]), 4),
            "item": self.items.describe(r.match_modality[query],
                                        int(r.match_index[query, rank]))}

  def round_json(self) -> dict:
    store, shown = self.store, self.shown
    queries = []
    for k, (m, i) in enumerate(store.queries):
      other = ranking_lib.other_modality(self.pool.modalities, m)
      queries.append({
          "query": k, "item": self.items.describe(m, i),
          "other": other, "other_kind": self.items.kind(other),
          "matches": [self._match(k, r) for r in range(shown)]})
    ranked = 0 if self.ranking is None else self.ranking.match_index.shape[1]
    return {"round": self.round_index, "workdir": self.workdir,
            "queries": queries, "shown": shown, "ranked": ranked,
            "browse": bool(self.ranking and self.ranking.browse_index),
            "warning": self.warning,
            "answers_path": store.answers_path}

  def answers_json(self) -> dict:
    store = self.store
    public = ("id", "partners", "via", "client", "time_s", "rank")
    return {"round": self.round_index, "version": store.version,
            "submitted": store.submitted,
            "answers": {str(k): {f: a[f] for f in public}
                        for k, a in sorted(store.answers.items())}}

  def more(self, query: int, offset: int, limit: int) -> dict:
    if self.ranking is None:
      raise ValueError("This round has no ranking file.")
    if not 0 <= query < len(self.store.queries):
      raise ValueError(f"No query {query}.")
    end = min(offset + limit, self.ranking.match_index.shape[1])
    return {"total": int(self.ranking.match_index.shape[1]),
            "items": [self._match(query, r) for r in range(offset, end)]}

  def search(self, modality: str, words: str, offset: int, limit: int
             ) -> dict:
    if modality not in self.pool.modalities or (
        self.items.kind(modality) == "image"):
      raise ValueError(f"The text filter searches captions; {modality!r} "
                       f"has none: browse by similarity instead.")
    found = self.items.search(modality, words)
    return {"total": len(found), "items": [
        {"item": self.items.describe(modality, i)}
        for i in found[offset:offset + limit]]}

  def similar(self, modality: str, of: str, offset: int, limit: int) -> dict:
    m, _, i = of.partition(":")
    if not (self.ranking and modality in self.ranking.browse_index and
            i.isdigit()):
      raise ValueError("Browsing by similarity needs this round's ranking "
                       "file with browse vectors (config.oracle.browse_dim).")
    vector = self.ranking.vector(m, int(i))
    if vector is None:
      raise ValueError(f"{m} item {i} was not embedded this round.")
    index, scores = self.ranking.similar(modality, vector)
    return {"total": int(len(index)), "items": [
        {"score": round(float(s), 4), "item": self.items.describe(modality,
                                                                  int(j))}
        for j, s in zip(index[offset:offset + limit],
                        scores[offset:offset + limit])]}


def _int_param(request: Request, name: str, default: int = 0) -> int:
  value = request.query_params.get(name, str(default))
  if not value.isdigit():
    raise ValueError(f"{name} must be a non-negative integer.")
  return int(value)


def _error(e: Exception) -> JSONResponse:
  if isinstance(e, store_lib.Conflict):
    answer = e.answer and {f: e.answer[f] for f in ("id", "partners", "via",
                                                    "client", "time_s",
                                                    "rank")}
    return JSONResponse({"error": str(e), "answer": answer}, 409)
  return JSONResponse({"error": str(e)}, 400)


def create_app(annotator: Annotator, token: str, cookie: str) -> Starlette:
  """The application serving `annotator`, guarded by `token` (and the cookie
  named `cookie` once the token was given)."""
  root = importlib.resources.files("mmal_jax.annotate") / "static"
  assets = {name: ((root / name).read_bytes(), media_type)
            for name, media_type in _ASSETS.items()}
  page = (root / "index.html").read_text().replace("__TOKEN__", token)

  def index(request: Request) -> Response:
    if "token" in request.query_params:  # Keep it out of the address bar.
      response = RedirectResponse("/", 303)
      response.set_cookie(cookie, token, httponly=True, samesite="strict")
      return response
    return Response(page, media_type="text/html; charset=utf-8")

  def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in assets:
      return PlainTextResponse("not found", 404)
    body, media_type = assets[name]
    return Response(body, media_type=media_type)

  def item(request: Request) -> Response:
    modality, index = (request.path_params["modality"],
                       request.path_params["index"])
    if (not annotator.items.has(modality, index) or
        annotator.items.kind(modality) != "image"):
      return PlainTextResponse("not found", 404)
    try:
      body, media_type = annotator.items.image(modality, index)
    except (OSError, ValueError) as e:
      return PlainTextResponse(f"cannot show it: {e}", 415)
    return Response(body, media_type=media_type)

  def get(fn):
    def endpoint(request: Request) -> Response:
      annotator.refresh()
      try:
        return JSONResponse(fn(request))
      except ValueError as e:
        return _error(e)
    return endpoint

  def post(fn):
    async def endpoint(request: Request) -> Response:
      try:
        body = await request.json()
        if not isinstance(body, dict):
          raise ValueError("The body must be a JSON object.")
        return JSONResponse(await run_in_threadpool(fn, body))
      except (ValueError, store_lib.Conflict) as e:
        return _error(e)
    return endpoint

  def answer(body):
    partners = body.get("partners")
    if not (isinstance(partners, list) and all(
        isinstance(p, list) and len(p) == 2 for p in partners)):
      raise ValueError("partners must be a list of [modality, index] pairs.")
    entry = annotator.store.answer(
        body.get("query"), [tuple(p) for p in partners],
        time_s=body.get("time_s"), via=body.get("via"),
        input=body.get("input", "click"), client=body.get("client", ""),
        shown=annotator.shown)
    return {"answer": {f: entry[f] for f in ("id", "partners", "via",
                                             "client", "time_s", "rank")}}

  def undo(body):
    annotator.store.undo(body.get("query"), body.get("id"))
    return {"ok": True}

  def submit(body):
    del body
    return {"path": annotator.store.submit()}

  q = lambda request, name: request.query_params.get(name, "")
  routes = [
      Route("/", index),
      Route("/favicon.ico", lambda request: Response(status_code=204)),
      Route("/static/{name}", asset),
      Route("/item/{modality}/{index:int}", item),
      Route("/api/round", get(lambda r: annotator.round_json())),
      Route("/api/answers", get(lambda r: annotator.answers_json())),
      Route("/api/more", get(lambda r: annotator.more(
          _int_param(r, "query"), _int_param(r, "offset"),
          min(_int_param(r, "limit", _PAGE_SIZE), _PAGE_SIZE)))),
      Route("/api/search", get(lambda r: annotator.search(
          q(r, "modality"), q(r, "q"), _int_param(r, "offset"),
          min(_int_param(r, "limit", _PAGE_SIZE), _PAGE_SIZE)))),
      Route("/api/similar", get(lambda r: annotator.similar(
          q(r, "modality"), q(r, "of"), _int_param(r, "offset"),
          min(_int_param(r, "limit", _PAGE_SIZE), _PAGE_SIZE)))),
      Route("/api/answer", post(answer), methods=["POST"]),
      Route("/api/undo", post(undo), methods=["POST"]),
      Route("/api/submit", post(submit), methods=["POST"]),
  ]
  return TokenGate(Starlette(routes=routes), token, cookie)


class TokenGate:
  """ASGI middleware: 403 without the token; security headers on every
  response (a strict Content-Security-Policy: no inline script runs)."""

  def __init__(self, app, token: str, cookie: str):
    self.app, self.token, self.cookie = app, token, cookie

  def _valid(self, value) -> bool:
    return isinstance(value, str) and hmac.compare_digest(
        value.encode(), self.token.encode())

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    request = Request(scope)
    header = request.headers.get(TOKEN_HEADER)
    if scope["method"] in ("GET", "HEAD"):
      allowed = (self._valid(request.cookies.get(self.cookie)) or
                 self._valid(header) or self._valid(
                     urllib.parse.parse_qs(scope["query_string"].decode(
                         "latin-1")).get("token", [None])[-1]))
    else:  # Never by the cookie alone: another site can send that.
      allowed = self._valid(header)

    async def send_with_headers(message):
      if message["type"] == "http.response.start":
        message["headers"] = list(message.get("headers", [])) + (
            _SECURITY_HEADERS)
      await send(message)

    if not allowed:
      response = PlainTextResponse(
          "Forbidden: open the address with ?token= that `python -m "
          "mmal_jax.annotate` printed.", 403)
      return await response(scope, receive, send_with_headers)
    return await self.app(scope, receive, send_with_headers)
