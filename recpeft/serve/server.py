"""Running the scoring server: :func:`run_server` (what ``recpeft serve`` runs, until stopped) and
:class:`BackgroundServer` (the same app on a free localhost port in a background thread, for
tests and the load benchmark).

:func:`load_bank` loads the base and every LoRA adapter folder directly under ``adapters_dir`` (as
``recpeft finetune --segments`` writes them: ``<segment>/``, :func:`~recpeft.apps.scoring.find_adapter_folders`);
a folder that does not fit the base is refused and reported while the others serve.

The server binds 127.0.0.1 by default: ``POST /adapters`` loads any folder the server's user can
read, so expose it beyond the machine only behind something that controls who may call it.

Example::

    run_server("runs/base", "runs/adapters", port=8000)        # blocks; Ctrl-C stops it

    with BackgroundServer(create_app(bank)) as server:          # tests
        urllib.request.urlopen(f"{server.url}/health")
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

from recpeft.apps.adapter_bank import AdapterBank
from recpeft.apps.scoring import find_adapter_folders
from recpeft.utils.devices import AUTO

from .app import create_app
from .limits import ServeLimits

#: seconds :class:`BackgroundServer` waits for the server to start, and then to stop
START_TIMEOUT_S = STOP_TIMEOUT_S = 30.0


def load_bank(
    base: str | Path,
    adapters_dir: str | Path | None = None,
    *,
    device=AUTO,
    ignore_base_mismatch: bool = False,
) -> tuple[AdapterBank, dict[str, str]]:
    """The bank of ``base`` and the adapters under ``adapters_dir`` (None: none), and the refused
    ones as {name: reason}."""
    bank = AdapterBank(base, device=device)
    refused = {}
    if adapters_dir is not None:
        folders = find_adapter_folders(adapters_dir, flag="adapters_dir")
        refused = bank.add_folders(folders.lora, ignore_base_mismatch=ignore_base_mismatch)
    return bank, refused


def run_server(
    base: str | Path,
    adapters_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    limits: ServeLimits | None = None,
    device=AUTO,
    ignore_base_mismatch: bool = False,
    log_level: str = "info",
) -> None:
    """Serve ``base`` with the adapters under ``adapters_dir`` on ``host:port`` until stopped
    (SIGINT/SIGTERM); refused adapter folders are listed on stderr and left out."""
    import uvicorn

    bank, refused = load_bank(base, adapters_dir, device=device, ignore_base_mismatch=ignore_base_mismatch)
    for reason in refused.values():
        print(f"recpeft serve: {reason}", file=sys.stderr)
    print(f"recpeft serve: {len(bank.names)} adapter(s) serving on http://{host}:{port}", file=sys.stderr)
    uvicorn.run(create_app(bank, limits), host=host, port=port, log_level=log_level)


class BackgroundServer:
    """uvicorn serving ``app`` on ``host`` in a daemon thread, on a port the OS picked free (a
    socket bound to port 0 and handed to uvicorn, so no other process can take it in between).
    A context manager: entering starts it and waits until it serves (RuntimeError if it does not
    within :data:`START_TIMEOUT_S`); leaving stops it and waits for its thread."""

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning"):
        self.app, self.host, self.log_level = app, host, log_level
        self.port: int | None = None
        self._server = self._thread = self._socket = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self.host, 0))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="recpeft-serve", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"BackgroundServer: the server did not start on {self.url} (see its log)")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()
