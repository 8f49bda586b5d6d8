"""Compile every Triton kernel of softtopk for an sm_90 GPU (H100/H200) without a GPU: Triton's frontend, its MLIR
passes and the bundled ptxas. Catches what the interpreter does not (Python that jit code may not contain, types
that change across loop iterations). Run by tests/kernels/test_triton_compile.py in a subprocess with
``TRITON_INTERPRET=0`` (under the interpreter, kernels are not compilable objects); exit status = failures.
"""

from __future__ import annotations

import sys
import traceback


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import softtopk.kernels._triton_kernels as K

    target = GPUTarget("cuda", 90, 32)
    P32, P16, PI8, PI64 = "*fp32", "*bf16", "*i8", "*i64"
    specs = {
        "threshold_row_kernel": (
            dict(
                x_ptr=P16,
                k_ptr=P32,
                t_ptr=P32,
                y_ptr=P32,
                tau_ptr=P32,
                c_ptr=P32,
                ok_ptr=PI8,
                n="i32",
                stride_x="i32",
                stride_y="i32",
                tol="fp32",
                max_iter="i32",
            ),
            dict(FAMILY=None, BLOCK=1024, START_STEPS=16),
        ),
        "threshold_backward_row_kernel": (
            dict(
                g_ptr=P32,
                y_ptr=P32,
                x_ptr=P16,
                t_ptr=P32,
                tau_ptr=P32,
                c_ptr=P32,
                gx_ptr=P32,
                gk_ptr=P32,
                gt_ptr=P32,
                n="i32",
                stride_g="i32",
                stride_y="i32",
                stride_x="i32",
                stride_gx="i32",
            ),
            dict(FAMILY=None, BLOCK=1024, NEED_T=True),
        ),
        "row_stats_kernel": (dict(x_ptr=P32, part_ptr=P32, n="i32", stride_x="i32", n_blocks="i32"), dict(BLOCK=4096)),
        "threshold_eval_kernel": (
            dict(
                x_ptr=P32,
                t_ptr=P32,
                tau_ptr=P32,
                c_ptr=P32,
                active_ptr=PI8,
                part_ptr=P32,
                y_ptr=P32,
                n="i32",
                stride_x="i32",
                stride_y="i32",
                n_blocks="i32",
            ),
            dict(FAMILY=None, BLOCK=4096, WRITE=True),
        ),
        "threshold_update_kernel": (
            dict(
                part_ptr=P32,
                k_ptr=P32,
                n_live_ptr=P32,
                tau_ptr=P32,
                lo_ptr=P32,
                hi_ptr=P32,
                active_ptr=PI8,
                ok_ptr=PI8,
                tol="fp32",
                n_blocks="i32",
            ),
            dict(FAMILY=None, BLOCK_P=256),
        ),
        "exact_mask_kernel": (
            dict(x_ptr=P32, none_ptr=PI8, full_ptr=PI8, y_ptr=P32, n="i32", stride_x="i32", stride_y="i32"),
            dict(BLOCK=4096),
        ),
        "threshold_backward_sums_kernel": (
            dict(g_ptr=P32, y_ptr=P32, part_ptr=P32, n="i32", stride_g="i32", stride_y="i32", n_blocks="i32"),
            dict(FAMILY=None, BLOCK=4096),
        ),
        "threshold_backward_apply_kernel": (
            dict(
                g_ptr=P32,
                y_ptr=P32,
                x_ptr=P32,
                t_ptr=P32,
                tau_ptr=P32,
                c_ptr=P32,
                gbar_ptr=P32,
                gx_ptr=P32,
                part_ptr=P32,
                n="i32",
                stride_g="i32",
                stride_y="i32",
                stride_x="i32",
                stride_gx="i32",
                n_blocks="i32",
            ),
            dict(FAMILY=None, BLOCK=4096, NEED_T=True),
        ),
        "dftopk_row_kernel": (
            dict(
                x_ptr=P16,
                k_ptr=PI64,
                t_ptr=P32,
                y_ptr=P32,
                tau_ptr=P32,
                idx_ptr=PI64,
                n="i32",
                stride_x="i32",
                stride_y="i32",
            ),
            dict(BLOCK=1024),
        ),
        "radix_histogram_kernel": (
            dict(x_ptr=P32, prefix_ptr=PI64, hist_ptr="*i32", n="i32", stride_x="i32", n_blocks="i32"),
            dict(SHIFT=16, BLOCK=4096),
        ),
        "locate_kernel": (
            dict(x_ptr=P32, ka_ptr=PI64, skip_ptr=PI64, part_ptr=PI64, n="i32", stride_x="i32", n_blocks="i32"),
            dict(BLOCK=4096),
        ),
        "dftopk_mask_kernel": (
            dict(x_ptr=P32, t_ptr=P32, tau_ptr=P32, y_ptr=P32, n="i32", stride_x="i32", stride_y="i32"),
            dict(BLOCK=4096),
        ),
        "dftopk_backward_kernel": (
            dict(
                g_ptr=P32,
                y_ptr=P32,
                x_ptr=P32,
                t_ptr=P32,
                tau_ptr=P32,
                gx_ptr=P32,
                part_ptr=P32,
                n="i32",
                stride_g="i32",
                stride_y="i32",
                stride_x="i32",
                stride_gx="i32",
                n_blocks="i32",
            ),
            dict(BLOCK=4096, NEED_T=True),
        ),
    }
    kernels = {name for name in dir(K) if name.endswith("_kernel")}
    bad = len(kernels ^ set(specs))
    if bad:
        print("FAIL: kernels without a signature here, or signatures without a kernel:", sorted(kernels ^ set(specs)))
    for name, (sig, consts) in specs.items():
        # every family's φ and φ' through the one-program kernels; one family for the others (same elementwise code)
        fams = ((0, 1, 2, 3) if "_row_" in name else (3,)) if "FAMILY" in consts else (None,)
        for fam in fams:
            c = dict(consts)
            if fam is not None:
                c["FAMILY"] = fam
            fn = getattr(K, name)
            full_sig = {**sig, **{k: "constexpr" for k in c}}
            try:
                src = ASTSource(fn, full_sig, constexprs={(fn.arg_names.index(k),): v for k, v in c.items()})
                triton.compile(src, target=target, options={"num_warps": 8})
                print("ok", name, fam)
            except Exception as e:
                bad += 1
                print("FAIL", name, fam, "".join(traceback.format_exception_only(e))[-2000:])
    return bad


if __name__ == "__main__":
    sys.exit(main())
