r"""Serves the annotation page over a workdir whose run waits for answers.

  python -m mmal_jax.annotate --workdir W [--host 127.0.0.1 --port 8080 \
      --top_k K]

W is the workdir of a `python -m mmal_jax.main --config.oracle.kind=file`
run that stopped with exit status 3 (local or gs://). Prints the page's
address with a random access token; open it, answer, submit; then rerun the
run's command. --port 0 picks a free port. Exit status 2: a problem with the
command or the workdir, named in one line.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
from typing import NoReturn

from absl import app
from absl import flags

from mmal_jax import cli

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

_WORKDIR = flags.DEFINE_string("workdir", None, "The waiting run's workdir.",
                               required=True)
_HOST = flags.DEFINE_string(
    "host", "127.0.0.1", "Address to listen on. Anything but a loopback "
    "address exposes the page (unencrypted, guarded by the token) to others.")
_PORT = flags.DEFINE_integer("port", 8080, "Port (0: any free port).")
_TOP_K = flags.DEFINE_integer(
    "top_k", 0, "Ranked matches shown per query (0: the run's "
    "config.oracle.top_k); at most config.oracle.num_ranked.")


_PROG = "mmal_jax.annotate"


def _fail(message: str) -> NoReturn:
  cli.fail(_PROG, message)


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; see --help.")
  if _TOP_K.value < 0 or not 0 <= _PORT.value < 65536:
    _fail("--top_k must be >= 0 and --port in 0..65535.")
  # Imported here: --help and flag errors answer at once.
  import uvicorn  # pylint: disable=g-import-not-at-top
  from mmal_jax.annotate import items  # pylint: disable=g-import-not-at-top
  from mmal_jax.annotate import server  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value
  try:
    pool = items.load_pool(items.load_config(workdir))
    annotator = server.Annotator(workdir, pool, top_k=_TOP_K.value)
  except ValueError as e:
    _fail(str(e))
  family = socket.AF_INET6 if ":" in _HOST.value else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((_HOST.value, _PORT.value))
  except OSError as e:
    _fail(f"cannot listen on {_HOST.value}:{_PORT.value} ({e.strerror}); "
          f"pass another --port (0: any free one).")
  port = sock.getsockname()[1]
  token = secrets.token_urlsafe(24)
  host = f"[{_HOST.value}]" if family == socket.AF_INET6 else _HOST.value
  store = annotator.store
  print(f"Annotating round {annotator.round_index} of {workdir}: "
        f"{len(store.queries)} queries, {len(store.answers)} answered"
        f"{', submitted' if store.submitted else ''}.\n"
        f"Open http://{host}:{port}/?token={token}\n"
        f"Submitting writes {store.answers_path}; then rerun the run's "
        f"python -m mmal_jax.main command. Ctrl-C stops this server (every "
        f"confirmed answer is kept in {store.path}).", flush=True)
  if not _is_loopback(_HOST.value):
    print(f"mmal_jax.annotate: warning: listening on {_HOST.value}: anyone "
          f"who can reach it and has the token can annotate; traffic is not "
          f"encrypted.", file=sys.stderr, flush=True)
  cookie = f"mmal_annotate_{port}"
  config = uvicorn.Config(server.create_app(annotator, token, cookie),
                          log_level="warning", access_log=False)
  uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser(_PROG))
