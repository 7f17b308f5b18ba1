"""The shop demo bot: its knowledge answers real paraphrases, and its plugin looks orders up."""
from __future__ import annotations

import re

import pytest

from engine import load_knowledge, paths
from engine.testing import engine_for
from plugins import shop
from plugins.shop.orders import OrderBook, OrderFileError, find_order_number, is_only_order_number

#: Visitor questions written independently of the knowledge file (none is one of its
#: examples or FAQ questions, see the test below), with the intent each must reach.
PARAPHRASES: list[tuple[str, str]] = [
    # small talk and handoff
    ("hello there, good to see you", "greeting"),
    ("hey, is this the help desk?", "greeting"),
    ("thanks so much, that's exactly what I needed", "thanks"),
    ("brilliant, cheers for that", "thanks"),
    ("ok that's all I needed, bye for now", "goodbye"),
    ("I'm off now, have a good evening", "goodbye"),
    ("can I chat with an actual person please", "human_agent"),
    ("this bot is useless, get me a manager", "human_agent"),
    ("do you know any funny jokes?", "chitchat"),
    ("what's your favourite colour?", "chitchat"),
    # orders
    ("where has my parcel got to?", "order/status"),
    ("I'd like an update on the status of my purchase", "order/status"),
    ("has my stuff been sent out yet?", "order/status"),
    ("I placed an order and want to cancel it", "order/cancel"),
    ("please call off my order, I don't need it any more", "order/cancel"),
    ("I typed my address wrong when I ordered", "order/change_address"),
    ("can you ship my order to my parents' address instead?", "order/change_address"),
    ("can I add one more t-shirt to the order I just placed?", "order/change_items"),
    ("I need to change the colour of something in my order", "order/change_items"),
    ("the tracking says it was delivered yesterday but there's nothing at my door", "order/not_delivered"),
    ("my parcel seems to have gone missing, it never turned up", "order/not_delivered"),
    # shipping
    ("how much do you charge to deliver?", "shipping/cost"),
    ("is delivery free if I spend over forty pounds?", "shipping/cost"),
    ("how many working days until my order gets here?", "shipping/time"),
    ("if I order tonight, could it come tomorrow?", "shipping/time"),
    ("do you send orders to the netherlands?", "shipping/international"),
    ("I'm in new zealand, can you deliver here?", "shipping/international"),
    # returns and refunds
    ("how can I send a dress back?", "returns/how_to"),
    ("what's the process for returning stuff?", "returns/how_to"),
    ("the glass arrived in pieces", "returns/damaged"),
    ("you sent me a completely different product than the one I ordered", "returns/damaged"),
    ("the trousers are too long, can I exchange them for a shorter pair?", "returns/exchange"),
    ("could I swap these boots for a size up?", "returns/exchange"),
    ("I sent my return back weeks ago, when is my money coming?", "refund/status"),
    ("my refund still isn't showing on my bank statement", "refund/status"),
    ("I'd like my money returned for this order", "refund/request"),
    ("I'm not happy with the item and want a refund", "refund/request"),
    # payment and invoices
    ("which payment types can I use?", "payment/methods"),
    ("do you take visa and mastercard?", "payment/methods"),
    ("my card keeps getting declined at checkout", "payment/failed"),
    ("the payment won't go through, what's wrong?", "payment/failed"),
    ("I've been charged two times for the same thing", "payment/charged_twice"),
    ("there are two charges on my card for one order", "payment/charged_twice"),
    ("please send me an invoice for my purchase", "invoice"),
    ("I need a receipt for my expenses claim", "invoice"),
    # discount codes and gift cards
    ("where do I type in a discount code?", "coupon/apply"),
    ("are there any discounts for first-time buyers?", "coupon/apply"),
    ("the promo code I got by email doesn't work", "coupon/not_working"),
    ("why is my voucher code being rejected?", "coupon/not_working"),
    ("can I buy a gift card for my sister?", "gift_card"),
    ("how much money is still on my gift voucher?", "gift_card"),
    # account
    ("I can't remember my password", "account/password"),
    ("the site won't let me log into my account", "account/password"),
    ("I'd like my account removed completely", "account/delete"),
    ("please delete all the data you hold about me", "account/delete"),
    ("how do I update the email on my account?", "account/update_details"),
    ("I want to stop getting your promotional emails", "account/update_details"),
    # products
    ("is the wool jumper in stock in medium?", "product/availability"),
    ("when are you restocking the sold out trainers?", "product/availability"),
    ("which size would fit me best?", "product/size"),
    ("do your jeans come up small or large?", "product/size"),
    ("does the blender come with a warranty?", "product/warranty"),
    ("my toaster stopped working after six months, is it covered?", "product/warranty"),
]


