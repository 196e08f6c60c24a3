#!/usr/bin/env python3
"""Build the project's default text corpus from Debian-packaged English prose.

Output: data/corpus/default.jsonl.gz, beside this script -- gzip (mtime 0) of
JSON lines, one document per line: {"text": "...", "source": "<short source name>"}.

Sources (all public domain or permissively licensed; see data/corpus/README.md):

  kjv       King James Bible, one chapter per document.
            Debian packages: bible-kjv-text (data) + bible-kjv (the `bible`
            reader, needed to decompress the data).
  pydoc     Python 3.11 documentation prose (HTML, code blocks and tables
            dropped), one page section per document.  Package: python3.11-doc.
  wordnet   WordNet 3.0 glosses that carry usage examples, grouped by
            lexicographer file (topic).  Package: wordnet-base.
  jargon    The Jargon File 4.4.7 (lexicon entries, introduction, appendices).
            Package: jargon-text.
  devil     Ambrose Bierce, "The Devil's Dictionary".  Package: dict-devil.

Only the standard library is used; no network access.  Install the inputs
with

    apt-get install bible-kjv bible-kjv-text python3.11-doc wordnet-base \
        jargon-text dict-devil

and run `python data/corpus/prepare.py` (from any directory).  The output
is deterministic: inputs are read in sorted order, per-source subsampling and
the final shuffle use fixed seeds, and the gzip header carries mtime 0.
"""

from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

SEED = 20240601
DEFAULT_OUT = Path(__file__).resolve().parent / "default.jsonl.gz"

# Per-source character budgets (None = take everything).  Sources larger than
# their budget are subsampled by whole documents with a fixed seed, so the
# corpus stays varied instead of being dominated by the Bible.
BUDGETS = {
    "kjv": 2_000_000,
    "pydoc": 2_200_000,
    "wordnet": 1_300_000,
    "jargon": None,
    "devil": None,
}

# Documents are packed up to about this many characters where a source has
# no natural unit of that size (dictionary entries).
CHUNK_CHARS = 3000

# Debian package -> files we read from it.
PKG_FILES = {
    "bible-kjv-text": ["/usr/lib/bible.data"],
    "bible-kjv": ["/usr/bin/bible"],
    "python3.11-doc": ["/usr/share/doc/python3.11/html/index.html"],
    "wordnet-base": ["/usr/share/wordnet/data.noun"],
    "jargon-text": ["/usr/share/doc/jargon-text/jargon.txt.gz"],
    "dict-devil": ["/usr/share/dictd/devil.dict.dz", "/usr/share/dictd/devil.index"],
}


def check_inputs() -> None:
    missing = [pkg for pkg, files in PKG_FILES.items() if not all(os.path.exists(f) for f in files)]
    if missing:
        sys.stderr.write(
            "prepare.py: missing input files from Debian packages: "
            + ", ".join(missing)
            + "\nInstall them with:\n    apt-get update && apt-get install -y "
            + " ".join(missing)
            + "\n"
        )
        sys.exit(1)


