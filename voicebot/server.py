"""The production server's command line (docs/deploying.md#run-the-server),
used as is by the test suite and the load test."""

import sys

# --no-access-log: voicebot.access logs every request with its request ID.
# --ws-max-size: a message over 1 MiB ends the connection (1009); up to that,
#   the consumer answers too_large and the connection stays open.
# --ws-per-message-deflate false: compression costs more CPU than it saves on
#   loopback and LAN links; see docs/performance.md#compression.
UVICORN_OPTIONS = ["--no-access-log", "--ws-max-size", "1048576", "--ws-per-message-deflate", "false"]


def uvicorn_command(port: int, application: str = "voicebot.asgi:application", host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "uvicorn", application, "--host", host, "--port", str(port), *UVICORN_OPTIONS]
