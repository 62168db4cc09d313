"""Byte-level token data (vocabulary 256): seeded synthetic domains, or the user's own files.

The synthetic corpus (`SYNTHETIC_DOMAINS`) has domains with clearly different statistics, so
MoE experts have something to specialise on and routing can be measured per domain:

- `words`:  Zipf-distributed pseudo-English words from a seeded lexicon; one word in nine ends a
            sentence with ". " and the next word is capitalised.
- `arith`:  lines like "123+45=168\\n" with correct sums of 1- to 4-digit operands.
- `markov`: an order-1 Markov chain over the private bytes 0x80-0xBF: each byte has four seeded
            successors with weights 8:4:3:1 (about 1.7 bits per byte).
- `code`:   python-like functions from templates with seeded identifiers, numbers and indentation.
- `dna`:    ACGT in lines of 60, built from 16 seeded motifs with 1-in-32 point mutations.

User data (`load_dataset`): a `.bin`/`.u16` file of little-endian uint16 tokens (as nanoGPT-style
pipelines write), a `.txt` file read as bytes, or a folder of `*.txt` files, one domain each.
The last tenth of every corpus is held out: `split="eval"` windows come only from there.

Determinism: every draw is raw PCG64 output, seeded through SeedSequence from integers only
(seed, stream tag, domain index or split and step), and turned into data with integer
arithmetic only. Both are fixed by their specifications, unlike numpy's distribution methods
(NEP 19 lets those change between releases) or float maths (libm and SIMD paths differ in the
last bit). So each corpus, and `TokenDataset.batch(step, ...)`, is the same in every process on
every machine, and every model variant sees the same data.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

BYTE_VOCAB_SIZE = 256
SPLITS = ("train", "eval")
EVAL_DIVISOR = 10  # the last len // 10 tokens of each corpus are the eval split
DEFAULT_BYTES_PER_DOMAIN = 1 << 16  # 5 domains x 64 KiB: held-out tail of 6553 bytes each
# "synthetic-long": the same domain generators run for 2 MiB each, so a 128K-token window fits one domain's train split.
LONG_BYTES_PER_DOMAIN = 1 << 21

# The smallest corpus whose eval tail still holds a one-token window (2 tokens).
_MIN_CORPUS_TOKENS = 2 * EVAL_DIVISOR
# Stream tags keep corpus and batch streams apart when their other seed words coincide.
_CORPUS_STREAM = 0
_BATCH_STREAM = 1
_TOKEN_FILE_SUFFIXES = (".bin", ".u16")
_ALLOWED_SOURCES = "'synthetic', 'synthetic-long', a .bin/.u16 uint16 token file, a .txt file, or a folder of .txt files"


from dsbench.errors import DataError  # noqa: E402,F401 (kept importable from here)


# --- seeded integer draws ---------------------------------------------------------------------


def _bit_stream(*words: int) -> np.random.PCG64:
    if any(word < 0 for word in words):
        raise ValueError(f"seed and step must be >= 0, got {words}")
    return np.random.PCG64(np.random.SeedSequence([int(word) for word in words]))


def _draw(bits: np.random.PCG64, n: int, high: int | np.ndarray) -> np.ndarray:
    """n integers in [0, high) as int64; the modulo bias (< high / 2**64) is immaterial here."""
    return (bits.random_raw(n) % np.asarray(high, dtype=np.uint64)).astype(np.int64)


class _Picker:
    """One integer at a time for the generators that loop in Python. Raw values are fetched in
    fixed-size chunks, so the stream does not depend on how many values a caller uses."""

    def __init__(self, bits: np.random.PCG64, chunk: int = 4096) -> None:
        self._bits = bits
        self._chunk = chunk
        self._buffer: list[int] = []

    def __call__(self, high: int) -> int:
        if not self._buffer:
            self._buffer = self._bits.random_raw(self._chunk).tolist()[::-1]
        return self._buffer.pop() % high

    def choice(self, options: Sequence[str]) -> str:
        return options[self(len(options))]


# --- building blocks for the generators -------------------------------------------------------


def _pack(pieces: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte strings as (flat bytes, starts, lengths) for `_concat_pieces`."""
    lengths = np.array([len(piece) for piece in pieces], dtype=np.int64)
    flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    return flat, np.cumsum(lengths) - lengths, lengths


