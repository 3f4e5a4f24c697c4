// The kernels of src/gradclip/cupy/_kernels.cu, built for the CPU with
// emulator.h and exported with C linkage for ctypes (tests/cuda_emulator/__init__.py).
#include "emulator.h"
#include "_kernels.cu"

extern "C" {

#define EMU_NORM(NAME)                                                                       \
    void emu_##NAME(unsigned grid, const i64* tab, int n, int chunks, int nbig, i64 chunk,      \
                    double p, int zero, int smallk, i64 total, double* wv, int* wi, char* out,  \
                    int res64, int mode, int skip, double max_norm, double eps,                 \
                    const void* max_norm_at) {                                                  \
        gc_launch(grid, GC_THREADS, [=] {                                                       \
            NAME(tab, n, chunks, nbig, chunk, p, zero, smallk, total, wv, wi, out, res64, mode, \
                 skip, max_norm, eps, max_norm_at);                                             \
        });                                                                                     \
    }

EMU_NORM(gc_norm_p2)
EMU_NORM(gc_norm_p1)
EMU_NORM(gc_norm_p)
EMU_NORM(gc_norm_inf)
EMU_NORM(gc_norm_neginf)
EMU_NORM(gc_norm_zero)

void emu_gc_given(unsigned grid, const void* norms, int count, const i64* sizes, char* out,
                  int res64, int mode, int skip, double max_norm, double eps,
                  const void* max_norm_at) {
    gc_launch(grid, GC_THREADS, [=] {
        gc_given(norms, count, sizes, out, res64, mode, skip, max_norm, eps, max_norm_at);
    });
}

void emu_gc_scale(unsigned grid, const i64* tab, int n, int chunks, int nbig, i64 chunk,
                  const void* scales, int per_leaf, int res64, int zero, u64 out_base) {
    gc_launch(grid, GC_THREADS, [=] {
        gc_scale(tab, n, chunks, nbig, chunk, scales, per_leaf, res64, zero, out_base);
    });
}

void emu_gc_clamp_kernel(unsigned grid, const i64* tab, int n, int chunks, int nbig, i64 chunk,
                         u32 lo16, u32 hi16, u32 lob, u32 hib, float lof, float hif, double lod,
                         double hid, int has_lo, int has_hi, int zero, const bool* finite,
                         u64 out_base) {
    gc_launch(grid, GC_THREADS, [=] {
        gc_clamp_kernel(tab, n, chunks, nbig, chunk, lo16, hi16, lob, hib, lof, hif, lod, hid,
                        has_lo, has_hi, zero, finite, out_base);
    });
}
}
