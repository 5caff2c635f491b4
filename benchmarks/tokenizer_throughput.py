"""Tokenizer encode throughput (frames/s) at 64x64 and 128x128, batch sizes 1..64, two layouts.

Runs on CPU (fp32) always, and on CUDA in bf16 autocast when a GPU is present. Random-init
weights: throughput does not depend on what the weights are. With no GPU, it prints an
*estimate* for one from the encoder's FLOP count (torch's FlopCounterMode): an A100's 312 bf16
TFLOP/s at an assumed 30% utilisation. Small convnets rarely do better; treat it as a bound on
planning, not a measurement.

    .venv/bin/python benchmarks/tokenizer_throughput.py [--threads 2] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from gr2.tokenizers import Tokenizer, TokenizerConfig

RESULTS = Path(__file__).parent / "results" / "tokenizer_throughput.json"
# The default VQGAN layout, and the one the floor trains (4x4 pixels folded into channels).
LAYOUTS = {"plain": TokenizerConfig(), "folded": TokenizerConfig(patch_size=4, channels=64)}
GPU_PEAK_FLOPS = 312e12  # A100 dense bf16
GPU_UTILISATION = 0.30  # assumed, for the estimate only


def encode_flops(tokenizer: Tokenizer, resolution: int) -> int:
    """FLOPs to encode one frame at `resolution` (convolutions and matmuls, counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, 256, (1, 3, resolution, resolution), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        tokenizer.encode(x)
    return counter.get_total_flops()


def frames_per_second(tokenizer: Tokenizer, resolution: int, batch: int, seconds: float) -> float:
    x = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
    sync = torch.cuda.synchronize if tokenizer.device.type == "cuda" else (lambda: None)
    tokenizer.encode(x)  # warm-up: allocator, cuDNN / oneDNN kernel choice
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        tokenizer.encode(x)
        n += 1
    sync()
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    devices = [("cpu", "fp32")] + ([("cuda", "bf16")] if torch.cuda.is_available() else [])
    rows, estimates = [], []
    print(f"{'layout':7} {'device':6} {'dtype':5} {'res':>4} {'batch':>5} {'frames/s':>10}")
    for layout, config in LAYOUTS.items():
        for device, dtype in devices:
            tokenizer = Tokenizer(config).to(device).eval()
            for resolution in (64, 128):
                for batch in (1, 2, 4, 8, 16, 32, 64):
                    fps = frames_per_second(tokenizer, resolution, batch, args.seconds)
                    rows.append({"layout": layout, "device": device, "dtype": dtype, "resolution": resolution,
                                 "batch_size": batch, "frames_per_s": round(fps, 1)})
                    print(f"{layout:7} {device:6} {dtype:5} {resolution:4d} {batch:5d} {fps:10.1f}", flush=True)
        if not torch.cuda.is_available():
            cpu_tokenizer = Tokenizer(config).eval()
            for resolution in (64, 128):
                flops = encode_flops(cpu_tokenizer, resolution)
                fps = GPU_PEAK_FLOPS * GPU_UTILISATION / flops
                estimates.append({"layout": layout, "resolution": resolution, "gflops_per_frame": round(flops / 1e9, 3),
                                  "a100_bf16_frames_per_s_estimate": round(fps)})
                print(f"ESTIMATE (from FLOPs, not measured) {layout} A100 bf16 {resolution}x{resolution}: "
                      f"{flops / 1e9:.3f} GFLOP/frame -> ~{fps:,.0f} frames/s at {GPU_UTILISATION:.0%} of peak")

    result = {
        "benchmark": "tokenizer encode throughput",
        "layouts": {name: {"config": c.to_dict(), "parameters": sum(p.numel() for p in Tokenizer(c).parameters())}
                    for name, c in LAYOUTS.items()},
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),  # the machine is shared: read numbers against this
        "rows": rows,
        "gpu_estimates": {"assumed_peak_flops": GPU_PEAK_FLOPS, "assumed_utilisation": GPU_UTILISATION,
                          "rows": estimates},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