def _plain(text: str) -> str:
    """Lower-cased, punctuation and apostrophes removed, spaces collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower().replace("'", "").replace("\u2019", "")).split())


@pytest.fixture(scope="module")
def eng():
    with engine_for() as engine:
        yield engine


def test_paraphrase_table_is_large_and_covers_every_intent_with_examples():
    knowledge = load_knowledge(paths.knowledge_dir() / "shop.yaml")
    with_examples = {name for name, intent in knowledge.intents.items() if intent.examples}
    assert len(PARAPHRASES) >= 40
    assert len(with_examples) >= 25
    assert with_examples <= {intent for _, intent in PARAPHRASES}


def test_no_paraphrase_is_an_example_or_faq_question_of_the_knowledge_file():
    knowledge = load_knowledge(paths.knowledge_dir() / "shop.yaml")
    texts = [ex for intent in knowledge.intents.values() for ex in intent.examples]
    texts += [q for entry in knowledge.faq for q in (entry.question, *entry.alternatives)]
    # Compared both plainly and as the engine sees them (synonyms applied).
    known = {_plain(text) for text in texts} | {knowledge.prepare(text) for text in texts}
    copied = [text for text, _ in PARAPHRASES if {_plain(text), knowledge.prepare(text)} & known]
    assert copied == []


@pytest.mark.parametrize("text,intent", PARAPHRASES, ids=[t for t, _ in PARAPHRASES])
def test_paraphrase_reaches_its_intent(eng, text, intent):
    turn = eng.ask("shop", text, session=f"paraphrase:{text}")
    assert (turn.intent, turn.source != "fallback") == (intent, True), turn.as_dict()


def test_every_example_reaches_its_own_intent(eng):
    """Catches keywords, synonyms and FAQ entries that steal another intent's examples."""
    knowledge = load_knowledge(paths.knowledge_dir() / "shop.yaml")
    stolen = []
    for name, intent in knowledge.intents.items():
        for example in intent.examples:
            turn = eng.ask("shop", example, session=f"example:{example}")
            if turn.intent != name:
                stolen.append((example, name, turn.intent, turn.source))
    assert stolen == []


def test_every_faq_question_gets_its_faq_answer(eng):
    knowledge = load_knowledge(paths.knowledge_dir() / "shop.yaml")
    for entry in knowledge.faq:
        for question in (entry.question, *entry.alternatives):
            turn = eng.ask("shop", question, session=f"faq:{question}")
            assert (turn.intent, turn.source, turn.answer) == (entry.intent, "faq", entry.answer), question


# -- handoff ------------------------------------------------------------------------------


def test_human_agent_intent_hands_off(eng):
    turn = eng.ask("shop", "could somebody from your staff take over please", session="handoff-intent")
    assert turn.intent == "human_agent"
    assert turn.handoff is not None and turn.handoff.reason == "intent"


def test_asking_for_a_real_person_hands_off(eng):
    turn = eng.ask("shop", "I'd rather speak to a person about this", session="handoff-asked")
    assert turn.handoff is not None and turn.handoff.reason == "asked"


# -- order numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,number",
    [
        ("where is KF-10023?", "KF-10023"),
        ("status of kf10022 please", "KF-10022"),
        ("my order is #10025", "KF-10025"),
        ("order 10024 hasn't come", "KF-10024"),
        ("order no. 10021", "KF-10021"),
        ("Order number: 10030", "KF-10030"),
    ],
)
def test_order_number_is_found_in_every_documented_form(text, number):
    assert find_order_number(text) == number


def test_bare_number_counts_as_order_number_only_while_awaiting_one():
    assert find_order_number("I live at 10023 Main Street") is None
    assert find_order_number("it's 10023", awaiting=True) == "KF-10023"
    assert find_order_number("KF-100234") is None  # six digits is not an order number


def test_only_an_order_number_is_told_apart_from_a_question_with_one():
    assert is_only_order_number("it's KF-10023")
    assert is_only_order_number("10023")
    assert not is_only_order_number("cancel order KF-10023")


def test_order_number_is_extracted_into_slots_and_looked_up(eng):
    turn = eng.ask("shop", "Hi, where is my order KF-10022?", session="lookup")
    assert turn.intent == "order/status"
    assert turn.source == "plugin"
    assert "KF-10022" in turn.answer and "DHL" in turn.answer and "JD014600004512" in turn.answer
    context = eng.run(eng.memory.load("shop", "lookup"))
    assert context.slots["order_id"] == "KF-10022"


