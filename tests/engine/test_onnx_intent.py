"""engine.onnx_intent.OnnxIntentClassifier on a tiny hand-built ONNX model (no torch needed).

The model: word embeddings that point each keyword at its intent, masked mean pooling, an
identity-like head; the bank holds one prototype per intent.  Unknown words embed as a
uniform vector, so a text of unknown words is out of scope under the knn_cosine threshold.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ModelError
from engine.onnx_intent import OnnxIntentClassifier
from engine.types import Classification

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

LABELS = ["order/status", "refund", "opening_hours"]
WORDS = {"order": 0, "parcel": 0, "track": 0, "refund": 1, "money": 1, "back": 1, "open": 2, "hours": 2, "close": 2}


def make_tokenizer(extra_words: int = 0) -> Tokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in list(WORDS) + ["where", "is", "my", "i", "want", "are", "you", "when", "the"]:
        vocab[w] = len(vocab)
    for i in range(extra_words):
        vocab[f"extra{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(length=16)  # like the base model's file: the loader must turn it off
    return tok


def make_model(path: Path, vocab_size: int, n_labels: int = len(LABELS), metadata_vocab: int | None = None) -> None:
    dim = 3
    table = np.full((vocab_size, dim), 0.3, np.float32)
    vocab = make_tokenizer().get_vocab()
    for word, label in WORDS.items():
        table[vocab[word]] = np.eye(dim, dtype=np.float32)[label]
    head = np.zeros((dim, n_labels), np.float32)
    head[:, :min(dim, n_labels)] = 5 * np.eye(dim, dtype=np.float32)[:, :min(dim, n_labels)]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
        helper.make_node("ReduceL2", ["pooled"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["pooled", "norm"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-intent",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_labels]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head, "head"),
         numpy_helper.from_array(np.array([2], np.int64), "axis2"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"vocab_size": str(metadata_vocab or vocab_size)})
    onnx.save(model, str(path))


def make_folder(folder: Path, **meta_overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    make_model(folder / "model.onnx", tok.get_vocab_size())
    np.save(folder / "bank.npy", np.eye(3, dtype=np.float32))
    meta = {"labels": LABELS, "threshold": 0.8, "oos_score": "knn_cosine", "max_length": 8,
            "knn": {"bank": "bank.npy", "counts": [1, 1, 1], "mix": 0.0, "temperature": 0.05}}
    meta.update(meta_overrides)
    (folder / "labels.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "model")


@pytest.fixture
def clf(folder):
    c = OnnxIntentClassifier.load(folder)
    yield c
    c.close()


def test_predicts_ranked_intents_with_confidences(clf):
    (r,) = clf.predict_batch(["where is my order"], top_k=3)
    assert isinstance(r, Classification)
    assert r.intent == "order/status" and r.in_scope and r.source == "model"
    assert [s.intent for s in r.ranked][0] == "order/status" and len(r.ranked) == 3
    assert r.ranked[0].confidence >= r.ranked[1].confidence >= r.ranked[2].confidence


def test_top_k_limits_the_ranking(clf):
    (r,) = clf.predict_batch(["refund my money"], top_k=1)
    assert [s.intent for s in r.ranked] == ["refund"]


def test_text_far_from_every_prototype_is_out_of_scope(clf):
    (r,) = clf.predict_batch(["zzz qqq www"])
    assert not r.in_scope


def test_threshold_comes_from_labels_json(tmp_path):
    c = OnnxIntentClassifier.load(make_folder(tmp_path / "m", threshold=0.1))
    assert c.threshold == 0.1
    (r,) = c.predict_batch(["zzz qqq www"])
    assert r.in_scope  # cosine 0.577 >= 0.1


def test_max_prob_score_uses_the_top_confidence(tmp_path):
    c = OnnxIntentClassifier.load(make_folder(tmp_path / "m", oos_score="max_prob", threshold=0.9, knn=None))
    (sure, unsure) = c.predict_batch(["order order order", "zzz"])
    assert sure.in_scope and not unsure.in_scope


def test_batch_results_keep_input_order_whatever_the_lengths(clf):
    texts = ["when are you open", "refund", "track my parcel where is it is it", "zzz", "open hours", "money back"]
    batch = clf.predict_batch(texts)
    single = [clf.predict_batch([t])[0] for t in texts]
    assert [r.intent for r in batch] == [r.intent for r in single]
    for a, b in zip(batch, single):
        assert a.ranked[0].confidence == pytest.approx(b.ranked[0].confidence, abs=1e-6)


def test_empty_batch_gives_no_results(clf):
    assert clf.predict_batch([]) == []


def test_padding_is_off_and_texts_truncate_at_max_length(clf):
    assert clf._tokenizer.padding is None
    assert clf._tokenizer.truncation["max_length"] == 8
    # Past 8 tokens the refund words are cut off: the order words decide.
    (r,) = clf.predict_batch(["order order order order order order order order refund refund refund refund "
                              "refund refund refund refund refund"])
    assert r.intent == "order/status"


def test_intra_op_thread_count_is_configurable(folder):
    c = OnnxIntentClassifier.load(folder, threads=2)
    assert c._session.get_session_options().intra_op_num_threads == 2


def test_knn_mix_blends_prototype_votes(tmp_path):
    plain = OnnxIntentClassifier.load(make_folder(tmp_path / "a"))
    mixed = OnnxIntentClassifier.load(make_folder(tmp_path / "b", knn={"bank": "bank.npy", "counts": [1, 1, 1],
                                                                         "mix": 0.5, "temperature": 0.05}))
    a, = plain.predict_batch(["where is my order"])
    b, = mixed.predict_batch(["where is my order"])
    assert a.intent == b.intent == "order/status"
    assert a.ranked[0].confidence != pytest.approx(b.ranked[0].confidence)


async def test_classify_matches_predict_batch_for_concurrent_calls(clf):
    import asyncio

    texts = ["where is my order", "refund", "open hours", "zzz"] * 5
    results = await asyncio.gather(*(clf.classify(t) for t in texts))
    expected = clf.predict_batch(texts)
    assert [r.intent for r in results] == [r.intent for r in expected]
    assert [r.in_scope for r in results] == [r.in_scope for r in expected]


async def test_classify_honours_each_callers_top_k(clf):
    import asyncio

    one, three = await asyncio.gather(clf.classify("refund", top_k=1), clf.classify("refund", top_k=3))
    assert len(one.ranked) == 1 and len(three.ranked) == 3


async def test_close_is_idempotent_and_classify_reopens(clf):
    await clf.classify("refund")
    clf.close()
    clf.close()
    assert (await clf.classify("refund")).intent == "refund"


# ------------------------------------------------------------------ bad model folders
def test_missing_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        OnnxIntentClassifier.load(tmp_path / "nope")


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "labels.json"])
def test_missing_file_is_a_model_error_naming_it(folder, name):
    (folder / name).unlink()
    with pytest.raises(ModelError, match=name.replace(".", r"\.")):
        OnnxIntentClassifier.load(folder)


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "labels.json", "bank.npy"])
def test_corrupt_file_is_a_model_error_naming_it(folder, name):
    (folder / name).write_bytes(b"\x00garbage{")
    with pytest.raises(ModelError, match=name.replace(".", r"\.")):
        OnnxIntentClassifier.load(folder)


def test_missing_bank_is_a_model_error_naming_it(folder):
    (folder / "bank.npy").unlink()
    with pytest.raises(ModelError, match=r"bank\.npy"):
        OnnxIntentClassifier.load(folder)


def test_bank_of_the_wrong_shape_is_a_model_error(folder):
    np.save(folder / "bank.npy", np.eye(4, dtype=np.float32))
    with pytest.raises(ModelError, match=r"bank\.npy.*shape"):
        OnnxIntentClassifier.load(folder)


def test_more_labels_than_logits_is_a_model_error_naming_labels_json(tmp_path):
    folder = make_folder(tmp_path / "m", labels=LABELS + ["extra"],
                         knn={"bank": "bank.npy", "counts": [1, 1, 1, 1], "mix": 0.0, "temperature": 0.05})
    np.save(folder / "bank.npy", np.eye(4, 3, dtype=np.float32))
    with pytest.raises(ModelError, match=r"labels\.json.*4 labels.*3 logits"):
        OnnxIntentClassifier.load(folder)


def test_tokenizer_vocab_not_matching_the_model_is_a_model_error(folder):
    make_tokenizer(extra_words=50).save(str(folder / "tokenizer.json"))
    with pytest.raises(ModelError, match=r"tokenizer\.json.*does not match"):
        OnnxIntentClassifier.load(folder)


def test_tokenizer_larger_than_an_unlabelled_model_fails_the_probe(folder):
    tok = make_tokenizer()
    make_model(folder / "model.onnx", vocab_size=tok.get_vocab_size() - 5, metadata_vocab=None)
    # Strip the vocab_size metadata so only the probe run can catch the mismatch.
    m = onnx.load(str(folder / "model.onnx"))
    del m.metadata_props[:]
    onnx.save(m, str(folder / "model.onnx"))
    with pytest.raises(ModelError, match=r"model\.onnx.*probe"):
        OnnxIntentClassifier.load(folder)


@pytest.mark.parametrize("meta, message", [
    ({"labels": []}, "labels"),
    ({"labels": ["a", "a", "b"]}, "duplicates"),
    ({"threshold": "high"}, "threshold"),
    ({"oos_score": "vibes"}, "oos_score"),
    ({"knn": {"bank": "bank.npy", "counts": [1, 1]}}, "knn"),
])
def test_bad_labels_json_is_a_model_error(folder, meta, message):
    body = json.loads((folder / "labels.json").read_text())
    body.update(meta)
    (folder / "labels.json").write_text(json.dumps(body))
    with pytest.raises(ModelError, match=message) as e:
        OnnxIntentClassifier.load(folder)
    assert "labels.json" in str(e.value)


def test_model_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        OnnxIntentClassifier.load(tmp_path / "nope")


# ------------------------------------------------------------------ dependency rule
def test_serving_never_imports_torch_or_transformers(folder):
    code = textwrap.dedent(f"""
        import sys
        import engine.onnx_intent as oi
        import engine.batcher
        c = oi.OnnxIntentClassifier.load({str(folder)!r})
        c.predict_batch(["where is my order"])
        import asyncio
        asyncio.run(c.classify("refund"))
        c.close()
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
    """)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
