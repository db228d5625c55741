"""How far repeated Share consolidations move an early task's dW on a bf16 model.

Prints, for layer 0 of a 24 -> 20 -> 16 bf16 MLP (k = 8, p = 2, tasks 'a' and 'b' trained by
random steps), ``‖dW_a(now) − dW_a(after its consolidation)‖_F / ‖dW_a(after)‖_F`` after N
plain consolidations of the same tasks and after N more task boundaries (begin_task /
end_task, the learner's path). Usage: ``python benchmarks/bf16_drift.py [N_CONSOLIDATIONS] [N_TASKS]``.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from share_kernels.continual.share import consolidate  # noqa: E402
from tests.test_share_low_precision import bf16_learner as trained, exact_delta  # noqa: E402  (the test's setup)


def main():
    n_cons = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    n_tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    model, _ = trained()
    layer = model[0]
    exact = exact_delta(layer, "a")
    err = float((layer.delta_weight("a").double() - exact).norm() / exact.norm())
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
