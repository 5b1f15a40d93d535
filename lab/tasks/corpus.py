"""A token corpus on disk: text tokenised once and cached, or a token array the user already has, always
memory-mapped (never read whole into memory).

``open_corpus(path, ...)`` reads, by what ``path`` is:

- ``stdlib``: the Python standard library's own source files (``*.py`` under the running interpreter's
  ``sysconfig`` stdlib path, third-party ``site-packages`` left out). Every machine that runs the lab has it,
  so the default text experiment needs no download; it is code rather than prose, which suits induction: code
  repeats its own identifiers within a file. (It differs a little between Python versions: a run records the
  corpus's content key and token count in its task info.)
- a text file, or a folder of them (the files matching ``glob``, in sorted path order; files with a NUL byte
  in their first 8 KiB are binary and skipped);
- a token array: ``.npy`` (any integer dtype, one dimension) or a raw ``.bin`` of ``dtype`` (``uint16`` as
  nanoGPT's ``prepare.py`` writes it).

Text is tokenised byte-level (``tokenizer: byte``: ids 0-255 are the bytes; documents are joined by byte 0,
which a text file never holds) or by a byte-level BPE trained on the corpus itself with the ``tokenizers``
library (``tokenizer: bpe``, ``bpe_vocab`` ids; id 0 is the document separator ``<|doc|>``), or by a tokenizer saved
before (``tokenizer: path/to/bpe-KEY.json``, e.g. a trained run's, to measure it on another corpus). The tokens are
cached as ``.npy`` beside the corpus (``<path>.tokens/``, or the user cache folder when that is not writable,
or ``cache_dir``), keyed by a hash of the files' names and contents and the tokenizer's settings: an edited
file or another setting tokenises afresh, an unchanged corpus loads in a fraction of a second.

Every problem with a file is a ``ConfigError`` on ``field`` (one line: the path and what is wrong).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.errors import ConfigError, check

TOKENIZERS = ("byte", "bpe")
ARRAY_SUFFIXES = (".npy", ".bin")
DOC_SEPARATOR = 0  # byte 0 / the BPE's first special token: where one document ends and the next begins
CACHE_VERSION = 1  # bump when the cached format or the tokenisation changes
_CHUNK = 1 << 24  # tokens per pass when scanning an array (max id, counts): bounded memory


@dataclass(frozen=True)
class Corpus:
    """Tokens [n] (a read-only memory map), the vocabulary size, and what they came from."""

    tokens: np.ndarray
    vocab_size: int
    info: dict  # source, files, tokens, tokenizer, key: recorded with the run

    def counts(self, stop: int | None = None) -> np.ndarray:
        """How often each id occurs in tokens[:stop], scanned in chunks."""
        stop = len(self.tokens) if stop is None else stop
        out = np.zeros(self.vocab_size, np.int64)
        for i in range(0, stop, _CHUNK):
            out += np.bincount(np.asarray(self.tokens[i:min(stop, i + _CHUNK)]), minlength=self.vocab_size)
        return out


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's root and its ``*.py`` files (not third-party packages), in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and not skip.intersection(p.relative_to(root).parts))
    return root, files


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def text_files(path: str, glob: str, field: str) -> tuple[Path, list[Path]]:
    """(root, files) of a text corpus: ``stdlib``, one file, or the text files of a folder matching ``glob``."""
    if path == "stdlib":
        root, files = stdlib_files()
        check(bool(files), field, path, f"no *.py files under {root}")
        return root, files
    p = Path(path).expanduser()
    check(p.exists(), field, path, "no such file or folder")
    if p.is_file():
        check(p.stat().st_size > 0, field, path, "the file is empty")
        check(not _is_binary(p), field, path, "not a text file (it holds NUL bytes); a token array must end in "
              + " or ".join(ARRAY_SUFFIXES))
        return p.parent, [p]
    files = sorted(f for f in p.glob(glob) if f.is_file() and f.stat().st_size > 0 and not _is_binary(f))
    check(bool(files), field, path, f"no non-empty text files matching task.glob={glob!r} in this folder")
    return p, files


def _content_key(root: Path, files: list[Path], settings: dict) -> str:
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **settings}, sort_keys=True).encode())
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            data = fh.read()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def cache_folder(path: str, cache_dir: str | None) -> Path:
    """Where a corpus's tokens are cached: ``cache_dir`` if given; else ``<path>.tokens`` beside it when its folder
    is writable; else the user cache (``$XDG_CACHE_HOME`` or ``~/.cache``)/induction-lab/tokens."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if path != "stdlib":
        p = Path(path).expanduser().resolve()
        if os.access(p.parent, os.W_OK):
            return p.parent / (p.name + ".tokens")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "induction-lab" / "tokens"


