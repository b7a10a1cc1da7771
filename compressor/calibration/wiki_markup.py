"""MediaWiki source reduced to plain prose: a pure text transform, no I/O.

Kept apart from ``sources.py`` (which resolves SOURCE strings and reads files, the bz2 XML dump of ``demo:wiki``
among them) because it is a self-contained piece of string processing, with its own table of patterns and its
own known-answer tests: perplexity on a Wikipedia sample should measure prose, not templates and tables.
"""

from __future__ import annotations

import html
import re
from types import MappingProxyType

__all__ = ["strip_wiki_markup"]

_DROPPED_SPANS = re.compile(  # comments, references and non-prose tags, content and all
    r"<!--.*?(?:-->|$)|<ref\b[^>]*?/>|<(ref|math|gallery|timeline|imagemap|score|chem|ce|hiero|syntaxhighlight)"
    r"\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_NEST_TOKEN = re.compile(r"\{\{|\}\}|^[ \t]*\{\||\|\}", re.MULTILINE)
_CLOSER_OF = MappingProxyType({"}}": "{{", "|}": "{|"})
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")  # single brackets may occur inside
_HIDDEN_NAMESPACES = frozenset({"file", "image", "category", "media"})
_LANGUAGE_PREFIX = re.compile(r"[a-z]{2,3}(-[a-z]{2,8})*")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_LINE_BREAK_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_EMPHASIS_OR_MAGIC = re.compile(r"'{2,}|__[A-Z]+__")  # bold and italic quotes, __NOTOC__
_HEADING = re.compile(r"(=+)\s*(.*?)\s*\1")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_ORPHAN_PUNCT = re.compile(r"(?<=\()[\s,;]+|[\s,;]+(?=\))|\(\s*\)")  # what removed templates leave
_REPEATED_PUNCT = re.compile(r"([,;])(?:\s*[,;])+")
_SKIPPED_SECTIONS = frozenset(
    "see also|references|notes|external links|further reading|bibliography|sources|footnotes|citations|"
    "notes and references|works cited|gallery".split("|")
)


def strip_wiki_markup(text: str) -> str:
    """Reduce MediaWiki source to plain prose, one paragraph per line: perplexity should measure prose.

    Templates, tables, references, comments, HTML, files, categories, interlanguage links, headings and
    reference sections (See also, References, ...) go; links keep their visible text. Regexes and a brace
    scanner, not a parser: fast and dependency-free."""
    text = _replace_links(_remove_nested(_DROPPED_SPANS.sub("", text)))
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = html.unescape(_HTML_TAG.sub("", _LINE_BREAK_TAG.sub(" ", text)))  # unescape last: no new tags
    return _clean_lines(_EMPHASIS_OR_MAGIC.sub("", text))


def _remove_nested(text: str) -> str:
    """Drop `{{templates}}` and `{| tables |}`, which nest in each other, with a stack over their tokens.
    An opener never closed stays as text, so one malformed template does not swallow the article."""
    kept: list[str] = []
    keep_from = pos = 0
    stack: list[tuple[str, int]] = []
    while True:
        match = _NEST_TOKEN.search(text, pos)
        if match is None:
            if not stack:
                break
            # unclosed: keep the opener as text and rescan after it
            keep_from, pos = stack[0][1], stack[0][1] + 2
            stack.clear()
            continue
        token = match.group().strip()
        if token in ("{{", "{|"):
            if not stack:
                kept.append(text[keep_from : match.start()])
            stack.append((token, match.end() - 2))
            pos = match.end()
        elif stack and stack[-1][0] == _CLOSER_OF[token]:
            stack.pop()
            pos = match.end()
            if not stack:
                keep_from = pos
        else:
            pos = match.start() + 1  # a stray closer, or `|}` ending a template argument: not ours
    kept.append(text[keep_from:])
    return "".join(kept)


def _replace_links(text: str) -> str:
    """Replace `[[...]]` innermost first, so captions of dropped image links may contain links."""
    for _ in range(8):  # links do not nest deeper than this in articles
        text, count = _LINK.subn(_link_text, text)
        if not count:
            break
    return text.replace("[[", "").replace("]]", "")


def _link_text(match: re.Match[str]) -> str:
    """Visible text of one internal link: the label, else the target; nothing for files and categories."""
    target, _, label = match.group(1).partition("|")
    target = target.strip()
    prefix, colon, _ = target.partition(":")
    if colon and not target.startswith(":"):
        if prefix.strip().lower() in _HIDDEN_NAMESPACES:
            return ""
        if not label and _LANGUAGE_PREFIX.fullmatch(prefix.strip()):
            return ""  # interlanguage link
    return label.strip() or target.lstrip(":")


def _clean_lines(text: str) -> str:
    """Drop headings and reference sections, list markers, markup-only lines; tidy spacing per line."""
    kept: list[str] = []
    skip_level = 0
    for line in text.splitlines():
        line = line.strip()
        heading = _HEADING.fullmatch(line)
        if heading:
            level = len(heading.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = level if heading.group(2).strip().lower() in _SKIPPED_SECTIONS else 0
            continue
        if skip_level or line.startswith(("|", "!")):
            continue
        line = _SPACES.sub(" ", _LIST_MARKER.sub("", line))
        line = _REPEATED_PUNCT.sub(r"\1", _ORPHAN_PUNCT.sub("", line))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line).strip()
        if any(char.isalnum() for char in line):
            kept.append(line)
    return "\n".join(kept)
