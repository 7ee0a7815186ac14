#!/usr/bin/env python
"""Build dllmq's offline Wikipedia corpus from the dump that gensim ships as test data.

Run once by a developer; the output is committed under src/dllmq/data/wiki/:

    python scripts/extract_wiki.py                      # pip-downloads the pinned gensim wheel
    python scripts/extract_wiki.py --wheel gensim-4.4.0-....whl

Needs `mwparserfromhell` (pip install mwparserfromhell). gensim itself is never imported (it pulls
scipy): its wheel is only opened as a zip to read
`gensim/test/test_data/enwiki-*-shortened.bz2`, a MediaWiki XML dump of about 200 pages.

What it does: keeps the main-namespace articles that are not redirects, strips the wiki markup to
plain prose (templates, tables, references, comments, files, categories, math, galleries and the
reference/link sections are dropped; links become their text; headings become plain lines;
list markers are removed), splits the articles with a fixed seed into `train` (calibration) and
`heldout` (perplexity evaluation only) and writes one gzip file per split plus ATTRIBUTION.md.

Output format: UTF-8; one article per block, a block being the title line followed by the
article's lines (paragraphs, headings, list items; no blank lines inside); blocks separated by
one blank line. The output bytes depend only on the wheel's dump, the seed and the fraction.
"""
from __future__ import annotations

import argparse
import bz2
import fnmatch
import gzip
import html
import importlib.util
import io
import random
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

GENSIM_VERSION = "4.4.0"
DUMP_GLOB = "gensim/test/test_data/enwiki-*-shortened.bz2"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "dllmq" / "data" / "wiki"

# Sections whose content is citations, link lists or navigation rather than prose.
DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "citations", "footnotes", "notes and references", "references and notes", "works cited",
    "general references", "external link", "reference", "related articles", "notes and citations",
    "primary sources", "secondary sources", "cited sources", "literature",
}
# Tags whose content is not running prose.
DROP_TAGS = {"ref", "references", "math", "gallery", "table", "timeline", "score", "graph", "chem", "ce",
             "imagemap", "syntaxhighlight", "source", "hiero", "templatedata", "mapframe", "hr", "noinclude",
             "includeonly", "nowiki-disabled"}
DROP_LINK_PREFIXES = {"file", "image", "media", "category"}
INTERWIKI_PREFIXES = {"wikt", "wiktionary", "w", "wikipedia", "wp", "s", "wikisource", "q", "wikiquote",
                      "b", "wikibooks", "n", "wikinews", "v", "wikiversity", "commons", "meta", "species"}
HEADING = "\x00H"  # marks a heading line until empty sections are removed


@dataclass
class Article:
    page_id: int
    revision_id: int
    title: str
    text: str
    timestamp: str  # of the revision, ISO 8601


# ----------------------------------------------------------------------------------------- reading

def download_wheel(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"gensim=={version}", "--no-deps", "--only-binary=:all:",
           "-d", str(dest)]
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("gensim-*.whl"))
    if not wheels:
        sys.exit("pip download produced no gensim wheel")
    return wheels[0]


def read_dump(wheel: Path) -> tuple[bytes, str, str]:
    """(the XML bytes, the dump's path inside the wheel, the gensim version from the wheel metadata)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if fnmatch.fnmatch(n, DUMP_GLOB)]
        if len(names) != 1:
            sys.exit(f"{wheel} holds {len(names)} files matching {DUMP_GLOB}; expected exactly one")
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        version = re.search(r"^Version:\s*(\S+)", zf.read(meta).decode(), re.M).group(1)
        return bz2.decompress(zf.read(names[0])), names[0], version


def iter_pages(xml_bytes: bytes):
    """(page id, revision id, timestamp, title, namespace, is_redirect, wikitext) for every page of the dump."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        revision = {c.tag.rsplit("}", 1)[-1]: c for c in fields["revision"]}
        yield (int(fields["id"].text), int(revision["id"].text), revision["timestamp"].text, fields["title"].text,
               int(fields["ns"].text),
               "redirect" in fields, revision["text"].text or "")
        elem.clear()


# ------------------------------------------------------------------------------- markup removal

