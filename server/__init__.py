"""kefu's chat server: Sanic app factory, WebSocket and REST endpoints, routing, storage.

``server.app.create_app(config)`` builds the app; ``kefu serve`` runs it.
"""
