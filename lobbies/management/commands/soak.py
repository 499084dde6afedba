"""Soak run of the signaling server: many WebSocket clients in many lobbies
joining, signaling, chatting, dropping and resuming for a long time, with every
message accounted for and the servers' memory watched. docs/performance.md#soak-run
explains the loss rule and the output."""

import asyncio
import gc
import json
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from lobbies.loadtest import servers, soak
from lobbies.loadtest.servers import Target
from lobbies.management.commands.loadtest import on_this_machine

TRACEBACK = "Traceback (most recent call last)"


class Command(BaseCommand):
    help = (
        "Soak the signaling server: 1,000 clients in 100 lobbies signaling, chatting, dropping and resuming "
        "for 10 minutes on two processes; fails on any error, any lost message or memory growth of 10 % or more."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        defaults = soak.Options()
        parser.add_argument("--clients", type=int, help=f"Clients ({defaults.clients}).")
        parser.add_argument("--lobbies", type=int, help=f"Lobbies they are spread over ({defaults.lobbies}).")
        parser.add_argument("--minutes", type=float, help=f"How long the load lasts ({defaults.seconds / 60:g}).")
        parser.add_argument("--rate", type=float, help=f"Offers, answers and ICE per second, overall ({defaults.rate:g}).")
        parser.add_argument("--chat-rate", type=float, help=f"Chat messages per second, overall ({defaults.chat_rate:g}).")
        parser.add_argument("--drop-rate", type=float, help=f"Drops (each followed by a resume) per second, overall ({defaults.drop_rate:g}).")
        parser.add_argument("--interval", type=float, help=f"Seconds per line of the report ({defaults.interval:g}).")
        parser.add_argument("--deadline", type=float, help=f"Seconds after which a message that did not arrive counts as lost ({defaults.deadline:g}).")
        parser.add_argument("--max-growth", type=float, help=f"Memory growth after warm-up, in percent, that fails the run ({defaults.max_growth:g}).")
        parser.add_argument("--seed", type=int, help="Seed of the random choices, to repeat a run.")
        parser.add_argument("--short", action="store_true", help="The suite's version: 40 clients, 8 lobbies, 15 seconds; memory growth reported, not judged.")
        parser.add_argument("--processes", type=int, default=2, help="Server processes to start (2).")
        parser.add_argument("--url", action="append", default=[], help="Soak this running server (one per process) instead of starting one; run it with RATE_LIMITS=0.")
        parser.add_argument("--server-pid", action="append", type=int, default=[], help="Pid of a --url server process, for its memory.")
        parser.add_argument("--allow-remote", action="store_true", help="Allow --url on another machine.")
        parser.add_argument("--json", help="Write the figures to this file.")

    def handle(self, *args: Any, **options: Any) -> None:
        # The generator measures latency as messages arrive: a full garbage
        # collection walking Django's objects paused it for up to 63 ms, which
        # counted against the server. Frozen, collections skip them.
        gc.freeze()
        run_options = self.soak_options(options)
        for url in options["url"]:
            if not on_this_machine(url) and not options["allow_remote"]:
                raise CommandError(f"{url} is not on this machine; pass --allow-remote to load it anyway.")
        with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
            target = self.target(options, Path(scratch))
            try:
                report = asyncio.run(soak.run(target, run_options, self.progress))
            finally:
                target.stop()
            # An exception in a server is an error even if no client noticed it.
            tracebacks = [
                text for log in sorted(Path(scratch).glob("*.log")) if TRACEBACK in (text := log.read_text(errors="replace"))
            ]
            for text in tracebacks:
                report.errors["server_traceback"] += text.count(TRACEBACK)
            if tracebacks:
                first = tracebacks[0]
                self.progress("First server traceback:\n" + first[first.index(TRACEBACK):][:3000])
        self.stdout.write("\n" + soak.summary(report))
        if options["json"]:
            document = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **soak.as_json(report)}
            Path(options["json"]).write_text(json.dumps(document, indent=2))
            self.progress(f"Figures written to {options['json']}")
        failures = report.failures()
        if failures:
            raise CommandError("soak run failed: " + "; ".join(failures))

    def soak_options(self, options: dict[str, Any]) -> soak.Options:
        values: dict[str, Any] = {field.name: getattr(soak.Options(), field.name) for field in fields(soak.Options)}
        if options["short"]:
            values.update(soak.SHORT)
        if options["minutes"] is not None:
            values["seconds"] = 60 * options["minutes"]
        for name in ("clients", "lobbies", "rate", "chat_rate", "drop_rate", "interval", "deadline", "max_growth", "seed"):
            if options[name] is not None:
                values[name] = options[name]
        run_options = soak.Options(**values)
        if run_options.clients < 2 or not 1 <= run_options.lobbies <= run_options.clients // 2:
            raise CommandError("Every lobby needs at least two clients: give more --clients or fewer --lobbies.")
        size = -(-run_options.clients // run_options.lobbies)
        if size > settings.LOBBY_DEFAULT_MAX_PARTICIPANTS:
            raise CommandError(
                f"{size} clients a lobby is more than a lobby holds ({settings.LOBBY_DEFAULT_MAX_PARTICIPANTS}): "
                "give more --lobbies."
            )
        if run_options.seconds <= 0 or run_options.interval <= 0 or run_options.deadline <= 0:
            raise CommandError("--minutes, --interval and --deadline must be more than zero.")
        return run_options

    def target(self, options: dict[str, Any], scratch: Path) -> Target:
        if options["url"]:
            self.progress(f"Soaking {', '.join(options['url'])}")
            return Target(name="server", urls=[url.rstrip("/") for url in options["url"]], pids=options["server_pid"])
        if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql") or not settings.REDIS_URL:
            raise CommandError("The soak run starts servers on Postgres and Redis: set DATABASE_URL and REDIS_URL.")
        call_command("migrate", verbosity=0)
        env = servers.server_env()
        self.progress(f"Starting {options['processes']} server process(es) on Postgres + Redis, RATE_LIMITS=0")
        return servers.start("soak", "voicebot.asgi:application", options["processes"], env, scratch, None)

    def progress(self, line: str) -> None:
        self.stderr.write(line)
        self.stderr.flush()
