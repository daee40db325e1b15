"""Mixed-domain calibration text and held-out evaluation domains, built at run time from text
every Debian machine with Python has.

Why: calibrating and evaluating on one text (the Python docs) hid overfitting. The 3-bit and
2-bit schemes looked fine there and fell apart on prose of another kind (issue 22). So the
calibration set mixes several domains and the evaluation uses *other* domains, none of whose
text (nor any text of its kind) reaches calibration, and reports each domain on its own.

Domains (each a list of documents; a document is one file or one module's docstrings):

================  ============  ===============================================================
name              role          source
================  ============  ===============================================================
python-docs       calibration   ``pydoc_data.topics`` (the language reference, in CPython)
docstrings        calibration   docstrings of the standard library's modules (``ast`` of the
                                ``.py`` files under ``sysconfig``'s stdlib path, tests skipped)
changelogs        calibration   ``/usr/share/doc/*/changelog*`` (Debian and upstream changelogs)
licenses          held out      ``/usr/share/common-licenses/*`` (legal prose; in base-files,
                                so present even in slim images)
man-pages         held out      ``/usr/share/man/man[1-8]/*`` rendered to plain text here
                                (roff macros stripped; absent in minimal images)
readmes           held out      ``/usr/share/doc/*/README*`` (project prose, install notes)
================  ============  ===============================================================

Recipe (fixed; ``seed`` 22 by default): each domain's documents are listed in sorted path
order, shuffled with ``random.Random(f"{seed}:{domain}")``, each cut to its first
``DOC_CHARS`` characters (so no one long file dominates a domain), and joined by blank lines
until ``DOMAIN_CHARS`` characters. The domain's tokens are then sliced: calibration domains give
``calib`` tokens (Hessians) and, disjoint after them, ``sens`` tokens (held out from the
Hessians: sensitivity probes and mixed-precision scoring); held-out domains give ``eval``
tokens. A domain with fewer tokens than it must give is left out and the recipe says so
(``MixedText.notes``); the report prints what was used. Calibration ids of several domains are
concatenated in domain order, every domain's share a whole number of windows so no window
straddles two domains.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field

SEED = 22
DOC_CHARS = 6000
DOMAIN_CHARS = 240_000
CALIBRATION_DOMAINS = ("python-docs", "docstrings", "changelogs")
HELDOUT_DOMAINS = ("licenses", "man-pages", "readmes")


# ------------------------------------------------------------------ document sources


def _read(path: str) -> str:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read(4 * DOC_CHARS)
        else:
            with open(path, "rb") as f:
                raw = f.read(4 * DOC_CHARS)
    except (OSError, EOFError):
        return ""
    text = raw.decode("utf-8", errors="replace")
    # binary files slip into doc folders (images, compressed archives): drop them
    if text.count("\ufffd") > len(text) // 100 or "\x00" in text:
        return ""
    return text


def _python_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _docstrings() -> list[str]:
    """Paths of the stdlib's modules (parsed lazily: only the documents the recipe picks)."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    return sorted(p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                  if "/test" not in p[len(root):] and "site-packages" not in p)


def _module_docstrings(path: str) -> str:
    import ast

    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(2_000_000))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and len(d) > 40:
                parts.append(d)
    return "\n\n".join(parts)


def _files(patterns) -> list[str]:
    out = set()
    for pat in patterns:
        out.update(p for p in glob.glob(pat) if os.path.isfile(p))
    return sorted(out)


def _one_per_family(paths: list[str]) -> list[str]:
    """The first page (in path order) of each command family: one SDK can install thousands of
    near-identical pages (``gcloud_alpha_...``) that would otherwise fill the domain."""
    seen, out = set(), []
    for p in paths:
        fam = re.split(r"[_.\-]", os.path.basename(p), maxsplit=1)[0]
        if fam not in seen:
            seen.add(fam)
            out.append(p)
    return out


_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ROFF_NAMED = {r"\(em": "—", r"\(en": "–", r"\(bu": "•", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"',
               r"\(rq": '"', r"\(co": "©", r"\(oq": "'", r"\(cq": "'"}
