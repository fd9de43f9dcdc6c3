"""Text on the device: the bundle's WordPiece tokenizer and text data files.

Text bundles (``input.modality == "text"``) ship their tokenizer (``vocab.txt`` and the
Hugging Face ``tokenizer.json``). The runner tokenises with the ``tokenizers`` package when
it is installed (Rust, fast) and otherwise with :class:`WordPiece`, a pure-Python BERT
tokenizer with no dependency at all; the tests check that both give the same ids on
thousands of real strings. The backbone's input is one int64 array ``(N, 2, L)``: token ids
and attention mask, padded to the manifest's ``max_length``. Texts with more word pieces
than fit are truncated, and counted.

Data files: a ``.csv`` with a ``text`` column and an optional ``label`` column (any other
columns are ignored; quoted fields may span lines), or a ``.txt`` file with one unlabelled
text per line.
"""

from __future__ import annotations

import csv
import os
import unicodedata

import numpy as np

from edgerun import RunnerError


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf", "Cn", "Co")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True  # ASCII symbols count as punctuation for BERT ("$", "^", "`")
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
            or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPiece:
    """BERT's uncased tokenizer in pure Python: normalise, split, greedy WordPiece.

    Mirrors the ``tokenizers`` pipeline of the bundle (``BertNormalizer`` with clean text,
    CJK spacing, lowercase and accent stripping; ``BertPreTokenizer``; ``WordPiece`` with
    ``##`` continuations and ``[UNK]`` for words it cannot cover or longer than
    ``max_chars`` characters).
    """

    name = "edgerun.text.WordPiece (pure Python)"

    def __init__(self, vocab: list[str], *, lowercase: bool = True, unk: str = "[UNK]",
                 prefix: str = "##", max_chars: int = 100):
        self.vocab = {tok: i for i, tok in enumerate(vocab)}
        self.lowercase, self.prefix, self.max_chars = lowercase, prefix, max_chars
        if unk not in self.vocab:
            raise RunnerError(f"the tokenizer vocabulary has no unknown token {unk!r}")
        self.unk_id = self.vocab[unk]
        self._cache: dict[str, list[int]] = {}

    def _normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.lowercase:
            text = unicodedata.normalize("NFD", text.lower())
            text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        return text

    def _split(self, text: str) -> list[str]:
        words = []
        for chunk in text.split():
            cur = []
            for ch in chunk:
                if _is_punctuation(ch):
                    if cur:
                        words.append("".join(cur))
                        cur = []
                    words.append(ch)
                else:
                    cur.append(ch)
            if cur:
                words.append("".join(cur))
        return words

    def _word(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        if len(word) > self.max_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                ids = [self.unk_id]
                break
            ids.append(found)
            start = end
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of ``text``, without special tokens."""
        ids: list[int] = []
        for w in self._split(self._normalize(text)):
            ids.extend(self._word(w))
        return ids


class _FastTokenizer:
    """The ``tokenizers`` package on the bundle's ``tokenizer.json`` (no padding/specials)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer, __version__

        tok = Tokenizer.from_file(path)
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.name = f"tokenizers {__version__}"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]


class TextEncoder:
    """Texts -> the backbone's ``(N, 2, max_length)`` int64 input, as the manifest says.

    Args:
        bundle: the :class:`edgerun.bundle.Bundle` (its ``input.text`` block and files).
        prefer: ``"auto"`` (``tokenizers`` if installed, else pure Python), ``"fast"`` or
            ``"python"``.
    """

    def __init__(self, bundle, prefer: str = "auto"):
        spec = bundle.manifest["input"]["text"]
        self.max_length = int(spec["max_length"])
        self.cls_id, self.sep_id, self.pad_id = (int(spec["cls_id"]), int(spec["sep_id"]),
                                                 int(spec["pad_id"]))
        self.impl = None
        if prefer in ("auto", "fast") and spec.get("tokenizer_json"):
            try:
                self.impl = _FastTokenizer(bundle.path(spec["tokenizer_json"]))
            except ImportError:
                if prefer == "fast":
                    raise RunnerError("the tokenizers package is not installed; "
                                      "pip install tokenizers, or use the pure-Python "
                                      "tokenizer") from None
        if self.impl is None:
            with open(bundle.path(spec["vocab"]), encoding="utf-8") as f:
                vocab = [line.rstrip("\n") for line in f]
            self.impl = WordPiece(vocab, lowercase=bool(spec.get("lowercase", True)),
                                  unk=spec.get("unk_token", "[UNK]"))
        self.name = self.impl.name

    def encode(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """``(tokens, n_truncated)``: ``tokens[:, 0]`` ids, ``tokens[:, 1]`` attention mask."""
        pieces = (self.impl.encode_batch(list(texts)) if hasattr(self.impl, "encode_batch")
                  else [self.impl.encode(t) for t in texts])
        return pack(pieces, self.max_length, self.cls_id, self.sep_id, self.pad_id)


def pack(pieces: list[list[int]], max_length: int, cls_id: int, sep_id: int,
         pad_id: int) -> tuple[np.ndarray, int]:
    """``[CLS] ids [SEP]`` per text, right-padded to ``max_length``; ``(tokens, n_truncated)``.

    Texts with more than ``max_length - 2`` word pieces keep their first ones (the
    ``tokenizers`` "longest first" rule for one sequence) and are counted. The server packs
    its texts with this same function.

    Shape:
        tokens: (N, 2, max_length) int64: ids, attention mask.
    """
    out = np.zeros((len(pieces), 2, max_length), np.int64)
    out[:, 0] = pad_id
    room = max_length - 2
    truncated = 0
    for i, ids in enumerate(pieces):
        if len(ids) > room:
            truncated += 1
            ids = ids[:room]
        row = [cls_id, *ids, sep_id]
        out[i, 0, : len(row)] = row
        out[i, 1, : len(row)] = 1
    return out, truncated


def read_texts(path: str, max_mb: float | None = None) -> tuple[list[str], list[str] | None]:
    """Texts and optional labels from a ``.csv`` (``text`` [, ``label``]) or ``.txt`` file."""
    texts, labels, _ = read_text_table(path, max_mb=max_mb)
    return texts, labels


def read_text_table(path: str, columns=(), max_mb: float | None = None):
    """``(texts, labels or None, {column: values or None})`` from a ``.csv`` or ``.txt``.

    ``columns``: other optional columns to return (e.g. ``("user",)``), stripped strings.
    The server reads users' text files with this same function. Only a regular file is read
    (never a FIFO or device), of at most ``max_mb`` MiB when given.
    """
    import io

    from edgerun.files import open_regular

    ext = os.path.splitext(path)[1].lower()
    extra = {c: None for c in columns}
    raw = open_regular(path, "data file", None if max_mb is None else int(max_mb * 2**20),
                       limit_flag="--max-data-mb")
    from edgerun.data import _csv_encoding

    encoding = _csv_encoding(path, raw)  # UTF-8, or UTF-16 with a BOM; a BOM is dropped
    try:
        with io.TextIOWrapper(raw, encoding=encoding, newline="") as f:
            if ext == ".txt":
                return [s for s in (line.strip() for line in f) if s], None, extra
            if ext != ".csv":
                raise RunnerError(f"{path}: this bundle takes text: a .csv with a 'text' column "
                                  "(and 'label' to adapt) or a .txt with one text per line, "
                                  f"not {ext or '(no extension)'!r}")
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            if "text" not in cols:
                raise RunnerError(f"{path}: expected a header with a 'text' column (and "
                                  f"'label' to adapt), found {cols}")
            extra = {c: [] if c in cols else None for c in columns}
            texts, labels = [], []
            for row in reader:
                texts.append(row["text"] or "")
                labels.append((row.get("label") or "").strip())
                for c, v in extra.items():
                    if v is not None:
                        v.append((row.get(c) or "").strip())
    except UnicodeDecodeError as e:
        raise RunnerError(f"{path} is not {'UTF-16' if encoding == 'utf-16' else 'UTF-8'} text "
                          f"({e}); text files must be UTF-8 (or UTF-16 with a byte-order "
                          "mark): re-save it as UTF-8") from None
    except csv.Error as e:  # e.g. a field over csv.field_size_limit() (128 KiB)
        raise RunnerError(f"{path}: not a readable CSV file ({e}); split texts longer than "
                          "128 KiB") from None
    has = "label" in cols
    if has:
        from edgerun.data import check_label_text

        check_label_text(path, labels)
    if has and any(not lab for lab in labels):
        bad = [i + 2 for i, lab in enumerate(labels) if not lab][:5]
        raise RunnerError(f"{path}: empty labels on line(s) {bad}; every row needs a label")
    return texts, labels if has else None, extra
