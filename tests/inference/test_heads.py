"""Own labels: calibration, train-head, several heads in one forward pass (issue 11)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from nlpstream.inference import ModelLoadError, load_engine
from nlpstream.inference.builtin import BUILTIN_DIR
from nlpstream.inference.heads import (
    HeadTrainingError,
    check_labels,
    expected_calibration_error,
    fit_temperature,
    head_names,
    stratified_split,
)
from nlpstream.jobs.cli import app

DATA = BUILTIN_DIR / "data"


def rows(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


# -- calibration (no model) --------------------------------------------------------

def test_ece_of_known_predictions():
    # 4 texts at confidence 0.9, 3 right: |0.75 - 0.9| = 0.15 over the whole set
    probs = torch.tensor([[0.9, 0.1]] * 4)
    gold = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, gold) == pytest.approx(0.15, abs=1e-6)
    # two bins, each perfectly calibrated: 0
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1, 0])) == pytest.approx(0.0, abs=1e-6)


def test_temperature_is_recovered_and_lowers_ece():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 3, generator=gen) * 3
    true_t = 2.5  # the "model" is overconfident: labels drawn from softmax(logits / 2.5)
    gold = torch.multinomial(torch.softmax(logits / true_t, dim=1), 1, generator=gen).flatten()
    t = fit_temperature(logits, gold)
    assert t == pytest.approx(true_t, rel=0.1)
    before = expected_calibration_error(torch.softmax(logits, dim=1), gold)
    after = expected_calibration_error(torch.softmax(logits / t, dim=1), gold)
    assert after < 0.03 < before


def test_split_is_stratified_and_deterministic():
    y = [0] * 10 + [1] * 5 + [2] * 2
    kept, held = stratified_split(y, 0.2, seed=3)
    assert sorted(kept + held) == list(range(17)) and not set(kept) & set(held)
    assert [sum(y[i] == k for i in held) for k in range(3)] == [2, 1, 1]
    assert stratified_split(y, 0.2, seed=3) == (kept, held)


def test_label_checks():
    with pytest.raises(HeadTrainingError, match="at least two labels; found only 'a'"):
        check_labels(["a", "a", "a"])
    with pytest.raises(HeadTrainingError, match="'b' have one example"):
        check_labels(["a", "a", "b"])
    assert check_labels(["b", "a", "b", "a"]) == ("a", "b")


# -- shipped heads -----------------------------------------------------------------

def test_shipped_heads_are_calibrated_and_accurate():
    sentiment = json.loads((BUILTIN_DIR / "sentiment.json").read_text())
    topic = json.loads((BUILTIN_DIR / "topic.json").read_text())
    assert sentiment["heldout"]["accuracy"] >= 0.90 and sentiment["heldout"]["ece"] <= 0.05
    assert sentiment["heldout"]["ece"] < sentiment["heldout"]["ece_uncalibrated"]
    assert topic["labels"] == ["billing", "delivery", "technical", "account", "product", "other"]
    assert topic["heldout"]["accuracy"] >= 0.8 and topic["heldout"]["ece"] <= 0.05
    assert topic["few_shot"]["train_size"] == 100 and topic["few_shot"]["heldout"]["accuracy"] >= 0.7
    assert head_names("builtin:sentiment,builtin:topic") == ["sentiment", "topic"]


@pytest.mark.model
def test_calibrated_scores_on_shipped_heldout(engine):
    held = rows("sentiment_heldout.jsonl")
    preds = engine.classify([r["text"] for r in held])
    labels = ("negative", "neutral", "positive")
    probs = torch.tensor([[p.probs[k] for k in labels] for p in preds])
    gold = torch.tensor([labels.index(r["label"]) for r in held])
    assert expected_calibration_error(probs, gold) <= 0.05
    assert all(abs(sum(p.probs.values()) - 1) < 1e-4 for p in preds)


# -- several heads in one pass -----------------------------------------------------

@pytest.fixture(scope="module")
def two_heads():
    with load_engine("builtin:sentiment,builtin:topic", devices="cpu", precision="fp32") as eng:
        yield eng


@pytest.mark.model
def test_two_heads_equal_each_head_alone(two_heads, engine):
    texts = [r["text"] for r in rows("topic_heldout.jsonl")[:60]]
    both = two_heads.classify(texts)
    sentiment = engine.classify(texts)
    with load_engine("builtin:topic", devices="cpu", precision="fp32") as topic_engine:
        topic = topic_engine.classify(texts)
    assert [p.label for p in both] == [p.label for p in sentiment]
    assert [p.heads["topic"].label for p in both] == [p.label for p in topic]
    for a, s, t in zip(both, sentiment, topic):
        assert a.score == pytest.approx(s.score, abs=1e-4)
        assert a.heads["topic"].score == pytest.approx(t.score, abs=1e-4)
        assert set(a.heads["topic"].probs) == {"billing", "delivery", "technical", "account", "product", "other"}
        assert set(a.probs) == {"negative", "neutral", "positive"}
    assert two_heads.model_name == "builtin:sentiment,builtin:topic"


@pytest.mark.model
def test_two_heads_int8_guard_and_agreement_cover_every_head(two_heads):
    held = rows("topic_heldout.jsonl")
    texts = [r["text"] for r in held]
    with load_engine("builtin:sentiment,builtin:topic", devices="cpu", precision="auto") as fast:
        assert fast.modes == {"cpu#0": "openvino-int8+bf16-guard"}
        assert fast.agreement["cpu#0"] >= 0.9  # both heads' labels on the start-up sample
        got = fast.classify(texts)
    ref = two_heads.classify(texts)
    same = sum(a.label == b.label and a.heads["topic"].label == b.heads["topic"].label for a, b in zip(got, ref))
    assert same / len(texts) >= 0.97
    accuracy = sum(p.heads["topic"].label == r["label"] for p, r in zip(got, held)) / len(held)
    assert accuracy >= 0.8


# -- train-head --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    picked = [r for r in rows("topic_train.jsonl") if r["label"] in ("billing", "delivery", "account")][:90]
    path = folder / "tickets.jsonl"
    path.write_text("".join(json.dumps({"body": r["text"], "queue": r["label"]}) + "\n" for r in picked))
    return path


@pytest.mark.model
def test_train_head_writes_a_deterministic_calibrated_head(small_data, tmp_path, engine):
    runner = CliRunner()
    outs = []
    for name in ("a", "b"):
        result = runner.invoke(app, ["train-head", "--data", str(small_data), "--text-field", "body",
                                     "--label-field", "queue", "--out", str(tmp_path / name), "--name", "queue"])
        assert result.exit_code == 0, result.output
        outs.append(tmp_path / name)
    assert "accuracy" in result.output and "calibration error" in result.output
    assert (outs[0] / "head.safetensors").read_bytes() == (outs[1] / "head.safetensors").read_bytes()
    spec = json.loads((outs[0] / "head.json").read_text())
    assert spec["labels"] == ["account", "billing", "delivery"] and spec["name"] == "queue"
    assert spec["train_size"] + spec["heldout"]["n"] == 90 and spec["heldout"]["accuracy"] >= 0.8
    assert set(spec["heldout"]["f1"]) == {"account", "billing", "delivery"}
    assert 0 < spec["temperature"] < 1 and spec["backbone"]["hidden_size"] == 384
    card = (outs[0] / "MODEL_CARD.md").read_text()
    assert "ECE before" in card and f"{spec['heldout']['accuracy']:.3f}" in card

    # the trained head next to the builtin one: its columns in classify's JSON lines
    texts = tmp_path / "texts.txt"
    texts.write_text("I was charged twice this month.\nMy parcel is stuck at the depot.\n")
    result = runner.invoke(app, ["classify", str(texts), "--model", f"builtin:sentiment,{outs[0]}",
                                 "--devices", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [line["heads"]["queue"]["label"] for line in lines] == ["billing", "delivery"]
    assert [line["label"] for line in lines] == [p.label for p in engine.classify(texts.read_text().splitlines())]

    # a head trained on another backbone is refused with one clear line
    spec["backbone"]["sha256"] = "0" * 64
    moved = tmp_path / "other"
    shutil.copytree(outs[0], moved)
    (moved / "head.json").write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match="trained on the backbone"):
        load_engine(f"builtin:sentiment,{moved}", devices="cpu", precision="fp32")
    result = runner.invoke(app, ["classify", str(texts), "--model", str(moved), "--devices", "cpu"])
    assert result.exit_code == 1 and "error: head" in result.output and "train the head again" in result.output


def test_train_head_bad_input_is_one_line_exit_1(tmp_path):
    runner = CliRunner()
    cases = {
        "one.jsonl": ([{"text": f"t{i}", "label": "same"} for i in range(6)], "at least two labels"),
        "empty.jsonl": ([{"text": "fine", "label": "a"}, {"text": "  ", "label": "b"}], "empty or missing 'text'"),
        "nolabel.jsonl": ([{"text": "fine", "tag": "a"}], "no column 'label'"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        result = runner.invoke(app, ["train-head", "--data", str(path), "--out", str(tmp_path / "h")])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error: ") and message in result.output and "Traceback" not in result.output
    csv = tmp_path / "x.csv"
    csv.write_text("text,label\nhello,a\n")
    result = runner.invoke(app, ["train-head", "--data", str(csv), "--out", str(tmp_path / "Bad Name!")])
    assert result.exit_code == 1 and "head name" in result.output


def test_multi_head_spec_mistakes_are_clear(tmp_path):
    from nlpstream.inference.preflight import check_model

    with pytest.raises(ModelLoadError, match="is not a head"):
        check_model(f"builtin:sentiment,{tmp_path}")
    with pytest.raises(ModelLoadError, match="unknown builtin"):
        check_model("builtin:sentiment,builtin:nope")
    with pytest.raises(ModelLoadError, match="two heads are named 'topic'"):
        load_engine("builtin:sentiment,builtin:topic,builtin:topic", devices="cpu", precision="fp32")
