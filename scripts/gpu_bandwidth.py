"""Measure the device's copy bandwidth (bytes read + written per second) and a
bf16 matmul rate, the ceilings the benchmarks are judged against."""
import json
import sys

import torch


def _time(fn, reps=20):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main():
    n = 1 << 28  # 1 GiB of fp32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_GBps": round(2 * src.nbytes / t / 1e9, 1)}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _time(lambda: a @ a, reps=10)
    result["bf16_matmul_TFLOPs"] = round(2 * 8192**3 / t / 1e12, 1)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
