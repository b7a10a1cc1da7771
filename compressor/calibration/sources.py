"""Text sources for calibration and evaluation: one SOURCE string in, a lazy stream of documents out.

Calibration and `compressor eval` must read the same kinds of data the same way, so every form a user may
pass (`demo:lee`, `demo:wiki`, `hf:NAME[:CONFIG][@SPLIT]`, a file, a directory) is resolved here and nowhere
else. Documents are streamed so that a large corpus never has to fit in memory; the token side
(`tokens.py`) stops reading as soon as it has enough. The `demo:wiki` articles' markup is stripped by the pure
`wiki_markup.py`.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import itertools
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from compressor.calibration.wiki_markup import strip_wiki_markup
from compressor.errors import CalibrationError

__all__ = ["ACCEPTED_FORMS", "HFSpec", "iter_documents", "parse_hf_spec"]

ACCEPTED_FORMS = (
    "demo:lee, demo:wiki, hf:NAME[:CONFIG][@SPLIT], a .txt/.jsonl/.json/.csv/.parquet file or directory"
)
_GENSIM_DATA = "test/test_data"  # inside the gensim package: ships the Lee corpus and a Wikipedia sample
_LEE_FILE = "lee_background.cor"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# A .txt with no blank line in its first 100 lines, averaging >= 200 characters, is one document per line.
_PEEK_LINES, _LONG_LINE = 100, 200
_MAX_DOC_CHARS = 1 << 20  # a blank-line paragraph longer than this is cut, so memory stays bounded
_MIN_ARTICLE_CHARS = 500  # shorter stripped Wikipedia articles are stubs or lists, not prose


@dataclass(frozen=True)
class HFSpec:
    """The parts of `hf:NAME[:CONFIG][@SPLIT]`, as `datasets.load_dataset` takes them."""

    name: str
    config: str | None
    split: str


def parse_hf_spec(source: str) -> HFSpec:
    """Split `hf:NAME[:CONFIG][@SPLIT]`; pure, so the hub form is tested without the network. NAME may be
    `org/name` or a local directory; SPLIT (default `train`) may carry a slice, `train[:1000]`."""
    if not source.startswith("hf:"):
        raise CalibrationError(f"{source!r} is not an hf: source; expected hf:NAME[:CONFIG][@SPLIT]")
    body, at, split = source[3:].rpartition("@") if "@" in source else (source[3:], "", "train")
    name, colon, config = body.partition(":")
    if not name.strip() or (colon and not config.strip()) or (at and not split.strip()):
        raise CalibrationError(f"malformed {source!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    return HFSpec(name=name.strip(), config=config.strip() or None, split=split.strip())


def iter_documents(source: str, text_field: str | None = None) -> Iterator[str]:
    """Yield the non-empty, stripped documents of SOURCE in a stable order, reading lazily.

    The source is resolved now, so a bad scheme, missing file or missing demo package fails before a model
    is loaded. `text_field` (default `text`) names the column of structured files and hub datasets.
    """
    documents = _resolve(source, text_field)
    return _non_empty(documents, source)


def _non_empty(documents: Iterable[str], source: str) -> Iterator[str]:
    """Drop blank documents and fail loudly if nothing is left: an empty corpus would calibrate nothing."""
    count = 0
    for document in filter(None, map(str.strip, documents)):
        count += 1
        yield document
    if not count:
        raise CalibrationError(f"source {source!r} contains no text; point it at files with non-empty text")


def _resolve(source: str, text_field: str | None) -> Iterator[str]:
    """Map a SOURCE string to a document iterator, validating what can be checked without reading."""
    if not source.strip():
        raise CalibrationError(f"empty data source; accepted: {ACCEPTED_FORMS}")
    if source.startswith("demo:"):
        return _iter_demo(source)
    if source.startswith("hf:"):
        return _iter_hf(parse_hf_spec(source), text_field)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _READERS)
        if not files:
            raise CalibrationError(f"directory {source!r} holds no .txt/.jsonl/.json/.csv/.parquet files")
        return itertools.chain.from_iterable(_READERS[p.suffix.lower()](p, text_field) for p in files)
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise CalibrationError(f"{source!r}: unsupported file type; accepted: {ACCEPTED_FORMS}")
        return reader(path, text_field)
    scheme = re.match(r"([A-Za-z][\w+.-]+):", source)
    if scheme:
        raise CalibrationError(f"{source!r}: unknown scheme {scheme.group(1)!r}; accepted: {ACCEPTED_FORMS}")
    raise CalibrationError(f"source {source!r} does not exist; accepted: {ACCEPTED_FORMS}")


def _iter_demo(source: str) -> Iterator[str]:
    """A demo corpus from the gensim package, found but not imported (installed --no-deps, it would fail)."""
    if source not in ("demo:lee", "demo:wiki"):
        raise CalibrationError(f"unknown demo corpus {source!r}; available: demo:lee, demo:wiki")
    spec = importlib.util.find_spec("gensim")
    install = "pip install --no-deps gensim==4.4.0 (the 'demo' extra)"
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(f"{source} needs the gensim test corpora: {install}")
    name = _LEE_FILE if source == "demo:lee" else _WIKI_FILE
    path = Path(spec.submodule_search_locations[0], _GENSIM_DATA, name)
    if not path.is_file():
        raise CalibrationError(f"{source}: {path} is missing; reinstall: {install}")
    return _read_lines(path) if source == "demo:lee" else _iter_wiki(path)  # Lee: one article per line


def _read_lines(path: Path) -> Iterator[str]:
    """Stream the lines of a UTF-8 file; a bad byte becomes a CalibrationError naming file and line."""
    lineno = 0
    with path.open(encoding="utf-8") as file:
        try:
            for lineno, line in enumerate(file, 1):  # noqa: B007 - lineno is read in the handler
                if "\x00" in line:  # valid UTF-8, but no text file holds NUL: a binary file
                    raise CalibrationError(f"{path} looks binary (a NUL byte on line {lineno}); give a text file")
                yield line
        except UnicodeDecodeError:
            raise CalibrationError(f"{path} is not UTF-8 (near line {lineno + 1}); re-encode it") from None


def _read_txt(path: Path, _text_field: str | None) -> Iterator[str]:
    """Plain text: documents are separated by blank lines, except that a file with no blank lines and
    long lines (one article per line, like the Lee corpus) is one document per line."""
    lines = _read_lines(path)
    head = list(itertools.islice(lines, _PEEK_LINES))
    rest = itertools.chain(head, lines)
    mean = sum(len(line) for line in head) / max(len(head), 1)
    if head and all(line.strip() for line in head) and mean >= _LONG_LINE:
        yield from rest
        return
    paragraph: list[str] = []
    size = 0
    for line in rest:
        if line.strip():
            paragraph.append(line.rstrip("\n"))
            size += len(line)
        if paragraph and (not line.strip() or size >= _MAX_DOC_CHARS):
            yield "\n".join(paragraph)
            paragraph, size = [], 0
    yield "\n".join(paragraph)


def _record_text(record: Any, text_field: str | None, where: str) -> str:
    """The text of one structured record: a bare string, or the `text_field` member of an object."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise CalibrationError(f"{where} is a JSON {type(record).__name__}; expected an object with text")
    field = text_field or "text"
    if field not in record:
        raise _no_field(where, field, record)
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise CalibrationError(f"{where}: field {field!r} is a {type(value).__name__}, expected a string")
    return value or ""


