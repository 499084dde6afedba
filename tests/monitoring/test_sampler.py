"""A process's sample: what its own metrics moved by since the previous one."""

import os
import time

from django.test import Client

from lobbies import metrics as lobby_metrics
from monitoring.sampler import Sampler


def test_a_sample_holds_the_increases_since_the_previous_one(db: None) -> None:
    sampler = Sampler(role="server")
    sampler.take()

    client = Client()
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    lobby_metrics.connection_opened()
    lobby_metrics.message_received("chat", 100)
    lobby_metrics.message_delivered("chat", time.time() - 0.02)
    lobby_metrics.error_sent("bad_json")
    try:
        sample = sampler.take()
    finally:
        lobby_metrics.connection_closed(1000)

    assert sample["process"].endswith(f":{os.getpid()}")
    assert (sample["role"], sample["http_requests"], sample["http_errors"]) == ("server", 3, 0)
    assert (sample["signaling_received"], sample["signaling_errors"]) == (1, 1)
    # One relay of about 20 ms: in the (10 ms, 25 ms] bucket and every one above.
    relay = dict(zip([*sample["relay_latency"]["le"], "inf"], sample["relay_latency"]["n"]))
    assert (relay[0.01], relay[0.025], relay["inf"]) == (0, 1, 1)
    assert sample["websocket_connections"] >= 1
    assert sample["memory_bytes"] > 10 * 2**20
    assert 0 < sample["seconds"] < 5

    # Nothing happened since: every count is back to zero.
    quiet = sampler.take()
    assert (quiet["http_requests"], quiet["signaling_received"], quiet["relay_latency"]["n"][-1]) == (0, 0, 0)
