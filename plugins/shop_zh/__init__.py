"""青橙商城的中文客服机器人 ``shop_zh``：知识库在 knowledge/shop_zh.yaml。

One hook beyond registration: a visitor who gives an order number ("订单号１２３４５",
full-width digits included, or just "12345") gets that order's status from the sample
orders in ``orders.json``.  The number is kept in the session's ``order_id`` slot, so a
later "到哪了" in the same session is answered for that order too.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine import BotSpec, Classification, IntentScore, Reply, hookimpl, paths
from plugins.shop.orders import OrderFileError, read_order_file

BOT = "shop_zh"
ORDERS_FILE = Path(__file__).with_name("orders.json")

# Matched against the normalised text: NFKC has already turned "１２３４５" into "12345"
# and punctuation into spaces.  "物流单号" / "运单号" are tracking numbers, not order numbers.
_ORDER_NUMBER = re.compile(r"(?:订单编号|订单号码|订单号|订单|(?<!物流)(?<!运)单号)\s*(?:是|为)?\s*(\d{5,20})(?!\d)")
_BARE_NUMBER = re.compile(r"^\s*(\d{5,20})\s*$")
# What may surround an order number in a message that asks for nothing else.
_FILLER = re.compile(r"^(?:我的|我|帮我|帮忙|麻烦|请|你|查一下|查下|查查|查|看看|看一下|看下|这个|是|呢|吗|"
                     r"你好|您好|在吗|状态|情况|谢谢|\s)*$")
_ORDER_INTENTS = {"order", "order/status"}


@hookimpl
def register_bots() -> BotSpec:
    return BotSpec(
        name=BOT,
        knowledge=paths.knowledge_dir() / "shop_zh.yaml",
        description="青橙商城中文电商客服（订单、物流、退换货、退款、支付、发票、优惠券、账号、商品）",
    )


@hookimpl
def classify_intent(message: Any, bot: Any, context: Any) -> Classification | None:
    """A message that is only an order number (with filler such as "帮我查一下") asks for
    that order's status; anything else is left to the knowledge base's ranking."""
    if bot.name != BOT:
        return None
    number, rest = _find_order_number(message.normalized)
    if number is None:
        return None
    context.slots["order_id"] = number
    if not _FILLER.match(rest):
        return None
    return Classification((IntentScore("order/status", 1.0),), in_scope=True, source="plugin")


@hookimpl
def answer(message: Any, bot: Any, context: Any, classification: Classification) -> Reply | None:
    """Answer an order-status question for a known order number with its status."""
    if bot.name != BOT or classification.intent not in _ORDER_INTENTS:
        return None
    number = context.slots.get("order_id")  # classify_intent put this turn's number there
    if not number:
        return None  # no number yet: the knowledge base's answer asks for one
    order = load_orders().get(number)
    if order is None:
        return Reply(f"没有查到订单号 {number} 的订单，请核对一下号码（在“我的-全部订单”里可以复制订单号）。")
    return Reply(f"订单 {number} 当前状态：{order['status']}。{order['detail']}。")


def _find_order_number(text: str) -> tuple[str | None, str]:
    """The order number in a normalised text and the text left around it."""
    match = _ORDER_NUMBER.search(text) or _BARE_NUMBER.search(text)
    if match is None:
        return None, text
    return match.group(1), text[: match.start()] + text[match.end():]


@lru_cache(maxsize=1)
def load_orders() -> dict[str, dict[str, str]]:
    """The sample orders, keyed by order number (keys starting with "_" are comments)."""
    data = read_order_file(ORDERS_FILE)   # errors name the file and line
    if not isinstance(data, dict):
        raise OrderFileError(f"{ORDERS_FILE}: expected an object of order number -> order")
    return {k: v for k, v in data.items() if not k.startswith("_")}
