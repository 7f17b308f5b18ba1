"""Order numbers in a visitor's text, and the shop's order file.

An order number is ``KF-`` followed by five digits (``KF-10023``).  Visitors write it in
several ways, all recognised in the raw text (before normalisation strips ``#`` and
``-``):

* ``KF-10023``, ``KF10023``, ``kf 10023``
* ``#10023``
* ``order 10023``, ``order no. 10023``, ``order number: 10023``, ``order #10023``
* ``10023`` alone, but only while the bot is waiting for an order number, because a
  bare number could be anything (a postcode, a price) otherwise.

Every form is reported in the canonical ``KF-10023`` shape.

The order file (``orders.json`` beside this module) is a JSON object
``{"orders": [{"number": "KF-10021", "status": "shipped", ...}, ...]}``; it is read
once, the first time an order is looked up.
"""
from __future__ import annotations

import json
import re
import threading
import unicodedata
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Mapping

PREFIX = "KF-"
DIGITS = 5

ORDERS_FILE = Path(__file__).with_name("orders.json")

_DIGITS = rf"([0-9]{{{DIGITS}}})(?![0-9])"
#: A number with something saying it is an order number.
_PREFIXED = re.compile(
    rf"""(?<![\w-])(?:
            kf[\s-]?{_DIGITS}
          | \#\s?{_DIGITS}
          | order\s*(?:number|num|no|nr|id|ref(?:erence)?)?\.?\s*(?:\#|:|-)?\s*{_DIGITS}
        )""",
    re.IGNORECASE | re.VERBOSE,
)
#: Any number of the right length, for the turn after the bot asked for one.
_BARE = re.compile(rf"(?<![\w-]){_DIGITS}")
#: Words that may surround an order number without the visitor asking anything else.
_FILLER = frozenset(
    "it its it's is the my number order no nr num id ref reference here you go sure yes yeah yep ok okay "
    "oh um er sorry thanks thank please this that one was i think mine".split()
)


def find_order_number(text: str, *, awaiting: bool = False) -> str | None:
    """Return the first order number in ``text`` as ``KF-12345``, or ``None``.

    :param text: the visitor's raw text.
    :param awaiting: the bot has just asked for an order number, so a bare five-digit
        number counts too.
    """
    text = _fold(text)
    match = _PREFIXED.search(text)
    if match:
        digits = next(group for group in match.groups() if group)
        return PREFIX + digits
    if awaiting:
        match = _BARE.search(text)
        if match:
            return PREFIX + match.group(1)
    return None


def is_only_order_number(text: str) -> bool:
    """True when ``text`` is an order number and nothing more than filler words
    ("it's KF-10023", "order 10023 please"): the visitor is answering "what's your
    order number?" rather than asking something new."""
    rest = _BARE.sub(" ", _PREFIXED.sub(" ", _fold(text)))
    words = re.findall(r"[a-z']+", rest.lower())
    return all(word in _FILLER for word in words)


def _fold(text: str) -> str:
    """Fold full-width forms ("ＫＦ－１００２３") to ASCII, keeping "#" and "-" (which the
    engine's normalisation would drop): phone keyboards often type full-width digits."""
    return unicodedata.normalize("NFKC", text)


class OrderFileError(ValueError):
    """The order file is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Order:
    number: str
    status: str
    placed: date | None
    carrier: str | None
    tracking: str | None
    shipped: date | None
    expected: date | None
    delivered: date | None
    items: tuple[tuple[str, int], ...]

    @property
    def summary(self) -> str:
        """The items, e.g. ``4 x Stoneware mug, sage``."""
        return "; ".join(name if qty == 1 else f"{qty} x {name}" for name, qty in self.items)


_STATUSES = ("processing", "shipped", "out_for_delivery", "delayed", "delivered", "cancelled", "returned", "refunded")


class OrderBook:
    """Orders by number, read from a JSON file on first use (thread-safe)."""

    def __init__(self, path: Path = ORDERS_FILE) -> None:
        self.path = Path(path)
        self._orders: dict[str, Order] | None = None
        self._lock = threading.Lock()

    def get(self, number: str) -> Order | None:
        """The order with this number (``KF-10023``), or ``None`` if there is none.

        :raises OrderFileError: the file cannot be read or is malformed.
        """
        return self._load().get(number.upper())

    def __len__(self) -> int:
        return len(self._load())

    def _load(self) -> dict[str, Order]:
        if self._orders is None:
            with self._lock:
                if self._orders is None:
                    self._orders = _read_orders(self.path)
        return self._orders


def read_order_file(path: Path) -> Any:
    """An order file's JSON, or an :class:`OrderFileError` naming the file (and line).  The
    Chinese shop's plugin reads its own sample orders with this too."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OrderFileError(f"{path}: cannot read the order file: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise OrderFileError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from exc