def _concat_pieces(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Concatenate pieces[ids] without a Python loop; piece k is flat[starts[k]:][:lengths[k]]."""
    piece_lengths = lengths[ids]
    out_starts = np.cumsum(piece_lengths) - piece_lengths
    within_piece = np.arange(int(piece_lengths.sum())) - np.repeat(out_starts, piece_lengths)
    return flat[np.repeat(starts[ids], piece_lengths) + within_piece]


_CONSONANTS = "bcdfghklmnprstvwz"
_VOWELS = "aeiou"


def _pseudo_word(pick: _Picker, min_len: int, max_len: int) -> str:
    """Alternating consonants and vowels: pronounceable, so it reads like a language."""
    length = min_len + pick(max_len - min_len + 1)
    vowel_first = pick(2)
    alphabets = [_VOWELS if (i + vowel_first) % 2 == 0 else _CONSONANTS for i in range(length)]
    return "".join(pick.choice(alphabet) for alphabet in alphabets)


# --- the synthetic domains: each maps (bit stream, n_bytes) to exactly n_bytes uint8 ------------

_LEXICON_SIZE = 600
_SENTENCE_END_ODDS = 9  # one word in nine ends a sentence


def _words(bits: np.random.PCG64, n_bytes: int) -> np.ndarray:
    pick = _Picker(bits)
    lexicon = [_pseudo_word(pick, 1, 9) for _ in range(_LEXICON_SIZE)]
    # Four spellings per word (plain/capitalised x " "/". ") so one gather yields whole sentences.
    spellings = [w + " " for w in lexicon] + [w + ". " for w in lexicon]
    spellings += [w.capitalize() + " " for w in lexicon] + [w.capitalize() + ". " for w in lexicon]
    flat, starts, lengths = _pack([s.encode("ascii") for s in spellings])

    n_words = n_bytes // 2 + 1  # every spelling is at least 2 bytes
    # Zipf with exponent 1 from integer weights: floats could round differently across machines.
    cumulative = np.cumsum((1 << 20) // np.arange(1, _LEXICON_SIZE + 1, dtype=np.int64))
    ranks = np.searchsorted(cumulative, _draw(bits, n_words, int(cumulative[-1])), side="right")
    ends_sentence = _draw(bits, n_words, _SENTENCE_END_ODDS) == 0
    starts_sentence = np.roll(ends_sentence, 1)
    starts_sentence[0] = True
    spelling = ranks + _LEXICON_SIZE * (ends_sentence + 2 * starts_sentence)
    return _concat_pieces(flat, starts, lengths, spelling)[:n_bytes]


_PAD = 0  # marks unused digit cells in `_arith`; never a character of that domain


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """(N, width) ASCII digits of values, right-aligned, leading zeros replaced by _PAD."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    digits = (values[:, None] // powers) % 10 + ord("0")
    leading = values[:, None] < powers
    leading[:, -1] = False  # zero itself prints as "0"
    return np.where(leading, _PAD, digits).astype(np.uint8)


def _operands(bits: np.random.PCG64, n: int) -> np.ndarray:
    """Numbers of 1 to 4 digits, the digit count uniform, so short and long sums are both common."""
    n_digits = 1 + _draw(bits, n, 4)
    low = np.where(n_digits == 1, 0, 10 ** (n_digits - 1))
    return low + _draw(bits, n, 10**n_digits - low)


def _arith(bits: np.random.PCG64, n_bytes: int) -> np.ndarray:
    n_lines = n_bytes // 6 + 1  # the shortest line, "1+2=3\n", is 6 bytes
    a, b = _operands(bits, n_lines), _operands(bits, n_lines)

    def column(char: str) -> np.ndarray:
        return np.full((n_lines, 1), ord(char), dtype=np.uint8)

    cells = np.concatenate(
        [_digits(a, 4), column("+"), _digits(b, 4), column("="), _digits(a + b, 5), column("\n")], axis=1
    ).ravel()
    return cells[cells != _PAD][:n_bytes]


_MARKOV_FIRST_BYTE = 0x80
_MARKOV_STATES = 64
_MARKOV_WEIGHTS = (8, 4, 3, 1)  # out of 16 slots per state


def _markov(bits: np.random.PCG64, n_bytes: int) -> np.ndarray:
    successors = _draw(bits, _MARKOV_STATES * len(_MARKOV_WEIGHTS), _MARKOV_STATES)
    successors = successors.reshape(_MARKOV_STATES, len(_MARKOV_WEIGHTS))
    # Each state's successors repeated by weight: one uniform slot index picks the next state.
    next_state = np.repeat(successors, _MARKOV_WEIGHTS, axis=1).tolist()  # (states, 16)
    slots = _draw(bits, n_bytes, sum(_MARKOV_WEIGHTS)).tolist()
    states = bytearray(n_bytes)
    state = 0
    for i, slot in enumerate(slots):  # inherently sequential; ~10 ms for 64 KiB
        state = next_state[state][slot]
        states[i] = state
    return np.frombuffer(bytes(states), dtype=np.uint8) + np.uint8(_MARKOV_FIRST_BYTE)


_CODE_IDENTIFIERS = 40
_CODE_STATEMENTS = (
    "{x} = {a} {op} {n}",
    "{x} = {f}({a}, {n})",
    "{x} += {b}",
    "{x}.append({a})",
    "{b} = [{a}, {n}]",
    "print({x})",
    "assert {x} >= {n}",
)
_CODE_OPENERS = ("if {x} > {n}:", "for {i} in range({n}):", "while {x} < {n}:", "elif {a} == {n}:")
_CODE_OPERATORS = ("+", "-", "*", "//")


def _identifier(pick: _Picker) -> str:
    name = _pseudo_word(pick, 2, 6)
    return name + "_" + _pseudo_word(pick, 2, 5) if pick(2) else name


def _code_function(pick: _Picker, names: Sequence[str]) -> str:
    # Names fixed per function, so a model can learn to copy them from the signature.
    fields = {"f": pick.choice(names), "a": pick.choice(names), "b": pick.choice(names), "x": pick.choice(names)}
    fields["i"] = pick.choice("ijk")

    def fill(template: str) -> str:
        return template.format(**fields, n=pick(100), op=pick.choice(_CODE_OPERATORS))

    lines = [fill("def {f}({a}, {b}):")]
    for _ in range(1 + pick(5)):
        if pick(3) == 0:
            lines.append("    " + fill(pick.choice(_CODE_OPENERS)))
            lines += ["        " + fill(pick.choice(_CODE_STATEMENTS)) for _ in range(1 + pick(2))]
        else:
            lines.append("    " + fill(pick.choice(_CODE_STATEMENTS)))
    lines.append(fill("    return {x}"))
    return "\n".join(lines) + "\n\n"


def _code(bits: np.random.PCG64, n_bytes: int) -> np.ndarray:
    pick = _Picker(bits)
    names = [_identifier(pick) for _ in range(_CODE_IDENTIFIERS)]
    functions: list[str] = []
    size = 0
    while size < n_bytes:
        functions.append(_code_function(pick, names))
        size += len(functions[-1])
    return np.frombuffer("".join(functions).encode("ascii"), dtype=np.uint8)[:n_bytes]


_DNA_MOTIFS = 16
_DNA_MOTIF_LENGTHS = (6, 20)  # inclusive
_DNA_MUTATION_ODDS = 32  # one base in 32 is redrawn
_DNA_LINE = 60


def _dna(bits: np.random.PCG64, n_bytes: int) -> np.ndarray:
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)
    shortest, longest = _DNA_MOTIF_LENGTHS
    lengths = shortest + _draw(bits, _DNA_MOTIFS, longest - shortest + 1)
    motifs = bases[_draw(bits, int(lengths.sum()), 4)]
    n_motifs = (n_bytes + 2 * _DNA_LINE) // shortest  # enough bases for the lines below
    sequence = _concat_pieces(motifs, np.cumsum(lengths) - lengths, lengths, _draw(bits, n_motifs, _DNA_MOTIFS))
    mutated = _draw(bits, sequence.size, _DNA_MUTATION_ODDS) == 0
    sequence = np.where(mutated, bases[_draw(bits, sequence.size, 4)], sequence)

    n_lines = n_bytes // (_DNA_LINE + 1) + 1
    lines = sequence[: n_lines * _DNA_LINE].reshape(n_lines, _DNA_LINE)
    newlines = np.full((n_lines, 1), ord("\n"), dtype=np.uint8)
    return np.concatenate([lines, newlines], axis=1).ravel()[:n_bytes]


