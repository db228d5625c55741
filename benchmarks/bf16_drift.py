"""How far repeated Share consolidations move an early task's dW on a bf16 model.

Prints, for layer 0 of a 24 -> 20 -> 16 bf16 MLP (k = 8, p = 2, tasks 'a' and 'b' trained by
random steps), ``‖dW_a(now) − dW_a(after its consolidation)‖_F / ‖dW_a(after)‖_F`` after N
plain consolidations of the same tasks and after N more task boundaries (begin_task /
end_task, the learner's path). Usage: ``python benchmarks/bf16_drift.py [N_CONSOLIDATIONS] [N_TASKS]``.
"""
import sys
import time

import torch
import torch.nn as nn

from share_kernels.continual import ContinualLearner
import share_kernels.continual.share as share_mod
from share_kernels.continual.share import consolidate


def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20, dtype=torch.bfloat16), nn.GELU(), nn.Linear(20, 16, dtype=torch.bfloat16))
    learner = ContinualLearner(model, "share", target_modules=["0", "2"], k=8, p=2, r=2, phi=2)
    for t in ("a", "b"):
        learner.begin_task(t)
        with torch.no_grad():
            for prm in learner.trainable_parameters():
                prm.add_(0.3 * torch.randn_like(prm))
        learner.end_task(t)
    return model, learner


def main():
    n_cons = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    n_tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    model, _ = trained()
    layer = model[0]
    m = getattr(layer, getattr(share_mod, "_MASTER", ""), None)  # None before the float64 state existed
    if m is not None:
        ea, eb = m["eps"]["a"]
        exact = layer.scale * m["V"] @ eb @ ea.t() @ m["U"].t()
        stored = layer.delta_weight("a").double()
        err = float((stored - exact).norm() / exact.norm())
        print(f"stored bf16 dW of 'a' vs its float64 value after the first merge: {err:.2e}")
    for what, n in (("consolidations", n_cons), ("task boundaries", n_tasks)):
        model, learner = trained()
        d0 = model[0].delta_weight("a").double()
        t0 = time.perf_counter()
        for i in range(n):
            if what == "consolidations":
                consolidate(learner.layers, after="a", k=8)
            else:
                learner.begin_task(f"t{i}")
                learner.end_task(f"t{i}")
        d = model[0].delta_weight("a").double()
        moved = float((d - d0).norm() / d0.norm())
        print(f"{n} {what}: dW of 'a' moved by {moved:.2e} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
