"""Alice talks with the voice bot Ava in real chromium, over real WebRTC: an
administrator adds Ava to Alice's lobby and removes her again from the admin,
and in between Ava greets Alice, hears her spoken question (from chromium's
fake microphone), and speaks the fake provider's answer.

The scenario runs in a fresh network namespace that has only loopback, so
no media, STUN, DNS or provider traffic can leave the machine and ICE can only
succeed on 127.0.0.1. See browser_bot_scenario.py for the steps.
"""

from pathlib import Path

from tests.conftest import run_browser_scenario


SCENARIO = Path(__file__).with_name("browser_bot_scenario.py")
TIMEOUT = 180


def ms(value: float | None) -> str:
    """A stage's duration; the pipeline leaves out stages that did not run."""
    return "–" if value is None else f"{value:.0f} ms"


def test_a_person_talks_with_a_bot_that_an_administrator_adds_and_removes():
    results = run_browser_scenario(SCENARIO, TIMEOUT)

    turn = results["turn"]
    print(
        f"\nbot shown on Alice's page {results['bot_appeared_ms']} ms after the admin's add, "
        f"gone {results['bot_left_ms']} ms after the remove; "
        f"peer connection up {results['bot_connected_ms']} ms after it appeared, "
        f"greeting heard {results['greeting_after_appearance_ms']} ms after it appeared "
        f"(energy {results['greeting_energy']:.4f}, peak level {results['greeting_max_level']:.3f})"
    )
    print(
        f"question ({results['question_seconds']} s) transcribed as {turn['user_text']!r}; turn: "
        f"end of speech {ms(turn['end_of_speech_ms'])}, recognition {ms(turn['recognition_ms'])}, "
        f"model first token {ms(turn['model_first_token_ms'])}, "
        f"synthesis first audio {ms(turn['synthesis_first_audio_ms'])}, "
        f"first audio {ms(turn['first_audio_ms'])}; answer heard on the page "
        f"{results['answer_heard_after_question_ms']} ms after the question's last sound "
        f"(energy {results['answer_energy']:.4f}); scenario {results['duration_s']} s"
    )

    # The administrator's actions reach the room live, with the bot shown as a bot.
    assert 0 <= results["bot_appeared_ms"] <= 2000
    assert 0 <= results["bot_left_ms"] <= 2000
    assert results["bot_shown_with_badge"] and results["bot_badge_visible"] and results["bot_is_bot_peer"]
    assert results["admin_add_message"] and results["admin_remove_message"]
    assert results["bot_gone_from_participants"] and results["bot_link_closed"]

    # The greeting: sound arrives on Alice's page, and the words are in the chat and the history.
    assert results["greeting_energy"] > 0 and results["greeting_before_any_question"]
    assert results["greeting_in_chat"]
    assert results["greeting_turn_text"] == ["Hello Alice, I am Ava."]

    # The question: transcribed from Alice's microphone, sent to the provider, answered aloud.
    assert all(word in turn["user_text"].lower() for word in ("capital", "spain")), turn
    assert turn["speaker_name"] == "Alice" and turn["reply_text"] == "The capital of Spain is Madrid."
    assert not turn["error"]
    assert turn["first_audio_ms"] is not None
    assert results["provider_got_question"] and results["provider_model"] == "fake-model"
    assert results["provider_key_sent"]
    assert results["answer_energy"] > 0 and results["answer_heard_after_question_ms"] > 0
    assert results["answer_in_chat"]

    # Media on loopback only.
    assert results["candidate_pairs"]
    assert {address for pair in results["candidate_pairs"] for address in pair} == {"127.0.0.1"}
    assert results["http_errors"] == []
