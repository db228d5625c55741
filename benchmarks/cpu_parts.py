"""CPU timings of the pieces behind the vs_peft ratios (one process, A/B alternation, medians).

1. PS-LoRA's ``extra_loss()`` forward + backward over the 36 layers of vs_peft's MiniLM-sized
   BERT (r = 8, alpha = 100, fp32): ``share_kernels.stability_loss`` (the extension's C++
   kernel) against its pure-PyTorch reference.
2. The shrink ``t = x·U`` of ``lowrank_linear``'s CPU path at M = 256, k = 8: ``x @ U`` with a
   k-major U against ``(Uᵀ @ xᵀ)ᵀ``, the form the reference uses.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/cpu_parts.py [ROUNDS]``.
"""
import importlib
import statistics
import sys
import time

import torch

from share_kernels.bench import vs_peft
from share_kernels.nn import PSLoRALinear

sl = importlib.import_module("share_kernels.ops.stability_loss")


def alternate(fns, rounds):
    times = {n: [] for n in fns}
    for r in range(rounds + 1):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r:
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) * 1e3 for n, ts in times.items()}


def loss_fns():
    base = vs_peft._bert("full", torch.device("cpu"), torch.float32)
    model, _ = vs_peft._pslora(base)
    layers = [m for m in model.modules() if isinstance(m, PSLoRALinear)]

    def run(how):
        total = 0.0
        for layer in layers:
            A, B = layer.lora_A[layer.training_task], layer.lora_B[layer.training_task]
            args = (A, B * layer.scale, layer.prev_delta, layer.alpha)
            if how == "reference":
                saved, sl._cpu_kernel = sl._cpu_kernel, False  # the ops fall back to the reference
                try:
                    total = total + sl.stability_loss(*args)
                finally:
                    sl._cpu_kernel = saved
            else:
                total = total + sl.stability_loss(*args)
        total.backward()

    elements = sum(layer.prev_delta.numel() for layer in layers)
    return {h: (lambda h=h: run(h)) for h in ("kernel", "reference")}, len(layers), elements


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    fns, n_layers, elements = loss_fns()
    res = alternate(fns, rounds)
    print(f"PS-LoRA extra_loss forward + backward, {n_layers} layers, {elements / 1e6:.1f} M elements of D:")
    for n, ms in res.items():
        print(f"  {n:13s} {ms:7.1f} ms  {ms * 1e6 / elements:5.2f} ns/element")
    print("shrink t = x·U, M = 256, k = 8:")
    for d_in in (384, 1536):
        x = torch.randn(256, d_in)
        Ut = torch.randn(8, d_in)
        U = Ut.t()  # k-major, the layout the layers cache
        r = alternate({"x @ U": lambda: x @ U, "(Uᵀ xᵀ)ᵀ": lambda: (Ut @ x.t()).t()}, rounds * 50)
        print(f"  d_in {d_in}: x @ U {r['x @ U'] * 1e3:.1f} us, (Uᵀ xᵀ)ᵀ {r['(Uᵀ xᵀ)ᵀ'] * 1e3:.1f} us, "
              f"ratio {r['x @ U'] / r['(Uᵀ xᵀ)ᵀ']:.2f}x")


if __name__ == "__main__":
    main()
