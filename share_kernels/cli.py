"""The ``share-kernels`` command.

Nothing heavy is imported until a command runs (``--help`` of every command stays well under
2 s): torch, the kernels and transformers are imported inside the command functions.
"""
from __future__ import annotations

import argparse
import sys

PROG = "share-kernels"

DESCRIPTION = """\
Fused kernels and layers for continual low-rank adaptation of a frozen model (Share, InfLoRA,
PS-LoRA). The Python API (share_kernels.wrap, ContinualLearner, ...) is the main way in; these
commands benchmark the kernels, compress peft LoRA adapters and run the continual-learning
experiment."""

EPILOG = "Run 'share-kernels COMMAND --help' for a command's options. Docs: README.md."

# `share-kernels continual` defaults: the same values as harness.run.HarnessConfig (a test checks),
# written here so that --help does not import torch.
CONTINUAL_DEFAULTS = dict(
    methods=("share", "inflora", "pslora", "inflora+pslora", "seq-lora", "per-task-lora", "joint"),
    tasks=("bbc", "sentiment", "language", "chat-a", "chat-b"),
    epochs=2, batch_size=16, lr=1e-2, train_per_class=64, test_per_class=48, max_length=32,
    layers=(4, 5), targets=("query", "value"), rank=8, seed=0, dtype="float32", head_loss="own",
)


