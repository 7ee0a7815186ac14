"""Calibration and evaluation text: the shipped Wikipedia, windows, files, and the offline errors."""
import gzip
import importlib.util
import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from dllmq.data import (
    calibration_set,
    calibration_windows,
    eval_token_ids,
    heldout_text,
    load_corpus,
    mask_windows,
    tokenize_text,
    wiki_articles,
)
from dllmq.errors import DllmqError
from dllmq.models.random_models import random_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return random_model("random-llama", seed=0)[1]


# ------------------------------------------------------------------------------ shipped corpus

@pytest.mark.parametrize("split, min_words", [("train", 300_000), ("heldout", 20_000)])
def test_shipped_wiki_loads_offline_with_real_size(split, min_words):
    text = load_corpus("wiki", split)
    assert len(text.split()) > min_words
    assert text == load_corpus("wiki", split)  # deterministic (and cached)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shipped_wiki_has_no_markup_left(split):
    text = load_corpus("wiki", split)
    for marker in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "'''", "<!--", "==", "thumb|", "Category:",
                   "http://", "https://"):
        assert marker not in text, marker
    assert "\n\n\n" not in text


def test_wiki_articles_have_titles_and_splits_are_disjoint():
    train, heldout = wiki_articles("train"), wiki_articles("heldout")
    assert len(train) > 80 and 5 <= len(heldout) <= 20
    titles_train, titles_heldout = {t for t, _ in train}, {t for t, _ in heldout}
    assert len(titles_train) == len(train) and len(titles_heldout) == len(heldout)
    assert not titles_train & titles_heldout
    assert not {b for _, b in train} & {b for _, b in heldout}
    assert all(title and "\n" not in title and body for title, body in train + heldout)
    assert "Anarchism" in titles_train | titles_heldout


