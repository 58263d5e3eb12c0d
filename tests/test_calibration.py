import json
import platform
from pathlib import Path

import pytest

from qtk import errors
from qtk.quantize.calibration import build_samples, list_sets, load_calibration


@pytest.fixture(scope="module")
def tok(smol_layers):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_layers(2))


def test_named_sets_are_listed_with_source_and_license():
    names = {s["name"]: s for s in list_sets()}
    assert {"prose", "chat", "code", "prose-heldout"} <= set(names)
    assert all(s["license"] and s["source"] and s["description"] for s in names.values())


@pytest.mark.parametrize("name,kind", [("prose", "text"), ("chat", "chat"), ("code", "text"), ("prose-heldout", "text")])
def test_named_sets_assemble_and_match_their_pinned_digest(name, kind):
    cal = load_calibration(name)
    assert cal.kind == kind and len(cal.documents) > 10
    pinned = next(s for s in list_sets() if s["name"] == name)["sha256"]
    if platform.python_version() in pinned:
        assert cal.pinned is True and cal.sha256 == pinned[platform.python_version()]
    assert load_calibration(name).sha256 == cal.sha256  # reproducible


def test_held_out_prose_does_not_overlap_calibration():
    train = set(load_calibration("prose").documents)
    held = set(load_calibration("prose-heldout").documents)
    assert train and held and not (train & held)


def test_samples_are_seeded_and_exactly_sized(tok):
    cal = load_calibration("prose")
    a = build_samples(cal, tok, samples=8, seq_len=64, seed=1)
    b = build_samples(cal, tok, samples=8, seq_len=64, seed=1)
    c = build_samples(cal, tok, samples=8, seq_len=64, seed=2)
    assert a.input_ids == b.input_ids != c.input_ids
    assert len(a.input_ids) == 8 and all(len(x) == 64 for x in a.input_ids)
    assert a.to_dict()["seed"] == 1 and a.to_dict()["sha256"] == cal.sha256


def test_chat_set_uses_the_chat_template(tok):
    s = build_samples(load_calibration("chat"), tok, samples=4, seq_len=128, seed=0, chat_template=True)
    text = tok.decode(sum(s.input_ids, []))
    assert "<|im_start|>" in text and s.chat_template
    plain = build_samples(load_calibration("chat"), tok, samples=4, seq_len=128, seed=0, chat_template=False)
    assert "<|im_start|>" not in tok.decode(sum(plain.input_ids, []))


def test_too_little_text_is_an_error_with_numbers(tok, tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("One short paragraph.\n\nAnother short paragraph.\n")
    cal = load_calibration(str(f))
    with pytest.raises(errors.CalibrationError) as e:
        build_samples(cal, tok, samples=4, seq_len=8, seed=0)
    assert "4 samples x 8 tokens need 32" in str(e.value)
    few = build_samples(cal, tok, samples=4, seq_len=8, seed=0, allow_fewer=True)
    assert 1 <= len(few.input_ids) < 4


def test_custom_files(tmp_path, tok):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert load_calibration(str(txt)).documents == ("first paragraph\nstill first", "second paragraph")
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"body": "hello"}) + "\n" + json.dumps({"body": "world"}) + "\n")
    assert load_calibration(str(jl), text_field="body").documents == ("hello", "world")
    with pytest.raises(errors.CalibrationError, match="no string field 'text'"):
        load_calibration(str(jl))
    chats = tmp_path / "c.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello!"}]}) + "\n")
    assert load_calibration(str(chats)).kind == "chat"
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(errors.CalibrationError, match=r"d.jsonl:2"):
        load_calibration(str(bad))


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["alpha beta", "gamma delta"]}), f)
    assert load_calibration(str(f), text_field="content").documents == ("alpha beta", "gamma delta")
    with pytest.raises(errors.CalibrationError, match="columns: content"):
        load_calibration(str(f))


def test_hub_dataset_through_qtk_downloader(hub, cache_dir):
    cal = load_calibration("hf://datasets/acme/texts/data/train.txt")
    assert cal.documents and "hello world" in cal.documents[0]
    assert "@ " in cal.source  # pinned commit recorded
    assert (cache_dir / "datasets--acme--texts").is_dir()


def test_unknown_set_lists_the_named_ones():
    with pytest.raises(errors.CalibrationError) as e:
        load_calibration("wikitext")
    assert "prose" in e.value.hint and "chat" in e.value.hint


def test_missing_file():
    with pytest.raises(errors.CalibrationError, match="not found"):
        load_calibration(str(Path("/nonexistent/calib.txt")))
