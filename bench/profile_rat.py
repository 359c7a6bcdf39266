"""Profile one bf16 training step of RAT (and Llama) on the GPU: the kernels that take the time.

    python bench/profile_rat.py [--model rat|llama] [--compile]
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_rat import build  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="rat")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out", default=None, help="also write the table here")
    a = p.parse_args()
    cfg = argparse.Namespace(vocab=32000, hidden=768, intermediate=2048, layers=12, heads=12, policies=3, device="cuda")
    model = build(a.model, cfg).train()
    fn = torch.compile(model) if a.compile else model
    ids = torch.randint(0, 32000, (16, 1024), device="cuda")
    for _ in range(3):
        fn(input_ids=ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fn(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=120)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
