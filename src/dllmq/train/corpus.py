"""The training corpus of dllmq-tiny: offline, openly licensed, seeded, and disjoint from the mini benchmark.

Sources
- `wiki`: the shipped English Wikipedia train split (CC BY-SA 3.0, see dllmq/data/wiki/ATTRIBUTION.md).
  The mini benchmark's general items come only from the held-out split (other articles).
- `python`: source files of the Python standard library found on disk (PSF License 2.0).
- `math`: generated arithmetic and short word problems with their answers.
- `code`: generated small Python functions with docstrings and asserts.

Generated items are identified by a *key* (template + numbers); a fixed hash of the key decides
whether it belongs to the held-out benchmark space or to the training space, so no training item
can ever be a benchmark item, whatever the seed (`is_heldout`). Text items are plain strings.
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from dllmq.data.text import wiki_articles

# share (percent) of each generated key space reserved for the benchmark
HELDOUT_PERCENT = {"math": 10, "code": 35}


def is_heldout(key: str) -> bool:
    """Whether a generated item (by its key) belongs to the benchmark; fixed, seed independent."""
    digest = hashlib.sha256(f"dllmq-mini:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT[key.split("/", 1)[0]]


# ---------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------

NAMES = ("Tom", "Anna", "Sam", "Lena", "Omar", "Mia", "Ben", "Sara", "Ivan", "Lucy", "Ravi", "Nora", "Paul", "Emma",
         "Leo", "Zoe", "Kai", "Ada", "Max", "Eva")
THINGS = ("apples", "books", "coins", "pencils", "stamps", "cards", "marbles", "stickers", "eggs", "shells",
          "cookies", "flowers", "balls", "toys", "rocks", "candles")


@dataclass(frozen=True)
class MathItem:
    key: str
    question: str   # without "Question: " and without the answer
    answer: int

    @property
    def prompt(self) -> str:
        return f"Question: {self.question} Answer:"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def _math_item(kind: str, a: int, b: int, rng: random.Random) -> MathItem:
    key = f"math/{kind}/{a}/{b}"
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    if kind == "add":
        return MathItem(key, f"What is {a} + {b}?", a + b)
    if kind == "sub":
        return MathItem(key, f"What is {a} - {b}?", a - b)
    if kind == "add3":
        c = a % 7 + b % 5 + 1  # the third operand is a function of the key
        return MathItem(key, f"What is {a} + {b} + {c}?", a + b + c)
    if kind == "wadd":
        return MathItem(key, f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?",
                        a + b)
    if kind == "wsub":
        return MathItem(key, f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?", a - b)
    raise ValueError(kind)


MATH_KINDS = {  # kind -> (weight, operand sampler)
    "add": (3, lambda r: (r.randint(0, 99), r.randint(0, 99))),
    "sub": (2, lambda r: tuple(sorted((r.randint(0, 99), r.randint(0, 99)), reverse=True))),
    "add3": (1, lambda r: (r.randint(1, 40), r.randint(1, 40))),
    "wadd": (1, lambda r: (r.randint(1, 50), r.randint(1, 50))),
    "wsub": (1, lambda r: tuple(sorted((r.randint(1, 50), r.randint(1, 50)), reverse=True))),
}


def math_item(rng: random.Random, heldout: bool) -> MathItem:
    """A random math item from the training space (heldout=False) or the benchmark space."""
    kinds = list(MATH_KINDS)
    weights = [MATH_KINDS[k][0] for k in kinds]
    while True:
        kind = rng.choices(kinds, weights)[0]
        a, b = MATH_KINDS[kind][1](rng)
        item = _math_item(kind, a, b, rng)
        if is_heldout(item.key) == heldout:
            return item


# ---------------------------------------------------------------------------------------------
# code
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CodeItem:
    key: str
    name: str
    prompt: str         # signature + docstring, ending with a newline
    body: str           # the reference body ("    return ...\n")
    tests: tuple[str, ...]  # assert lines

    @property
    def text(self) -> str:
        return self.prompt + self.body + "\n" + "\n".join(self.tests) + "\n"


WORDS = ("apple", "banana", "cherry", "river", "stone", "garden", "planet", "yellow", "window", "silver",
         "forest", "rabbit", "pepper", "candle", "mirror", "button", "orange", "pillow", "rocket", "tomato")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _num_args(rng):  # a few test inputs for numeric functions
    return [0, 1, rng.randint(2, 20), rng.randint(21, 60), -rng.randint(1, 9)]


def _code_templates():
    """name -> (parameter values, builder(param, rng) -> (func name, arg, doc, body expr, test fn))."""
    numeric = {
        "add": (range(1, 100), lambda k: (f"add_{k}", f"Return {{a}} plus {k}.", f"{{a}} + {k}", lambda x: x + k)),
        "sub": (range(1, 100), lambda k: (f"subtract_{k}", f"Return {{a}} minus {k}.", f"{{a}} - {k}", lambda x: x - k)),
        "mul": (range(2, 50), lambda k: (f"times_{k}", f"Return {{a}} multiplied by {k}.", f"{{a}} * {k}",
                                         lambda x: x * k)),
        "gt": (range(0, 100), lambda k: (f"is_greater_than_{k}", f"Return True if {{a}} is greater than {k}.",
                                        f"{{a}} > {k}", lambda x: x > k)),
        "lt": (range(0, 100), lambda k: (f"is_less_than_{k}", f"Return True if {{a}} is less than {k}.",
                                        f"{{a}} < {k}", lambda x: x < k)),
        "div": (range(2, 13), lambda k: (f"is_multiple_of_{k}", f"Return True if {{a}} is divisible by {k}.",
                                         f"{{a}} % {k} == 0", lambda x: x % k == 0)),
        "min": (range(1, 100), lambda k: (f"at_most_{k}", f"Return {{a}}, but never more than {k}.",
                                         f"min({{a}}, {k})", lambda x: min(x, k))),
        "max": (range(1, 100), lambda k: (f"at_least_{k}", f"Return {{a}}, but never less than {k}.",
                                         f"max({{a}}, {k})", lambda x: max(x, k))),
    }
    lists = {
        "ladd": (range(1, 50), lambda k: (f"add_{k}_to_all", f"Return a new list with {k} added to every element of {{a}}.",
                                          f"[v + {k} for v in {{a}}]", lambda xs: [v + k for v in xs])),
        "lfirst": (range(1, 6), lambda k: (f"first_{k}", f"Return the first {k} elements of {{a}}.",
                                           f"{{a}}[:{k}]", lambda xs: xs[:k])),
        "lcount": (range(0, 50), lambda k: (f"count_above_{k}", f"Return how many elements of {{a}} are greater than {k}.",
                                            f"len([v for v in {{a}} if v > {k}])", lambda xs: len([v for v in xs if v > k]))),
    }
    strings = {
        "rep": (range(2, 10), lambda k: (f"repeat_{k}", f"Return the string {{a}} repeated {k} times.",
                                         f"{{a}} * {k}", lambda s: s * k)),
        "has": (LETTERS, lambda c: (f"contains_{c}", f"Return True if the string {{a}} contains the letter '{c}'.",
                                    f"'{c}' in {{a}}", lambda s: c in s)),
        "count": (LETTERS, lambda c: (f"count_{c}", f"Return the number of times the letter '{c}' occurs in {{a}}.",
                                      f"{{a}}.count('{c}')", lambda s: s.count(c))),
        "starts": (LETTERS, lambda c: (f"starts_with_{c}", f"Return True if the string {{a}} starts with '{c}'.",
                                       f"{{a}}.startswith('{c}')", lambda s: s.startswith(c))),
        "suffix": (WORDS, lambda w: (f"add_{w}", f"Return {{a}} followed by the word '{w}'.",
                                     f"{{a}} + '{w}'", lambda s: s + w)),
    }
    return numeric, lists, strings


ARG_NAMES = {"numeric": ("x", "n", "value", "num"), "lists": ("xs", "items", "values", "numbers"),
             "strings": ("s", "text", "word", "name")}


@functools.lru_cache(maxsize=None)
def code_space() -> list[tuple[str, str, object]]:
    """Every (group, template, parameter) of the code key space, in a fixed order."""
    out = []
    for group, templates in zip(("numeric", "lists", "strings"), _code_templates()):
        for template, (params, _) in templates.items():
            out.extend((group, template, p) for p in params)
    return out


def _code_item(group: str, template: str, param, rng: random.Random) -> CodeItem:
    builders = dict(zip(("numeric", "lists", "strings"), _code_templates()))[group]
    fname, doc, expr, fn = builders[template][1](param)
    arg = rng.choice(ARG_NAMES[group])
    if group == "numeric":
        inputs = _num_args(rng)
    elif group == "lists":
        inputs = [[rng.randint(0, 40) for _ in range(rng.randint(0, 6))] for _ in range(4)]
    else:
        inputs = [rng.choice(WORDS), rng.choice(WORDS) + rng.choice(WORDS), "", rng.choice(LETTERS) * 2]
    prompt = f"def {fname}({arg}):\n    \"\"\"{doc.format(a=arg)}\"\"\"\n"
    body = f"    return {expr.format(a=arg)}\n"
    tests = tuple(f"assert {fname}({v!r}) == {fn(v)!r}" for v in inputs)
    return CodeItem(f"code/{template}/{param}", fname, prompt, body, tests)


def code_item(rng: random.Random, heldout: bool) -> CodeItem:
    space = code_space()
    while True:
        group, template, param = space[rng.randrange(len(space))]
        if is_heldout(f"code/{template}/{param}") == heldout:
            return _code_item(group, template, param, rng)


# ---------------------------------------------------------------------------------------------
# text sources
# ---------------------------------------------------------------------------------------------

def wiki_documents(split: str = "train") -> list[str]:

    return [f"{title}\n{body}" for title, body in wiki_articles(split)]


STDLIB_MODULES = ("textwrap", "string", "bisect", "heapq", "fractions", "statistics", "colorsys", "calendar",
                  "functools", "collections/__init__", "json/encoder", "json/decoder", "shlex", "difflib",
                  "glob", "fnmatch", "copy", "random", "base64", "csv", "pprint", "graphlib", "enum", "operator",
                  "keyword", "numbers", "queue", "sched", "secrets", "uu", "quopri", "netrc", "locale",
                  "ipaddress", "datetime", "dataclasses", "contextlib", "abc", "reprlib", "ntpath", "posixpath",
                  "tokenize", "token", "linecache", "weakref", "zipapp", "tabnanny", "cmd", "code", "codeop")


def python_documents(max_chars: int = 1_500_000) -> list[str]:
    """Standard-library source files on disk (PSF License), cut at function/class boundaries."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for module in STDLIB_MODULES:
        path = root / f"{module}.py"
        if not path.is_file():
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"\n(?=def |class )", source):
            chunk = chunk.strip("\n")
            if 80 <= len(chunk) <= 6000:
                docs.append(chunk + "\n")
                total += len(chunk)
        if total >= max_chars:
            break
    return docs


