"""Run a real kefu server for the browser tests: ``python -m tests.web.serve DATA_DIR PORT``.

Engine delays and models off, the shop bot, and the agents in AGENTS created in the data dir
before the server starts.  Allowed origins: its own, and KEFU_WEB_HOST_ORIGINS (space-separated:
the test's shop page that embeds the widget).  Run as a subprocess, so Playwright's synchronous API and Sanic's event loop stay in separate processes; a test can
kill it and start it again on the same data dir and port (a real dropped connection).
"""
from __future__ import annotations

import asyncio
import os
import sys


#: Shared with the test's shop page, which signs its visitor's identity with it.
IDENTITY_SECRET = "shop-identity-secret"
#: (username, capacity); every password is "password123".
AGENTS = (("alice", 5), ("bob", 5), ("carol", 5), ("dave", 5), ("erin", 1), ("frank", 5))


def main() -> None:
    data_dir, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("KEFU_ENGINE_DELAYS", "false")
    os.environ.setdefault("KEFU_ENGINE_USE_MODELS", "false")

    from sanic import Sanic

    from server.app import create_app
    from server.auth import hash_password
    from server.config import database_url, load_server_config, server_settings
    from server.storage import open_storage

    config = load_server_config(env={})
    config["engine"].update({"delays": False, "use_models": False, "watch_knowledge": False, "seed": 0,
                             "bots": ["shop"]})
    config["server"].update({"data_dir": data_dir, "secret_key": "browser-test-secret-0123456789",
                             "identity_secret": IDENTITY_SECRET,
                             "host": "127.0.0.1", "port": port, "rate_per_s": 50.0, "rate_burst": 100,
                             "new_conversations_per_ip_per_min": 1000, "grace_s": 5.0,
                             # its own pages, and the test's shop page that embeds the widget
                             "origins": [f"http://127.0.0.1:{port}"] + [
                                 o for o in os.environ.get("KEFU_WEB_HOST_ORIGINS", "").split() if o]})

    async def seed() -> None:
        storage = await open_storage(database_url(server_settings(config)))
        try:
            for name, capacity in AGENTS:
                if await storage.get_agent(username=name) is None:
                    await storage.add_agent(name, hash_password("password123"), display_name=name.title(),
                                            capacity=capacity)
        finally:
            await storage.close()

    asyncio.run(seed())
    app = create_app(config, name=f"kefu_web_{port}")
    Sanic.test_mode = False
    app.run(host="127.0.0.1", port=port, single_process=True, access_log=False, motd=False)


if __name__ == "__main__":
    main()
