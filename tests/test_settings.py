"""voicebot/settings.py: the embedded default and the environment switches."""

import json
import subprocess
import sys
from pathlib import Path

from django.conf import settings

from tests.conftest import PROJECT_DIR, embedded_env

PRINT_SETTINGS = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({'key': s.SECRET_KEY, 'engine': s.DATABASES['default']['ENGINE'], "
    "'layer': s.CHANNEL_LAYERS['default']['BACKEND'], 'cache': s.CACHES['default']['BACKEND'], "
    "'debug': s.DEBUG, 'pool': s.DATABASES['default'].get('OPTIONS', {}).get('pool')}))"
)


def load_settings(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS],
        cwd=PROJECT_DIR,
        env={**env, "DJANGO_SETTINGS_MODULE": "voicebot.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_embedded_default_needs_nothing_and_keeps_its_secret_key(tmp_path: Path) -> None:
    first = load_settings(embedded_env(tmp_path))
    second = load_settings(embedded_env(tmp_path))

    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    values = json.loads(first.stdout)
    # django-prometheus's wrappers of SQLite and the local-memory cache (settings.py, metrics).
    assert values["engine"] == "django_prometheus.db.backends.sqlite3"
    assert values["layer"] == "channels.layers.InMemoryChannelLayer"
    assert values["cache"] == "django_prometheus.cache.backends.locmem.LocMemCache"
    assert values["debug"] is False
    assert len(values["key"]) >= 50
    assert oct((tmp_path / "secret_key").stat().st_mode & 0o777) == "0o600"


def test_a_database_url_without_a_secret_key_refuses_to_start(tmp_path: Path) -> None:
    env = {**embedded_env(tmp_path), "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/voicebot"}

    result = load_settings(env)

    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


def test_postgres_uses_djangos_pool_without_persistent_connections() -> None:
    database = settings.DATABASES["default"]

    # django-prometheus's wrapper of the PostgreSQL backend (settings.py, metrics).
    assert database["ENGINE"] == "django_prometheus.db.backends.postgresql", "run the suite with tests/run.sh"
    assert database["CONN_MAX_AGE"] == 0
    assert database["CONN_HEALTH_CHECKS"] is True
    assert database["OPTIONS"]["pool"] == {"min_size": 2, "max_size": 10, "timeout": 10, "reconnect_timeout": 5}


def test_pool_sizes_come_from_the_environment(tmp_path: Path) -> None:
    env = {
        **embedded_env(tmp_path),
        "DJANGO_SECRET_KEY": "x",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/voicebot",
        "DATABASE_POOL_MIN_SIZE": "1",
        "DATABASE_POOL_MAX_SIZE": "3",
    }

    result = load_settings(env)

    pool = {"min_size": 1, "max_size": 3, "timeout": 10, "reconnect_timeout": 5}
    assert json.loads(result.stdout)["pool"] == pool, result.stderr


def test_redis_url_switches_the_channel_layer_and_cache() -> None:
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "lobbies.layers.LocalFirstChannelLayer"
    assert settings.CACHES["default"]["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