def python_sources_note() -> str:
    return f"Python {sys.version_info.major}.{sys.version_info.minor} standard library: " + ", ".join(
        m.replace("/__init__", "") for m in STDLIB_MODULES)


# ---------------------------------------------------------------------------------------------
# general (cloze) items from Wikipedia text
# ---------------------------------------------------------------------------------------------

STOPWORDS = set("""about above after again against also although among another because been before being below
between both could does doing down during each either from further have having here itself just more most other
over same should some such than that their theirs them then there these they this those through under until very
were what when where which while whom with would your into only many much onto upon within without later first""".split())

_WORD = re.compile(r"[A-Za-z]{4,}")


def cloze_candidates(text: str) -> list[tuple[int, str]]:
    """(char offset, word) of content words that also occur earlier in `text` (LAMBADA-style targets)."""
    seen: set[str] = set()
    out = []
    for m in _WORD.finditer(text):
        w = m.group(0)
        if w.lower() in STOPWORDS:
            continue
        if w in seen and m.start() > 200:
            out.append((m.start(), w))
        seen.add(w)
    return out


def _windows(doc: str, chars: int, rng: random.Random) -> str:
    if len(doc) <= chars:
        return doc
    start = rng.randrange(len(doc) - chars)
    start = doc.rfind(" ", 0, start) + 1
    return doc[start:start + chars]


