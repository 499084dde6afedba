"""tests/workers.py: each pytest-xdist worker has a Redis of its own."""

import os

import pytest
from django.conf import settings

from tests.workers import BASE_CHANNEL_LAYER_PREFIX, BASE_REDIS_URL, redis_url_for_worker


def test_a_worker_gets_the_redis_database_after_the_base_by_its_number() -> None:
    assert redis_url_for_worker("redis://127.0.0.1:6379/9", 0) == "redis://127.0.0.1:6379/9"
    assert redis_url_for_worker("redis://127.0.0.1:6379/9", 3) == "redis://127.0.0.1:6379/12"
    assert redis_url_for_worker("redis://:secret@127.0.0.1:6379", 1) == "redis://:secret@127.0.0.1:6379/1"
    with pytest.raises(AssertionError):
        redis_url_for_worker("redis://127.0.0.1:6379/15", 1)


@pytest.mark.django_db
def test_this_worker_uses_its_own_database_redis_and_channel_prefix() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        # One process (-n0): the settings tests/run.sh gave, unchanged.
        assert settings.REDIS_URL == BASE_REDIS_URL
        assert settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] == BASE_CHANNEL_LAYER_PREFIX
        return
    number = int(worker.removeprefix("gw"))
    assert settings.DATABASES["default"]["NAME"].endswith(f"_{worker}")
    assert settings.REDIS_URL == redis_url_for_worker(BASE_REDIS_URL, number)
    assert settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] == f"{BASE_CHANNEL_LAYER_PREFIX}-{worker}"