_ROFF_ESC = re.compile(r"\\(\(..|\[[^\]]*\]|\*\(..|\*.|s[-+]?\d|[&|^%:c])")
_PARA = {"PP", "P", "LP", "TP", "IP", "sp", "br", "Pp", "Sh", "SH", "SS", "Ss", "Bl", "El", "It", "RS", "RE", "nf", "fi", "Bd", "Ed"}


def render_man(text: str) -> str:
    """Plain text of a roff/mdoc man page: macro lines keep their arguments, font switches and
    escapes go, paragraph macros become blank lines. Not a typesetter: enough for text whose
    words, not layout, are what a language model is scored on."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            macro = macro.strip()
            if macro in _PARA:
                out.append("")
            if macro in ("TH", "Dd", "Dt", "Os", "so", "de", "ds", "nr", "ad", "na", "hy", "nh", "ie", "el", "if", "ft", "in", "ti", "ll", "ta"):
                continue
            line = rest.replace('"', "")
        for k, v in _ROFF_NAMED.items():
            line = line.replace(k, v)
        line = _ROFF_FONT.sub("", line).replace(r"\-", "-").replace(r"\e", "\\").replace(r"\ ", " ")
        line = _ROFF_ESC.sub("", line)
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@dataclass(frozen=True)
class Domain:
    name: str
    documents: object  # () -> list of texts or paths
    render: object = None  # path -> text (None: documents are texts, or plain files)


DOMAINS = {
    "python-docs": Domain("python-docs", _python_docs),
    "docstrings": Domain("docstrings", _docstrings, _module_docstrings),
    "changelogs": Domain("changelogs", lambda: _files(["/usr/share/doc/*/changelog*", "/usr/share/doc/*/CHANGES*", "/usr/share/doc/*/NEWS*"])),
    "licenses": Domain("licenses", lambda: _files(["/usr/share/common-licenses/*"])),
    "man-pages": Domain("man-pages", lambda: _one_per_family(_files([f"/usr/share/man/man{i}/*" for i in range(1, 9)])),
                        lambda p: render_man(_read(p))),
    "readmes": Domain("readmes", lambda: _files(["/usr/share/doc/*/README*"])),
}


def domain_text(name: str, seed: int = SEED, chars: int = DOMAIN_CHARS) -> tuple[str, int]:
    """(text, documents used) of one domain by the fixed recipe."""
    d = DOMAINS[name]
    docs = list(d.documents())
    random.Random(f"{seed}:{name}").shuffle(docs)
    parts, total = [], 0
    for doc in docs:
        if d.render is not None:
            t = d.render(doc)
        else:
            t = doc if name == "python-docs" else _read(doc)
        t = t.strip()[:DOC_CHARS]
        if len(t) < 200:
            continue
        parts.append(t)
        total += len(t) + 2
        if total >= chars:
            break
    return "\n\n".join(parts), len(parts)


# ------------------------------------------------------------------ the token sets


@dataclass
class MixedText:
    """Token ids of the calibration mix, its held-out sensitivity slice, and each held-out
    evaluation domain, with what the recipe used."""

    calib: dict = field(default_factory=dict)  # domain -> ids (Hessians)
    sens: dict = field(default_factory=dict)  # calibration domain -> ids disjoint from calib
    eval: dict = field(default_factory=dict)  # held-out domain -> ids
    notes: list = field(default_factory=list)  # what was used or left out, and why
    seed: int = SEED

    @property
    def calib_ids(self) -> list[int]:
        return [t for d in self.calib for t in self.calib[d]]

    @property
    def sens_ids(self) -> list[int]:
        return [t for d in self.sens for t in self.sens[d]]

    def save(self, path: str) -> None:
        """The token ids and notes as JSON: another machine (other docs installed, another
        Python) evaluates on exactly these tokens with ``load``."""
        with open(path, "w") as f:
            json.dump({"seed": self.seed, "calib": self.calib, "sens": self.sens, "eval": self.eval, "notes": self.notes}, f)

    @staticmethod
    def load(path: str) -> "MixedText":
        try:
            with open(path) as f:
                d = json.load(f)
            m = MixedText(calib=d["calib"], sens=d["sens"], eval=d["eval"], notes=list(d["notes"]), seed=int(d["seed"]))
            for part in (m.calib, m.sens, m.eval):
                for name, ids in part.items():
                    if not all(isinstance(t, int) and t >= 0 for t in ids):
                        raise ValueError(f"{name}: token ids must be non-negative integers")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read calibration texts from {path}: {exc}") from None
        m.notes.append(f"token ids loaded from {path}")
        return m

    def describe(self) -> str:
        cal = ", ".join(f"{d} {len(v)}" for d, v in self.calib.items())
        ev = ", ".join(f"{d} {len(v)}" for d, v in self.eval.items())
        return f"calibration (seed {self.seed}): {cal} tokens; held-out evaluation: {ev} tokens" + \
            "".join(f"\n  note: {n}" for n in self.notes)


def build(tokenizer, *, calib_tokens: int = 6144, sens_tokens: int = 768, eval_tokens: int = 2048,
          window: int = 512, seed: int = SEED, calibration=CALIBRATION_DOMAINS, heldout=HELDOUT_DOMAINS,
          cache_dir: str | None = None, selection: tuple[int, int] | None = None) -> MixedText:
    """The calibration mix and the held-out domains as token ids. ``calib_tokens`` and
    ``sens_tokens`` are totals split evenly across the calibration domains (each domain's
    calibration share rounded down to whole windows); ``eval_tokens`` is per held-out domain.

    ``selection=(start, n)`` evaluates instead on each calibration domain's tokens
    [start, start + n), named ``sel:DOMAIN``: text of the calibration domains in no Hessian and
    no sensitivity score, where choices between schemes are made (the held-out domains are
    then not built, so nothing chosen there has seen them). One ``start`` past the largest
    calibration size compared gives every candidate the same selection tokens."""
    overlap = set(calibration) & set(heldout)
    if overlap:
        raise ValueError(f"domains both calibrated on and held out: {sorted(overlap)}")
    unknown = (set(calibration) | set(heldout)) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown domains {sorted(unknown)}; known: {', '.join(DOMAINS)}")
    out = MixedText(seed=seed)
    per_calib = max(window, (calib_tokens // max(len(calibration), 1)) // window * window)
    per_sens = sens_tokens // max(len(calibration), 1)
    for name in calibration:
        ids, ndocs = _domain_ids(tokenizer, name, seed, cache_dir)
        if len(ids) < per_calib + per_sens:
            out.notes.append(f"{name}: {len(ids)} tokens from {ndocs} documents, fewer than {per_calib + per_sens}: left out of calibration")
            continue
        out.calib[name] = ids[:per_calib]
        out.sens[name] = ids[per_calib:per_calib + per_sens]
        out.notes.append(f"{name}: {ndocs} documents")
        if selection is not None:
            start, n = selection
            if start < per_calib + per_sens:
                raise ValueError(f"selection tokens from {start} overlap {name}'s calibration and sensitivity "
                                 f"tokens (the first {per_calib + per_sens})")
            if len(ids) < start + n:
                raise ValueError(f"{name}: {len(ids)} tokens, fewer than the selection's {start + n}")
            out.eval[f"sel:{name}"] = ids[start:start + n]
    for name in (heldout if selection is None else ()):
        ids, ndocs = _domain_ids(tokenizer, name, seed, cache_dir)
        if len(ids) < min(eval_tokens, 4 * window):
            out.notes.append(f"{name}: {len(ids)} tokens from {ndocs} documents: too few to evaluate, left out")
            continue
        out.eval[name] = ids[:eval_tokens]
        out.notes.append(f"{name}: {ndocs} documents")
    if not out.calib:
        raise ValueError("no calibration domain has enough text on this machine")
    return out


def _domain_ids(tokenizer, name: str, seed: int, cache_dir: str | None) -> tuple[list[int], int]:
    """Tokenized domain text, cached on disk by (domain, seed, text hash, tokenizer probe):
    reading ~1,000 files and tokenizing takes seconds that every run would repeat."""
    text, ndocs = domain_text(name, seed)
    probe = tokenizer.encode("tabshard probe: def f(x): return ünï")
    key = hashlib.sha256(json.dumps([name, seed, probe]).encode() + text.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"ids_{name}_{key}.json") if cache_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f), ndocs
    ids = tokenizer.encode(text) if text else []
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".part", "w") as f:
            json.dump(ids, f)
        os.replace(path + ".part", path)
    return ids, ndocs