def pkg_version(pkg: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# --------------------------------------------------------------------------
# shared text helpers

_WS = re.compile(r"[ \t\r\f\v\u00a0]+")


def squash(s: str) -> str:
    """Collapse runs of horizontal whitespace and strip."""
    return _WS.sub(" ", s).strip()


def reflow(lines: list[str], min_wrapped: int = 55) -> str:
    """Turn one block of hard-wrapped lines into a paragraph.

    Prose that was wrapped at a fixed width is joined into one line; verse and
    other short-line material keeps its line breaks (with indentation removed).
    """
    stripped = [squash(row) for row in lines if row.strip()]
    if len(stripped) <= 1:
        return stripped[0] if stripped else ""
    body = stripped[:-1]
    wrapped = sum(len(row) >= min_wrapped for row in body) >= 0.8 * len(body)
    if not wrapped:
        return "\n".join(stripped)
    out = stripped[0]
    for row in stripped[1:]:
        # re-join words hyphenated across a line break only when the hyphen
        # is part of a compound ("cannon-\nshot" -> "cannon-shot").
        if out.endswith("-") and not out.endswith("--") and out[-2:-1].isalpha():
            out += row
        else:
            out += " " + row
    return out


def blocks(lines: list[str]) -> list[list[str]]:
    """Split lines into blank-line separated blocks."""
    out: list[list[str]] = []
    cur: list[str] = []
    for row in lines:
        if row.strip():
            cur.append(row.rstrip("\n"))
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def letter_ratio(s: str) -> float:
    chars = [c for c in s if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c.isalpha() for c in chars) / len(chars)


def pack(entries: list[str], limit: int = CHUNK_CHARS, sep: str = "\n\n") -> list[str]:
    """Pack consecutive entries into documents of at most ~limit characters."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for e in entries:
        if cur and size + len(e) > limit:
            docs.append(sep.join(cur))
            cur, size = [], 0
        cur.append(e)
        size += len(e) + len(sep)
    if cur:
        docs.append(sep.join(cur))
    return docs


# --------------------------------------------------------------------------
# King James Bible (bible-kjv-text, read through the `bible` program)

KJV_BOOKS = [
    "Genesis",
    "Exodus",
    "Leviticus",
    "Numbers",
    "Deuteronomy",
    "Joshua",
    "Judges",
    "Ruth",
    "1 Samuel",
    "2 Samuel",
    "1 Kings",
    "2 Kings",
    "1 Chronicles",
    "2 Chronicles",
    "Ezra",
    "Nehemiah",
    "Esther",
    "Job",
    "Psalms",
    "Proverbs",
    "Ecclesiastes",
    "Song of Solomon",
    "Isaiah",
    "Jeremiah",
    "Lamentations",
    "Ezekiel",
    "Daniel",
    "Hosea",
    "Joel",
    "Amos",
    "Obadiah",
    "Jonah",
    "Micah",
    "Nahum",
    "Habakkuk",
    "Zephaniah",
    "Haggai",
    "Zechariah",
    "Malachi",
    "Matthew",
    "Mark",
    "Luke",
    "John",
    "Acts",
    "Romans",
    "1 Corinthians",
    "2 Corinthians",
    "Galatians",
    "Ephesians",
    "Philippians",
    "Colossians",
    "1 Thessalonians",
    "2 Thessalonians",
    "1 Timothy",
    "2 Timothy",
    "Titus",
    "Philemon",
    "Hebrews",
    "James",
    "1 Peter",
    "2 Peter",
    "1 John",
    "2 John",
    "3 John",
    "Jude",
    "Revelation",
]


def kjv_docs() -> list[str]:
    # -f turns pretty-printing off: one "Ref Text" line per verse.
    out = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"],
        capture_output=True,
        check=True,
        cwd="/",
        env={**os.environ, "COLUMNS": "80"},
    ).stdout.decode("latin-1")
    ref = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
    chapters: dict[tuple[int, int], list[str]] = {}
    order: list[str] = []
    for line in out.splitlines():
        m = ref.match(line)
        if not m:
            continue
        abbr, chap, _verse, text = m.groups()
        if abbr not in order:
            order.append(abbr)
        chapters.setdefault((order.index(abbr), int(chap)), []).append(squash(text))
    if len(order) != len(KJV_BOOKS):
        raise SystemExit(f"unexpected `bible` output: {len(order)} books, expected 66")
    docs = []
    for (b, c), verses in sorted(chapters.items()):
        docs.append(f"{KJV_BOOKS[b]} {c}\n\n" + " ".join(verses))
    return docs


# --------------------------------------------------------------------------
# Python documentation (python3.11-doc HTML)

PYDOC_ROOT = Path("/usr/share/doc/python3.11/html")
PYDOC_EXCLUDE = re.compile(
    r"^(genindex.*|py-modindex|search|contents|index|download|copyright|license|"
    r"bugs|about|whatsnew/changelog)\.html$"
)
_BLOCK = {
    "p",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "dd",
    "dt",
    "div",
    "section",
    "blockquote",
    "pre",
    "table",
    "tr",
    "td",
    "th",
    "ul",
    "ol",
    "dl",
    "figure",
    "figcaption",
    "caption",
    "br",
    "hr",
    "aside",
}
_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}
_SKIP_TAGS = {"pre", "script", "style", "table", "dt", "nav", "img"}
_SKIP_CLASSES = {
    "headerlink",
    "admonition-title",
    "toctree-wrapper",
    "linenos",
    "highlight",
    "sig",
    "footnote-reference",
    "fn-backref",
}


class _DocHTML(html.parser.HTMLParser):
    """Collect (kind, text) paragraphs from the main body of a Sphinx page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skip, is_body)
        self.buf: list[str] = []
        self.paras: list[tuple[str, str]] = []
        self.kind = "p"

    def _in_body(self) -> bool:
        return any(b for _, _, b in self.stack)

    def _skipping(self) -> bool:
        return any(s for _, s, _ in self.stack)

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        self.buf = []
        if text:
            self.paras.append((self.kind, text))
        self.kind = "p"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        is_body = tag == "div" and "body" in classes and a.get("role") == "main"
        skip = (
            tag in _SKIP_TAGS
            or bool(classes & _SKIP_CLASSES)
            or any(c.startswith("highlight-") for c in classes)
        )
        if tag in _BLOCK and self._in_body() and not self._skipping():
            self._flush()
            if tag in ("h1", "h2"):
                self.kind = "H"
            elif tag in ("h3", "h4", "h5", "h6"):
                self.kind = "h"
        if tag not in _VOID:
            self.stack.append((tag, skip, is_body))

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCK and self._in_body() and not self._skipping():
            self._flush()

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if tag in _BLOCK and self._in_body() and not self._skipping():
            self._flush()
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        if self._in_body() and not self._skipping():
            self.buf.append(data)


