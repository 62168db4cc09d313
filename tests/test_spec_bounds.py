"""Bad values the spec used to accept (issue 19, class 6): numbers the results tables cannot
hold, repeated list entries (the axes already refuse them), sweeps too large to expand, and
fault-injection entries the worker would silently ignore. Each is one line naming the key."""

from __future__ import annotations

import pytest

from dsbench import spec as spec_lib
from dsbench.errors import SpecError, UsageError
from dsbench.worker import check_faults

BIG = 2**63


@pytest.mark.parametrize("raw, needle", [
    ({"seed": 2**64}, "seed: 18446744073709551616 is more than the results tables hold; allowed: up to 2**63 − 1"),
    ({"seed": BIG}, "seed: 9223372036854775808 is more than the results tables hold"),
    ({"train": {"steps": BIG}}, "train.steps: 9223372036854775808 is more than the results tables hold"),
    ({"train": {"batch_size": BIG}}, "train.batch_size"),
    ({"measure": {"repeats": BIG}}, "measure.repeats"),
    ({"measure": {"warmup": BIG}}, "measure.warmup"),
    ({"decode": {"new_tokens": BIG}}, "decode.new_tokens"),
    ({"axes": {"workload": ["prefill"]}, "prefill": {"seq_lens": [64, 64]}}, "prefill.seq_lens: 64 is listed twice"),
    ({"axes": {"workload": ["decode"]}, "decode": {"context_lens": [32, 64, 32]}}, "decode.context_lens: 32 is listed twice"),
    ({"axes": {"workload": ["prefill"]}, "prefill": {"seq_lens": [64, BIG]}}, "prefill.seq_lens: 9223372036854775808 is more than the results tables hold"),
    ({"measure": {"replicates": 10_000_000}}, "measure.replicates: 10000000 would expand to more than 100,000 cells"),
])
def test_values_the_store_cannot_hold_or_that_repeat_are_one_line(raw, needle):
    with pytest.raises(SpecError) as e:
        spec = spec_lib.parse_spec({"name": "b", "device": "cpu", **raw})
        spec_lib.expand(spec, "cpu")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_largest_int64_is_still_accepted():
    spec = spec_lib.parse_spec({"name": "b", "device": "cpu", "seed": BIG - 1})
    assert spec.seed == BIG - 1


@pytest.mark.parametrize("value", ["rais@x", "raise", "raise@", "@x", "oom@x@rank=one", "raise@a,boom@b", "segfault@x@rank="])
def test_fault_entries_the_worker_would_ignore_are_refused(value):
    with pytest.raises(UsageError) as e:
        check_faults(value)
    assert "DSBENCH_INJECT_FAULT:" in str(e.value) and "KIND one of raise, oom, hang, nan, segfault, exit" in str(e.value)


@pytest.mark.parametrize("value", ["raise@x", "hang@abc123,nan@train", "exit@prefill/moe@rank=1", ""])
def test_valid_fault_entries_pass(value):
    check_faults(value)
