"""Run a kefu server with the test bot in this process (for the crash test):
``python -m tests.server.serve_testbot DATA_DIR PORT``."""
from __future__ import annotations

import sys

from server.app import create_app

from .conftest import server_config
from . import testbot


def main() -> None:
    data_dir, port = sys.argv[1], int(sys.argv[2])
    config = server_config(data_dir, port=port)
    app = create_app(config, plugins=[testbot], load_entrypoints=False, name="kefu_crash")
    app.run(host="127.0.0.1", port=port, single_process=True, access_log=False, motd=False)


if __name__ == "__main__":
    main()
