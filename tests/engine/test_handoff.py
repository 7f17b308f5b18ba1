"""Each handoff rule: an intent marked handoff, asking for a person, N turns not understood."""


def test_an_intent_marked_handoff_passes_the_visitor_to_a_person(mini_engine):
    turn = mini_engine().ask("mini", "i need an agent")
    assert turn.handoff is not None and turn.handoff.reason == "intent"
    assert turn.replies[0].kind == "handoff"
    assert turn.answer == "Connecting you to a colleague."


def test_asking_for_a_person_hands_off_whatever_the_intent(mini_engine):
    turn = mini_engine().ask("mini", "Where is my order? I want a REAL person!")
    assert turn.handoff.reason == "asked" and turn.handoff.detail == "real person"


def test_n_misunderstood_turns_in_a_row_hand_off(mini_engine):
    eng = mini_engine()
    first = eng.ask("mini", "qwrtzp zzxv", session="s")
    assert first.handoff is None and first.source == "fallback"
    second = eng.ask("mini", "blorp flim", session="s")
    assert second.handoff is not None and second.handoff.reason == "misunderstood"


def test_an_understood_turn_resets_the_misunderstood_count(mini_engine):
    eng = mini_engine()
    eng.ask("mini", "qwrtzp zzxv", session="s")
    eng.ask("mini", "i want a refund", session="s")
    assert eng.ask("mini", "blorp flim", session="s").handoff is None


def test_confidence_under_the_threshold_counts_as_not_understood(mini_engine):
    from engine import Classification, IntentScore, hookimpl

    class Unsure:
        @hookimpl
        def classify_intent(self):
            return Classification((IntentScore("refund", 0.3),), in_scope=True)

    turn = mini_engine(Unsure()).ask("mini", "i want a refund")  # min_confidence is 0.4
    assert (turn.intent, turn.source) == (None, "fallback")


def test_a_classifier_out_of_scope_verdict_counts_as_not_understood(mini_engine):
    from engine import Classification, IntentScore, hookimpl

    class OutOfScope:
        @hookimpl
        def classify_intent(self):
            return Classification((IntentScore("refund", 0.9),), in_scope=False)

    assert mini_engine(OutOfScope()).ask("mini", "i want a refund").source == "fallback"
