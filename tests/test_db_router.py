"""Read replicas (DATABASE_REPLICA_URL, voicebot/db_router.py): listings are
read from a replica, everything else from and to the primary.

The end-to-end tests run a real server whose replica is a second Postgres
database with the same schema and no replication, so that what a request
shows tells which database it read.
"""

import http.cookiejar
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from django.contrib.auth.models import User
from django.db import connections, transaction
from django.db.models.sql import InsertQuery

from lobbies.models import Lobby, Session
from tests.conftest import PROJECT_DIR, LiveServer, embedded_env, http_json, make_person, production_env
from voicebot import db_router
from voicebot.db_router import ReplicaRouter, read_from_replica

router = ReplicaRouter()


# --- settings ---------------------------------------------------------------

PRINT_DATABASES = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({'databases': {alias: {k: db.get(k) for k in "
    "('NAME', 'CONN_MAX_AGE', 'CONN_HEALTH_CHECKS', 'OPTIONS', 'TEST')} for alias, db in s.DATABASES.items()}, "
    "'routers': s.DATABASE_ROUTERS}))"
)


def load_databases(tmp_path, **extra_env: str) -> dict:
    env = {
        **embedded_env(tmp_path),
        "DJANGO_SECRET_KEY": "x",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/voicebot",
        "DATABASE_POOL_MAX_SIZE": "4",
        "DJANGO_SETTINGS_MODULE": "voicebot.settings",
        **extra_env,
    }
    result = subprocess.run(
        [sys.executable, "-c", PRINT_DATABASES], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_each_replica_url_adds_a_pooled_alias_built_like_the_primary(tmp_path) -> None:
    loaded = load_databases(
        tmp_path, DATABASE_REPLICA_URL="postgres://postgres@127.0.0.1:5432/r1, postgres://postgres@127.0.0.1:5432/r2"
    )

    databases = loaded["databases"]
    assert list(databases) == ["default", "replica_1", "replica_2"]
    assert [databases[alias]["NAME"] for alias in ("replica_1", "replica_2")] == ["r1", "r2"]
    for alias in ("replica_1", "replica_2"):
        assert databases[alias]["OPTIONS"] == databases["default"]["OPTIONS"]
        assert databases[alias]["OPTIONS"]["pool"]["max_size"] == 4
        assert (databases[alias]["CONN_MAX_AGE"], databases[alias]["CONN_HEALTH_CHECKS"]) == (0, True)
        # Under test a replica is the test database, not a test database of its own.
        assert databases[alias]["TEST"]["MIRROR"] == "default"
    assert loaded["routers"] == ["voicebot.db_router.ReplicaRouter"]


def test_without_replicas_there_is_no_router(tmp_path) -> None:
    loaded = load_databases(tmp_path)

    assert list(loaded["databases"]) == ["default"]
    assert loaded["routers"] == []


# --- the router -------------------------------------------------------------


def add_alias(alias: str, **overrides) -> None:
    """Make `alias` known to this process, built like the primary (the test database)."""
    connections.settings[alias] = {**connections["default"].settings_dict, **overrides}


def remove_alias(alias: str) -> None:
    connection = connections[alias]
    connection.close()
    connection.close_pool()
    del connections[alias]
    del connections.settings[alias]
    db_router._unreachable_until.pop(alias, None)


@pytest.fixture
def database_access(django_db_setup: None, django_db_blocker) -> Iterator[None]:
    """Connections allowed, outside Django's test cases (which refuse aliases added
    after they start). The tests using it connect but write nothing."""
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def mirror_replicas(database_access: None) -> Iterator[list[str]]:
    """Two replica aliases on the test database itself."""
    aliases = ["replica_1", "replica_2"]
    for alias in aliases:
        add_alias(alias)
    yield aliases
    for alias in aliases:
        remove_alias(alias)


def test_reads_go_to_the_primary_by_default(mirror_replicas: list[str]) -> None:
    assert router.db_for_read(Lobby) == "default"
    assert router.db_for_read(Session) == "default"


def test_listing_reads_go_to_a_replica(mirror_replicas: list[str]) -> None:
    with read_from_replica():
        assert router.db_for_read(Lobby) in mirror_replicas


def test_listing_reads_are_spread_over_the_replicas(mirror_replicas: list[str]) -> None:
    with read_from_replica():
        chosen = {router.db_for_read(Lobby) for _ in range(60)}

    assert chosen == set(mirror_replicas)


def test_writes_go_to_the_primary_even_while_listing(mirror_replicas: list[str]) -> None:
    with read_from_replica():
        assert router.db_for_write(Lobby) == "default"


def test_a_listing_inside_a_transaction_reads_the_primary(mirror_replicas: list[str]) -> None:
    with transaction.atomic(), read_from_replica():
        assert router.db_for_read(Lobby) == "default"


def test_a_listing_on_one_thread_leaves_other_threads_on_the_primary(mirror_replicas: list[str]) -> None:
    elsewhere: list[str] = []
    with read_from_replica():
        thread = threading.Thread(target=lambda: elsewhere.append(router.db_for_read(Lobby)))
        thread.start()
        thread.join()
        here = router.db_for_read(Lobby)

    assert here in mirror_replicas
    assert elsewhere == ["default"]


def test_a_listing_reads_the_primary_when_no_replica_can_be_reached(database_access: None) -> None:
    pool = {**connections["default"].settings_dict["OPTIONS"]["pool"], "timeout": 1}
    add_alias("replica_1", PORT=1, OPTIONS={**connections["default"].settings_dict["OPTIONS"], "pool": pool})
    try:
        with read_from_replica():
            first = router.db_for_read(Lobby)
            started = time.monotonic()
            second = router.db_for_read(Lobby)
            # Left out for a while, so later listings do not wait for it.
            assert time.monotonic() - started < 0.5
    finally:
        remove_alias("replica_1")

    assert first == second == "default"


def test_migrations_run_on_the_primary_only() -> None:
    assert router.allow_migrate("default", "lobbies", "lobby") is True
    assert router.allow_migrate("replica_1", "lobbies", "lobby") is False


def test_rows_from_a_replica_and_the_primary_can_be_related(mirror_replicas: list[str]) -> None:
    lobby, session = Lobby(name="listed"), Session(name="Alice")
    lobby._state.db, session._state.db = "replica_1", "default"

    assert router.allow_relation(lobby, session) is True


# --- a real server with a stand-in replica ------------------------------------


def database_url(name: str) -> str:
    db = connections["default"].settings_dict
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{credentials}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{name}"


def execute(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def maintenance(sql: str) -> None:
    execute(database_url("postgres"), sql)


@pytest.fixture(scope="session")
def standin_replica_url(django_db_setup: None, django_db_blocker) -> Iterator[str]:
    """A second database with the schema of the test database and no replication."""
    with django_db_blocker.unblock():
        # Named after the test database, so concurrent runs with their own test databases do not clash.
        name = f"{connections['default'].settings_dict['NAME']}_replica"
        maintenance(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        maintenance(f'CREATE DATABASE "{name}"')
        url = database_url(name)
    try:
        env = {**production_env(), "DATABASE_URL": url}
        env.pop("DATABASE_REPLICA_URL", None)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=PROJECT_DIR,
            env=env,
            check=True,
            timeout=120,
        )
        yield url
    finally:
        maintenance(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class StandInReplica:
    """Rows put straight into the stand-in replica (Django's test case refuses
    a database alias it did not know when it started)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def add_lobby(self, name: str) -> None:
        """Insert the row Lobby.objects.create(name=name) would, defaults and all."""
        query = InsertQuery(Lobby)
        fields = [field for field in Lobby._meta.local_concrete_fields if field is not Lobby._meta.auto_field]
        query.insert_values(fields, [Lobby(name=name)])
        for sql, params in query.get_compiler("default").as_sql():
            execute(self.url, sql, params)

    def has_lobby(self, name: str) -> bool:
        return bool(execute(self.url, f"SELECT 1 FROM {Lobby._meta.db_table} WHERE name = %s", (name,)))

    def empty(self) -> None:
        # CASCADE: whatever else refers to lobbies and sessions goes too.
        execute(self.url, f"TRUNCATE {Lobby._meta.db_table}, {Session._meta.db_table} CASCADE")


@pytest.fixture
def replica(standin_replica_url: str) -> Iterator[StandInReplica]:
    replica = StandInReplica(standin_replica_url)
    yield replica
    replica.empty()


@pytest.fixture
def replica_server(replica: StandInReplica, start_production_server: Callable[..., LiveServer]) -> LiveServer:
    return start_production_server(DATABASE_REPLICA_URL=replica.url)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def listed_names(server: LiveServer) -> set[str]:
    return {lobby["name"] for lobby in http_json(f"{server.http}/api/lobbies/")["lobbies"]}


def test_the_lobby_list_shows_what_the_replica_has(replica_server: LiveServer, replica: StandInReplica) -> None:
    on_replica, on_primary = unique("on-replica"), unique("on-primary")
    replica.add_lobby(on_replica)
    Lobby.objects.create(name=on_primary)

    names = listed_names(replica_server)

    assert on_replica in names
    assert on_primary not in names


def test_a_new_lobby_is_saved_on_the_primary_and_its_page_shows_it_at_once(
    replica_server: LiveServer, replica: StandInReplica
) -> None:
    # The token is looked up on the primary, where the session was just created.
    alice = make_person("Alice")
    name = unique("new")

    created = http_json(f"{replica_server.http}/api/lobbies/", {"name": name}, token=alice.token)
    detail = http_json(f"{replica_server.http}/api/lobbies/{name}/")

    assert created["name"] == detail["name"] == name
    assert Lobby.objects.filter(name=name).exists()
    assert not replica.has_lobby(name)


def test_the_admin_lists_what_the_replica_has_and_opens_a_lobby_from_the_primary(
    replica_server: LiveServer, replica: StandInReplica
) -> None:
    User.objects.create_superuser("admin", password="correct-horse")
    on_replica, on_primary = unique("on-replica"), unique("on-primary")
    replica.add_lobby(on_replica)
    primary_lobby = Lobby.objects.create(name=on_primary)
    browser = admin_login(replica_server, "admin", "correct-horse")

    changelist = browser.open(f"{replica_server.http}/admin/lobbies/lobby/").read().decode()
    change_url = f"{replica_server.http}/admin/lobbies/lobby/{primary_lobby.pk}/change/"
    change_page = browser.open(change_url).read().decode()

    assert on_replica in changelist
    assert on_primary not in changelist
    assert on_primary in change_page


def admin_login(server: LiveServer, username: str, password: str) -> urllib.request.OpenerDirector:
    cookies = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(cookies))
    browser.open(f"{server.http}/admin/login/").read()
    csrf = next(cookie.value for cookie in cookies if cookie.name == "csrftoken")
    form = urllib.parse.urlencode(
        {"username": username, "password": password, "csrfmiddlewaretoken": csrf, "next": "/admin/"}
    ).encode()
    with browser.open(f"{server.http}/admin/login/?next=/admin/", data=form) as response:
        assert response.geturl() == f"{server.http}/admin/", "the admin login failed"
    return browser


def test_the_lobby_list_still_answers_while_the_replica_is_down(
    start_production_server: Callable[..., LiveServer],
) -> None:
    name = unique("on-primary")
    Lobby.objects.create(name=name)
    server = start_production_server(
        DATABASE_REPLICA_URL="postgres://postgres@127.0.0.1:1/gone", DATABASE_POOL_TIMEOUT="1"
    )

    assert name in listed_names(server)
