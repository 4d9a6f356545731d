"""Cost of the vMF correction: forward + backward of the DINO loss, vMF on vs off.

K = 65536 prototypes, p = 256, batch 64, 2 global + 8 local crops, as in DINO's
ViT recipes. Both variants are timed alternately in one process; the printed figure
is the median of the per-round ratios (target: at most 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raydino.objectives import DINOTerm, Temperatures, Views


def _inputs(k: int, batch: int, crops: int, device: torch.device, learned_norms: bool):
    student = [torch.randn(batch, k, device=device, requires_grad=True) for _ in range(crops)]
    teacher = [torch.randn(batch, k, device=device) for _ in range(2)]
    s_norms = (torch.rand(k, device=device) + 0.5).requires_grad_(learned_norms)
    t_norms = torch.rand(k, device=device) + 0.5
    return student, teacher, s_norms, t_norms


def _time(term: DINOTerm, inputs, device: torch.device) -> float:
    student, teacher, s_norms, t_norms = inputs
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = term(student=Views(student, s_norms), teacher=Views(teacher, t_norms), temps=Temperatures(0.1, 0.04))
    term.commit()
    out.loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--centering", default="logit")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument(
        "--frozen-norms", action="store_true", help="prototype norms without gradient (norm_last_layer=True)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    inputs = _inputs(args.prototypes, args.batch, 2 + args.local_crops, device, not args.frozen_norms)
    losses = {vmf: DINOTerm(args.prototypes, args.dim, vmf=vmf, centering=args.centering).to(device) for vmf in (False, True)}
    for vmf in (False, True):  # warm-up
        _time(losses[vmf], inputs, device)
    times: dict[bool, list[float]] = {False: [], True: []}
    ratios = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for vmf in order:
            times[vmf].append(_time(losses[vmf], inputs, device))
        ratios.append(times[True][-1] / times[False][-1])
    print(
        f"vmf_overhead  K={args.prototypes} p={args.dim} batch={args.batch} crops=2+{args.local_crops} "
        f"centering={args.centering} norms={'frozen' if args.frozen_norms else 'learned'} device={device} threads={torch.get_num_threads()} rounds={args.rounds}"
    )
    print(f"  DINO     median {statistics.median(times[False]) * 1e3:8.1f} ms")
    print(f"  DINO-vMF median {statistics.median(times[True]) * 1e3:8.1f} ms")
    print(f"  median ratio vMF / plain: {statistics.median(ratios):.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
