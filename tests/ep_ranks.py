"""One rank of tests/test_expert_parallel.py's checks, run under torchrun:
`python -m torch.distributed.run --standalone --nproc-per-node R tests/ep_ranks.py CONFIG_JSON OUT_DIR`.

Builds the config's model from seed 0, shards its experts, runs forward and backward on this
rank's slice of the test batch (ep_case.batch), syncs gradients and saves what the test compares.
"""

import json
import os
import sys

import torch

from dsbench import distributed
from ep_case import batch, build


def main(config_json: str, out_dir: str) -> None:
    case = json.loads(config_json)
    ranks = distributed.Ranks(*[int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")])
    torch.distributed.init_process_group("gloo")
    model = build(case)
    inputs, targets = batch(case)
    rows = slice(ranks.rank * case["batch"], (ranks.rank + 1) * case["batch"])
    placements = None
    if case.get("redundant"):  # EPLB from this very batch's load
        placements = distributed.eplb_placements(model, ranks, inputs[rows], case["redundant"])
        model.train()
    shards = distributed.shard(model, ranks, placements)
    out = model.forward_losses(inputs[rows], targets[rows])
    out.total().backward()
    distributed.sync_gradients(model, ranks)
    record = {
        "loss": out.losses["lm"].detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "ranks_per_token": [s.records[-1].ranks_reached / s.records[-1].tokens for s in shards],
        "rows_received": [s.records[-1].rows_received for s in shards],
        "bytes_sent": [s.records[-1].bytes_sent for s in shards],
        "phy2log": [None if p is None else p.phy2log_P for p in (placements or [None] * len(shards))],
    }
    torch.save(record, f"{out_dir}/rank{ranks.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
