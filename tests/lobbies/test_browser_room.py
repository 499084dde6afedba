"""Alice and Bob meet in a voice room in real chromium, with real WebRTC; the
server restarts under them and Bob reloads his page, and both come back on their own.
Then they meet again in a lobby with a password.

The scenario runs in a fresh network namespace that has only loopback, so
no media, STUN or DNS traffic can leave the machine and ICE can only succeed
on 127.0.0.1. See browser_room_scenario.py for the steps.
"""

from pathlib import Path

from tests.conftest import run_browser_scenario


SCENARIO = Path(__file__).with_name("browser_room_scenario.py")
TIMEOUT = 180


def test_two_people_talk_and_chat_in_a_room():
    results = run_browser_scenario(SCENARIO, TIMEOUT)

    print(
        "\ntime from opening the landing page to connected audio: "
        f"Alice {results['alice_open_to_audio_ms']} ms (includes waiting for Bob), "
        f"Bob {results['bob_open_to_audio_ms']} ms; "
        f"from opening the room page: Alice {results['alice_room_to_audio_ms']} ms, "
        f"Bob {results['bob_room_to_audio_ms']} ms"
    )
    print(
        f"server restart (down {results['restart_server_down_ms']} ms) to audio again on fresh peer connections: "
        f"Alice {results['restart_alice_to_audio_ms']} ms, Bob {results['restart_bob_to_audio_ms']} ms "
        f"(attempts: Alice {results['restart_alice_attempts']}, Bob {results['restart_bob_attempts']}; "
        "the backoff's full jitter makes this vary); "
        f"Bob's drop to audio again: Alice {results['drop_alice_to_audio_ms']} ms, "
        f"Bob {results['drop_bob_to_audio_ms']} ms; "
        f"lost offer to audio again (offer retried after 10 s): Alice {results['lost_offer_alice_to_audio_ms']} ms, "
        f"Bob {results['lost_offer_bob_to_audio_ms']} ms; "
        f"Bob's reload to audio again: Alice {results['reload_alice_to_audio_ms']} ms, "
        f"Bob {results['reload_bob_to_audio_ms']} ms; Bob's leave seen by Alice after {results['leave_seen_ms']} ms"
    )
    for who in ("alice", "bob"):
        assert results[f"{who}_peer_states"] == ["connected"]
        assert results[f"{who}_bytes_after"] > results[f"{who}_bytes_before"] > 0, f"{who} hears nothing new"
        assert results[f"{who}_candidate_addresses"] == ["127.0.0.1"]
    assert results["alice_sees_bob"] and results["bob_sees_alice"]
    assert results["chat_seen_by_bob"] and results["chat_escaped"]
    assert results["bob_muted_seen_by_alice"]
    assert results["delivery_failed_noted"] and results["delivery_failed_keeps_room"]
    assert results["http_errors"] == []
    assert results["posts"] and all(
        post["content_type"] == "application/json" and post["body"] for post in results["posts"]
    ), results["posts"]
    assert results["favicon"].startswith("200 image/svg+xml")

    # The server restarts: both pages show it, keep the room on screen, and come back by themselves.
    for who, other in (("alice", "bob"), ("bob", "alice")):
        assert results[f"restart_{who}_shows_reconnecting"] and results[f"restart_{who}_keeps_room_while_reconnecting"]
        assert results[f"restart_{who}_reconnected_after_reconnecting"], results[f"restart_{who}_status_log"]
        assert results[f"restart_{who}_same_peer_id"] and results[f"restart_{who}_sees_{other}"]
        assert results[f"restart_{who}_room_not_stale"]
        assert results[f"restart_{who}_peer_states"] == ["connected"]
        assert results[f"restart_{who}_bytes_after"] > results[f"restart_{who}_bytes_before"] > 0
    assert results["restart_bob_mute_kept"]

    # Bob's connection drops: Alice sees him reconnecting, then back.
    assert results["drop_alice_sees_bob_reconnecting"] and results["drop_bob_shows_reconnecting"]
    assert results["drop_alice_sees_bob_back"] and results["drop_bob_same_peer_id"]
    assert results["drop_bob_fetched_missed_chat_once"]
    for who in ("alice", "bob"):
        assert results[f"drop_{who}_peer_states"] == ["connected"]
        assert results[f"drop_{who}_bytes_after"] > results[f"drop_{who}_bytes_before"] > 0

    # A lost offer is sent again by the offering side.
    assert results["lost_offer_swallowed"]
    for who in ("alice", "bob"):
        assert results[f"lost_offer_{who}_peer_states"] == ["connected"]
        assert results[f"lost_offer_{who}_bytes_after"] > results[f"lost_offer_{who}_bytes_before"] > 0

    # Bob reloads: Alice sees the same Bob back, and they hear each other again.
    assert results["reload_bob_same_peer_id"] and results["reload_alice_sees_bob"] and results["reload_bob_sees_alice"]
    assert results["reload_alice_sees_two"]
    # Bob was muted: his reloaded page mutes itself on the welcome's word, and sends no mute of its own.
    assert results["reload_bob_mute_kept"] and results["reload_bob_mic_off"]
    assert results["reload_bob_sent_no_mute"], results["reload_bob_mute_frames"]
    assert results["reload_alice_saw_bob_reconnect"], results["reload_alice_bob_states"]

    # A second tab of Bob's takes over; the first stops for good.
    assert results["second_tab_replaces_first"] and results["second_tab_same_peer_id"]
    assert results["second_tab_alice_sees_bob"]
    assert results["second_tab_first_tab_stays_out"], results["second_tab_first_tab_state"]
    for who in ("alice", "bob"):
        assert results[f"second_tab_{who}_peer_states"] == ["connected"]
        assert results[f"second_tab_{who}_bytes_after"] > results[f"second_tab_{who}_bytes_before"] > 0

    # Bob clicks Leave: Alice sees him gone at once, not after the grace period.
    assert results["leave_alice_sees_bob_gone"], results["leave_seen_ms"]
    for who in ("alice", "bob"):
        assert results[f"reload_{who}_peer_states"] == ["connected"]
        assert results[f"reload_{who}_bytes_after"] > results[f"reload_{who}_bytes_before"] > 0

    # A lobby with a password: the creator goes straight in; Bob is asked, a wrong
    # password asks again, the right one lets him in, and they hear each other.
    assert results["secret_alice_not_asked"] and results["secret_lock_shown"]
    assert results["secret_bob_asked"] and results["secret_bob_asked_again"]
    assert results["secret_wrong_password_forgotten"] and results["secret_password_kept"]
    assert results["secret_alice_sees_bob"] and results["secret_bob_sees_alice"]
    for who in ("alice", "bob"):
        assert results[f"secret_{who}_peer_states"] == ["connected"]
        assert results[f"secret_{who}_bytes_after"] > results[f"secret_{who}_bytes_before"] > 0

    # An administrator's mute (played in): Bob's page mutes itself and does not answer.
    assert results["admin_mute_shown"] and results["admin_mute_mic_off"]
    assert results["admin_mute_not_answered"], results["admin_mute_frames_sent"]
    assert results["admin_mute_unmuted_mic_on"]
    # A quick mute-unmute: the page shows each click once, not the echoes.
    assert results["quick_toggle_echoes_back"] and results["quick_toggle_ends_unmuted"]
    assert results["quick_toggle_no_flicker"], results["quick_toggle_self_shown"]
    assert results["quick_toggle_mic_on"]

    # A kick and a closed lobby (played in) are final, with the server's words for a kick.
    for code in (4008, 4410):
        assert results[f"final_close_{code}_shown"] and results[f"final_close_{code}_stays_out"]