def _positional(template) -> list[str]:
    return [_render(p.value).strip() for p in template.params if not p.showkey]


def _template(template) -> str:
    """The prose a few common inline templates stand for; every other template is dropped."""
    name = str(template.name).strip().lower().replace("_", " ")
    args = _positional(template)
    if name in {"convert", "cvt"} and args:
        if len(args) >= 4 and args[1] in {"to", "-", "–", "and", "or", "x", "by"}:
            return f"{args[0]} {args[1]} {args[2]} {args[3]}"
        return f"{args[0]} {args[1]}" if len(args) > 1 else args[0]
    if name in {"lang", "transl", "transliteration"} and args:
        return args[-1]
    if name.startswith("lang-") and args:
        return args[0]
    if name in {"nowrap", "small", "smaller", "big", "nts", "vanchor", "nihongo", "ipa", "sic", "mvar",
                "math", "em", "strong", "keypress", "abbr", "section link", "visible anchor"} and args:
        return args[0]
    if name == "respell" and args:
        return "-".join(args)
    if name == "as of" and args:
        return "As of " + " ".join(args[:3])
    if name == "angbr" and args:
        return f"⟨{args[0]}⟩"
    if name in {"·", "dot", "middot"}:
        return " · "
    if name in {"ndash", "snd"}:
        return " – "
    if name == "mdash":
        return " — "
    if name == "'":
        return "'"
    if name in {"quote", "blockquote", "cquote", "quotation"} and args:
        return "\n" + args[0] + "\n"
    if name in {"hlist", "flatlist", "plainlist"} and args:
        return ", ".join(a for a in args if a)
    return ""


def _link(link) -> str:
    title = str(link.title).strip()
    prefix = title.split(":", 1)[0].strip() if ":" in title else ""
    if prefix.lower() in DROP_LINK_PREFIXES:
        return ""
    if link.text is not None:
        return _render(link.text)
    if title.startswith(":"):
        title = title[1:]
        prefix = title.split(":", 1)[0].strip() if ":" in title else ""
    if prefix.lower() in INTERWIKI_PREFIXES:
        title = title.split(":", 1)[1]
    elif re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", prefix):  # interlanguage link, e.g. [[de:Anarchismus]]
        return ""
    if title.startswith("#"):
        return title[1:]
    return title.split("#", 1)[0]


def _render(code) -> str:
    import mwparserfromhell.nodes as n

    out = []
    for node in code.nodes:
        if isinstance(node, n.Text):
            out.append(str(node.value))
        elif isinstance(node, n.Wikilink):
            out.append(_link(node))
        elif isinstance(node, n.ExternalLink):
            if node.title is not None:
                out.append(_render(node.title))
        elif isinstance(node, n.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, n.Template):
            out.append(_template(node))
        elif isinstance(node, n.Heading):
            out.append(f"\n{HEADING}{node.level} {_render(node.title).strip()}\n")
        elif isinstance(node, n.Tag):
            tag = str(node.tag).strip().lower()
            markup = node.wiki_markup
            if tag in DROP_TAGS or (markup or "").startswith("{|"):
                continue
            if tag == "br":
                out.append("\n")
            elif tag in {"li", "dt", "dd"} and markup:  # list markers: drop, keep the item's text
                if markup == ":" and out and not out[-1].endswith("\n"):
                    out.append(": ")  # '; term : definition' stays on one line
            elif node.contents is not None:
                text = _render(node.contents)
                out.append(f"\n{text}\n" if tag in {"blockquote", "poem", "div", "center", "p"} else text)
        # Comment, Argument and anything unknown: dropped
    return "".join(out)