def _prose_para(text: str) -> bool:
    words = text.split()
    if len(words) < 4:
        return False
    if letter_ratio(text) < 0.7:
        return False
    # lines of pure API listing ("os.path.join(), os.path.split(), ...")
    if sum(("(" in w or "." in w[:-1] or "_" in w) for w in words) > 0.5 * len(words):
        return False
    return True


def pydoc_docs() -> list[str]:
    docs: list[str] = []
    files = sorted(p.relative_to(PYDOC_ROOT).as_posix() for p in PYDOC_ROOT.rglob("*.html"))
    for rel in files:
        if rel.startswith(("_", "genindex")) or PYDOC_EXCLUDE.match(rel):
            continue
        parser = _DocHTML()
        parser.feed((PYDOC_ROOT / rel).read_text(encoding="utf-8", errors="replace"))
        parser.close()
        parser._flush()
        sections: list[list[tuple[str, str]]] = [[]]
        for kind, text in parser.paras:
            if kind == "H":
                sections.append([])
            sections[-1].append((kind, text))
        for sec in sections:
            parts: list[str] = []
            pending_head: str | None = None
            n_prose = 0
            for kind, text in sec:
                if kind in ("H", "h"):
                    pending_head = text
                    continue
                if not _prose_para(text):
                    continue
                if pending_head:
                    parts.append(pending_head)
                    pending_head = None
                parts.append(text)
                n_prose += 1
            body = "\n\n".join(parts)
            if n_prose >= 2 and len(body) >= 300:
                docs.append(body)
    return docs


# --------------------------------------------------------------------------
# WordNet 3.0 glosses (wordnet-base)

WN_ROOT = Path("/usr/share/wordnet")
# lexnames(5WN): lexicographer file number -> name
WN_LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]


def _split_gloss(gloss: str) -> tuple[list[str], list[str]]:
    """Split a WordNet gloss into definitions and quoted examples."""
    defs, exs = [], []
    for part in re.split(r';\s*(?=(?:[^"]*"[^"]*")*[^"]*$)', gloss):
        part = part.strip()
        if not part:
            continue
        if part.startswith('"'):
            exs.extend(m.strip() for m in re.findall(r'"([^"]+)"', part) if m.strip())
        else:
            defs.append(part)
    return defs, exs