def test_attribution_lists_every_shipped_article():
    note = (ROOT / "src/dllmq/data/wiki/ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "CC BY-SA" in note and "creativecommons.org/licenses/by-sa" in note and "gensim" in note
    for title, _ in wiki_articles("train") + wiki_articles("heldout"):
        assert f"- {title} — " in note


def test_heldout_text_is_the_heldout_split(tokenizer):
    assert heldout_text() == load_corpus("wiki", "heldout") == load_corpus("wiki", "test")
    ids = eval_token_ids(tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert torch.equal(ids, tokenize_text(tokenizer, load_corpus("wiki", "heldout")))


def test_unknown_split_is_an_error():
    with pytest.raises(DllmqError, match="Unknown split"):
        load_corpus("wiki", "validation-2")


# -------------------------------------------------------------------------------------- windows

def test_windows_are_seeded_slices_within_range():
    n, seqlen = 1000, 64
    ids = torch.arange(n)
    windows = calibration_windows(ids, 32, seqlen, seed=7)
    assert windows.shape == (32, seqlen) and windows.dtype == torch.long
    starts = windows[:, 0]
    assert torch.equal(windows, starts[:, None] + torch.arange(seqlen))  # contiguous slices
    assert int(starts.min()) >= 0 and int(starts.max()) <= n - seqlen - 1
    assert torch.equal(windows, calibration_windows(ids.tolist(), 32, seqlen, seed=7))
    assert not torch.equal(windows, calibration_windows(ids, 32, seqlen, seed=8))


def test_windows_match_the_gptq_reference_draw():
    n, seqlen, seed = 500, 50, 3
    random.seed(seed)  # GPTQ: random.seed(seed); i = random.randint(0, len - seqlen - 1)
    starts = [random.randint(0, n - seqlen - 1) for _ in range(10)]
    assert calibration_windows(torch.arange(n), 10, seqlen, seed)[:, 0].tolist() == starts


def test_windows_need_one_more_token_than_seqlen():
    assert calibration_windows(torch.arange(9), 3, 8, 0).shape == (3, 8)
    with pytest.raises(DllmqError, match="shorter than one window"):
        calibration_windows(torch.arange(8), 3, 8, 0)
    with pytest.raises(DllmqError, match="nsamples"):
        calibration_windows(torch.arange(100), 0, 8, 0)
    with pytest.raises(DllmqError, match="seqlen"):
        calibration_windows(torch.arange(100), 2, 0, 0)


@pytest.fixture(scope="module")
def wiki_windows(tokenizer):
    return calibration_set(tokenizer, "wiki", nsamples=4, seqlen=128, seed=0)


def test_calibration_set_from_shipped_wiki(tokenizer, wiki_windows):
    assert wiki_windows.shape == (4, 128) and wiki_windows.dtype == torch.long
    ids = tokenize_text(tokenizer, load_corpus("wiki", "train"))
    assert torch.equal(wiki_windows, calibration_windows(ids, 4, 128, seed=0))
    assert tokenizer.decode(wiki_windows[0]) in load_corpus("wiki", "train")


def test_calibration_set_from_a_short_file_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("too short")
    with pytest.raises(DllmqError, match="shorter than one window"):
        calibration_set(tokenizer, path, nsamples=2, seqlen=64, seed=0)


# ----------------------------------------------------------------------------- masked windows

def test_mask_windows_masks_the_requested_fraction_seeded():
    windows = calibration_windows(torch.arange(10, 2000), 6, 40, 0)
    masked = mask_windows(windows, 0.25, mask_token_id=3, seed=1)
    is_mask = masked == 3
    assert is_mask.sum(dim=1).tolist() == [10] * 6
    assert torch.equal(masked[~is_mask], windows[~is_mask])  # nothing else changed
    assert torch.equal(masked, mask_windows(windows, 0.25, 3, seed=1))
    assert not torch.equal(masked, mask_windows(windows, 0.25, 3, seed=2))
    assert (mask_windows(windows, 1.0, 3) == 3).all()
    assert (mask_windows(windows, 1e-6, 3) == 3).sum(dim=1).tolist() == [1] * 6
    assert not (windows == 3).any()  # the input is left as it was


def test_masked_calibration_set_is_clean_by_default(tokenizer, wiki_windows):
    mask_id = tokenizer.mask_token_id
    masked = calibration_set(tokenizer, "wiki", 4, 128, 0, mask_ratio=0.5, mask_token_id=mask_id)
    assert not (wiki_windows == mask_id).any()
    assert ((masked == mask_id).sum(dim=1) == 64).all()
    keep = masked != mask_id
    assert torch.equal(masked[keep], wiki_windows[keep])


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_mask_ratio_out_of_range_is_an_error(ratio):
    with pytest.raises(DllmqError, match="mask_ratio"):
        mask_windows(torch.zeros(2, 8, dtype=torch.long), ratio, 1)


def test_mask_ratio_without_mask_token_is_an_error(tokenizer):
    with pytest.raises(DllmqError, match="mask token"):
        calibration_set(tokenizer, "wiki", 2, 16, 0, mask_ratio=0.3)


# ------------------------------------------------------------------------------------- files

def test_txt_and_gzipped_txt(tmp_path):
    (tmp_path / "a.txt").write_text("héllo world\n", encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("héllo world\n".encode()))
    assert load_corpus(tmp_path / "a.txt") == load_corpus(str(tmp_path / "b.txt.gz")) == "héllo world\n"


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "first doc", "id": 1}, {"text": "second\ndoc"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_corpus(path) == "first doc\n\nsecond\ndoc"


def test_jsonl_without_text_field_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(DllmqError, match='Line 2 .*"text"'):
        load_corpus(path)
    path.write_text("{not json\n")
    with pytest.raises(DllmqError, match="Line 1 .*not valid JSON"):
        load_corpus(path)


def test_bad_paths_are_errors(tmp_path):
    with pytest.raises(DllmqError, match="No text file"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "e.csv").write_text("a,b")
    with pytest.raises(DllmqError, match="neither .txt nor .jsonl"):
        load_corpus(tmp_path / "e.csv")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DllmqError, match="empty"):
        load_corpus(tmp_path / "empty.txt")


# ------------------------------------------------------------------ HF sets, no network in tests

def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


@pytest.mark.parametrize("name", ["wikitext2", "pile"])
def test_hf_set_offline_is_one_clear_error(monkeypatch, name):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(DllmqError) as info:
        load_corpus(name)
    message = str(info.value)
    assert message.startswith(f"{name} could not be loaded") and "--calib wiki" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_hf_set_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DllmqError, match="wikitext2 needs the HF datasets package.*--calib wiki"):
        load_corpus("wikitext2")


def test_wikitext2_is_joined_as_gptq_does(monkeypatch):
    calls = []

    def fake(path, config, split):
        calls.append((path, config, split))
        return {"text": [" = Title = \n", "", " body line \n"]}

    _fake_datasets(monkeypatch, fake)
    assert load_corpus("wikitext2") == " = Title = \n\n\n\n\n body line \n"
    load_corpus("wikitext2", "heldout")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("wikitext", "wikitext-2-raw-v1", "test")]


def test_pile_has_no_heldout_split():
    with pytest.raises(DllmqError, match="pile has only a calibration split"):
        load_corpus("pile", "heldout")


# ----------------------------------------------------------------------- the extraction script

def test_extract_script_strips_markup(monkeypatch):
    pytest.importorskip("mwparserfromhell")
    spec = importlib.util.spec_from_file_location("extract_wiki", ROOT / "scripts" / "extract_wiki.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "extract_wiki", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    wikitext = (
        "{{Infobox|name=x}}\n'''Foo''' is a [[bar|Bar]] of ''baz''<ref>{{cite web|url=http://a}}</ref> "
        "({{convert|5|km}}).<!-- hidden -->\n[[File:x.png|thumb|caption]]\n== History ==\n"
        "* item [http://example.org one]\n{| class=wikitable\n|a||b\n|}\n== Empty ==\n"
        "== References ==\n{{reflist}}\n* Smith 2001\n[[Category:Things]]"
    )
    assert module.wikitext_to_prose(wikitext) == "Foo is a Bar of baz (5 km).\nHistory\nitem one"
