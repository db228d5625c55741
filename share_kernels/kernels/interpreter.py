"""Test mode: Triton's CPU interpreter made to compute bf16 as a GPU does."""


def patch_bf16() -> None:
    """Make Triton's interpreter compute bf16 as the GPU does.

    The interpreter keeps bf16 as raw uint16 words: ``tl.dot`` multiplied those words as
    integers (a 16x16 bf16 dot was off by ~4e9 relative) and fp32 -> bf16 casts truncated
    instead of rounding to nearest even. Here bf16 dot operands are widened to fp32 exactly
    (a 16-bit shift; products of two bf16 are exact in fp32, as in the tensor cores' fp32
    accumulation) and fp32 -> bf16 rounds to nearest even, so the kernels' bf16 paths run
    on CPU against the float64 reference.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, "_share_kernels_bf16", False):
        return

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def narrow(data):
        bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(data)
        return np.where(nan, np.uint16(0x7FC0), rounded) if nan.any() else rounded

    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast(self, src, dst_type):
        src_t, dst_t = src.dtype.scalar, dst_type.scalar
        if src_t == tl.bfloat16 and dst_t == tl.float32:
            return widen(src)
        if src_t == tl.float32 and dst_t == tl.bfloat16:
            return interp.TensorHandle(narrow(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    builder.create_dot, builder.cast_impl = dot, cast
    builder._share_kernels_bf16 = True
