"""The ``shop`` demo bot: Kingfisher Goods, a fictional English-language online shop.

Most questions are answered from ``knowledge/shop.yaml``.  This plugin adds order
look-ups from ``orders.json`` (see :mod:`plugins.shop.orders` for the order-number
formats it recognises):

* an order number in the visitor's text is stored in ``context.slots["order_id"]``
  (as ``KF-10023``), so later turns and ``{order_id}`` placeholders can use it;
* an order-status question is answered with the order's real status; without a number
  the bot asks for one and remembers that it did, so the next turn may be the number
  alone (``10023``);
* an unknown number gets "I can't find order KF-99999" and the bot asks again;
* a cancellation request for an order that has already shipped says so.
"""
from __future__ import annotations

from engine import BotSpec, Classification, IntentScore, Reply, hookimpl, paths

from .orders import OrderBook, OrderFileError, describe_cancel, describe_status, find_order_number, is_only_order_number

__all__ = ["BOT", "ORDER_BOOK", "OrderFileError", "register_bots", "classify_intent", "answer"]

BOT = "shop"
STATUS_INTENT = "order/status"
CANCEL_INTENT = "order/cancel"
#: Slot holding the order number the conversation is about.
ORDER_SLOT = "order_id"
#: Slot set while the bot waits for the visitor to send an order number.
AWAITING_SLOT = "awaiting"

#: Read lazily: the file is opened on the first look-up, not at import.
ORDER_BOOK = OrderBook()

ASK_NUMBER = (
    "Sure, I can check that for you. What's your order number? You'll find it in your "
    "confirmation email; it looks like KF-10023."
)


@hookimpl
def register_bots() -> BotSpec:
    return BotSpec(
        name=BOT,
        knowledge=paths.knowledge_dir() / "shop.yaml",
        description="Kingfisher Goods, a demo English online shop: orders, delivery, returns, refunds, payments, account",
    )


@hookimpl
def classify_intent(message, bot, context):
    """Store an order number found in the text; a message that is only an order number
    (or a bare number the bot asked for) is an order-status question."""
    if bot.name != BOT:
        return None
    awaiting = context.slots.get(AWAITING_SLOT) == ORDER_SLOT
    number = find_order_number(message.text, awaiting=awaiting)
    if number is None:
        return None
    context.slots[ORDER_SLOT] = number
    if is_only_order_number(message.text):
        return Classification(ranked=(IntentScore(STATUS_INTENT, 1.0),), in_scope=True, source="plugin")
    return None


@hookimpl
def answer(message, bot, context, classification):
    """Answer order-status questions (and cancelling a shipped order) from the order file."""
    if bot.name != BOT:
        return None
    intent = classification.intent
    context.slots.pop(AWAITING_SLOT, None)  # any answer ends the wait; asking again sets it
    if intent == STATUS_INTENT:
        number = context.slots.get(ORDER_SLOT)
        if not number:
            context.slots[AWAITING_SLOT] = ORDER_SLOT
            return Reply(ASK_NUMBER, data={"asks_for": ORDER_SLOT})
        order = ORDER_BOOK.get(number)
        if order is None:
            del context.slots[ORDER_SLOT]
            context.slots[AWAITING_SLOT] = ORDER_SLOT
            return Reply(
                f"I can't find order {number}. Please check the number in your confirmation email "
                f"(it looks like KF-10023) and send it again.",
                data={"order_id": number, "found": False},
            )
        return Reply(describe_status(order), data={"order_id": number, "found": True, "status": order.status})
    if intent == CANCEL_INTENT and context.slots.get(ORDER_SLOT):
        order = ORDER_BOOK.get(context.slots[ORDER_SLOT])
        text = describe_cancel(order) if order else None
        if text:
            return Reply(text, data={"order_id": order.number, "found": True, "status": order.status})
    return None
