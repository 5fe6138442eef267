"""Annotating in the browser: a web page over a workdir waiting for answers.

  python -m mmal_jax.annotate --workdir W [--host 127.0.0.1 --port 8080]

Modules (this package imports none of them, so that the loop and the report
can use the light ones without the web stack):
  ranking   what the page shows beside each query, written by the loop at
            acquisition time: `queries/round_T.ranking.npz`;
  store     one round's answers on the page: compare-and-set, undo, each
            confirmed answer persisted at once, the file oracle's answers
            file written atomically; the per-answer measurements and their
            summary (the run's report reads it);
  items     the pool rebuilt from the workdir's config.json: captions and
            images (PNG or the file's own JPEG/PNG/GIF/WebP bytes);
  server    the Starlette application (token, routes, assets);
  __main__  the command line.
"""
