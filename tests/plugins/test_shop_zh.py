"""The shop_zh demo bot (青橙商城中文客服): knowledge quality, Chinese normalisation and its plugin.

The table below holds questions a shopper might type that are *not* in the knowledge
file (a test checks that), each with the intent the bot must recognise.  When a row
fails, improve knowledge/shop_zh.yaml (examples, keywords, synonyms); never the table.
"""
from __future__ import annotations

import pytest

from engine.testing import engine_for
from plugins import shop_zh

BOT = "shop_zh"

# (visitor question, expected intent): paraphrases, none of them a knowledge example or FAQ question.
PARAPHRASES: list[tuple[str, str]] = [
    # 订单
    ("我买的衣服现在到什么地方了", "order/status"),
    ("帮我看看包裹走到哪一步了", "order/status"),
    ("物流三天没动静了", "order/status"),
    ("下单一周了还没收到货", "order/status"),
    ("刚付款就后悔了，订单能撤回吗", "order/cancel"),
    ("我不想买了，帮我取消一下", "order/cancel"),
    ("怎么cancel订单", "order/cancel"),
    ("收货地址填成老家的了，能改吗", "order/change_address"),
    ("门牌号写错了怎么办", "order/change_address"),
    ("订单里的数量能改成两件吗", "order/change_items"),
    ("快递显示签收了 可是我根本没拿到", "order/not_delivered"),
    # 发货 / 运费 / 配送
    ("你们满几块钱包邮", "shipping/cost"),
    ("运费怎么收的", "shipping/cost"),
    ("今天拍的话大概哪天能收到", "shipping/time"),
    ("一般下单后多长时间发出", "shipping/time"),
    ("可以发顺丰快递吗", "shipping/courier"),
    ("国外地址能下单吗", "shipping/international"),
    # 退换货 / 退款
    ("衣服不合适，怎么退回去", "returns/how_to"),
    ("退货的话要去哪里操作", "returns/how_to"),
    ("拆了包装还能不能退", "returns/policy"),
    ("七天内不满意能退吗", "returns/policy"),
    ("收到的杯子有裂痕", "returns/damaged"),
    ("少给我发了一个配件", "returns/damaged"),
    ("鞋码小了能换大一号吗", "returns/exchange"),
    ("颜色想换一下可以吗", "returns/exchange"),
    ("我的退款怎么还没到", "refund/status"),
    ("退货寄回去一周了钱还没退", "refund/status"),
    ("没收到东西 想直接退款", "refund/request"),
    # 支付 / 发票 / 优惠
    ("支付宝能付款吗", "payment/methods"),
    ("能不能用花呗付", "payment/methods"),
    ("付钱的时候一直失败", "payment/failed"),
    ("钱被扣了订单却显示未支付", "payment/failed"),
    ("同一个订单被扣了两次钱", "payment/charged_twice"),
    ("怎么申请开电子发票", "invoice"),
    ("发票能开成公司名字吗", "invoice"),
    ("我的优惠券怎么用不上", "coupon/not_working"),
    ("结账时候红包怎么抵扣", "coupon/apply"),
    ("双12有没有活动", "promotion"),
    ("买完第二天就降价了 能补吗", "price_protection"),
    ("礼品卡里还剩多少钱", "gift_card"),
    # 账户
    ("密码忘了怎么找回", "account/password"),
    ("手机app登不进去了", "account/login"),
    ("短信验证码收不到怎么办", "account/login"),
    ("手机号换了 账号怎么绑新的", "account/update_details"),
    ("我想把账号注销掉", "account/delete"),
    # 商品
    ("这款白色的什么时候补货", "product/availability"),
    ("还有没有货啊", "product/availability"),
    ("身高180体重150斤选多大的", "product/size"),
    ("这个鞋偏码吗", "product/size"),
    ("这个耳机保修几年", "product/warranty"),
    ("东西坏了能免费修吗", "product/warranty"),
    ("你们卖的是不是正品", "product/authenticity"),
    # 寒暄 / 客服
    ("哈喽，有人在吗", "greeting"),
    ("好的，谢谢你啦", "thanks"),
    ("行，那先这样，拜拜", "goodbye"),
    ("晚上十点还有客服吗", "contact"),
    # 全角字符、中英混合
    ("ＡＰＰ登录不上怎么办", "account/login"),
    ("ｖｉｐ会员有打折吗", "promotion"),
    ("iphone充电器坏了保修吗", "product/warranty"),
]


@pytest.fixture(scope="module")
def eng():
    with engine_for() as engine:
        yield engine


@pytest.fixture(scope="module")
def knowledge(eng):
    return eng.bot(BOT).knowledge


