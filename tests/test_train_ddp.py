"""DistributedDataParallel: two CPU processes under gloo train a tiny config;
both ranks must end with identical weights, rank 0 alone writes the run
directory, and validation counts are reduced over both ranks."""
import json
import os
import socket

import torch
import torch.multiprocessing as mp
from _train_helpers import data_cache, tiny_args  # noqa: F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: list, dump_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastmod.train import cli, loop

    original = loop.Trainer.close

    def close_and_dump(self):
        torch.save({k: v.clone() for k, v in self.model.state_dict().items()},
                   os.path.join(dump_dir, f"rank{rank}.pt"))
        original(self)

    loop.Trainer.close = close_and_dump
    rc = cli.main(args)
    if rc != 0:
        raise SystemExit(f"rank {rank}: exit status {rc}")


def test_two_process_gloo_identical_weights(data_cache, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(data_cache, out, "cnn-lstm", "model.fc_dropout=0.2", epochs=2)
    # Generate the dataset in this process first so both ranks find it cached.
    from fastmod.train import cli

    assert cli.main(tiny_args(data_cache, tmp_path / "warm", "lstm", steps=1)) == 0
    mp.spawn(_worker, args=(2, _free_port(), args, str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt")
    w1 = torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    for k in w0:
        assert torch.equal(w0[k], ck["model"][k]), k
    # 48 questions, 2 ranks x batch 8 -> 3 steps per epoch; val covers all 16 questions once.
    assert ck["step"] == 6
    res = json.loads((out / "results.json").read_text())
    assert res["final"]["num_questions"] == 16
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "end" for r in recs) == 1  # rank 0 logs alone
