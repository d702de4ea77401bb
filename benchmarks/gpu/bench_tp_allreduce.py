"""Cost of Kara's one score all-reduce per compression step under tensor parallelism (NCCL).

    python3 benchmarks/gpu/bench_tp_allreduce.py --gpus 2 --out $OUT/tp_allreduce.json

A compression step reduces one float32 vector of ``windows * W`` scores (kara_sglang/tp.py).
This times exactly that call, ``torch.distributed.all_reduce(SUM)`` on a fresh NCCL group, for
window counts from 1 to 256 at W = 512 (CUDA events, median of 200 after 20 warm-up calls),
and prints one JSON row per size.
"""

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank, world, port, sizes, window, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    rows = []
    for windows in sizes:
        flat = torch.rand(windows * window, device="cuda")
        for _ in range(20):
            dist.all_reduce(flat)
        times = []
        for _ in range(200):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_reduce(flat)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        rows.append({"tp_size": world, "windows": windows, "window": window, "bytes": flat.numel() * 4,
                     "allreduce_us_median": statistics.median(times),
                     "allreduce_us_p90": sorted(times)[int(0.9 * len(times))],
                     "device": torch.cuda.get_device_name(rank)})
    if rank == 0:
        for row in rows:
            print(json.dumps(row), flush=True)
        if out:
            with open(out, "w") as f:
                json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    mp.spawn(_rank, args=(a.gpus, 29531, [1, 8, 32, 128, 256], a.window, a.out), nprocs=a.gpus, join=True)
