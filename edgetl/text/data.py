"""Text data that installs offline as Debian packages.

* Source (server): WordNet 3.0 noun synsets (``wordnet-base``, ``data.noun``): each gloss
  labelled by its lexicographer file (``lex_filenum`` -> ``noun.animal``, ``noun.food`` ...;
  names from the package's ``lexnames(5WN)`` manual page). WordNet licence: Princeton's
  WordNet 3.0 licence (permissive; see ``/usr/share/doc/wordnet-base/copyright``).
* Device: the ``fortunes`` package's topic files (``computers``, ``science``, ``food`` ...):
  short texts in ``%``-separated records, topics the server never saw.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from edgetl.errors import DataError

WORDNET = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
FORTUNES = Path("/usr/share/games/fortunes")
DEBIAN_PACKAGES = ("wordnet-base", "fortunes")


def _missing(package: str, path: Path) -> DataError:
    return DataError(f"{path} not found: the text scenario needs the Debian package {package}; "
                     f"run `make data-text` (as root: apt-get install {package})")


def ensure_packages(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> None:
    """Install the Debian packages the text data come from, when missing and possible (root)."""
    missing = [p for p in packages
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise DataError(f"Debian packages {missing} are missing and apt-get is not available; "
                        f"install them (wordnet-base: {WORDNET}, fortunes: {FORTUNES})")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise DataError(f"could not install {missing} ({' '.join(cmd)} failed: "
                            f"{r.stderr.strip()[-300:]}); as root run: apt-get update && "
                            f"apt-get install {' '.join(missing)}")


def lexnames(man: Path = LEXNAMES_MAN) -> dict[int, str]:
    """``lex_filenum`` -> lexicographer file name, read from the ``lexnames(5WN)`` page."""
    if not man.is_file():
        raise _missing("wordnet-base", man)
    out = {}
    for line in gzip.open(man, "rt", encoding="utf-8", errors="replace"):
        m = re.match(r"^(\d\d)\t(\w+\.\w+)\s", line)
        if m:
            out[int(m.group(1))] = m.group(2)
    if not out:
        raise DataError(f"{man}: no lexicographer file names found")
    return out


def load_glosses(data_noun: Path = WORDNET / "data.noun", *,
                 min_per_class: int = 100) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Noun glosses and their lexicographer category.

    Categories with fewer than ``min_per_class`` synsets (``noun.Tops``, ``noun.motive``...)
    are dropped. Returns ``(texts, y, labels)``; ``y`` indexes ``labels`` (sorted names).
    """
    if not data_noun.is_file():
        raise _missing("wordnet-base", data_noun)
    names = lexnames()
    texts, cats = [], []
    with open(data_noun, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:  # licence header
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            texts.append(gloss.strip())
            cats.append(names.get(int(fields[1]), f"lex{fields[1]}"))
    counts = {c: cats.count(c) for c in set(cats)}
    labels = tuple(sorted(c for c, n in counts.items() if n >= min_per_class))
    index = {c: i for i, c in enumerate(labels)}
    keep = [i for i, c in enumerate(cats) if c in index]
    return [texts[i] for i in keep], np.array([index[cats[i]] for i in keep]), labels


def load_fortunes(topics: tuple[str, ...], folder: Path = FORTUNES) -> dict[str, list[str]]:
    """Each topic's fortunes, whitespace collapsed to single spaces (attributions kept)."""
    out = {}
    for t in topics:
        path = folder / f"{t}.u8" if (folder / f"{t}.u8").is_file() else folder / t
        if not path.is_file():
            if not folder.is_dir():
                raise _missing("fortunes", folder)
            known = sorted(p.name for p in folder.iterdir() if "." not in p.name)
            raise DataError(f"fortunes topic {t!r} not found in {folder}; topics: {known}")
        raw = path.read_text(encoding="utf-8", errors="replace")
        recs = [" ".join(r.split()) for r in re.split(r"^%$", raw, flags=re.M)]
        out[t] = [r for r in recs if r]
    return out