# Order fixes each domain's seed (its index): add new domains at the end to keep old ones stable.
_DOMAIN_GENERATORS: tuple[tuple[str, Callable[[np.random.PCG64, int], np.ndarray]], ...] = (
    ("words", _words),
    ("arith", _arith),
    ("markov", _markov),
    ("code", _code),
    ("dna", _dna),
)
SYNTHETIC_DOMAINS: tuple[str, ...] = tuple(name for name, _ in _DOMAIN_GENERATORS)


def synthetic_corpus(domain: str, seed: int, n_bytes: int = DEFAULT_BYTES_PER_DOMAIN) -> np.ndarray:
    """The first n_bytes of one synthetic domain's seeded stream, as uint8."""
    if domain not in SYNTHETIC_DOMAINS:
        raise DataError(f"synthetic domain {domain!r} is unknown; allowed: {', '.join(SYNTHETIC_DOMAINS)}")
    if n_bytes < _MIN_CORPUS_TOKENS:
        raise DataError(f"synthetic n_bytes {n_bytes} is too small; allowed: >= {_MIN_CORPUS_TOKENS}")
    index = SYNTHETIC_DOMAINS.index(domain)
    return _DOMAIN_GENERATORS[index][1](_bit_stream(seed, _CORPUS_STREAM, index), n_bytes)


