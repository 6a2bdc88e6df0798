"""The scoring server: an HTTP API (FastAPI on uvicorn) over an
:class:`~recpeft.apps.adapter_bank.AdapterBank`, micro-batching concurrent requests.

    app.py       create_app(bank, limits): the endpoints (POST /score, GET /health, GET/POST /adapters,
                 DELETE /adapters/{name})
    batcher.py   MicroBatcher: concurrent requests scored in one bank call on one worker thread
    rows.py      RowReader: a request's rows checked against the base's columns, as a DataFrame
    limits.py    ServeLimits: request bounds and the micro-batch policy
    server.py    run_server (``recpeft serve``), BackgroundServer (tests, the load benchmark)

A layer of its own, above ``apps`` (it serves the bank ``apps`` defines) and below ``cli``. FastAPI
and uvicorn are imported by the modules that need them, not by ``import recpeft.serve``.

Example::

    from recpeft.serve import run_server
    run_server("runs/base", "runs/adapters", port=8000)
"""

from recpeft.utils.lazy import lazy_exports

_EXPORTS = {
    "BackgroundServer": ".server",
    "MicroBatcher": ".batcher",
    "ServeLimits": ".limits",
    "create_app": ".app",
    "load_bank": ".server",
    "run_server": ".server",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