def _known_questions(knowledge) -> set[str]:
    texts = [ex for intent in knowledge.intents.values() for ex in intent.examples]
    texts += [q for entry in knowledge.faq for q in (entry.question, *entry.alternatives)]
    return {knowledge.prepare(t) for t in texts}


def test_the_table_is_large_and_covers_many_intents():
    assert len(PARAPHRASES) >= 40
    assert len({intent for _, intent in PARAPHRASES}) >= 25


def test_no_table_question_is_a_knowledge_example_or_faq_question(knowledge):
    known = _known_questions(knowledge)
    copied = [q for q, _ in PARAPHRASES if knowledge.prepare(q) in known]
    assert copied == []


def test_every_expected_intent_exists_in_the_knowledge_file(knowledge):
    missing = sorted({i for _, i in PARAPHRASES} - set(knowledge.intent_names()))
    assert missing == []


@pytest.mark.parametrize("question,intent", PARAPHRASES, ids=[f"{n:02d}-{i}" for n, (_, i) in enumerate(PARAPHRASES)])
def test_paraphrased_question_is_recognised_as_its_intent(eng, question, intent):
    turn = eng.ask(BOT, question, session=f"table-{question}")
    assert (turn.intent, turn.source != "fallback") == (intent, True), (turn.confidence, turn.source, turn.answer)


def test_knowledge_file_meets_the_demo_size(knowledge):
    with_examples = [i for i in knowledge.intents.values() if i.examples]
    assert len(with_examples) >= 25
    assert all(len(i.examples) >= 12 for i in with_examples), [i.name for i in with_examples if len(i.examples) < 12]
    assert len(knowledge.faq) >= 8
    assert all(entry.intent in knowledge.intent_names() for entry in knowledge.faq)
    assert len(knowledge.fallback) >= 2


# -- Chinese normalisation ----------------------------------------------------------------


def test_full_width_letters_digits_and_punctuation_match_like_half_width(eng, knowledge):
    assert knowledge.prepare("ＡＰＰ登录不了？！") == knowledge.prepare("app登录不了")
    assert knowledge.prepare("订单号１２３４５，") == knowledge.prepare("订单号12345")
    full = eng.ask(BOT, "ＡＰＰ登录不了？！", session="fw-1")
    half = eng.ask(BOT, "app登录不了", session="fw-2")
    assert (full.intent, full.source, full.confidence) == (half.intent, half.source, half.confidence)
    assert full.intent == "account/login"


def test_punctuation_is_ignored(eng, knowledge):
    assert knowledge.prepare("退款什么时候到账？？！") == knowledge.prepare("退款什么时候到账")
    assert knowledge.prepare("「退款」什么时候到账") == knowledge.prepare("退款 什么时候到账")
    plain = eng.ask(BOT, "退款什么时候到账", session="p-1")
    noisy = eng.ask(BOT, "退款……什么时候到账？？！", session="p-2")
    assert noisy.intent == plain.intent == "refund/status"


def test_chinese_needs_no_word_spaces_and_tolerates_them(eng):
    solid = eng.ask(BOT, "我想改一下收货的地址", session="s-1")
    spaced = eng.ask(BOT, "我想 改一下 收货的 地址", session="s-2")
    assert solid.intent == spaced.intent == "order/change_address"


def test_synonyms_rewrite_variants_before_matching(knowledge):
    assert knowledge.prepare("快递到哪了") == knowledge.prepare("物流到哪了")
    assert knowledge.prepare("优惠卷") == knowledge.prepare("优惠券")
    assert knowledge.prepare("咋登陆") == "怎么登录"


def test_mixed_chinese_and_english_question_works(eng):
    turn = eng.ask(BOT, "我的order到哪了 tracking看不到", session="mix-1")
    assert turn.intent == "order/status"
    turn = eng.ask(BOT, "能用PayPal付款吗", session="mix-2")
    assert turn.intent == "payment/methods"


# -- type-ahead, FAQ, greeting --------------------------------------------------------------


def test_type_ahead_suggests_faq_questions_for_a_chinese_prefix(eng):
    suggestions = eng.suggest(BOT, "支持", limit=5)
    assert set(suggestions) == {"支持七天无理由退货吗？", "支持货到付款吗？"}
    assert eng.suggest(BOT, "退款", limit=5) == ["退款多久能到账？"]
    assert eng.suggest(BOT, "ＦＯＯ不存在", limit=5) == []


def test_exact_faq_question_is_answered_from_the_faq(eng):
    turn = eng.ask(BOT, "支持货到付款吗", session="faq-1")
    assert (turn.source, turn.intent, turn.confidence) == ("faq", "payment/methods", 1.0)
    assert "不支持货到付款" in turn.answer


