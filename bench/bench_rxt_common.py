"""Helpers shared by the RxT benchmarks (bench_rxt_conversation.py, bench_rxt_attention.py): timing and results."""

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # rat_hf from this checkout, installed or not


def base_parser(doc: str, default_out: str, tiny_help: str) -> argparse.ArgumentParser:
    """`--out`, `--device` (default cuda) and `--tiny` (the CPU smoke test), which every RxT benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    return parser


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    """`(fn(), seconds)`, with the device's queued work finished on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def bench_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def write_results(path: str, device: str, rows: list[dict], **extra) -> None:
    """JSON with the device, the date, the exact command, library versions and the rows."""
    import transformers

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    record = dict(
        device=torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join(sys.argv),
        torch=torch.__version__,
        transformers=transformers.__version__,
        **extra,
        rows=rows,
    )
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def png_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".png"


def pyplot():
    """matplotlib's pyplot on a headless backend, or None (the JSON is written either way)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    return plt
