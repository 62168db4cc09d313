"""Byte-level data: determinism, splits, domain statistics, user sources and their errors."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dsbench.data import (
    BYTE_VOCAB_SIZE,
    SYNTHETIC_DOMAINS,
    Batch,
    DataError,
    TokenDataset,
    load_dataset,
    synthetic_corpus,
    synthetic_dataset,
)


@pytest.fixture(scope="module")
def synthetic() -> TokenDataset:
    return synthetic_dataset(seed=0)


def _same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.inputs, b.inputs), (a.targets, b.targets), (a.domains, b.domains)))


def _digest(batch: Batch) -> str:
    parts = (batch.inputs, batch.targets, batch.domains)
    return hashlib.sha256(b"".join(t.numpy().astype("<i8").tobytes() for t in parts)).hexdigest()[:16]


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_and_step_give_identical_batches_from_separate_objects():
    first, second = synthetic_dataset(seed=3), synthetic_dataset(seed=3)
    for split in ("train", "eval"):
        assert _same(first.batch(5, 8, 64, split), second.batch(5, 8, 64, split))


def test_different_steps_and_seeds_differ(synthetic):
    assert not _same(synthetic.batch(0, 8, 64), synthetic.batch(1, 8, 64))
    assert not _same(synthetic.batch(0, 8, 64), synthetic_dataset(seed=1).batch(0, 8, 64))


def test_cross_machine_pin(synthetic):
    # Pins the whole generator (SeedSequence, raw PCG64, every domain, the batch sampler): a
    # change here means every stored loss curve was trained on different data. Update only on
    # purpose, and say so in the changelog.
    assert _digest(synthetic.batch(0, 8, 64)) == "30ea02f008db70ba"


def test_batch_does_not_depend_on_earlier_calls():
    fresh = synthetic_dataset(seed=0)
    used = synthetic_dataset(seed=0)
    for step in range(10):
        used.batch(step, 4, 32)
    assert _same(fresh.batch(7, 4, 32), used.batch(7, 4, 32))


# --- batch contents ---------------------------------------------------------------------------


def test_shapes_dtypes_and_shifted_targets(synthetic):
    batch = synthetic.batch(0, batch_size=6, seq_len=33)
    assert batch.inputs.shape == batch.targets.shape == (6, 33)
    assert batch.domains.shape == (6,)
    assert batch.inputs.dtype == batch.targets.dtype == batch.domains.dtype == torch.int64
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert batch.targets.is_contiguous()  # losses call targets.view(-1)
    assert int(batch.inputs.max()) < BYTE_VOCAB_SIZE


def test_each_row_is_a_window_of_its_domain(synthetic):
    batch = synthetic.batch(2, 8, 40)
    for row, label in zip(batch.inputs.numpy(), batch.domains.tolist()):
        corpus = synthetic.tokens(synthetic.domains[label]).tobytes()
        assert row.astype(np.uint8).tobytes() in corpus


def test_domain_labels_cover_all_domains_roughly_uniformly(synthetic):
    labels = torch.cat([synthetic.batch(step, 8, 16).domains for step in range(50)])
    counts = torch.bincount(labels, minlength=len(SYNTHETIC_DOMAINS))
    assert synthetic.domains == SYNTHETIC_DOMAINS
    assert counts.min() >= 70 and counts.max() <= 90  # 400 rows over 5 domains


def test_eval_split_is_held_out(synthetic):
    assert not _same(synthetic.batch(0, 8, 64, "train"), synthetic.batch(0, 8, 64, "eval"))
    for name in SYNTHETIC_DOMAINS:
        assert synthetic.tokens(name, "eval").size == synthetic_corpus(name, 0).size // 10
    # Eval windows come from the tail only; a 256-byte window of these sources never repeats by
    # chance, so finding one in the train part would mean the splits overlap.
    batch = synthetic.batch(3, 10, 256, "eval")
    for row, label in zip(batch.inputs.numpy().astype(np.uint8), batch.domains.tolist()):
        name = synthetic.domains[label]
        assert row.tobytes() in synthetic.tokens(name, "eval").tobytes()
        assert row.tobytes() not in synthetic.tokens(name, "train").tobytes()


# --- synthetic domains ------------------------------------------------------------------------


def test_construction_is_fast():
    start = time.perf_counter()
    synthetic_dataset(seed=11)
    assert time.perf_counter() - start < 0.5


def test_domains_have_distinct_byte_statistics(synthetic):
    histograms = {n: np.bincount(synthetic.tokens(n), minlength=256) / synthetic.tokens(n).size for n in SYNTHETIC_DOMAINS}
    for a in SYNTHETIC_DOMAINS:
        for b in SYNTHETIC_DOMAINS:
            if a < b:  # total variation distance; words and code share letters, hence the floor
                assert 0.5 * np.abs(histograms[a] - histograms[b]).sum() > 0.25, (a, b)
    assert set(np.unique(synthetic.tokens("dna"))) == set(b"ACGT\n")
    assert synthetic.tokens("markov").min() >= 0x80 and synthetic.tokens("markov").max() <= 0xBF


def test_arith_sums_are_correct(synthetic):
    lines = synthetic.tokens("arith").tobytes().decode("ascii").split("\n")[1:-1]  # drop cut ends
    assert len(lines) > 1000
    for line in lines:
        match = re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line)
        assert match, line
        a, b, total = map(int, match.groups())
        assert a + b == total


def test_synthetic_stream_is_learnable(synthetic):
    # log2(256) = 8 bits is what a model that learned nothing pays; these bounds leave room.
    stream = np.concatenate([synthetic.batch(step, 16, 128).inputs.numpy().ravel() for step in range(20)])
    unigram = np.bincount(stream, minlength=256)
    bigram = np.bincount(stream[:-1] * 256 + stream[1:], minlength=256 * 256)
    assert _entropy_bits(unigram) < 6.5
    assert _entropy_bits(bigram) - _entropy_bits(unigram) < 3.5  # H(next byte | byte)


def test_unknown_synthetic_domain_raises():
    with pytest.raises(DataError, match="allowed"):
        synthetic_corpus("poetry", seed=0)


# --- user sources -----------------------------------------------------------------------------


def test_uint16_token_file(tmp_path: Path):
    tokens = (np.arange(5000) * 7 % 1000).astype("<u2")
    path = tmp_path / "shard.bin"
    tokens.tofile(path)
    data = load_dataset(str(path), seed=0)
    assert data.domains == ("shard",) and data.max_token == 999
    batch = data.batch(0, 4, 32)
    assert batch.domains.tolist() == [0, 0, 0, 0]
    start = int(np.flatnonzero(tokens == batch.inputs[0, 0].item())[0])
    assert np.array_equal(tokens[start : start + 33], np.concatenate([batch.inputs[0], batch.targets[0, -1:]]))
    data.check_vocab(1000)
    with pytest.raises(DataError) as error:
        data.check_vocab(BYTE_VOCAB_SIZE)
    message = str(error.value)
    assert str(path) in message and "999" in message and "256" in message and "\n" not in message


def test_folder_of_text_files(tmp_path: Path):
    (tmp_path / "b_poems.txt").write_bytes(b"roses are red " * 20)
    (tmp_path / "a_logs.txt").write_bytes(b"INFO ok\n" * 40)
    (tmp_path / "ignored.csv").write_bytes(b"x,y\n" * 40)
    data = load_dataset(tmp_path, seed=0)
    assert data.domains == ("a_logs", "b_poems")
    batch = data.batch(0, 8, 12)
    for row, label in zip(batch.inputs.numpy().astype(np.uint8), batch.domains.tolist()):
        assert row.tobytes() in (tmp_path / f"{data.domains[label]}.txt").read_bytes()
    assert set(batch.domains.tolist()) == {0, 1}
    data.check_vocab(BYTE_VOCAB_SIZE)


def test_single_text_file(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    data = load_dataset(path, seed=0)
    assert data.domains == ("notes",)
    assert data.batch(1, 2, 16).inputs.shape == (2, 16)


@pytest.mark.parametrize("source", [None, "synthetic"])
def test_synthetic_sources(source):
    assert load_dataset(source, seed=0).domains == SYNTHETIC_DOMAINS


def _bad_sources(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "odd.u16").write_bytes(b"\x01\x02\x03")
    (tmp_path / "short.txt").write_bytes(b"hi")
    (tmp_path / "table.csv").write_bytes(b"a,b\n" * 100)
    names = ("missing.bin", "empty_dir", "empty.bin", "odd.u16", "short.txt", "table.csv")
    return {name: tmp_path / name for name in names}


@pytest.mark.parametrize("name", ["missing.bin", "empty_dir", "empty.bin", "odd.u16", "short.txt", "table.csv"])
def test_bad_source_raises_one_line_data_error(tmp_path: Path, name: str):
    path = _bad_sources(tmp_path)[name]
    with pytest.raises(DataError) as error:
        load_dataset(str(path), seed=0)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert "allowed" in message


def test_corpus_shorter_than_a_window_raises(tmp_path: Path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"x" * 200)  # eval tail: 20 tokens
    data = load_dataset(path, seed=0)
    data.batch(0, 2, 19, "eval")
    with pytest.raises(DataError, match=r"'tiny'.*eval.*seq_len \+ 1 = 21"):
        data.batch(0, 2, 20, "eval")
    with pytest.raises(DataError, match="tiny"):
        data.check_seq_len(64)


def test_bad_split_raises(synthetic):
    with pytest.raises(ValueError, match="split"):
        synthetic.batch(0, 2, 8, "test")


def test_synthetic_long_extends_the_same_streams_to_hold_128k_windows():
    from dsbench.data import DEFAULT_BYTES_PER_DOMAIN, load_dataset

    short, long = load_dataset("synthetic", 0), load_dataset("synthetic-long", 0)
    assert long.domains == short.domains and long.source == "synthetic-long"
    again = load_dataset("synthetic-long", 0)
    for a, b, c in zip(short.corpora, long.corpora, again.corpora):
        assert len(b) == 32 * len(a) == 32 * DEFAULT_BYTES_PER_DOMAIN and np.array_equal(b, c)  # seeded: the same every load
    long.check_seq_len(131072, "train")
    batch = long.batch(0, 1, 131072)
    assert batch.inputs.shape == (1, 131072)