def wordnet_docs() -> list[str]:
    by_lex: dict[int, list[str]] = {}
    for pos in ("adj", "adv", "noun", "verb"):
        with open(WN_ROOT / f"data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                lex = int(fields[1])
                n = int(fields[3], 16)
                words = []
                for i in range(n):
                    w = fields[4 + 2 * i]
                    w = re.sub(r"\((a|p|ip)\)$", "", w).replace("_", " ")
                    if w not in words:
                        words.append(w)
                defs, exs = _split_gloss(squash(gloss))
                if not defs or not exs:
                    continue  # keep only synsets with a usage example
                entry = ", ".join(words) + ": " + "; ".join(defs)
                entry += "" if entry.endswith((".", "!", "?")) else "."
                entry += " For example: " + "; ".join(f"\u201c{e}\u201d" for e in exs) + "."
                by_lex.setdefault(lex, []).append(entry)
    docs = []
    for lex in sorted(by_lex):
        # one document = a run of consecutive entries from one topic file
        docs.extend(pack(by_lex[lex], sep="\n"))
    return docs


# --------------------------------------------------------------------------
# The Jargon File (jargon-text)

_BOX = re.compile(r"[\u2500-\u257f]")


def _jargon_para(block: list[str]) -> str | None:
    text = "\n".join(block)
    if _BOX.search(text):
        return None  # tables and framed figures
    stripped = [row.strip() for row in block]
    if any(re.search(r"\S {3,}\S", row) for row in stripped):
        return None  # ASCII art, aligned tables
    if letter_ratio(text) < 0.72:
        return None  # code and other non-prose
    para = reflow(block, min_wrapped=50)
    para = re.sub(r"\{([^{}]*)\}", r"\1", para)  # {cross-reference} -> cross-reference
    return para


def jargon_docs() -> list[str]:
    with gzip.open("/usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().replace("\u00a0", " ").splitlines()
    entry_re = re.compile(r"^   :(.+?):(?:\s+(.*))?$")
    # Skip the front matter and the first (full) table of contents.
    start = next(i for i, row in enumerate(lines) if row.startswith("Chapter 1."))
    headings: set[str] = {"Table of Contents", "Glossary"}
    for row in lines:
        if row and not row[0].isspace() and not _BOX.search(row):
            headings.add(row.strip())
        m = entry_re.match(row)
        if m:
            headings.add(m.group(1))
    # Walk the text: a section starts at an unindented heading, a lexicon
    # entry at "   :word: ...", and the per-letter tables of contents start
    # at a two-space-indented letter.
    units: list[tuple[str, str, list[str]]] = []  # (kind, title, lines)
    cur: tuple[str, str, list[str]] | None = None
    for row in lines[start:]:
        m = entry_re.match(row)
        if m:
            cur = ("entry", m.group(1) + "\t" + (m.group(2) or ""), [])
            units.append(cur)
        elif row and not row[0].isspace() and not _BOX.search(row):
            cur = ("section", row.strip(), [])
            units.append(cur)
        elif re.match(r"^  \S", row):
            cur = None  # letter index
        elif cur is not None:
            cur[2].append(row)
    entries_by_letter: list[tuple[str, list[str]]] = []
    docs: list[str] = []
    for kind, title, body in units:
        paras = []
        for b in blocks(body):
            if len(b) == 1 and b[0].strip() in headings:
                continue  # table-of-contents line
            p = _jargon_para(b)
            if p:
                paras.append(p)
        if not paras:
            continue
        if kind == "entry":
            # drop the pronunciation(s): "ABEND: /a´bend/, /@·bend´/, n." -> "ABEND: n."
            word, rest = title.split("\t")
            rest = re.sub(r"/[^/\s][^/]*/,?\s*", "", rest)
            rest = re.sub(r",?\s*//", "", rest).strip().rstrip(",")
            head = f"{word}: {rest}" if rest else word
            letter = word[0].upper() if word[0].isalpha() else "#"
            entry = head + "\n" + "\n".join(paras)
            if not entries_by_letter or entries_by_letter[-1][0] != letter:
                entries_by_letter.append((letter, []))
            entries_by_letter[-1][1].append(entry)
        else:
            body_text = "\n\n".join(paras)
            if len(body_text) >= 300:
                docs.append(title + "\n\n" + body_text)
    for _letter, entries in entries_by_letter:
        docs.extend(pack(entries))
    return docs


# --------------------------------------------------------------------------
# The Devil's Dictionary (dict-devil)


def _devil_text(raw: str) -> str:
    raw = re.sub(r"_([^_]+)_", r"\1", raw)  # _italics_
    raw = re.sub(r"\{([^{}]+)\}", r"\1", raw)  # {CROSS-REFERENCE} added by dictfmt
    paras = []
    for b in blocks(raw.splitlines()):
        # an attribution line ("      Jamrach Holobom") closes a quotation
        tail = None
        if len(b) > 1 and len(b[-1]) - len(b[-1].lstrip()) >= 24:
            tail = "\u2014 " + b[-1].strip()
            b = b[:-1]
        p = reflow(b)
        if p:
            paras.append(p)
        if tail:
            paras.append(tail)
    return "\n\n".join(paras)


def devil_docs() -> list[str]:
    with gzip.open("/usr/share/dictd/devil.dict.dz", "rb") as f:
        data = f.read()
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def dec(s: str) -> int:
        v = 0
        for c in s:
            v = v * 64 + b64.index(c)
        return v

    spans: dict[int, tuple[int, str]] = {}
    with open("/usr/share/dictd/devil.index", encoding="utf-8") as f:
        for line in f:
            word, off, ln = line.rstrip("\n").split("\t")[:3]
            if word.startswith("00database") and word != "00databaseinfo":
                continue
            spans.setdefault(dec(off), (dec(ln), word))
    docs: list[str] = []
    groups: list[tuple[str, list[str]]] = []
    for off in sorted(spans):
        ln, word = spans[off]
        raw = data[off : off + ln].decode("utf-8", errors="replace")
        if word == "00databaseinfo":
            i = raw.find("PREFACE")
            if i >= 0:
                docs.append("The Devil's Dictionary: Preface\n\n" + _devil_text(raw[i + 7 :]))
            continue
        text = _devil_text(raw)
        if not text:
            continue
        letter = text[0].upper()
        if not groups or groups[-1][0] != letter:
            groups.append((letter, []))
        groups[-1][1].append(text)
    for _letter, entries in groups:
        docs.extend(pack(entries))
    return docs


# --------------------------------------------------------------------------

SOURCES = {
    "kjv": ("bible-kjv-text", kjv_docs),
    "pydoc": ("python3.11-doc", pydoc_docs),
    "wordnet": ("wordnet-base", wordnet_docs),
    "jargon": ("jargon-text", jargon_docs),
    "devil": ("dict-devil", devil_docs),
}


def clean(text: str) -> str:
    text = text.replace("\r", "")
    text = "\n".join(row.rstrip() for row in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def subsample(docs: list[str], budget: int | None, seed: int) -> list[str]:
    """Keep a seeded random subset of docs (in original order) within budget chars."""
    if budget is None or sum(map(len, docs)) <= budget:
        return docs
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    keep, total = set(), 0
    for i in idx:
        if total + len(docs[i]) > budget:
            continue
        keep.add(i)
        total += len(docs[i])
    return [d for i, d in enumerate(docs) if i in keep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    check_inputs()

    row = "{:8} {:16} {:18} {:>6} {:>10} {:>9} {:>9} {:>11}"
    print(row.format("source", "package", "version", "docs", "chars", "words", "~tokens", "(of chars)"))
    records: list[dict[str, str]] = []
    for k, (name, (pkg, fn)) in enumerate(SOURCES.items()):
        docs = [clean(d) for d in fn()]
        docs = [d for d in docs if d]
        raw_chars = sum(map(len, docs))
        docs = subsample(docs, BUDGETS[name], SEED + k)
        chars = sum(map(len, docs))
        words = sum(len(d.split()) for d in docs)
        print(row.format(name, pkg, pkg_version(pkg), len(docs), chars, words, round(chars / 4.2), raw_chars))
        records.extend({"text": d, "source": name} for d in docs)
    random.Random(SEED).shuffle(records)

    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(payload)
    tmp.replace(args.out)
    chars = sum(len(r["text"]) for r in records)
    words = sum(len(r["text"].split()) for r in records)
    print(row.format("total", "", "", len(records), chars, words, round(chars / 4.2), ""))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
