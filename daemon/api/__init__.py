"""The HTTP API and the web dashboard: a Flask application (`create_app`) served by `imputationd run` when
`api.listen` is set and by `imputationd api` alone, under cheroot's threaded WSGI server (`daemon.api.server`).

Routes, scopes and status codes are the contract in DESIGN.md ("Owners and the HTTP API"); `openapi.py` describes
them and a test holds the two together. Every handler reads and writes through the store, like the CLI: the API
shares nothing with the scheduler but the database, so it runs as well on a host that runs no daemon.
"""

from __future__ import annotations

from daemon.api.app import create_app

__all__ = ["create_app"]
