"""Gives each pytest-xdist worker a Redis of its own before Django reads its settings.

pytest.ini loads this module with `-p`, which runs before pytest-django sets
Django up. pytest-django already gives each worker its own test database
(test_voicebot_gw0, ...); this gives each its own Redis database and
channel-layer prefix, so one worker's lobbies, caches and pub/sub channels
never reach another's servers.
"""

import os
from urllib.parse import urlsplit, urlunsplit

REDIS_DATABASES = 16


def redis_url_for_worker(url: str, worker: int) -> str:
    parts = urlsplit(url)
    database = int(parts.path.strip("/") or 0) + worker
    assert database < REDIS_DATABASES, f"{url} leaves no Redis database for worker {worker}"
    return urlunsplit(parts._replace(path=f"/{database}"))


# What tests/run.sh set, before the worker's share of it.
BASE_REDIS_URL = os.environ.get("REDIS_URL", "")
BASE_CHANNEL_LAYER_PREFIX = os.environ.get("CHANNEL_LAYER_PREFIX", "voicebot")

worker_name = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
if worker_name:
    if BASE_REDIS_URL:
        os.environ["REDIS_URL"] = redis_url_for_worker(BASE_REDIS_URL, int(worker_name.removeprefix("gw")))
    os.environ["CHANNEL_LAYER_PREFIX"] = f"{BASE_CHANNEL_LAYER_PREFIX}-{worker_name}"