class UserError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fail(command: str, message) -> int:
    clear = "\r\033[K" if sys.stderr.isatty() else ""  # over a progress bar the error interrupted
    print(f"{clear}{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- bench


def _bench(args) -> int:
    from .bench import SUITES

    names = args.suites or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        return _fail("bench", f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    import torch

    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as e:
        return _fail("bench", f"--device {args.device!r}: {e}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail("bench", f"--device {args.device}: no CUDA device is visible (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        return _fail("bench", f"--device {args.device}: use cpu or cuda")
    from .bench import run_suites

    print(f"running {len(names)} suite(s) on {device} ({args.preset} preset): {', '.join(names)}", flush=True)
    run_suites(names, device, args.preset, args.out, echo=lambda s: print(s, flush=True))
    if args.out:
        print(f"\nCSV written under {args.out}/")
    return 0


# ----------------------------------------------------------------------------- compress


def _compress(args) -> int:
    import safetensors

    from .continual.compress import compress, parse_adapter_args

    errors = (ValueError, TypeError, ImportError, OSError, getattr(safetensors, "SafetensorError", ValueError))
    device = args.device
    try:
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        report = compress(
            parse_adapter_args(args.adapters), args.k, args.out, p=args.p, base=args.base, plot=args.plot,
            max_k=args.max_k, progress=not args.quiet, device=device,
        )
    except errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, getattr(safetensors, "SafetensorError", ())) or "safetensors" in type(e).__module__:
            given = " ".join(args.adapters)
            msg = f"cannot read an adapter_model.safetensors of {given} (corrupt or truncated?): {msg}"
        return _fail("compress", msg)
    print(report)
    print(f"\nShare adapters written to {args.out}/ (load: share_kernels.load_adapters(base_model, {args.out!r}))")
    if args.plot:
        print(f"error against k plotted to {args.plot}")
    return 0


# ----------------------------------------------------------------------------- continual


def continual_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``share-kernels continual`` (defaults: :data:`CONTINUAL_DEFAULTS`)."""
    d = CONTINUAL_DEFAULTS
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"methods to run, in order (default: {' '.join(d['methods'])})")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help=f"task stream in order (default: {' '.join(d['tasks'])})")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per task (default {d['epochs']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch size (default {d['batch_size']})")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW peak learning rate (default {d['lr']})")
    p.add_argument("--train-per-class", type=int, default=None,
                   help=f"training texts per class (default {d['train_per_class']})")
    p.add_argument("--test-per-class", type=int, default=None,
                   help=f"test texts per class (default {d['test_per_class']})")
    p.add_argument("--max-length", type=int, default=None, help=f"tokens per text (default {d['max_length']})")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="I",
                   help=f"adapted encoder layers, 0-5 (default {' '.join(map(str, d['layers']))})")
    p.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                   help=f"adapted projections (default {' '.join(d['targets'])})")
    p.add_argument("--rank", type=int, default=None, help=f"LoRA rank of every method (default {d['rank']})")
    p.add_argument("--seed", type=int, default=None, help=f"random seed of data, init and order (default {d['seed']})")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help=f"dtype of the backbone and adapters (default {d['dtype']})")
    p.add_argument("--head-loss", choices=["own", "seen"], default=None,
                   help="a task's loss over its own classes (default) or over every class seen so far "
                   "(old heads frozen)")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="a method's config field, e.g. share.k=16 (repeatable)")
    p.add_argument("--preset", choices=["default", "tiny", "long20"], default="default",
                   help="tiny: 2 tasks, a few texts (tests); long20: the 20-task stream, 32 train / 24 test texts "
                   "per class")
    p.add_argument("--out", default="continual-out",
                   help="directory for results.json and results.png (default continual-out)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-method lines stay)")


def _continual(args) -> int:
    from .harness.run import main as run_harness

    return run_harness(args)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    from .bench import SUITE_HELP, SUITES  # no torch

    suites = "\n".join(f"  {n:<19} {SUITE_HELP.get(n, '')}" for n in SUITES)
    b = sub.add_parser(
        "bench", help="benchmark the kernels against same-run baselines (F.linear, PyTorch, peft)",
        description="Run benchmark suites; print a table per suite (ratios against baselines timed in the\n"
        "same run), then each goal met or missed.",
        epilog=f"suites:\n{suites}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("suites", nargs="*", metavar="SUITE", help="suites to run (default: all; listed below)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    b.add_argument("--preset", choices=["full", "quick"], default="full",
                   help="shapes: the issues' (full, minutes) or tiny (quick, a smoke test)")
    b.add_argument("--out", default="bench-out", help="directory for the CSV files (default: bench-out)")
    b.set_defaults(func=_bench)

    c = sub.add_parser(
        "compress", help="compress peft LoRA adapters into one Share subspace and report the error",
        description="Compress peft LoRA adapter directories into one Share adapter directory (load it with "
        "share_kernels.load_adapters) and report each adapter's reconstruction error.",
    )
    c.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR",
                   help="peft adapter directories (task = dir name), or NAME=DIR to name the task")
    c.add_argument("--k", required=True, help="directions per layer (int), or an explained-energy threshold like 0.99")
    c.add_argument("--out", required=True, help="output directory (share_kernels.load_adapters reads it)")
    c.add_argument("--p", type=int, help="coefficient columns per task (default: the largest adapter rank, exact)")
    c.add_argument("--plot", metavar="PNG", help="write a PNG of the error against k (needs matplotlib)")
    c.add_argument("--base", metavar="MODEL", help="check layer names and shapes against this model's config")
    c.add_argument("--max-k", type=int, default=64, help="cap on k under an energy threshold (default 64)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--device", help="where the SVDs run: cpu or cuda (default: cuda when available, else cpu)")
    c.set_defaults(func=_compress)

    h = sub.add_parser(
        "continual", help="learn a stream of real text tasks with every method; accuracy matrices, forgetting, storage",
        description="Learn a stream of text-classification tasks on all-MiniLM-L6-v2 with every method and "
        "baseline; print accuracy matrices, forgetting and storage; write results.json and results.png. "
        "Under torchrun the methods train with DDP (gloo on CPU).",
    )
    continual_arguments(h)
    h.set_defaults(func=_continual)

    from . import gpu_check  # standard library only at import

    g = sub.add_parser(
        "gpu-check", help="first run on a GPU: compile, test every kernel, time the goal shapes, report (8 min)",
        description=(gpu_check.__doc__ or "").strip().split("\n\n")[0] or None,
    )
    gpu_check.add_arguments(g)
    g.set_defaults(func=gpu_check.run)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        return _fail(args.command, e)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
