"""Load test of the signaling server: many WebSocket clients through the real
protocol, against servers it starts (or one given with --url), optionally
beside the reference relay in the same run. docs/performance.md explains the
scenarios and figures."""

import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from lobbies.loadtest import report, scenarios, servers
from lobbies.loadtest.servers import Target

# A smoke run checks that everything works, not how fast: its latency limit
# is loose enough for a busy machine.
QUICK = {"pairs": 5, "rooms": 2, "room_size": 4, "fanout_size": 6, "idle": 20, "step_seconds": 0.5,
         "start_rate": 20.0, "max_rate": 30.0, "idle_seconds": 0.5, "p99_limit_ms": 1000.0}


def on_this_machine(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


class Command(BaseCommand):
    help = (
        "Drive a signaling server with many WebSocket clients (rooms of two and eight, one big room, idle "
        "connections, a reconnect storm) and report rates, latencies, CPU and memory."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", action="append", default=[], help="Measure this running server (one per process) instead of starting one.")
        parser.add_argument("--server-pid", action="append", type=int, default=[], help="Pid of a --url server process, for its CPU and memory.")
        parser.add_argument("--allow-remote", action="store_true", help="Allow --url on another machine.")
        parser.add_argument("--processes", default="1", help="Comma-separated process counts to start, e.g. 1,2.")
        parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn", help="ASGI server for the project: uvicorn as in production (docs/deploying.md), or daphne. The reference always runs on daphne.")
        parser.add_argument("--compression", choices=["off", "on", "both"], default="off", help="WebSocket compression: clients offer permessage-deflate and the servers started have VOICEBOT_WS_COMPRESSION on; both measures each project server without, then with it.")
        parser.add_argument("--placement", choices=["spread", "lobby"], default="spread", help="With several processes: spread each lobby's clients over them (spread), or keep each lobby on one process, as a proxy routing by lobby does (lobby).")
        parser.add_argument("--reference", action="store_true", help="Also measure the reference relay (needs REDIS_URL).")
        parser.add_argument("--scenarios", default=",".join(scenarios.SCENARIOS), help="Comma-separated: pairs, rooms, fanout, idle.")
        parser.add_argument("--quick", action="store_true", help="A few seconds with a handful of clients (a smoke run).")
        defaults = scenarios.Options()
        for name in ("pairs", "rooms", "room_size", "fanout_size", "idle", "refinements"):
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
        for name in ("step_seconds", "start_rate", "max_rate", "growth", "p99_limit_ms", "idle_seconds"):
            parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
        parser.add_argument("--json", help="Write the figures to this file.")
        parser.add_argument("--save-baseline", metavar="NAME", help="Save this run's figures as a baseline.")
        parser.add_argument("--compare", metavar="NAME", help="Compare this run with a saved baseline.")
        parser.add_argument("--tolerance", type=float, default=0.15, help="Share by which a figure may get worse (0.15).")

    def handle(self, *args: Any, **options: Any) -> None:
        # The generator measures latency as messages arrive: a full garbage
        # collection walking Django's objects paused it for up to 63 ms, which
        # counted against the server. Frozen, collections skip them.
        gc.freeze()
        wanted = [name.strip() for name in options["scenarios"].split(",") if name.strip()]
        unknown = set(wanted) - set(scenarios.SCENARIOS)
        if unknown:
            raise CommandError(f"unknown scenarios: {', '.join(sorted(unknown))}")
        run_options = self.scenario_options(options)
        for url in options["url"]:
            if not on_this_machine(url) and not options["allow_remote"]:
                raise CommandError(f"{url} is not on this machine; pass --allow-remote to load it anyway.")
        results: report.Results = {}
        with tempfile.TemporaryDirectory(prefix="loadtest-") as scratch:
            for describe, start in self.targets(options, Path(scratch)):
                self.progress(f"{describe}")
                target, cpus = start()
                try:
                    self.pin_generator(cpus)
                    results[target.name] = {}
                    for scenario in wanted:
                        figures = asyncio.run(scenarios.run_scenario(scenario, target, run_options, self.progress))
                        results[target.name].update(figures)
                finally:
                    target.stop()
                    self.pin_generator(None)
        reference = "reference" if "reference" in results else None
        self.stdout.write("\n" + report.table(results, reference))
        document = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "options": {key: value for key, value in vars(run_options).items()},
            "results": results,
        }
        if options["json"]:
            Path(options["json"]).write_text(json.dumps(document, indent=2))
            self.progress(f"Figures written to {options['json']}")
        if options["save_baseline"]:
            self.progress(f"Baseline saved to {report.save_baseline(options['save_baseline'], document)}")
        if options["compare"]:
            try:
                text, regressions = report.compare(results, options["compare"], options["tolerance"])
            except FileNotFoundError as error:
                raise CommandError(str(error))
            self.stdout.write("\n" + text)
            if regressions:
                raise CommandError(f"{regressions} figure(s) worse than baseline {options['compare']!r}")

    def scenario_options(self, options: dict[str, Any]) -> scenarios.Options:
        values = {name: options[name] for name in vars(scenarios.Options())}
        if options["quick"]:
            values.update(QUICK)
        return scenarios.Options(**values)

    def targets(self, options: dict[str, Any], scratch: Path) -> list[tuple[str, Any]]:
        """(description, start) for each server to measure, started one at a time."""
        compressions = {"off": [False], "on": [True], "both": [False, True]}[options["compression"]]
        if options["url"]:
            given = Target(
                name="server",
                urls=[url.rstrip("/") for url in options["url"]],
                pids=options["server_pid"],
                compression=compressions[-1],
                by_lobby=options["placement"] == "lobby",
            )
            return [(f"Measuring {', '.join(given.urls)}", lambda: (given, None))]
        production = settings.DATABASES["default"]["ENGINE"].endswith("postgresql") and bool(settings.REDIS_URL)
        env = self.server_env(production, scratch)
        kind = "Postgres + Redis" if production else "embedded default (SQLite, in-memory layer)"
        chosen = []
        for count in [int(value) for value in options["processes"].split(",")]:
            for compression in compressions:
                name = f"project×{count}" + (f" ({options['server']})" if options["server"] != "uvicorn" else "")
                name += " deflate" if compression else ""
                name += " by lobby" if count > 1 and options["placement"] == "lobby" else ""
                described = f"Project, {count} process(es), {kind}" + (", compression on" if compression else "")
                chosen.append((described, partial(
                    self.start_project, name, count, {**env, "VOICEBOT_WS_COMPRESSION": str(compression)},
                    scratch, options["server"], compression, options["placement"] == "lobby",
                )))
        if options["reference"]:
            if not settings.REDIS_URL:
                raise CommandError("--reference needs REDIS_URL: the reference relay runs on channels-redis.")
            cpus = self.server_cpus(1)
            chosen.append((
                "Reference relay (AsyncJsonWebsocketConsumer, group_send on RedisChannelLayer), 1 process",
                lambda: (servers.start(
                    "reference", "lobbies.loadtest.reference:application", 1, env, scratch, cpus, reference=True, server="daphne"
                ), cpus),
            ))
        return chosen

    def start_project(
        self, name: str, count: int, env: dict[str, str], scratch: Path, server: str, compression: bool, by_lobby: bool
    ) -> tuple[Target, set[int] | None]:
        cpus = self.server_cpus(count)
        target = servers.start(name, "voicebot.asgi:application", count, env, scratch, cpus, server=server)
        target.compression = compression
        target.by_lobby = by_lobby
        return target, cpus

    def server_env(self, production: bool, scratch: Path) -> dict[str, str]:
        env = servers.server_env()
        if production:
            call_command("migrate", verbosity=0)
            return env
        for name in ("DATABASE_URL", "REDIS_URL"):
            env.pop(name, None)
        env["VOICEBOT_DATA_DIR"] = str(scratch / "data")
        Path(env["VOICEBOT_DATA_DIR"]).mkdir()
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=servers.PROJECT_DIR, env=env, check=True)
        return env

    def server_cpus(self, processes: int) -> set[int] | None:
        """One server process on one core, the load generator on another; more share them all."""
        available = sorted(os.sched_getaffinity(0))
        return {available[0]} if processes == 1 and len(available) >= 2 else None

    def pin_generator(self, server_cpus: set[int] | None) -> None:
        everything = set(range(os.cpu_count() or 1))
        os.sched_setaffinity(0, (everything - server_cpus) if server_cpus else everything)

    def progress(self, line: str) -> None:
        self.stderr.write(line)
        self.stderr.flush()
