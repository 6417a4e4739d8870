"""GPU check: parity with torch's fused CUDA optimizers and step timings, in one command.

    python -m bench.gpu_check [--numel 268435456] [--repeats 20]

Needs a CUDA GPU, a CUDA build of torch and numba-cuda with the CUDA toolkit's NVRTC
(``pip install 'numba-cuda[cu12]'`` or ``[cu13]``, matching the driver).

1. Parity: a few parameter shapes, 30 steps with fixed random gradients, ours against
   ``torch.optim`` with ``fused=True`` on the same device; the largest relative
   difference of parameters and state, per optimizer (float32: both round per op).
2. Timing on one buffer of ``--numel`` float32 parameters (256M by default): median step
   time of fastmomentum, torch fused and torch foreach (CUDA events, after warm-up), and
   the ceiling: a device-to-device copy's bandwidth applied to the step's bytes.
"""

import statistics

import torch

import fastmomentum

from . import cli

OPTIMIZERS = {
    "SGD momentum": ("SGD", {"lr": 1e-2, "momentum": 0.9}),
    "SGD Nesterov": ("SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    "Adam": ("Adam", {"lr": 1e-3}),
    "Adam amsgrad": ("Adam", {"lr": 1e-3, "amsgrad": True, "weight_decay": 1e-2}),
    "AdamW": ("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),
}
ARRAYS_MOVED = {"SGD": 5, "Adam": 7, "AdamW": 7}  # reads + writes per parameter
SHAPES = [(1000, 257), (4096,), (3, 64, 7, 7), (1,), (0,), (33, 1023)]
#: Float32 on both sides, each op rounded (and fused into FMAs by NVCC/NVVM alike); the
#: CPU parity tests see at most 4e-6 after 120 steps.
TOLERANCE = 1e-5


def make_params(shapes, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device=device, generator=generator))
        params.append(param)
    return params


def relative_difference(a, b):
    if a.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def parity(device, flat_gradients):
    """Worst relative differences to torch fused after 30 steps, per optimizer.

    ``flat_gradients``: ``zero_grad(set_to_none=False)`` and gradients copied into the
    existing ``.grad`` (pieces of our gradient allocation); otherwise a fresh gradient
    tensor per parameter each step (read where it lies). One launch per step either way.
    """
    rows = []
    for label, (name, options) in OPTIMIZERS.items():
        ours_params, fused_params = make_params(SHAPES, device), make_params(SHAPES, device)
        ours = getattr(fastmomentum, name)(ours_params, **options)
        fused = getattr(torch.optim, name)(fused_params, fused=True, **options)
        generator = torch.Generator(device=device).manual_seed(1)
        for _ in range(30):
            ours.zero_grad(set_to_none=not flat_gradients)
            for p, q in zip(ours_params, fused_params):
                grad = torch.randn(p.shape, device=device, generator=generator)
                if flat_gradients and p.grad is not None:
                    p.grad.copy_(grad)
                else:
                    p.grad = grad.clone()
                q.grad = grad.clone()
            ours.step()
            fused.step()
        torch.cuda.synchronize(device)
        worst = max(
            relative_difference(p.detach(), q.detach()) for p, q in zip(ours_params, fused_params)
        )
        worst_state = max(
            (
                relative_difference(ours.state[p][key], value)
                for p, q in zip(ours_params, fused_params)
                for key, value in fused.state[q].items()
                if key != "step"
            ),
            default=0.0,
        )
        rows.append((label, worst, worst_state))
    return rows


def median_ms(step, repeats, device):
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device, numel, repeats):
    """Bytes per second of a device-to-device copy of ``numel`` float32 values."""
    source = torch.empty(numel, device=device)
    target = torch.empty_like(source)
    milliseconds = median_ms(lambda: target.copy_(source), repeats, device)
    return 2 * numel * 4 / (milliseconds / 1e3)


def timings(device, numel, repeats):
    bandwidth = copy_bandwidth(device, numel, repeats)
    torch.cuda.empty_cache()
    rows = []
    for label, (name, options) in OPTIMIZERS.items():
        if label == "Adam amsgrad":
            continue
        moved = ARRAYS_MOVED[name] * numel * 4
        result = {"ceiling": moved / bandwidth * 1e3}
        for provider in ("fastmomentum", "torch fused", "torch foreach"):
            param = torch.nn.Parameter(torch.randn(numel, device=device))
            param.grad = torch.randn(numel, device=device)
            if provider == "fastmomentum":
                optimizer = getattr(fastmomentum, name)([param], **options)
            else:
                flag = {"fused": True} if provider == "torch fused" else {"foreach": True}
                optimizer = getattr(torch.optim, name)([param], **options, **flag)
            result[provider] = median_ms(optimizer.step, repeats, device)
            del optimizer, param
            torch.cuda.empty_cache()
        rows.append((label, moved, result))
    return bandwidth, rows


def main(argv=None):
    parser = cli.parser("bench.gpu_check", __doc__)
    parser.add_argument(
        "--numel", type=cli.positive_int, default=256 * 2**20, help="parameters in the buffer"
    )
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=20, help="timed steps per optimizer"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch: nothing to check")
    device = torch.device("cuda", torch.cuda.current_device())
    print(
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}"
    )

    print("\nParity with torch fused, float32, 30 steps (max relative difference)")
    print(f"{'optimizer':14} {'gradients':18} {'params':>10} {'state':>10}")
    failed = False
    for flat in (False, True):
        for label, params, state in parity(device, flat):
            kind = "flat views" if flat else "read in place"
            failed |= max(params, state) > TOLERANCE
            print(f"{label:14} {kind:18} {params:10.2e} {state:10.2e}")

    bandwidth, rows = timings(device, args.numel, args.repeats)
    print(
        f"\nOne buffer of {args.numel / 2**20:.0f}M float32 parameters, median of "
        f"{args.repeats} steps; device-to-device copy: {bandwidth / 1e9:.0f} GB/s"
    )
    print(
        f"{'optimizer':14} {'ours ms':>9} {'fused ms':>9} {'foreach ms':>10} {'ceiling ms':>10} "
        f"{'ours/fused':>10} {'ours/ceiling':>12}"
    )
    for label, _, result in rows:
        ours, fused = result["fastmomentum"], result["torch fused"]
        print(
            f"{label:14} {ours:9.3f} {fused:9.3f} {result['torch foreach']:10.3f} "
            f"{result['ceiling']:10.3f} {ours / fused:10.2f} {ours / result['ceiling']:12.2f}"
        )

    if failed:
        raise SystemExit(f"parity FAILED: a difference above {TOLERANCE:g}")


if __name__ == "__main__":
    main()