def test_order_status_answer_follows_the_order_file(eng):
    assert "being packed" in eng.ask("shop", "KF-10021", session="st-1").answer
    assert "out for delivery" in eng.ask("shop", "KF-10024", session="st-2").answer
    assert "was delivered on" in eng.ask("shop", "KF-10025", session="st-3").answer
    assert "cancelled" in eng.ask("shop", "#10026", session="st-4").answer


def test_unknown_order_number_gets_cant_find_answer(eng):
    turn = eng.ask("shop", "where is my order KF-99999?", session="unknown")
    assert turn.intent == "order/status"
    assert "I can't find order KF-99999" in turn.answer
    context = eng.run(eng.memory.load("shop", "unknown"))
    assert "order_id" not in context.slots


def test_status_question_without_number_asks_for_it_and_accepts_number_next_turn(eng):
    first = eng.ask("shop", "can you tell me where my package is", session="ask")
    assert first.intent == "order/status"
    assert "order number" in first.answer
    second = eng.ask("shop", "10027", session="ask")
    assert second.intent == "order/status"
    assert "KF-10027" in second.answer and "delayed" in second.answer


def test_remembered_order_number_answers_a_later_status_question(eng):
    eng.ask("shop", "order KF-10023", session="remember")
    later = eng.ask("shop", "any news on when it arrives?", session="remember")
    assert later.intent == "order/status"
    assert "KF-10023" in later.answer


def test_cancelling_a_shipped_order_says_it_has_shipped(eng):
    turn = eng.ask("shop", "please cancel order KF-10022", session="cancel-shipped")
    assert turn.intent == "order/cancel"
    assert "already shipped" in turn.answer


def test_cancelling_an_order_still_being_packed_gets_the_knowledge_answer(eng):
    turn = eng.ask("shop", "please cancel order KF-10021", session="cancel-processing")
    assert turn.intent == "order/cancel"
    assert turn.source != "plugin"
    assert "within 1 hour" in turn.answer


def test_other_bots_are_left_alone_by_the_shop_hooks():
    class Other:
        name = "other"

    assert shop.classify_intent(message=None, bot=Other(), context=None) is None
    assert shop.answer(message=None, bot=Other(), context=None, classification=None) is None


# -- the order file -----------------------------------------------------------------------


def test_sample_order_file_loads_lazily_with_ten_orders():
    book = OrderBook()
    assert book._orders is None
    assert len(book) == 10
    assert book.get("kf-10029").status == "refunded"


def test_broken_order_file_raises_an_error_naming_file_and_line(tmp_path):
    broken = tmp_path / "orders.json"
    broken.write_text('{"orders": [\n  {"number": "KF-10001",}\n]}\n', encoding="utf-8")
    with pytest.raises(OrderFileError, match=r"orders\.json:2: not valid JSON"):
        OrderBook(broken).get("KF-10001")


def test_order_with_unknown_status_is_reported_with_its_position(tmp_path):
    bad = tmp_path / "orders.json"
    bad.write_text('{"orders": [{"number": "KF-10001", "status": "lost in space"}]}', encoding="utf-8")
    with pytest.raises(OrderFileError, match=r"orders\[0\]: status 'lost in space'"):
        OrderBook(bad).get("KF-10001")


def test_broken_order_file_is_logged_and_the_visitor_gets_a_fallback(eng, tmp_path, monkeypatch, caplog):
    broken = tmp_path / "orders.json"
    broken.write_text("{not json", encoding="utf-8")
    monkeypatch.setattr(shop, "ORDER_BOOK", OrderBook(broken))
    turn = eng.ask("shop", "where is KF-10023", session="broken-file")
    assert turn.source == "fallback"
    assert "orders.json:1: not valid JSON" in caplog.text


def test_missing_order_file_is_a_clear_error(tmp_path):
    with pytest.raises(OrderFileError, match="cannot read the order file"):
        OrderBook(tmp_path / "nope.json").get("KF-10001")


def test_full_width_order_numbers_are_read_as_ascii():
    from plugins.shop.orders import find_order_number, is_only_order_number

    assert find_order_number("where is ＫＦ－１００２３?") == "KF-10023"
    assert find_order_number("order １００２３") == "KF-10023"
    assert is_only_order_number("ＫＦ－１００２３ please")