def _read_orders(path: Path) -> dict[str, Order]:
    raw = read_order_file(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("orders"), list):
        raise OrderFileError(f'{path}: expected an object {{"orders": [...]}}')
    orders: dict[str, Order] = {}
    for index, entry in enumerate(raw["orders"]):
        where = f"{path}: orders[{index}]"
        try:
            order = _parse_order(entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise OrderFileError(f"{where}: {exc}") from exc
        if order.number in orders:
            raise OrderFileError(f"{where}: order {order.number} appears twice")
        orders[order.number] = order
    return orders


def _parse_order(entry: Mapping[str, Any]) -> Order:
    if not isinstance(entry, dict):
        raise TypeError("each order must be an object")
    number = str(entry["number"]).upper()
    if find_order_number(number) != number:
        raise ValueError(f"order number {number!r} is not of the form {PREFIX}{'1' * DIGITS}")
    status = entry["status"]
    if status not in _STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(_STATUSES)}")
    items = tuple((str(item["name"]), int(item.get("qty", 1))) for item in entry.get("items", []))
    return Order(
        number=number,
        status=status,
        placed=_date(entry, "placed"),
        carrier=entry.get("carrier"),
        tracking=entry.get("tracking"),
        shipped=_date(entry, "shipped"),
        expected=_date(entry, "expected"),
        delivered=_date(entry, "delivered"),
        items=items,
    )


def _date(entry: Mapping[str, Any], key: str) -> date | None:
    value = entry.get(key)
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} {value!r} is not a YYYY-MM-DD date") from None


def _day(value: date | None) -> str:
    return f"{value:%a} {value.day} {value:%b}" if value else "soon"


def describe_status(order: Order) -> str:
    """One sentence or two telling the visitor where the order is."""
    head = f"Order {order.number} ({order.summary})"
    via = f" with {order.carrier}" if order.carrier else ""
    tracking = f" Tracking number: {order.tracking}." if order.tracking else ""
    if order.status == "processing":
        return f"{head} is being packed in our warehouse. It should ship soon and arrive by {_day(order.expected)}."
    if order.status == "shipped":
        return f"{head} shipped on {_day(order.shipped)}{via} and should arrive by {_day(order.expected)}.{tracking}"
    if order.status == "out_for_delivery":
        return f"Good news: {head[0].lower()}{head[1:]} is out for delivery{via} today.{tracking}"
    if order.status == "delayed":
        return (
            f"{head} is delayed{via}, sorry about that. It shipped on {_day(order.shipped)} and is now expected "
            f"by {_day(order.expected)}.{tracking}"
        )
    if order.status == "delivered":
        return (
            f"{head} was delivered on {_day(order.delivered)}{via}. If you can't find it, check with your "
            f"neighbours and tell me, and we'll open an investigation with the carrier."
        )
    if order.status == "cancelled":
        return f"{head} was cancelled, so it won't be sent. Any payment taken has been refunded to your original payment method."
    if order.status == "returned":
        return f"We've received your return of {order.number} ({order.summary}). The refund follows within 5 working days."
    return f"{head} was returned and refunded to your original payment method."


def describe_cancel(order: Order) -> str | None:
    """What cancelling this order means, or ``None`` when the knowledge base's general
    answer fits (the order is still being packed)."""
    if order.status == "processing":
        return None
    if order.status in ("shipped", "out_for_delivery", "delayed"):
        return (
            f"Order {order.number} has already shipped, so it can't be cancelled any more. Once it arrives you "
            f"can return it for free within 30 days (My account > Orders > Return an item)."
        )
    if order.status == "delivered":
        return f"Order {order.number} has already been delivered; you can return it for free within 30 days of delivery."
    return f"Order {order.number} doesn't need cancelling: {describe_status(order)}"