def test_slightly_reworded_faq_question_is_matched_fuzzily(eng):
    turn = eng.ask(BOT, "你们客服工作时间是几点到几点呀", session="fz-1")
    assert (turn.source, turn.intent) == ("fuzzy", "contact")
    assert "9:00-21:00" in turn.answer
    turn = eng.ask(BOT, "注销了账号以后还能恢复吗", session="fz-2")
    assert (turn.source, turn.intent) == ("fuzzy", "account/delete")


def test_greeting_is_configured_in_chinese(eng):
    assert "青橙商城" in eng.greeting(BOT)


# -- handoff -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["转人工", "帮我转人工客服！", "机器人答非所问，我要找真人", "我不要机器人 给我人工服务"],
                         ids=["bare", "polite", "complaint", "refuses-bot"])
def test_asking_for_a_person_hands_off(eng, text):
    turn = eng.ask(BOT, text, session=f"h-{text}")
    assert turn.handoff is not None and turn.handoff.reason == "asked"
    assert "人工" in turn.answer


def test_human_agent_intent_hands_off_without_a_phrase(eng):
    turn = eng.ask(BOT, "能让你们的负责人来跟我说吗", session="h-intent")
    assert turn.intent == "human_agent"
    assert turn.handoff is not None


def test_two_misunderstood_turns_hand_off(eng):
    first = eng.ask(BOT, "给我讲个笑话", session="h-mis")
    assert first.source == "fallback" and first.handoff is None
    second = eng.ask(BOT, "推荐一部电影", session="h-mis")
    assert second.handoff is not None and second.handoff.reason == "misunderstood"


# -- the plugin: order numbers ------------------------------------------------------------------


def test_plugin_registers_the_shop_zh_bot(eng):
    assert BOT in eng.bots
    assert eng.bot(BOT).spec.knowledge.name == "shop_zh.yaml"


def test_full_width_order_number_alone_is_looked_up(eng):
    turn = eng.ask(BOT, "订单号１２３４５", session="o-1")
    assert (turn.intent, turn.source) == ("order/status", "plugin")
    assert "12345" in turn.answer and "已发货" in turn.answer


def test_order_number_in_a_status_question_is_looked_up(eng):
    turn = eng.ask(BOT, "帮我查下订单２３４５６到哪了", session="o-2")
    assert turn.intent == "order/status"
    assert "待发货" in turn.answer


def test_order_number_is_remembered_for_later_status_questions(eng):
    eng.ask(BOT, "34567", session="o-3")
    turn = eng.ask(BOT, "快递到哪了", session="o-3")
    assert (turn.intent, turn.source) == ("order/status", "plugin")
    assert "已签收" in turn.answer


def test_unknown_order_number_says_it_was_not_found(eng):
    turn = eng.ask(BOT, "订单号：99999", session="o-4")
    assert "没有查到" in turn.answer and "99999" in turn.answer


def test_status_question_without_a_number_asks_for_one(eng):
    turn = eng.ask(BOT, "我的包裹到哪了", session="o-5")
    assert turn.intent == "order/status" and turn.source != "plugin"
    assert "订单号" in turn.answer


def test_tracking_number_is_not_taken_for_an_order_number(eng):
    turn = eng.ask(BOT, "物流单号12345查不到信息", session="o-6")
    assert "订单 12345" not in turn.answer


def test_order_number_in_another_question_leaves_the_intent_alone(eng):
    turn = eng.ask(BOT, "订单12345怎么取消", session="o-7")
    assert turn.intent == "order/cancel"


def test_sample_orders_file_is_readable():
    orders = shop_zh.load_orders()
    assert {"12345", "23456", "34567", "45678", "56789"} <= set(orders)
    assert all({"status", "detail"} <= set(o) for o in orders.values())


def test_plugin_leaves_other_bots_alone(eng):
    if "shop" not in eng.bots:
        pytest.skip("the English shop bot is not installed")
    turn = eng.ask("shop", "12345", session="other-bot")
    assert "当前状态" not in turn.answer


def test_broken_order_file_names_the_file_and_line(tmp_path, monkeypatch):
    from plugins.shop.orders import OrderFileError

    broken = tmp_path / "orders.json"
    broken.write_text('{\n  "12345": {"status": "已发货",}\n}\n', encoding="utf-8")
    monkeypatch.setattr(shop_zh, "ORDERS_FILE", broken)
    shop_zh.load_orders.cache_clear()
    try:
        with pytest.raises(OrderFileError, match=r"orders\.json:2: not valid JSON"):
            shop_zh.load_orders()
    finally:
        shop_zh.load_orders.cache_clear()
