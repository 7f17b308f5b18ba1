"""Run a kefu server with the test bot in its own process (the crash and scale-out tests):
``python -m tests.server.serve_testbot DATA_DIR PORT [SETTINGS_JSON]``.

``SETTINGS_JSON`` holds more ``[server]`` settings (``redis_url``, ``database_url``,
``node_id``, ``workers``...).  With ``workers`` above 1 it runs as ``kefu serve --workers N``
does: Sanic's own multi-worker mode, each worker building its app with :func:`make_app`.
"""
from __future__ import annotations

import json
import sys
from functools import partial
from typing import Any

from sanic import Sanic

from server.app import create_app

from . import testbot
from .conftest import server_config


def make_app(data_dir: str, port: int, settings: dict[str, Any]) -> Sanic:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    config = server_config(data_dir, port=port, **settings)
    return create_app(config, plugins=[testbot], load_entrypoints=False, name="kefu_node")


def main() -> None:
    data_dir, port = sys.argv[1], int(sys.argv[2])
    settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    Sanic.test_mode = False          # (the conftest import turns it on; this is a real server)
    workers = int(settings.get("workers", 1))
    if workers == 1:
        app = make_app(data_dir, port, settings)
        app.run(host="127.0.0.1", port=port, single_process=True, access_log=False, motd=False)
        return
    from sanic.worker.loader import AppLoader

    loader = AppLoader(factory=partial(make_app, data_dir, port, settings))
    app = loader.load()
    app.prepare(host="127.0.0.1", port=port, workers=workers, access_log=False, motd=False)
    Sanic.serve(primary=app, app_loader=loader)


if __name__ == "__main__":
    main()
