"""Exit codes of the CLI and the one exception that carries them.

Scripts branch on the exit code, so each code means one kind of outcome; docs/cli.md and the
`rayinfer --help` epilog list them.
"""

from __future__ import annotations

import click

OK = 0
SERVER_ERROR = 1  # the gateway answered with an error of its own (5xx), or a node failed
USAGE = 2  # bad arguments or a bad client config file (click uses 2 for usage too)
CANNOT_CONNECT = 3  # no connection, or the connection broke or timed out
REJECTED = 4  # the gateway refused the request: 400, 401, 403, 404 and other 4xx
UNAVAILABLE = 5  # 503: no worker serves the model now
RATE_LIMITED = 6  # 429: the queues are full, retry later
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

EPILOG = """\b
Exit codes:
  0    success
  1    the gateway answered with a server error, or a node failed to start
  2    bad usage or a bad client config file
  3    cannot connect to the gateway (or the connection broke or timed out)
  4    request rejected: bad request, missing or wrong API key, unknown model
  5    unavailable: no worker serves the model now (503)
  6    rate limited: the cluster is busy, retry later (429)
  130  interrupted (Ctrl-C)
`rayinfer health` exits 0 when healthy and 1 otherwise, as Docker HEALTHCHECK expects.
"""


class CliError(click.ClickException):
    """A one-line failure: click prints "Error: <message>" and exits with exit_code."""

    def __init__(self, message: str, exit_code: int = SERVER_ERROR):
        super().__init__(message)
        self.exit_code = exit_code
