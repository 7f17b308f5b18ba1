"""models.data: CSV and knowledge-YAML loading, with errors that name the file and line."""
import pytest

from engine.errors import ModelError
from models.data import (Dataset, load_csv, load_knowledge_examples, sample_per_intent, stratified_split,
                         tiny_dataset, write_csv)


def csv_file(tmp_path, body: str, name="data.csv"):
    p = tmp_path / name
    p.write_text(body, encoding="utf-8")
    return p


def test_reads_text_label_csv(tmp_path):
    d = load_csv(csv_file(tmp_path, 'text,label\nhello there,greet\n"hi, you",greet\nbye now,bye\nsee ya,bye\n'))
    assert d.texts == ("hello there", "hi, you", "bye now", "see ya")
    assert d.intents == ("bye", "greet")


def test_columns_may_come_in_any_order(tmp_path):
    d = load_csv(csv_file(tmp_path, "label,text\ng,hi\ng,hello\nb,bye\nb,ciao\n"))
    assert d.labels[0] == "g" and d.texts[0] == "hi"


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ModelError, match="nope.csv: no such data file"):
        load_csv(tmp_path / "nope.csv")


def test_empty_csv_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="data.csv: the file is empty"):
        load_csv(csv_file(tmp_path, ""))


def test_header_without_rows_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="header but no rows"):
        load_csv(csv_file(tmp_path, "text,label\n"))


def test_missing_column_is_an_error_naming_it(tmp_path):
    with pytest.raises(ModelError, match=r"data.csv:1: missing column\(s\) label"):
        load_csv(csv_file(tmp_path, "text,intent\nhi,g\n"))


def test_extra_column_is_an_error_naming_it(tmp_path):
    with pytest.raises(ModelError, match=r"data.csv:1: unexpected column\(s\) source"):
        load_csv(csv_file(tmp_path, "text,label,source\nhi,g,web\n"))


def test_row_with_wrong_field_count_is_an_error_with_its_line(tmp_path):
    with pytest.raises(ModelError, match="data.csv:3: expected 2 fields"):
        load_csv(csv_file(tmp_path, "text,label\nhi,g\nhi, there,g\n"))


@pytest.mark.parametrize("row, what", [(",g", "empty text"), ("hi,", "empty label")])
def test_empty_cell_is_an_error_with_its_line(tmp_path, row, what):
    with pytest.raises(ModelError, match=f"data.csv:3: {what}"):
        load_csv(csv_file(tmp_path, f"text,label\nhello,g\n{row}\n"))


def test_label_with_a_single_example_is_an_error_naming_it(tmp_path):
    with pytest.raises(ModelError, match="single example: lonely"):
        load_csv(csv_file(tmp_path, "text,label\nhi,g\nhello,g\nx,lonely\n"))


def test_a_single_intent_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="at least two"):
        load_csv(csv_file(tmp_path, "text,label\nhi,g\nhello,g\n"))


def test_oos_rows_are_refused_in_training_data(tmp_path):
    with pytest.raises(ModelError, match="'oos' is reserved"):
        load_csv(csv_file(tmp_path, "text,label\nhi,g\nhello,g\nweather,oos\nrain,oos\n"))


def test_evaluation_files_may_hold_single_examples_and_oos(tmp_path):
    d = load_csv(csv_file(tmp_path, "text,label\nhi,g\nweather,oos\n"), allow_singletons=True)
    assert d.labels == ("g", "oos")


def test_non_utf8_csv_is_an_error(tmp_path):
    p = tmp_path / "data.csv"
    p.write_bytes("text,label\nh\xe9llo,g\n".encode("latin-1"))
    with pytest.raises(ModelError, match="UTF-8"):
        load_csv(p)


def test_reads_examples_from_knowledge_yaml(tmp_path):
    p = tmp_path / "bot.yaml"
    p.write_text("bot: bot\nintents:\n  order/status:\n    examples: [where is my order, track parcel]\n"
                 "    answers: [A]\n  refund:\n    examples: [money back, refund please]\n    answers: [B]\n"
                 "  hello:\n    answers: [Hi]\n")
    d = load_knowledge_examples(p)
    assert d.intents == ("order/status", "refund")  # intents without examples are not listed
    assert len(d) == 4


@pytest.mark.parametrize("body, message", [
    ("bot: b\nintents: [a, b]\n", "bot.yaml:2: intents must be a mapping"),
    ("just text\n", "bot.yaml:1: the file must be a mapping"),
    ("bot: b\nintents:\n  a:\n    answers: [x]\n", "no intent has examples"),
    ("bot: b\nintents:\n  a:\n    examples: {x: 1}\n    answers: [x]\n", "bot.yaml:4: intents.a.examples must be a list"),
    ("bot: b\nintents:\n  a:\n    examples: [[1], 2]\n    answers: [x]\n", "bot.yaml:4: intents.a.examples.0 must be text"),
    ("bot: b\nintents: {a: {examples: [x, y], answers: [1]}, b: {examples: [z], answers: [2]}}\n",
     "single example: b"),
    ("bot: b\nintents: [unclosed\n", "bot.yaml:3: invalid YAML"),
])
def test_bad_knowledge_yaml_is_an_error_naming_the_file(tmp_path, body, message):
    p = tmp_path / "bot.yaml"
    p.write_text(body)
    with pytest.raises(ModelError, match=message) as e:
        load_knowledge_examples(p)
    assert "bot.yaml" in str(e.value)


def test_fingerprint_ignores_row_order():
    a = Dataset(("x", "y"), ("1", "2"))
    b = Dataset(("y", "x"), ("2", "1"))
    assert a.fingerprint() == b.fingerprint() != Dataset(("x", "y"), ("2", "1")).fingerprint()


def test_validation_split_keeps_every_intent_in_training():
    d = tiny_dataset(8)
    train, val = stratified_split(d, 0.25, seed=0)
    assert set(train.labels) == set(d.labels) == set(val.labels)
    assert len(train) + len(val) == len(d)
    assert not set(zip(train.texts, train.labels)) & set(zip(val.texts, val.labels)) or len(set(d.texts)) < len(d)


def test_validation_split_is_reproducible_by_seed():
    d = tiny_dataset(8)
    assert stratified_split(d, 0.25, 1) == stratified_split(d, 0.25, 1)


def test_intent_with_two_examples_stays_whole_in_training():
    d = Dataset(("a", "b", "c", "d", "e"), ("x", "x", "y", "y", "y"))
    train, val = stratified_split(d, 0.5, 0)
    assert train.labels.count("x") == 2 and "x" not in val.labels


def test_sample_per_intent_keeps_k_of_each():
    d = sample_per_intent(tiny_dataset(8), 3, seed=0)
    assert sorted(d.labels.count(y) for y in set(d.labels)) == [3, 3, 3, 3]


def test_csv_round_trip(tmp_path):
    d = tiny_dataset(3)
    assert load_csv(write_csv(d, tmp_path / "t.csv")).texts == d.texts
