"""A data file's contents are part of cell identity (issue 19, class 8): the same path with other
bytes gives other cell ids, the digest is recorded, and --resume refuses a file that changed
since its run began. The built-in synthetic corpora carry no digest, so their ids hold."""

from __future__ import annotations

import pytest

from dsbench import data as data_lib
from dsbench import spec as spec_lib
from dsbench.errors import UsageError
from dsbench.results import load_results
from dsbench.runner import run_sweep


def corpus(path, seed: int):
    import random

    rng = random.Random(seed)
    path.write_text("".join(rng.choice("abcdefgh ") for _ in range(40_000)))
    return path


def prefill_spec(data: str):
    return spec_lib.parse_spec({"name": "d", "device": "cpu", "data": data, "axes": {"workload": ["prefill"]},
                                "prefill": {"batch_size": 1, "seq_lens": [16]}, "measure": {"warmup": 0, "repeats": 1}})


def ids(spec):
    return [c.cell_id for c in spec_lib.expand(spec, "cpu")]


def test_other_bytes_under_the_same_path_give_other_ids(tmp_path):
    path = corpus(tmp_path / "c.txt", 0)
    before = ids(prefill_spec(str(path)))
    assert ids(prefill_spec(str(path))) == before  # stable
    corpus(path, 1)  # same size, other bytes
    after = ids(prefill_spec(str(path)))
    assert after != before
    assert spec_lib.expand(prefill_spec(str(path)), "cpu")[0].data_digest == data_lib.data_digest(path)


def test_the_synthetic_corpora_carry_no_digest():
    for name in ("synthetic", "synthetic-long"):
        assert data_lib.data_digest(name) is None
        assert all(c.data_digest is None and "data_digest" not in c.identity() for c in spec_lib.expand(prefill_spec(name), "cpu"))


def test_a_folder_digest_covers_every_file(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    corpus(folder / "a.txt", 0)
    corpus(folder / "b.txt", 1)
    first = data_lib.data_digest(folder)
    corpus(folder / "b.txt", 2)
    assert data_lib.data_digest(folder) != first


def test_a_large_file_is_digested_by_size_head_and_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(data_lib, "SAMPLE_BYTES", 100)
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 5000)
    digest = data_lib.data_digest(path)
    assert digest.startswith("sampled:")
    path.write_bytes(b"x" * 4999 + b"y")  # the tail changed
    assert data_lib.data_digest(path) != digest


def test_resume_refuses_a_data_file_that_changed(tmp_path):
    path = corpus(tmp_path / "c.txt", 0)
    out = tmp_path / "run"
    run_sweep(prefill_spec(str(path)), out=out)
    assert load_results(out).cells["data_digest"].iloc[0] == data_lib.data_digest(path)
    corpus(path, 1)
    with pytest.raises(UsageError) as e:
        run_sweep(prefill_spec(str(path)), out=out, resume=True)
    assert "has changed since run 'run' started" in str(e.value) and "\n" not in str(e.value)
