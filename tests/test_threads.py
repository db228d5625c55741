"""``task_ids`` under threads: the ids one thread sets reach that thread's forwards only."""
import random
import threading

import torch
import torch.nn as nn

import share_kernels
from share_kernels.continual import ContinualLearner

F64 = torch.float64


def served_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(9, 14, dtype=F64), nn.GELU(), nn.Linear(14, 5, dtype=F64))
    learner = ContinualLearner(model, "share", target_modules=["0", "2"], k=4, p=2, r=2)
    for t in ("a", "b", "c"):
        learner.begin_task(t)
        with torch.no_grad():
            for prm in learner.trainable_parameters():
                prm.add_(0.3 * torch.randn_like(prm))
        learner.end_task(t)
    learner.set_task(None)
    return model


NAMES = ["a", "b", "c", "__base__"]


def single_thread(model, x, ids):
    with torch.no_grad(), share_kernels.task_ids(model, ids):
        return model(x)


def test_two_threads_inside_their_blocks_at_once():
    """Both threads enter their ``with task_ids`` and then run their forwards at the same time
    (a barrier in the second layer holds each until the other is inside too): each output is
    bit-identical to the single-thread result of its own ids."""
    model = served_model()
    x = torch.randn(6, 9, dtype=F64)
    ids = {0: ["a", "a", "b", "c", "__base__", "a"], 1: ["c", "__base__", "c", "b", "a", "b"]}
    ref = {i: single_thread(model, x, v) for i, v in ids.items()}
    assert not torch.equal(ref[0], ref[1])
    barrier = threading.Barrier(2, timeout=30)

    def meet(mod, args):
        barrier.wait()

    hook = model[2].register_forward_pre_hook(meet)
    got, errors = {}, []

    def serve(i):
        try:
            for _ in range(20):
                got.setdefault(i, []).append(single_thread(model, x, ids[i]))
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hook.remove()
    assert not errors, errors
    for i in ids:
        assert len(got[i]) == 20 and all(torch.equal(out, ref[i]) for out in got[i]), i
    # outside every block the model is the base model again
    with torch.no_grad():
        assert torch.equal(model(x), single_thread(model, x, ["__base__"] * 6))


def test_many_threads_random_ids_free_running():
    """8 threads, 50 requests each with fresh random ids (names or tensors, per sequence or per
    token), running freely: every output equals the single-thread result of its own ids."""
    model = served_model()
    n_threads, n_requests = 8, 50
    rng = random.Random(0)
    requests = []
    for _ in range(n_threads * n_requests):
        if rng.random() < 0.5:
            ids = [rng.choice(NAMES) for _ in range(4)]
            x = torch.randn(4, 9, dtype=F64)
        else:
            ids = torch.tensor([[rng.randrange(-1, 3) for _ in range(3)] for _ in range(4)])
            x = torch.randn(4, 3, 9, dtype=F64)
        requests.append((x, ids))
    ref = [single_thread(model, x, ids) for x, ids in requests]
    results = [None] * len(requests)
    errors = []

    def serve(t):
        try:
            for j in range(t, len(requests), n_threads):
                x, ids = requests[j]
                results[j] = single_thread(model, x, ids)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    wrong = sum(not torch.equal(r, e) for r, e in zip(results, ref))
    print(f"threads: {n_threads} x {n_requests} requests, wrong outputs: {wrong}")
    assert wrong == 0


def test_nested_blocks_and_the_enclosing_ids_come_back():
    model = served_model()
    x = torch.randn(3, 9, dtype=F64)
    with torch.no_grad(), share_kernels.task_ids(model, ["a", "b", "c"]):
        outer = model(x)
        with share_kernels.task_ids(model, ["c", "c", "c"]):
            inner = model(x)
        assert torch.equal(model(x), outer)
    assert torch.equal(inner, single_thread(model, x, ["c", "c", "c"]))
    assert not torch.equal(inner, outer)


def test_ids_set_in_one_thread_are_invisible_to_another():
    """A thread that runs the model while another sits inside ``task_ids`` gets the base model."""
    model = served_model()
    x = torch.randn(3, 9, dtype=F64)
    entered, done = threading.Event(), threading.Event()

    def holder():
        with torch.no_grad(), share_kernels.task_ids(model, ["a", "b", "c"]):
            entered.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(30)
    try:
        with torch.no_grad():
            plain = model(x)
    finally:
        done.set()
        t.join()
    assert torch.equal(plain, single_thread(model, x, ["__base__"] * 3))


def test_asyncio_tasks_interleaved_inside_their_blocks():
    """Two asyncio tasks enter their blocks, yield to each other, then run their forwards."""
    import asyncio

    model = served_model()
    x = torch.randn(3, 9, dtype=F64)
    ids = {0: ["a", "b", "c"], 1: ["c", "__base__", "a"]}
    ref = {i: single_thread(model, x, v) for i, v in ids.items()}

    async def serve(i):
        # grad mode is per thread, not per asyncio task: a no_grad held across an await would be
        # undone out of order by the other task and leave grad off; keep it around the forward only
        with share_kernels.task_ids(model, ids[i]):
            await asyncio.sleep(0)  # the other task enters its block here
            await asyncio.sleep(0)
            with torch.no_grad():
                return model(x)

    async def both():
        return await asyncio.gather(serve(0), serve(1))

    out = asyncio.run(both())
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
