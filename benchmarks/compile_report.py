"""Compile the Triton kernels ahead of time for a CUDA target (default sm_90) and print the
compiler's resource report per autotune configuration: registers, spill stack, shared memory,
and whether the dots became Hopper ``wgmma``. Needs no GPU (Triton's bundled ptxas), so it
catches compile errors and register spills on a CPU-only machine.

    python benchmarks/compile_report.py                 # every config, bf16 / fp16 / fp32
    python benchmarks/compile_report.py --dtypes bf16 --quick
"""
import argparse
import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report needs the real Triton compiler: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from share_kernels.kernels import lowrank_linear as llk  # noqa: E402

UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_ur", "stride_cn", "stride_yn", "stride_tr", "stride_b")
PTR_DTYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def lowrank_linear_variants(dtype: str, block_r: int, quick: bool):
    """(name, jit fn, signature, constexprs, options) for each config of the fused kernel."""
    jf = llk._lowrank_linear_fwd_kernel.fn.fn
    configs = llk._DECODE + llk._MID + llk._PREFILL
    if quick:
        configs = [llk._DECODE[0], llk._PREFILL[0]]
    for cfg in configs:
        const = dict(
            HAS_BIAS=True, STORE_T=False, W_K_CONTIG=True, BLOCK_R=block_r,
            DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", SPLIT_T=dtype != "fp32", EVEN_K=True, **cfg.kwargs,
        )
        # As at run time on row-major operands: unit strides specialised to 1, pointers and the
        # other integers 16-divisible (d = 4096), which is what enables cp.async pipelining.
        const.update({n: 1 for n in UNIT_STRIDES})
        sig, attrs = {}, {}
        for i, n in enumerate(jf.arg_names):
            if n in const:
                sig[n] = "constexpr"
                continue
            sig[n] = ("*fp32" if n == "t_ptr" else PTR_DTYPE[dtype]) if n.endswith("_ptr") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        name = "lowrank_linear BM={BLOCK_M} BN={BLOCK_N} BK={BLOCK_K}".format(**cfg.kwargs)
        name += f" w{cfg.num_warps} s{cfg.num_stages} k<={block_r} {dtype}"
        yield name, jf, sig, const, attrs, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def resource_usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = [ln for ln in out.splitlines() if "REG:" in ln][-1]
    fields = dict(kv.split(":", 1) for kv in line.split() if ":" in kv)
    return f"regs {fields['REG']:>3}  spill-stack {fields['STACK']:>5}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", nargs="*", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--ranks", nargs="*", type=int, default=[16, 64])
    ap.add_argument("--quick", action="store_true", help="one decode and one prefill config")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 64 if args.arch < 100 else 32)
    failures = 0
    for dtype in args.dtypes:
        for block_r in args.ranks:
            for name, jf, sig, const, attrs, opts in lowrank_linear_variants(dtype, block_r, args.quick):
                constexprs = {(jf.arg_names.index(k),): v for k, v in const.items()}
                src = ASTSource(fn=jf, signature=sig, constexprs=constexprs, attrs=attrs)
                try:
                    ck = triton.compile(src, target=target, options=opts)
                except Exception as e:  # report every config, then fail
                    failures += 1
                    print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                wgmma = ck.asm["ptx"].count("wgmma.mma_async")
                print(f"{name:60s} {resource_usage(ck.asm['cubin'])}  smem {ck.metadata.shared:>6}  wgmma {wgmma}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