# --- batches ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64: inputs shifted left by one
    domains: torch.Tensor  # (B,) int64: each row's index into TokenDataset.domains

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.domains.to(device))


def _split_range(n_tokens: int, split: str) -> tuple[int, int]:
    eval_start = n_tokens - n_tokens // EVAL_DIVISOR
    return (0, eval_start) if split == "train" else (eval_start, n_tokens)


def _row_domains(bits: np.random.PCG64, batch_size: int, n_domains: int) -> np.ndarray:
    """Shuffled rounds of all domains: every batch is as close to uniform over domains as B allows."""
    n_rounds = -(-batch_size // n_domains)
    keys = bits.random_raw(n_rounds * n_domains).reshape(n_rounds, n_domains)
    return np.argsort(keys, axis=1, kind="stable").ravel()[:batch_size].astype(np.int64)


class TokenDataset:
    """Named token corpora that give seeded (B, T) batches; each row is a window of one corpus."""

    def __init__(self, corpora: Sequence[np.ndarray], domains: Sequence[str], seed: int, source: str) -> None:
        if not corpora or len(corpora) != len(domains):
            raise ValueError(f"need one domain name per corpus, got {len(domains)} names for {len(corpora)} corpora")
        self.corpora = tuple(corpora)
        self.domains = tuple(domains)
        self.seed = seed
        self.source = source

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={corpus.size}" for name, corpus in zip(self.domains, self.corpora))
        return f"TokenDataset(source={self.source!r}, seed={self.seed}, {sizes})"

    @cached_property
    def max_token(self) -> int:
        # A full scan of a memmapped file, so it runs on first use only.
        return max(int(corpus.max()) for corpus in self.corpora)

    def tokens(self, domain: str, split: str = "train") -> np.ndarray:
        """One domain's tokens in a split (a view, for inspection and tests)."""
        corpus = self.corpora[self.domains.index(domain)]
        start, end = _split_range(corpus.size, _checked_split(split))
        return corpus[start:end]

    def check_vocab(self, vocab_size: int) -> None:
        if self.max_token >= vocab_size:
            raise DataError(
                f"data {self.source!r} has token id {self.max_token} >= model vocab_size {vocab_size}; "
                f"use vocab_size >= {self.max_token + 1}"
            )

    def check_seq_len(self, seq_len: int, split: str | None = None) -> None:
        """Raise unless every domain's split (both when None) holds a window of seq_len + 1 tokens."""
        for split_name in SPLITS if split is None else (_checked_split(split),):
            for name, corpus in zip(self.domains, self.corpora):
                start, end = _split_range(corpus.size, split_name)
                if end - start < seq_len + 1:
                    raise DataError(
                        f"data {self.source!r} domain {name!r}: {split_name} split holds {end - start} tokens, "
                        f"a window needs seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data"
                    )

    def batch(self, step: int, batch_size: int, seq_len: int, split: str = "train") -> Batch:
        """Batch `step` of a split: a pure function of (seed, split, step, batch_size, seq_len)."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self.check_seq_len(seq_len, split)
        bits = _bit_stream(self.seed, _BATCH_STREAM, SPLITS.index(split), step)
        labels = _row_domains(bits, batch_size, len(self.domains))
        start_keys = bits.random_raw(batch_size)  # one per row, in row order
        windows = np.empty((batch_size, seq_len + 1), dtype=np.int64)  # (B, T + 1)
        span = np.arange(seq_len + 1)
        for domain in np.unique(labels):
            rows = np.flatnonzero(labels == domain)
            corpus = self.corpora[domain]
            first, end = _split_range(corpus.size, split)
            n_starts = end - first - seq_len  # windows lie wholly inside the split
            starts = first + (start_keys[rows] % np.uint64(n_starts)).astype(np.int64)
            windows[rows] = corpus[starts[:, None] + span]
        windows_t = torch.from_numpy(windows)
        inputs, targets = windows_t[:, :-1].contiguous(), windows_t[:, 1:].contiguous()
        return Batch(inputs, targets, torch.from_numpy(labels))


def _checked_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; allowed: {', '.join(SPLITS)}")
    return split


# --- sources ----------------------------------------------------------------------------------


def synthetic_dataset(seed: int, bytes_per_domain: int = DEFAULT_BYTES_PER_DOMAIN, name: str = "synthetic") -> TokenDataset:
    corpora = [synthetic_corpus(domain, seed, bytes_per_domain) for domain in SYNTHETIC_DOMAINS]
    return TokenDataset(corpora, SYNTHETIC_DOMAINS, seed, name)


def _read_corpus(path: Path, dtype: str) -> np.ndarray:
    """Memory-map a file of tokens, so a large user corpus is read lazily, window by window."""
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise DataError(f"data file {str(path)!r} has {size} bytes, an odd count; allowed: a flat uint16 array")
    if size // itemsize < _MIN_CORPUS_TOKENS:
        raise DataError(
            f"data file {str(path)!r} holds {size // itemsize} tokens, shorter than one window; "
            f"allowed: at least {_MIN_CORPUS_TOKENS} (the last 1/{EVAL_DIVISOR} is held out for eval)"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _folder_dataset(folder: Path, seed: int) -> TokenDataset:
    files = sorted((path for path in folder.glob("*.txt") if path.is_file()), key=lambda path: path.name)
    if not files:
        raise DataError(f"data folder {str(folder)!r} holds no .txt files; allowed: {_ALLOWED_SOURCES}")
    corpora = [_read_corpus(path, "u1") for path in files]
    return TokenDataset(corpora, [path.stem for path in files], seed, str(folder))


FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole; larger ones by size, head and tail
SAMPLE_BYTES = 16 << 20


def data_digest(source: str | os.PathLike[str] | None) -> str | None:
    """What a data source holds, as a digest cell identity can carry: None for the built-in
    synthetic corpora (fixed by the seed); for a file, the sha256 of its bytes (a file over 256
    MiB: of its size and its first and last 16 MiB, prefixed "sampled:"); for a folder, of its
    .txt files' names and digests. A file that changes between cells, or between a run and its
    --resume, so gives other cell ids instead of silently mixing corpora."""
    if source is None or source in ("synthetic", "synthetic-long") or not str(source).strip():
        return None
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        return hashlib.sha256("".join(f"{p.name}:{_file_digest(p)};" for p in files).encode()).hexdigest()
    return _file_digest(path) if path.is_file() else None


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return _cached_file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(SAMPLE_BYTES))
        f.seek(size - SAMPLE_BYTES)
        h.update(f.read(SAMPLE_BYTES))
    return "sampled:" + h.hexdigest()


def load_dataset(source: str | os.PathLike[str] | None, seed: int) -> TokenDataset:
    """The dataset a spec's `data` names: None or "synthetic", or a path (see module docstring)."""
    if source is None or source == "synthetic":
        return synthetic_dataset(seed)
    if source == "synthetic-long":
        return synthetic_dataset(seed, LONG_BYTES_PER_DOMAIN, "synthetic-long")
    if not str(source).strip():
        raise DataError(f"data source is empty; allowed: {_ALLOWED_SOURCES}")
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist; allowed: {_ALLOWED_SOURCES}")
    if path.is_dir():
        return _folder_dataset(path, seed)
    suffix = path.suffix.lower()
    if suffix in _TOKEN_FILE_SUFFIXES:
        corpus = _read_corpus(path, "<u2")  # little-endian, as nanoGPT's prepare.py writes on x86
    elif suffix == ".txt":
        corpus = _read_corpus(path, "u1")
    else:
        raise DataError(f"data source {str(path)!r} has unknown extension {suffix!r}; allowed: {_ALLOWED_SOURCES}")
    return TokenDataset([corpus], [path.stem], seed, str(path))