def _clean_line(line: str) -> str:
    line = line.replace("\xa0", " ").replace("\u200b", "").replace("\t", " ")
    line = re.sub(r"__[A-Z]+__", "", line)
    line = re.sub(r"'{2,}", "", line)  # unbalanced bold / italic quotes the parser left as text
    line = re.sub(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}", "", line)  # stray brackets of broken markup
    line = re.sub(r"</?[A-Za-z][^<>\n]{0,200}>", "", line)  # stray HTML tags
    line = re.sub(r" {2,}", " ", line).strip()
    for _ in range(3):  # parentheses emptied by removed templates: "(; Greek: x)" -> "(Greek: x)"
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)
        line = re.sub(r"\s*[,;:]\s*\)", ")", line)
        line = re.sub(r"\(\s*\)", "", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    line = re.sub(r"\(\s+", "(", line)
    line = re.sub(r" {2,}", " ", line).strip()
    if line.startswith(("*", "#", ";", ":")) and not line.startswith(HEADING):
        line = line.lstrip("*#;: ")
    return line


def _drop_table_rows(lines: list[str]) -> list[str]:
    """Tables the parser could not recognise (malformed attributes) come through as text: drop
    everything from '{|' to the matching '|}', and any other line in table-row syntax."""
    kept, depth = [], 0
    for line in lines:
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        elif depth and s.startswith("|}"):
            depth -= 1
        elif not depth and not s.startswith(("|", "!")):
            kept.append(line)
    return kept


def wikitext_to_prose(wikitext: str) -> str:
    """Plain prose lines (no blank lines) of one article's wikitext."""
    import mwparserfromhell

    # Bold and italic quotes are left as text (and removed later): unbalanced ones would otherwise
    # make the parser give up on the reference or link around them.
    code = mwparserfromhell.parse(wikitext, skip_style_tags=True)
    lines = [_clean_line(line) for line in _drop_table_rows(html.unescape(_render(code)).split("\n"))]
    lines = [line for line in lines if re.search(r"\w", line)]
    # Drop reference/link sections (with their subsections), then headings left without content.
    kept, skip_level = [], None
    for line in lines:
        if line.startswith(HEADING):
            level = int(line[len(HEADING)])
            if skip_level is not None and level > skip_level:
                continue
            title = line[len(HEADING) + 2:].strip()
            skip_level = level if title.lower().strip(" :") in DROP_SECTIONS else None
            if skip_level is None:
                kept.append(line)
        elif skip_level is None:
            kept.append(line)
    result = []
    for i, line in enumerate(kept):
        if line.startswith(HEADING):
            later = kept[i + 1:]
            nxt = next((j for j, x in enumerate(later) if not x.startswith(HEADING)
                        or int(x[len(HEADING)]) <= int(line[len(HEADING)])), None)
            if nxt is None or later[nxt].startswith(HEADING):
                continue  # no prose before the next heading of the same or a higher level
            line = line[len(HEADING) + 2:].strip()
        result.append(line)
    return "\n".join(result)


def extract_articles(xml_bytes: bytes) -> list[Article]:
    articles = []
    for page_id, rev_id, timestamp, title, ns, redirect, wikitext in iter_pages(xml_bytes):
        if ns != 0 or redirect or wikitext.lstrip().upper().startswith("#REDIRECT"):
            continue
        prose = wikitext_to_prose(wikitext)
        if prose:
            articles.append(Article(page_id, rev_id, title.strip(), prose, timestamp))
    articles.sort(key=lambda a: a.page_id)
    return articles


# ----------------------------------------------------------------------------------------- writing

def split_articles(articles: list[Article], seed: int, heldout_fraction: float) -> tuple[list[Article], list[Article]]:
    n_heldout = max(1, round(len(articles) * heldout_fraction))
    heldout_ids = set(random.Random(seed).sample(range(len(articles)), n_heldout))
    train = [a for i, a in enumerate(articles) if i not in heldout_ids]
    heldout = [a for i, a in enumerate(articles) if i in heldout_ids]
    return train, heldout


def render_split(articles: list[Article]) -> str:
    return "\n\n".join(f"{a.title}\n{a.text}" for a in articles) + "\n"


def write_gzip(path: Path, text: str) -> None:
    """Deterministic gzip (no file name, mtime 0), written beside and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    tmp.replace(path)


def words(text: str) -> int:
    return len(text.split())


def attribution(train: list[Article], heldout: list[Article], dump_name: str, gensim_version: str,
                seed: int, fraction: float, counts: dict[str, int]) -> str:
    import mwparserfromhell

    parser_version = mwparserfromhell.__version__
    dates = sorted(a.timestamp[:10] for a in train + heldout)

    def rows(arts):
        return "\n".join(
            f"- {a.title} — https://en.wikipedia.org/w/index.php?oldid={a.revision_id} "
            f"(history: https://en.wikipedia.org/w/index.php?curid={a.page_id}&action=history)" for a in arts)

    return f"""# Offline Wikipedia text shipped with dllmq

`enwiki_train.txt.gz` (calibration) and `enwiki_heldout.txt.gz` (perplexity evaluation only, never
used for calibration) hold the text of {len(train) + len(heldout)} English Wikipedia articles.

## Source

- Wikipedia (https://en.wikipedia.org), article revisions dated {dates[0]} to {dates[-1]}, as
  contained in the test data of gensim {gensim_version} (https://pypi.org/project/gensim/{gensim_version}/),
  file `{dump_name}`
  of its wheel (a shortened MediaWiki XML dump).
- Authors: the Wikipedia contributors to each article; every article below links to the exact
  revision used and to its page history, which lists them.

## License

The text of these Wikipedia articles is licensed under the Creative Commons Attribution-ShareAlike
3.0 Unported license (CC BY-SA 3.0): https://creativecommons.org/licenses/by-sa/3.0/ (legal code:
https://creativecommons.org/licenses/by-sa/3.0/legalcode). That is the license under which these
revisions were contributed (all predate Wikipedia's 2023 move to CC BY-SA 4.0; they are also
available under the GNU Free Documentation License); see
https://en.wikipedia.org/wiki/Wikipedia:Copyrights. The two .txt.gz files are an adaptation of
that text and are distributed under the same license, CC BY-SA 3.0. This license covers only the
files in this directory, not the rest of dllmq (Apache-2.0).

## Changes made

The text was modified: wiki markup was removed (templates, tables, references, comments, HTML
tags, images, categories, math, galleries), links were replaced by their text, bold/italic quotes
and list markers removed, headings turned into plain lines, and the sections "References",
"External links", "See also", "Further reading", "Notes" (and similar) dropped. Redirect pages
were skipped. No words were otherwise changed.

## Format and split

UTF-8; articles separated by one blank line, each starting with its title line. Articles were
split with `random.Random({seed})` into {len(heldout)} held-out articles (fraction {fraction}) and
{len(train)} training articles; no article is in both.

| split | articles | words (whitespace-separated) |
|---|---|---|
| train | {len(train)} | {counts['train']} |
| heldout | {len(heldout)} | {counts['heldout']} |

## Regenerate

Extracted with mwparserfromhell {parser_version} (markup removal may differ slightly with other versions):

    pip install mwparserfromhell=={parser_version}
    python scripts/extract_wiki.py --gensim-version {gensim_version} --seed {seed} --heldout-fraction {fraction}

(`--wheel PATH` reads an already downloaded gensim wheel instead of running `pip download`.)

## Articles

### train

{rows(train)}

### heldout

{rows(heldout)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="a downloaded gensim wheel (default: pip download it)")
    parser.add_argument("--gensim-version", default=GENSIM_VERSION, help="gensim version to download")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("mwparserfromhell") is None:
        sys.exit("extract_wiki.py needs mwparserfromhell: pip install mwparserfromhell")

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(args.gensim_version, Path(tmp))
        xml_bytes, dump_name, gensim_version = read_dump(wheel)
    articles = extract_articles(xml_bytes)
    train, heldout = split_articles(articles, args.seed, args.heldout_fraction)
    texts = {"train": render_split(train), "heldout": render_split(heldout)}
    counts = {k: words(v) for k, v in texts.items()}

    args.out.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        write_gzip(args.out / f"enwiki_{split}.txt.gz", text)
    (args.out / "ATTRIBUTION.md").write_text(
        attribution(train, heldout, dump_name, gensim_version, args.seed, args.heldout_fraction, counts),
        encoding="utf-8")
    for split in texts:
        size = (args.out / f"enwiki_{split}.txt.gz").stat().st_size
        print(f"{split}: {len(train if split == 'train' else heldout)} articles, {counts[split]} words, "
              f"{size} bytes gzipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