def _no_field(where: str, field: str, available: Iterable[Any]) -> CalibrationError:
    """The error for a missing text column, listing the ones that exist so the user can pick."""
    names = ", ".join(map(str, available)) or "none"
    return CalibrationError(f"{where} has no field {field!r}; available: {names}; choose a text field")


def _read_jsonl(path: Path, text_field: str | None) -> Iterator[str]:
    """One JSON object (or string) per line, read line by line."""
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix that line") from None
        yield _record_text(record, text_field, f"{path}:{lineno}")


def _read_json(path: Path, text_field: str | None) -> Iterator[str]:
    """A JSON list of records, or an object holding one such list; loaded whole (use .jsonl for big data)."""
    try:
        with path.open(encoding="utf-8") as file:
            data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path} is not valid UTF-8 JSON ({exc}); fix it or use .jsonl") from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise CalibrationError(f"{path}: expected a JSON list of records, or an object with exactly one list")
    for index, record in enumerate(data):
        yield _record_text(record, text_field, f"{path} item {index}")


def _read_csv(path: Path, text_field: str | None) -> Iterator[str]:
    """CSV with a header row, streamed by the stdlib reader (no pandas needed)."""
    field = text_field or "text"
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        try:
            columns = reader.fieldnames or []
            if field not in columns:
                raise _no_field(str(path), field, columns)
            for row in reader:
                yield row.get(field) or ""
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CalibrationError(
                f"{path} line {reader.line_num}: {exc}; fix it or convert to .jsonl"
            ) from None


def _read_parquet(path: Path, text_field: str | None) -> Iterator[str]:
    """Parquet, read one column in record batches so only a batch is in memory at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CalibrationError(f"reading {path} needs pyarrow: pip install pyarrow ('eval' extra)") from None
    field = text_field or "text"
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise _no_field(str(path), field, columns)
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _record_text({field: value}, field, str(path))


def _iter_hf(spec: HFSpec, text_field: str | None) -> Iterator[str]:
    """A dataset through `datasets.load_dataset` (hub id or local directory), read in row batches."""
    try:
        import datasets
    except ImportError:
        raise CalibrationError("hf: sources need datasets: pip install datasets ('eval' extra)") from None
    label = f"hf:{spec.name}" + (f":{spec.config}" if spec.config else "") + f"@{spec.split}"
    try:
        dataset = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(f"could not load {label}: {reason}; check name, config, split") from exc
    field = text_field or "text"
    if field not in dataset.column_names:
        raise _no_field(label, field, dataset.column_names)
    for batch in dataset.iter(batch_size=1000):
        for value in batch[field]:
            yield _record_text({field: value}, field, label)


def _iter_wiki(path: Path) -> Iterator[str]:
    """Articles of a bz2 MediaWiki XML dump as plain prose; each <page> is dropped once read, so memory holds
    one article. Redirects, other namespaces, disambiguation pages and stubs are not running text: skipped."""
    with bz2.open(path, "rb") as file:
        events = ET.iterparse(file, events=("start", "end"))
        _, root = next(events)
        for event, page in events:
            if event != "end" or page.tag.rpartition("}")[2] != "page":
                continue
            raw = page.findtext("{*}revision/{*}text") or ""
            keep = page.findtext("{*}ns") == "0" and page.find("{*}redirect") is None
            root.clear()
            if keep and raw.lstrip()[:9].upper() != "#REDIRECT" and not _DISAMBIGUATION.search(raw):
                text = strip_wiki_markup(raw)
                if len(text) >= _MIN_ARTICLE_CHARS:
                    yield text


_DISAMBIGUATION = re.compile(r"\{\{\s*(disambig|dab|hndis|geodis|surname|given name)\b", re.IGNORECASE)


_READERS: Mapping[str, Callable[[Path, str | None], Iterator[str]]] = MappingProxyType(
    {
        ".txt": _read_txt,
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
)
