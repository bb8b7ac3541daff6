"""Speed and memory figures: ``dtnreg benchmark`` (network inference and one training step).

Each measurement runs in a fresh subprocess so that its peak memory (max RSS, or the CUDA allocator's
peak) is its own. Inference = network + scaling and squaring + warp, in ``torch.inference_mode``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _measure(kind: str, size: tuple[int, int, int], runs: int, device: str, variant: str, options: dict) -> dict:
    import resource

    import torch

    from ..core import losses, spatial
    from ..core.network import DTNConfig, build_model, to_device

    torch.manual_seed(0)
    dev = torch.device(device)
    model = to_device(build_model(DTNConfig(variant=variant, **options)), dev)  # the pipeline's layout
    moving, fixed = torch.rand(1, 1, *size, device=dev), torch.rand(1, 1, *size, device=dev)
    times = []
    if kind == "inference":
        model.eval()
        for _ in range(runs + 1):  # the first run warms up and is not counted
            start = time.perf_counter()
            with torch.inference_mode():
                v = model(moving, fixed, 0.1)
                u = model.displacement(v, size)
                spatial.warp(moving, u)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    else:
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.999))
        for _ in range(runs + 1):
            start = time.perf_counter()
            optimiser.zero_grad()
            v, _, warped = model.register(moving, fixed, 0.1)
            (losses.l1(warped, fixed) + 0.1 * losses.gradient_smoothness(v)).backward()
            optimiser.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "kind": kind,
        "size": "x".join(map(str, size)),
        "variant": variant + "".join(f", {k}={v}" for k, v in options.items()),
        "device": device,
        "median_s": statistics.median(times[1:]),
        "min_s": min(times[1:]),
        "runs": runs,
        "peak_memory_mb": round(peak_mb),
        "threads": torch.get_num_threads(),
    }


def _in_subprocess(kind: str, size, runs: int, device: str, variant: str, options: dict | None = None) -> dict:
    code = (
        "import json,sys;from DTNRegistrationLib.evaluate.benchmark import _measure;"
        f"print(json.dumps(_measure({kind!r}, {tuple(size)!r}, {runs}, {device!r}, {variant!r}, {options or {}!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def run_benchmark(args) -> list[dict]:
    import torch

    sizes = [tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        rows.append(_in_subprocess("inference", size, args.runs, args.device, args.variant))
    # the design choice that matters most: velocity (and the last decoder level) at full resolution
    rows.append(_in_subprocess("inference", sizes[0], args.runs, args.device, args.variant, {"velocity_level": 0}))
    rows.append(_in_subprocess("inference", sizes[0], args.runs, args.device, "none"))
    half = tuple(n // 2 if (n // 2) % 16 == 0 else n // 2 + 16 - (n // 2) % 16 for n in sizes[0])
    rows.append(_in_subprocess("train_step", half, max(3, args.runs // 2), args.device, args.variant))
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""
    print(f"# dtnreg benchmark: {machine()}{gpu}; torch {torch.__version__}")
    print("| what | grid | variant | device | median s | min s | runs | peak memory MB | threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['size']} | {r['variant']} | {r['device']} | {r['median_s']:.3f} | {r['min_s']:.3f} "
            f"| {r['runs']} | {r['peak_memory_mb']} | {r['threads']} |"
        )
    return rows