def _byte_tokens(files: list[Path]) -> np.ndarray:
    parts = []
    for f in files:
        parts.append(np.fromfile(f, np.uint8))
        parts.append(np.array([DOC_SEPARATOR], np.uint8))
    return np.concatenate(parts).astype(np.uint16)


def _text(f: Path) -> str:
    return f.read_bytes().decode("utf-8", errors="replace")


def train_bpe(files: list[Path], vocab: int, out: Path):
    """A byte-level BPE with ``vocab`` ids trained on ``files`` (id 0: ``<|doc|>``), saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|doc|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # decoded here (invalid UTF-8 replaced, as encoding does): `train` itself stops at a file that is not UTF-8
    tok.train_from_iterator((_text(f) for f in files), trainer, length=len(files))
    tok.save(str(out))
    return tok


def _encode(tok, files: list[Path]) -> np.ndarray:
    parts = []
    for f in files:
        parts.append(np.asarray(tok.encode(_text(f)).ids, np.uint32))
        parts.append(np.array([DOC_SEPARATOR], np.uint32))
    ids = np.concatenate(parts)
    return ids.astype(np.uint16) if tok.get_vocab_size() <= 1 << 16 else ids


def tokenizer_file(name: str) -> Path | None:
    """The saved tokenizer a ``task.tokenizer`` value names (a ``.json`` file), or None for byte / bpe."""
    return None if name in TOKENIZERS else Path(name).expanduser()


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise ConfigError("task.tokenizer", str(path), f"not a tokenizers .json file ({e})") from e


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def tokenise_text(path: str, glob: str, tokenizer: str, bpe_vocab: int, cache_dir: str | None,
                  field: str) -> Corpus:
    """A text corpus's tokens, from the cache when its content key is there, else tokenised and cached."""
    saved = tokenizer_file(tokenizer)
    check(saved is None or (saved.suffix == ".json" and saved.is_file()), "task.tokenizer", tokenizer,
          "byte, bpe, or a saved tokenizer's .json file (a BPE run's: its task info names it)")
    root, files = text_files(path, glob, field)
    if saved is not None:
        settings = {"tokenizer": hashlib.sha256(saved.read_bytes()).hexdigest()}
    else:
        settings = {"tokenizer": tokenizer} | ({"bpe_vocab": bpe_vocab} if tokenizer == "bpe" else {})
    key = _content_key(root, files, settings)
    folder = cache_folder(path, cache_dir)
    kind = "byte" if tokenizer == "byte" else "bpe"
    cached, model_file = folder / f"{kind}-{key}.npy", (saved or folder / f"bpe-{key}.json")
    tok = _load_tokenizer(saved) if saved is not None else None
    if not cached.exists() or (kind == "bpe" and not model_file.exists()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            what = "byte-level" if kind == "byte" else (f"with a {bpe_vocab}-id BPE trained on them" if tok is None
                                                        else "with the given BPE")
            print(f"tokenising {len(files):,} files {what}, once: cached in {folder}", file=sys.stderr, flush=True)
            if kind == "byte":
                ids = _byte_tokens(files)
            else:
                tok = tok or train_bpe(files, bpe_vocab, model_file)
                ids = _encode(tok, files)
            _atomic_save(cached, ids)
        except OSError as e:
            raise ConfigError("task.cache_dir", str(folder),
                              f"cannot write the token cache there ({e.strerror})") from e
    if kind == "bpe":
        tok = tok or _load_tokenizer(model_file)
    vocab = 256 if kind == "byte" else tok.get_vocab_size()
    tokens = np.load(cached, mmap_mode="r")
    info = {"source": path if path == "stdlib" else str(Path(path).expanduser()), "root": str(root),
            "files": len(files), "tokens": int(len(tokens)), "tokenizer": tokenizer, "key": key,
            "cache": str(cached)} | ({"tokenizer_file": str(model_file)} if kind == "bpe" else {})
    return Corpus(tokens, vocab, info)


def max_id(tokens: np.ndarray) -> int:
    return max(int(np.max(tokens[i:i + _CHUNK])) for i in range(0, len(tokens), _CHUNK))


def load_array(path: str, dtype: str, vocab_size: int | None, field: str) -> Corpus:
    """A token array the user already has, memory-mapped: ``.npy`` (1-D, integer) or raw ``.bin`` of ``dtype``."""
    p = Path(path).expanduser()
    check(p.is_file(), field, path, "no such file")
    check(p.stat().st_size > 0, field, path, "the file is empty")
    if p.suffix == ".npy":
        try:
            tokens = np.load(p, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ConfigError(field, path, f"not a readable .npy array ({e})") from e
        check(tokens.ndim == 1, field, path,
              f"a token array must have one dimension, this one has shape {tokens.shape}")
    else:
        try:
            dt = np.dtype(dtype)
        except TypeError as e:
            raise ConfigError("task.dtype", dtype, "a numpy integer dtype such as uint16 or int32") from e
        check(dt.kind in "iu", "task.dtype", dtype, "an integer dtype such as uint16 (nanoGPT's) or int32")
        size = p.stat().st_size
        check(size % dt.itemsize == 0, field, path,
              f"its size, {size} bytes, is not a whole number of task.dtype={dtype} tokens")
        tokens = np.memmap(p, dtype=dt, mode="r")
    check(tokens.dtype.kind in "iu", field, path, f"token ids must be integers, not {tokens.dtype}")
    check(len(tokens) > 0, field, path, "the array is empty")
    top = max_id(tokens)
    if tokens.dtype.kind == "i":
        low = min(int(np.min(tokens[i:i + _CHUNK])) for i in range(0, len(tokens), _CHUNK))
        check(low >= 0, field, path, f"token ids must be >= 0, it holds {low}")
    if vocab_size is None:
        vocab_size = top + 1
    check(top < vocab_size, field, path, f"it holds token id {top}, beyond task.vocab_size={vocab_size}")
    info = {"source": str(p), "files": 1, "tokens": int(len(tokens)), "tokenizer": "array",
            "dtype": str(tokens.dtype)}
    return Corpus(tokens, int(vocab_size), info)


def open_corpus(path: str, *, glob: str = "**/*", tokenizer: str = "byte", bpe_vocab: int = 1024,
                cache_dir: str | None = None, dtype: str = "uint16", vocab_size: int | None = None,
                field: str = "task.path") -> Corpus:
    """The corpus at ``path`` (see the module's docstring)."""
    check(isinstance(path, str) and path != "", field, path,
          "a text file, a folder, a .npy/.bin token array, or stdlib")
    if Path(path).suffix in ARRAY_SUFFIXES:
        return load_array(path, dtype, vocab_size, field)
    corpus = tokenise_text(path, glob, tokenizer, bpe_vocab, cache_dir, field)
    if vocab_size is not None:
        check(vocab_size >= corpus.vocab_size, "task.vocab_size", vocab_size,
              f"must be >= {corpus.vocab_size}, the {tokenizer} tokenizer's vocabulary (or null)")
        corpus = Corpus(corpus.tokens, vocab_size, corpus.info)
    return corpus
