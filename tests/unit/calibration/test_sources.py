"""Tests for compressor.calibration.sources (every SOURCE form, its errors) and wiki_markup (the markup stripper)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from itertools import islice
from pathlib import Path
from unittest import mock

import pytest

from compressor.calibration import sources
from compressor.calibration.sources import HFSpec, iter_documents, parse_hf_spec
from compressor.calibration.wiki_markup import strip_wiki_markup
from compressor.errors import CalibrationError

HAS_GENSIM = importlib.util.find_spec("gensim") is not None
needs_gensim = pytest.mark.skipif(not HAS_GENSIM, reason="demo corpora need the 'demo' extra (gensim)")


def _error(source: str, text_field: str | None = None) -> str:
    """The one-line message of the CalibrationError that reading SOURCE raises."""
    with pytest.raises(CalibrationError) as info:
        list(iter_documents(source, text_field))
    message = str(info.value)
    assert "\n" not in message
    assert info.value.exit_code == 2
    return message


# --- hf: spec ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("hf:wikitext:wikitext-2-raw-v1@test", HFSpec("wikitext", "wikitext-2-raw-v1", "test")),
        ("hf:wikitext", HFSpec("wikitext", None, "train")),
        ("hf:allenai/c4:en@validation", HFSpec("allenai/c4", "en", "validation")),
        ("hf:org/name@train[:1000]", HFSpec("org/name", None, "train[:1000]")),
        ("hf:/data/local_dataset", HFSpec("/data/local_dataset", None, "train")),
    ],
)
def test_parse_hf_spec(source: str, expected: HFSpec) -> None:
    assert parse_hf_spec(source) == expected


@pytest.mark.parametrize("source", ["hf:", "hf::cfg", "hf:name:", "hf:name@", "hf:@test", "wikitext"])
def test_parse_hf_spec_rejects_malformed(source: str) -> None:
    with pytest.raises(CalibrationError, match="NAME"):
        parse_hf_spec(source)


def test_hf_local_directory_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "local"
    data.mkdir()
    (data / "part.jsonl").write_text('{"body": "first doc"}\n{"body": ""}\n{"body": "second doc"}\n')
    assert list(iter_documents(f"hf:{data}", "body")) == ["first doc", "second doc"]
    assert "available: body" in _error(f"hf:{data}")


def test_hf_passes_name_config_split(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    fake = mock.Mock(return_value=datasets.Dataset.from_dict({"text": ["a b", " ", "c"], "id": [1, 2, 3]}))
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert list(iter_documents("hf:wikitext:wikitext-2-raw-v1@test")) == ["a b", "c"]
    fake.assert_called_once_with("wikitext", "wikitext-2-raw-v1", split="test")
    assert "no field 'content'; available: text, id" in _error("hf:wikitext", "content")


def test_hf_load_failure_is_calibration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(
        datasets, "load_dataset", mock.Mock(side_effect=FileNotFoundError("no such dataset\nx"))
    )
    assert "could not load hf:nope@train: no such dataset" in _error("hf:nope")


def test_hf_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert "pip install datasets" in _error("hf:wikitext")


# --- local files ---------------------------------------------------------------------------------------------


def test_txt_splits_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("first para\nstill first\n\n\n  \nsecond para\n\nthird\n")
    assert list(iter_documents(str(path))) == ["first para\nstill first", "second para", "third"]


def test_txt_with_long_lines_and_no_blank_lines_is_one_document_per_line(tmp_path: Path) -> None:
    lines = [f"article {i} " + "word " * 60 for i in range(3)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    assert list(iter_documents(str(path))) == [line.strip() for line in lines]


def test_txt_with_short_lines_and_no_blank_lines_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "poem.txt"
    path.write_text("roses are red\nviolets are blue\n")
    assert list(iter_documents(str(path))) == ["roses are red\nviolets are blue"]


def test_jsonl_uses_text_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": "one", "n": 1}, {"text": None}, {"text": "two"}, "bare string"]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert list(iter_documents(str(path))) == ["one", "two", "bare string"]


def test_jsonl_errors_name_file_line_and_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x", "id": 3}\n')
    assert f"{path}:1 has no field 'text'; available: body, id" in _error(str(path))
    path.write_text('{"body": "x"}\n{"body": \n')
    assert f"{path}:2 is not valid JSON" in _error(str(path), "body")
    path.write_text('{"body": 7}\n')
    assert "field 'body' is a int" in _error(str(path), "body")


def test_json_list_or_object_with_one_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"content": "a"}, {"content": "b"}]))
    assert list(iter_documents(str(path), "content")) == ["a", "b"]
    path.write_text(json.dumps({"version": 1, "data": [{"text": "c"}]}))
    assert list(iter_documents(str(path))) == ["c"]
    path.write_text(json.dumps({"a": [], "b": []}))
    assert "exactly one list" in _error(str(path))


def test_csv_column_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('id,text\n1,"hello, world"\n2,\n3,"multi\nline"\n')
    assert list(iter_documents(str(path))) == ["hello, world", "multi\nline"]
    assert "no field 'body'; available: id, text" in _error(str(path), "body")


def test_parquet_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["p1", None, "p2"], "id": [1, 2, 3]}), path)
    assert list(iter_documents(str(path))) == ["p1", "p2"]
    assert "available: text, id" in _error(str(path), "body")


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert "pip install pyarrow" in _error(str(path))


def test_directory_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z")
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n')
    (tmp_path / "c.txt").write_text("from c")
    (tmp_path / "notes.pdf").write_text("ignored")
    assert list(iter_documents(str(tmp_path))) == ["from a", "from b/z", "from c"]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8" in _error(str(path))


# --- bad sources ---------------------------------------------------------------------------------------------


def test_bad_sources_fail_at_call_time_with_accepted_forms(tmp_path: Path) -> None:
    (tmp_path / "doc.pdf").write_text("x")
    cases = {
        str(tmp_path / "missing.txt"): "does not exist",
        "s3://bucket/data": "unknown scheme 's3'",
        str(tmp_path / "doc.pdf"): "unsupported file type",
        "": "empty data source",
    }
    for source, expected in cases.items():
        with pytest.raises(CalibrationError) as info:
            iter_documents(source)  # no iteration: resolution is eager
        assert expected in str(info.value)
        assert "hf:NAME[:CONFIG][@SPLIT]" in str(info.value)
    with pytest.raises(CalibrationError, match="available: demo:lee, demo:wiki"):
        iter_documents("demo:nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="holds no"):
        iter_documents(str(tmp_path / "empty"))


def test_source_without_text(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n   \n\t\n")
    assert "contains no text" in _error(str(path))
    jsonl = tmp_path / "blank.jsonl"
    jsonl.write_text('{"text": ""}\n{"text": "  "}\n')
    assert "contains no text" in _error(str(jsonl))


def test_demo_without_gensim(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        sources.importlib.util, "find_spec", lambda name: None if name == "gensim" else real(name)
    )
    with pytest.raises(CalibrationError, match=r"pip install --no-deps gensim==4\.4\.0"):
        iter_documents("demo:lee")


# --- demo corpora (the gensim files, installed by the 'demo' extra) ------------------------------------------


@needs_gensim
def test_demo_lee_has_300_articles() -> None:
    documents = list(iter_documents("demo:lee"))
    assert len(documents) == 300
    assert documents[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert all("\n" not in document for document in documents)


@needs_gensim
def test_demo_wiki_first_articles_are_plain_prose_and_fast() -> None:
    start = time.perf_counter()
    articles = list(islice(iter_documents("demo:wiki"), 50))
    elapsed = time.perf_counter() - start
    assert len(articles) == 50
    assert elapsed < 5.0, f"stripping 50 articles took {elapsed:.1f}s"
    assert articles[0].startswith("Anarchism is a political philosophy")
    for article in articles:
        for markup in (
            "{{",
            "}}",
            "[[",
            "]]",
            "<ref",
            "</ref",
            "'''",
            "&nbsp;",
            "[http",
            "Category:",
            "thumb|",
        ):
            assert markup not in article, (markup, article[:80])
        assert len(article) >= 500


@needs_gensim
def test_demo_wiki_skips_redirects_and_stubs() -> None:
    documents = list(iter_documents("demo:wiki"))
    assert 90 <= len(documents) <= 115  # 206 pages, about half are redirects
    assert not any(document.upper().startswith("#REDIRECT") for document in documents)


# --- strip_wiki_markup on hand-written snippets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("wiki", "plain"),
    [
        ("'''Bold''' and ''italic'' text.", "Bold and italic text."),
        (
            "A [[political philosophy]] and [[self-governance|self-governed]] [[society|societies]].",
            "A political philosophy and self-governed societies.",
        ),
        ("See [http://example.com the site] or [http://example.com].", "See the site or."),
        ("{{Infobox|name={{nested|x}}|y=1}}Text after.", "Text after."),
        ('Before.\n{| class="wikitable"\n|-\n| {{flag|X}} || 1\n|}\nAfter.', "Before.\nAfter."),
        ('Claim.<ref name="a">{{cite web|url=x}}</ref> More.<ref name="a/b" /> End.', "Claim. More. End."),
        ("Visible<!-- hidden [[link]] --> text.", "Visible text."),
        ("[[File:X.jpg|thumb|A caption with [[a link]] and [brackets].]]Prose.", "Prose."),
        ("Prose.\n[[Category:Things]]\n[[de:Dinge]]\n[[Image:Y.png|left]]", "Prose."),
        ("[[:Category:Things|the things category]] and [[wikt:word|word]].", "the things category and word."),
        (
            "Heading test\n== History ==\nOld times.\n=== Early ===\nEarlier.",
            "Heading test\nOld times.\nEarlier.",
        ),
        ("Body.\n== See also ==\n* [[Other]]\n=== Sub ===\nx\n== Later ==\nKept.", "Body.\nKept."),
        ("* item one\n# item two\n: indented", "item one\nitem two\nindented"),
        ("Caf&eacute;&nbsp;au lait &ndash; H<sub>2</sub>O<br/>next", "Café au lait – H2O next"),
        ("Asphalt ({{IPA|x}}, {{IPA|y}}, occasionally) is.", "Asphalt (occasionally) is."),
        ("Broken {{template never closed. Still here.", "Broken {{template never closed. Still here."),
        ("__NOTOC__Text <math>x^2</math> here.", "Text here."),
    ],
)
def test_strip_wiki_markup(wiki: str, plain: str) -> None:
    assert strip_wiki_markup(wiki) == plain


def test_strip_wiki_markup_keeps_prose_untouched() -> None:
    prose = "Plain sentences stay as they are, with (parentheses), numbers 1 < 2 and a colon: here."
    assert strip_wiki_markup(prose) == prose
