"""`manage.py benchbots`, run small: its table is there and its figures make sense."""

import json
import re
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command


def test_benchbots_reports_latency_stages_and_parallel_bots(tmp_path: Path) -> None:
    out = StringIO()
    report = tmp_path / "bench.json"

    call_command("benchbots", "--turns", "2", "--max-bots", "2", "--parallel-turns", "1", "--json", str(report), stdout=out)

    printed = out.getvalue()
    results = json.loads(report.read_text())
    single = results["single"]
    assert single["turns"] == 2 and single["unanswered"] == 0
    assert 150 < single["p50_ms"] <= single["p95_ms"] < 1500
    # Every turn heard its question, and the pipeline's own first-audio figure agrees with the benchmark's.
    for turn in single["turn_details"]:
        assert turn["record"]["user_text"]
        assert abs(turn["first_audio_ms"] - turn["record"]["first_audio_ms"]) < 80
    stages = single["stage_means_ms"]
    assert settings.BOT_END_OF_SPEECH_MS - 50 < stages["end_of_speech_ms"] < settings.BOT_END_OF_SPEECH_MS + 100
    assert all(value >= 0 for value in stages.values())
    assert sum(stages.values()) <= single["mean_ms"] + 20

    assert f"p50 {single['p50_ms']:.0f} ms, p95 {single['p95_ms']:.0f} ms" in printed
    for label in ("end-of-speech detection", "recognition", "model first token", "first synthesized audio", "rest"):
        assert re.search(rf"{label}.*\d+ ms +\d+%", printed)

    rows = results["parallel"]
    assert [row["bots"] for row in rows] == [1, 2]
    assert rows[1]["turns"] == 2 and rows[1]["unanswered"] == 0
    assert 150 < rows[1]["p50_ms"] <= rows[1]["p95_ms"] < 3000
    table = printed[printed.index("bots   turns   p50 ms   p95 ms"):]
    for row in rows:
        assert re.search(rf"^ +{row['bots']} +{row['turns']} +{row['p50_ms']:.0f} +{row['p95_ms']:.0f} +0$", table, re.MULTILINE)
    assert results["bots_before_p50_doubles"] in (1, 2)
    assert f"before p50 doubles (≥ {2 * single['p50_ms']:.0f} ms): {results['bots_before_p50_doubles']}" in printed


def test_benchbots_refuses_nonsense() -> None:
    with pytest.raises(CommandError, match="at least 1"):
        call_command("benchbots", "--turns", "0", stdout=StringIO())