def general_item(docs: list[str], rng: random.Random, context_chars: int = 360) -> dict | None:
    """A cloze item: a passage cut before a word that occurred earlier in it, and four choices."""
    i = rng.randrange(len(docs))
    title = docs[i].split("\n", 1)[0]
    passage = _windows(docs[i], context_chars + 120, rng)
    cands = [(o, w) for o, w in cloze_candidates(passage) if o >= context_chars // 2]
    if not cands:
        return None
    offset, word = rng.choice(cands)
    context = passage[:offset].rstrip()
    if not context or context[-1] not in " ,.;:" and not context[-1].isalpha():
        pass
    others = [d for j, d in enumerate(docs) if j != i]
    distractors: list[str] = []
    tries = 0
    while len(distractors) < 3 and tries < 400:
        tries += 1
        w = rng.choice(_WORD.findall(rng.choice(others)))
        if (w.lower() in STOPWORDS or w in distractors or w.lower() == word.lower() or w in passage
                or abs(len(w) - len(word)) > 2 or w[0].isupper() != word[0].isupper()):
            continue
        distractors.append(w)
    if len(distractors) < 3:
        return None
    choices = distractors + [word]
    rng.shuffle(choices)
    return {"context": f"{title}\n{context}", "choices": [" " + c for c in choices], "label": choices.index(word)}
