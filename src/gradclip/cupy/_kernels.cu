// gradclip's CUDA kernels: a multi-tensor norm, scale and clamp over any number
// of leaves of mixed dtypes.
//
// Compiled at run time by NVRTC through cupy.RawModule (gradclip/cupy/_launch.py).
// The tests compile it for sm_80 and sm_90 with NVRTC, and also run it on the
// CPU (tests/cuda_emulator/): so it uses no CUDA headers, no warp intrinsics and
// no dynamic shared memory, only what that emulator provides.
//
// Every kernel works from one int64 table built on the host (see _launch.Table):
//   ptr[n] size[n] code[n] first_chunk[n + 1] chunk_leaf[C] chunk_start[C]
//   big[nbig] out_offset[n]
// A block handles one chunk: up to `chunk` elements of one leaf. No launch is
// made per leaf.
//
// The norm is deterministic: each block reduces its chunk in a fixed tree
// order and writes a partial; the last block to finish (an integer ticket,
// no float atomics) merges the partials in a fixed order, per leaf and then
// over the leaves. Accumulators are float64, and a p-norm is kept as
// (exponent e, sum s) with norm**p = 2**(p*e) * s, rescaled by powers of two
// (exact) whenever a larger element arrives, so no sum can overflow or lose
// small entries to underflow, for float64 leaves too (subnormals included).
//
// Subnormals are kept, as torch and NumPy keep them, although CuPy compiles
// every kernel with -ftz=true (cupy/cuda/compiler.py appends it after the
// caller's options, and NVRTC takes the last): float32 instructions would then
// flush subnormal inputs and results to zero, and a float32 leaf of 3e-39 would
// have a norm of 0. So no float32 arithmetic, comparison or conversion is
// written here as such: they go through gc_wide, gc_narrow and gc_mul (PTX
// without .ftz), or are done in float64, which -ftz leaves alone, and rounded
// to float32 once (tests/test_cupy_kernels.py checks the PTX for .ftz).

#ifndef GC_THREADS
#define GC_THREADS 256  // threads per block; the launcher passes the same value
#endif

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// dtype codes (_launch.CODES)
#define GC_F16 0
#define GC_BF16 1
#define GC_F32 2
#define GC_F64 3
#define GC_C64 4
#define GC_C128 5

// norm kinds (one kernel each: _launch._NORM_KERNELS)
#define GC_P 0
#define GC_INF 1
#define GC_NEGINF 2
#define GC_ZERO 3

// what the last block computes scales for (_launch.MODES)
#define GC_GLOBAL 0  // one scale from the global norm: clip_by_global_norm
#define GC_LEAF 1    // a scale per leaf from its norm: clip_by_norm
#define GC_RMS 2     // a scale per leaf from its RMS: clip_by_block_rms

// flags of a partial: a NaN or an infinity was seen
#define GC_NANF 1u
#define GC_INFF 2u

#define GC_DBL_MAX 1.7976931348623157e308
#define GC_DBL_MIN 2.2250738585072014e-308  // smallest normal double
#define GC_E0 (-1100)  // exponent of an empty p-norm partial: below any element's (2**-1074)

__device__ __forceinline__ double gc_inf() { return __longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ double gc_nan() { return __longlong_as_double(0x7ff8000000000000LL); }
__device__ __forceinline__ double gc_tiny() { return __longlong_as_double(1LL); }  // 2**-1074

// ------------------------------------------------------- float32 without FTZ
// Exact IEEE float32 operations whatever -ftz says (see the top of the file).
// The CPU emulator has no FTZ: there they are the plain operations.

#ifdef __CUDA_ARCH__
__device__ __forceinline__ double gc_wide(float x) {
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float gc_narrow(double x) {  // round to nearest even
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
    return r;
}
__device__ __forceinline__ float gc_mul(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
#else
__device__ __forceinline__ double gc_wide(float x) { return (double)x; }
__device__ __forceinline__ float gc_narrow(double x) { return (float)x; }
__device__ __forceinline__ float gc_mul(float a, float b) { return a * b; }
#endif
__device__ __forceinline__ double gc_wide(double x) { return x; }
__device__ __forceinline__ double gc_mul(double a, double b) { return a * b; }

// x rounded to R (float or double), held in a double. float32 arithmetic done
// in float64 and rounded to float32 once per operation gives the float32
// result bit for bit (53 >= 2 * 24 + 2 bits: rounding twice is harmless for
// + - * / and sqrt), subnormals included.
template <typename R> __device__ __forceinline__ double gc_r(double x) {
    return sizeof(R) == 4 ? gc_wide(gc_narrow(x)) : x;
}

// A value of R at p, as a double.
template <typename R> __device__ __forceinline__ double gc_read(const void* p) {
    return sizeof(R) == 4 ? gc_wide(*(const float*)p) : *(const double*)p;
}

// A double as R: the scale kernel's factor (float32 for all but float64 leaves).
template <typename R> __device__ __forceinline__ R gc_as(double x);
template <> __device__ __forceinline__ float gc_as<float>(double x) { return gc_narrow(x); }
template <> __device__ __forceinline__ double gc_as<double>(double x) { return x; }

// ---------------------------------------------------------------- half floats
// Bit conversions written out (no cuda_fp16.h): exact, round to nearest even.

__device__ __forceinline__ float gc_half_to_float(u32 h) {
    u32 sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0)  // zero or subnormal: m * 2**-24, exact in float (and normal)
        return __uint_as_float(sign | __float_as_uint(gc_mul((float)m, 5.9604644775390625e-08f)));
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

__device__ __forceinline__ u16 gc_float_to_half(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (u16)(sign | 0x7e00u);  // NaN
    if (ax >= 0x477ff000u) return (u16)(sign | 0x7c00u);  // rounds to inf (>= 65520)
    if (ax < 0x38800000u) {  // below 2**-14: a subnormal half, m * 2**-24
        double m = gc_wide(__uint_as_float(ax)) * 16777216.0;  // exact
        return (u16)(sign | (u32)rint(m));  // rint rounds half to even; 1024 is the smallest normal
    }
    u32 r = ax - 0x38000000u;  // rebias 127 -> 15
    r = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;
    return (u16)(sign | r);
}

__device__ __forceinline__ float gc_bf16_to_float(u32 b) { return __uint_as_float(b << 16); }

__device__ __forceinline__ u16 gc_float_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return (u16)(x >> 16);
}

// ------------------------------------------------------------- element types

struct gc_c64 { float re, im; };
struct gc_c128 { double re, im; };

template <int C> struct Elem;
template <> struct Elem<GC_F16> {
    typedef u16 T;
    static __device__ __forceinline__ double mag(T x) { return fabs(gc_wide(gc_half_to_float(x))); }
};
template <> struct Elem<GC_BF16> {
    typedef u16 T;
    static __device__ __forceinline__ double mag(T x) { return fabs(gc_wide(gc_bf16_to_float(x))); }
};
template <> struct Elem<GC_F32> {
    typedef float T;
    static __device__ __forceinline__ double mag(T x) { return fabs(gc_wide(x)); }
};
template <> struct Elem<GC_F64> {
    typedef double T;
    static __device__ __forceinline__ double mag(T x) { return fabs(x); }
};
template <> struct Elem<GC_C64> {
    typedef gc_c64 T;
    static __device__ __forceinline__ double mag(T x) { return hypot(gc_wide(x.re), gc_wide(x.im)); }
};
template <> struct Elem<GC_C128> {
    typedef gc_c128 T;
    static __device__ __forceinline__ double mag(T x) { return hypot(x.re, x.im); }
};

// ------------------------------------------------------------------- partials

struct Acc {
    double v;  // GC_P: scaled sum; GC_INF: max; GC_NEGINF: min; GC_ZERO: count
    int e;     // GC_P: power-of-two exponent of the scale
    u32 f;     // GC_NANF | GC_INFF
};

template <int KIND> __device__ __forceinline__ Acc gc_identity() {
    Acc a;
    a.v = KIND == GC_NEGINF ? gc_inf() : 0.0;
    a.e = GC_E0;
    a.f = 0u;
    return a;
}

// 2**(p*d) for an exponent difference d <= 0; PK is 1 or 2 for those p, else 0.
template <int PK> __device__ __forceinline__ double gc_pow2p(int d, double p) {
    if (PK == 2) return ldexp(1.0, 2 * d);
    if (PK == 1) return ldexp(1.0, d);
    return exp2(p * (double)d);
}

template <int PK> __device__ __forceinline__ double gc_powp(double y, double p) {
    if (PK == 2) return y * y;
    if (PK == 1) return y;
    return pow(y, p);
}

// Running state of one thread's p-norm: 1 / 2**e = inv * inv2, and 2**(e + 1).
struct Scale {
    double inv, inv2, hi;
};

// W: magnitudes may be float64 subnormals (float64 and complex128 leaves),
// whose 2**-e passes 2**1023: the scale is then two factors. Scaled by 2**1023
// alone, they came out below 2**-51, and their 30th power was 0.
template <int C> struct Wide {
    enum { value = C == GC_F64 || C == GC_C128 };
};

// A new largest element m: the sum rescaled (exactly) and the new scale.
struct Rescaled {
    double v, inv, inv2, hi;
    int e;
};

// Rare, so kept out of line: inlined into every unrolled element it made
// compiling take minutes. By value, not by reference: references to the
// running sum and scale kept them in local memory for the whole loop, a load
// and a store per element (ncu on the H100: the norm kernel was bound by L2
// at 28% of DRAM bandwidth).
template <int PK, bool W>
__device__ __noinline__ Rescaled gc_rescale(double v, int e0, double m, double p) {
    Rescaled r;
    r.e = ilogb(m);
    r.v = v * gc_pow2p<PK>(e0 - r.e, p);
    int h = W ? -r.e / 2 : -r.e;
    r.inv = ldexp(1.0, h);
    r.inv2 = ldexp(1.0, -r.e - h);
    r.hi = ldexp(1.0, r.e + 1);
    return r;
}

// (m / 2**e)**p from logarithms, where m / 2**e is not a normal double.
// Out of line for the same reason as gc_rescale.
__device__ __noinline__ double gc_tiny_pow(double m, int e, double p) {
    return exp2(p * (log2(m) - (double)e));
}

template <int KIND, int PK, bool W>
__device__ __forceinline__ void gc_add(Acc& a, Scale& s, double m, double p, bool zero) {
    if (!(m <= GC_DBL_MAX)) {  // NaN or inf: flagged; the policy decides at the end
        a.f |= m != m ? GC_NANF : GC_INFF;
        if (KIND == GC_NEGINF && zero) a.v = 0.0;   // nonfinite="zero": the entry is 0
        if (KIND == GC_ZERO && !zero) a.v += 1.0;  // NaN and inf are nonzero
        return;
    }
    if (KIND == GC_INF) {
        a.v = m > a.v ? m : a.v;
    } else if (KIND == GC_NEGINF) {
        a.v = m < a.v ? m : a.v;
    } else if (KIND == GC_ZERO) {
        a.v += m != 0.0 ? 1.0 : 0.0;
    } else {
        if (m >= s.hi) {
            Rescaled r = gc_rescale<PK, W>(a.v, a.e, m, p);
            a.v = r.v;
            a.e = r.e;
            s.inv = r.inv;
            s.inv2 = r.inv2;
            s.hi = r.hi;
        }
        double y = m * s.inv;
        if (W) y *= s.inv2;
        // A float64 entry far below the largest one scales to a subnormal or
        // to 0, yet for a small p its y**p still counts: at p = 0.01, 5e-324
        // next to 2.0 adds 6e-4 to the sum. Only a nonzero y below 2**-1022
        // takes this branch, and only p other than 1 and 2 can need it.
        if (PK == 0 && W && y < GC_DBL_MIN && m != 0.0)
            a.v += gc_tiny_pow(m, a.e, p);
        else
            a.v += gc_powp<PK>(y, p);
    }
}

template <int KIND, int PK> __device__ __forceinline__ Acc gc_merge(Acc a, Acc b, double p) {
    Acc r;
    r.f = a.f | b.f;
    r.e = GC_E0;
    if (KIND == GC_INF) {
        r.v = a.v > b.v ? a.v : b.v;
    } else if (KIND == GC_NEGINF) {
        r.v = a.v < b.v ? a.v : b.v;
    } else if (KIND == GC_ZERO) {
        r.v = a.v + b.v;
    } else {
        r.e = a.e > b.e ? a.e : b.e;
        r.v = a.v * gc_pow2p<PK>(a.e - r.e, p) + b.v * gc_pow2p<PK>(b.e - r.e, p);
    }
    return r;
}

// The p-norm of a partial of finite entries as m * 2**E, m in [1, 2) or 0:
// finite where the norm is past double (the torch route rebuilds partials
// from it, and an rms may be representable where the norm is not).
template <int PK> __device__ double gc_split(Acc a, double p, double* E) {
    double r = PK == 2 ? sqrt(a.v) : PK == 1 ? a.v : pow(a.v, 1.0 / p);
    *E = 0.0;
    if (r == 0.0) return 0.0;
    if (PK == 0 && r > GC_DBL_MAX) {
        // For small p the power overflows before 2**e brings it back
        // (2000 entries of 1e-150, p = 0.01: 2000**100 = 1e330 for a norm
        // of 1e180): in logs instead.
        double t = log2(a.v) / p + a.e;
        *E = floor(t);
        return exp2(t - *E);
    }
    int k;
    double m = frexp(r, &k);  // r = m * 2**k, m in [0.5, 1): exact
    *E = (double)a.e + (double)(k - 1);
    return 2.0 * m;
}

// The norm a partial stands for (float64); `zero`: NaN/inf entries counted as 0.
template <int KIND, int PK> __device__ double gc_value(Acc a, double p, bool zero) {
    bool nan = !zero && (a.f & GC_NANF), inf = !zero && (a.f & GC_INFF);
    if (KIND == GC_ZERO) return a.v;
    if (nan) return gc_nan();
    if (KIND == GC_P) {
        if (inf) return gc_inf();
        double e, m = gc_split<PK>(a, p, &e);
        return ldexp(m, (int)(e > 4096.0 ? 4096.0 : e));  // past any double: inf
    }
    if (KIND == GC_INF && inf) return gc_inf();
    return a.v;
}

// The root of the mean square of a 2-norm's accumulator, 2**e sqrt(v / size):
// past double where the norm is (4 entries of 1e308), not where the rms is.
template <int KIND, int PK>
__device__ double gc_mean_root(Acc a, i64 size, double p, bool zero) {
    if (KIND != GC_P || PK != 2) return gc_value<KIND, PK>(a, p, zero) / sqrt((double)size);
    if (!zero && (a.f & GC_NANF)) return gc_nan();
    if (!zero && (a.f & GC_INFF)) return gc_inf();
    return ldexp(sqrt(a.v / (double)size), a.e);
}

// Reduce one Acc per thread in a fixed tree order; the result is returned to every thread.
template <int KIND, int PK> __device__ Acc gc_block_reduce(Acc a, double p) {
    __shared__ double sv[GC_THREADS];
    __shared__ int se[GC_THREADS];
    __shared__ u32 sf[GC_THREADS];
    int t = threadIdx.x;
    sv[t] = a.v;
    se[t] = a.e;
    sf[t] = a.f;
    __syncthreads();
    for (int half = GC_THREADS / 2; half > 0; half >>= 1) {
        if (t < half) {
            Acc x, y;
            x.v = sv[t]; x.e = se[t]; x.f = sf[t];
            y.v = sv[t + half]; y.e = se[t + half]; y.f = sf[t + half];
            Acc r = gc_merge<KIND, PK>(x, y, p);
            sv[t] = r.v; se[t] = r.e; sf[t] = r.f;
        }
        __syncthreads();
    }
    Acc r;
    r.v = sv[0]; r.e = se[0]; r.f = sf[0];
    __syncthreads();  // every thread has read slot 0 before the arrays are reused
    return r;
}

// 16 bytes of a leaf: loaded and stored as one 128-bit access.
template <typename T> struct __align__(16) Pack {
    enum { N = 16 / sizeof(T) };
    T v[N];
};

__device__ __forceinline__ bool gc_aligned(const void* p) { return ((u64)p & 15u) == 0; }

// One thread's share of a chunk. Where the chunk is 16-byte aligned, packs
// t, t + T, ... four at a time, so that 64 bytes per thread are in flight;
// the rest (a tail, or a view at an odd offset) element by element.
template <int C, int KIND, int PK>
__device__ void gc_chunk(Acc& a, const void* base, i64 start, i64 n, double p, bool zero) {
    typedef typename Elem<C>::T T;
    typedef Pack<T> P;
    const bool W = Wide<C>::value;
    const T* x = (const T*)base + start;
    Scale s;  // the first nonzero element sets it
    s.inv = 1.0;
    s.inv2 = 1.0;
    s.hi = gc_tiny();
    i64 done = 0;
    if (gc_aligned(x)) {
        const P* px = (const P*)x;
        i64 packs = n / P::N, i = threadIdx.x;
        for (; i + 3 * GC_THREADS < packs; i += 4 * GC_THREADS) {
            P v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) v[u] = px[i + u * GC_THREADS];
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int k = 0; k < P::N; ++k) gc_add<KIND, PK, W>(a, s, Elem<C>::mag(v[u].v[k]), p, zero);
        }
        for (; i < packs; i += GC_THREADS) {
            P v = px[i];
#pragma unroll
            for (int k = 0; k < P::N; ++k) gc_add<KIND, PK, W>(a, s, Elem<C>::mag(v.v[k]), p, zero);
        }
        done = packs * P::N;
    }
    for (i64 i = done + threadIdx.x; i < n; i += GC_THREADS)
        gc_add<KIND, PK, W>(a, s, Elem<C>::mag(x[i]), p, zero);
}

// y[i] = op(x[i]) over one chunk, by packs where source and destination are
// both aligned (four packs in flight per thread), else element by element.
template <typename T, typename Op>
__device__ void gc_map(const T* x, T* y, i64 n, const Op& op) {
    typedef Pack<T> P;
    i64 done = 0;
    if (gc_aligned(x) && gc_aligned(y)) {
        const P* px = (const P*)x;
        P* py = (P*)y;
        i64 packs = n / P::N, i = threadIdx.x;
        for (; i + 3 * GC_THREADS < packs; i += 4 * GC_THREADS) {
            P v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) v[u] = px[i + u * GC_THREADS];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
#pragma unroll
                for (int k = 0; k < P::N; ++k) v[u].v[k] = op(v[u].v[k]);
                py[i + u * GC_THREADS] = v[u];
            }
        }
        for (; i < packs; i += GC_THREADS) {
            P v = px[i];
#pragma unroll
            for (int k = 0; k < P::N; ++k) v.v[k] = op(v.v[k]);
            py[i] = v;
        }
        done = packs * P::N;
    }
    for (i64 i = done + threadIdx.x; i < n; i += GC_THREADS) y[i] = op(x[i]);
}

// ----------------------------------------------------------------- the table

struct Table {
    const i64 *ptr, *size, *code, *first, *chunk_leaf, *chunk_start, *big, *out;
    int n, chunks, nbig;
};

__device__ __forceinline__ Table gc_table(const i64* tab, int n, int chunks, int nbig) {
    Table t;
    t.ptr = tab;
    t.size = tab + n;
    t.code = tab + 2 * (i64)n;
    t.first = tab + 3 * (i64)n;
    t.chunk_leaf = t.first + n + 1;
    t.chunk_start = t.chunk_leaf + chunks;
    t.big = t.chunk_start + chunks;
    t.out = t.big + nbig;
    t.n = n;
    t.chunks = chunks;
    t.nbig = nbig;
    return t;
}

// The workspace: float64 [C + 1 chunk partials][n leaf partials], int32
// [C + 1 exponents][C + 1 flags][n exponents][n flags][ticket]. Written by one
// launch and read back by its last block; the ticket is left at 0.
struct Work {
    double *cv, *lv;
    int *ce, *le;
    u32 *cf, *lf, *ticket;
};

__device__ __forceinline__ Work gc_work(double* wv, int* wi, int n, int chunks) {
    Work w;
    i64 c1 = (i64)chunks + 1;
    w.cv = wv;
    w.lv = wv + c1;
    w.ce = wi;
    w.cf = (u32*)(wi + c1);
    w.le = wi + 2 * c1;
    w.lf = (u32*)(wi + 2 * c1 + n);
    w.ticket = (u32*)(wi + 2 * c1 + 2 * (i64)n);
    return w;
}

// Partials written by other blocks are read through volatile pointers: past
// the L1 cache, which is not coherent across blocks.
__device__ __forceinline__ Acc gc_load(const double* v, const int* e, const u32* f, i64 k) {
    Acc a;
    a.v = ((const volatile double*)v)[k];
    a.e = ((const volatile int*)e)[k];
    a.f = ((const volatile u32*)f)[k];
    return a;
}

__device__ __forceinline__ void gc_store(double* v, int* e, u32* f, i64 k, Acc a) {
    v[k] = a.v;
    e[k] = a.e;
    f[k] = a.f;
}

// ------------------------------------------------------------------- outputs

// The per-call output buffer, 8-byte aligned:
//   [0, 16): norm, scale (result dtype: float32 or float64)
//   [16, 18): clipped, finite (bool)
//   [32, 32 + 8n): per-leaf norms; then 8n: per-leaf scales; then n: per-leaf
//   clipped; then n: per-leaf finite; then, from the next multiple of 8, the
//   norm kernels' per-leaf norms as m * 2**e: n doubles m, then n doubles e.
struct Out {
    char* base;
    int n, res64;
    __device__ __forceinline__ void put(i64 byte, i64 k, double x) const {
        if (res64) ((double*)(base + byte))[k] = x;
        else ((float*)(base + byte))[k] = gc_narrow(x);
    }
    __device__ __forceinline__ void flag(i64 byte, bool x) const { ((bool*)base)[byte] = x; }
    // Leaf k's norm as m * 2**e (norm kernels only; float64).
    __device__ __forceinline__ void split(i64 k, double m, double e) const {
        double* at = (double*)(base + ((32 + 18 * (i64)n + 7) & ~(i64)7));
        at[k] = m;
        at[n + k] = e;
    }
};

// min(1, max_norm / (norm + eps)) in the result dtype R, operation for
// operation as the generic path (gradclip._core._scale_from_norm), so that
// the two agree bit for bit. A NaN norm gives a NaN scale, like torch, and
// so does an infinite norm under an infinite bound (inf / inf).
// Arguments and results are values of R held in doubles, each operation
// rounded to R (gc_r: float32 arithmetic without -ftz's flushing).
template <typename R> __device__ double gc_clip_scale(double norm, double max_norm, double eps) {
    double denom = gc_r<R>(norm + eps);
    double s = denom > max_norm ? gc_r<R>(max_norm / denom) : 1.0;
    double nan = denom + max_norm;  // NaN where either is: a NaN bound must not give 1
    if (isinf(denom) && isinf(max_norm)) nan = denom - max_norm;
    return nan != nan ? nan : s;
}

// optax's clip_by_block_rms: 1 / max(1, (norm / sqrt(size)) / threshold).
// ``norm`` is the norm rounded into R, ``mean`` the root of the mean square
// in double (gc_mean_root).
template <typename R>
__device__ double gc_rms_scale(double mean, double norm, i64 size, double threshold) {
    double root = sqrt((double)(size > 1 ? size : 1));
    double rms = gc_r<R>(norm / gc_r<R>(root));
    // The norm (1e39 for 1e4 entries of 1e37) may overflow R where the rms
    // does not, and inf / sqrt(n) would zero the leaf: there, the root of
    // the mean square, as the generic path takes it.
    mean = gc_r<R>(mean);
    if (norm - norm != norm - norm && mean - mean == mean - mean) rms = mean;  // inf, finite
    // A zero rms is within any threshold: at threshold 0 it would be 0 / 0.
    double q = gc_r<R>(rms / (rms > 0 ? threshold : 1.0));
    double m = q != q ? q : (q > 1.0 ? q : 1.0);  // maximum() propagates NaN
    return gc_r<R>(1.0 / m);
}

struct Bound {
    int mode, skip;
    double max_norm, eps;  // mode GLOBAL/LEAF: the bound; RMS: max_norm is the threshold
    const void* max_norm_at;  // or a 0-d device array in the result dtype
};

// The scale in R (held in a double).
template <typename R>
__device__ double gc_scale_of(const Bound& b, double value, double mean, bool finite, i64 size) {
    double bound = b.max_norm_at ? gc_read<R>(b.max_norm_at) : gc_r<R>(b.max_norm);
    double norm = gc_r<R>(value);
    double s = b.mode == GC_RMS ? gc_rms_scale<R>(mean, norm, size, bound)
                                : gc_clip_scale<R>(norm, bound, gc_r<R>(b.eps));
    return b.skip && !finite ? 1.0 : s;
}

// Write a norm, its finite flag and, if asked, its scale and clipped flag.
// ``mean``: the root of the mean square, read in RMS mode only.
__device__ void gc_emit(const Out& o, const Bound& b, bool scaled, double value, double mean,
                        bool finite, i64 size, i64 norm_byte, i64 scale_byte, i64 clipped_byte,
                        i64 finite_byte, i64 k) {
    o.put(norm_byte, k, value);
    o.flag(finite_byte + k, finite);
    if (!scaled) return;
    double s = o.res64 ? gc_scale_of<double>(b, value, mean, finite, size)
                       : gc_scale_of<float>(b, value, mean, finite, size);
    o.put(scale_byte, k, s);
    o.flag(clipped_byte + k, s < 1.0);
}

// ---------------------------------------------------------------------- norm

// The last block: merge chunk partials per leaf, then the leaves, and write
// the outputs.
template <int KIND, int PK>
__device__ void gc_finalize(const Table& t, const Work& w, double p, bool zero, int smallk,
                            i64 total, const Out& o, const Bound& b) {
    int tid = threadIdx.x;
    // Leaves of few chunks: one thread each, chunks merged in order.
    for (int l = tid; l < t.n; l += GC_THREADS) {
        i64 k0 = t.first[l], k1 = t.first[l + 1];
        if (k1 - k0 > smallk) continue;
        Acc r = gc_identity<KIND>();
        for (i64 k = k0; k < k1; ++k) r = gc_merge<KIND, PK>(r, gc_load(w.cv, w.ce, w.cf, k), p);
        gc_store(w.lv, w.le, w.lf, l, r);
    }
    // Leaves of many chunks (listed in the table): the whole block on each.
    for (int j = 0; j < t.nbig; ++j) {
        int l = (int)t.big[j];
        i64 k0 = t.first[l], k1 = t.first[l + 1];
        Acc r = gc_identity<KIND>();
        for (i64 k = k0 + tid; k < k1; k += GC_THREADS)
            r = gc_merge<KIND, PK>(r, gc_load(w.cv, w.ce, w.cf, k), p);
        r = gc_block_reduce<KIND, PK>(r, p);
        if (tid == 0) gc_store(w.lv, w.le, w.lf, l, r);
    }
    __syncthreads();
    __threadfence_block();
    // Per-leaf outputs, and this thread's share of the global merge.
    i64 n8 = 8 * (i64)t.n;
    bool per_leaf = b.mode != GC_GLOBAL;
    Acc g = gc_identity<KIND>();
    for (int l = tid; l < t.n; l += GC_THREADS) {
        Acc r = gc_load(w.lv, w.le, w.lf, l);
        i64 size = t.size[l];
        double value = size == 0 ? 0.0 : gc_value<KIND, PK>(r, p, zero);
        double mean = b.mode == GC_RMS && size ? gc_mean_root<KIND, PK>(r, size, p, zero) : value;
        gc_emit(o, b, per_leaf, value, mean, r.f == 0u, size, 32, 32 + n8, 32 + 2 * n8,
                32 + 2 * n8 + t.n, l);
        double e = 0.0;  // NaN/inf entries (unless zeroed) and the other kinds: (norm, 0)
        double m = KIND == GC_P && (zero || r.f == 0u) ? gc_split<PK>(r, p, &e) : value;
        o.split(l, m, e);
        if (KIND == GC_ZERO) {
            // torch's get_total_norm(ord=0): the number of leaves with a nonzero entry
            Acc one = gc_identity<KIND>();
            one.v = r.v != 0.0 ? 1.0 : 0.0;
            one.f = r.f;
            r = one;
        }
        g = gc_merge<KIND, PK>(g, r, p);
    }
    g = gc_block_reduce<KIND, PK>(g, p);
    if (tid == 0) {
        double value = total == 0 ? 0.0 : gc_value<KIND, PK>(g, p, zero);
        gc_emit(o, b, !per_leaf, value, value, g.f == 0u, total, 0, 8, 16, 17, 0);
    }
}

template <int KIND, int PK>
__device__ void gc_norm_body(const Table& t, const Work& w, i64 chunk, double p, bool zero,
                             int smallk, i64 total, const Out& o, const Bound& b) {
    __shared__ bool last;
    int c = blockIdx.x;
    Acc a = gc_identity<KIND>();
    if (c < t.chunks) {
        int l = (int)t.chunk_leaf[c];
        i64 start = t.chunk_start[c], left = t.size[l] - start;
        i64 n = left < chunk ? left : chunk;
        const void* base = (const void*)t.ptr[l];
        switch ((int)t.code[l]) {
            case GC_F16: gc_chunk<GC_F16, KIND, PK>(a, base, start, n, p, zero); break;
            case GC_BF16: gc_chunk<GC_BF16, KIND, PK>(a, base, start, n, p, zero); break;
            case GC_F32: gc_chunk<GC_F32, KIND, PK>(a, base, start, n, p, zero); break;
            case GC_F64: gc_chunk<GC_F64, KIND, PK>(a, base, start, n, p, zero); break;
            case GC_C64: gc_chunk<GC_C64, KIND, PK>(a, base, start, n, p, zero); break;
            default: gc_chunk<GC_C128, KIND, PK>(a, base, start, n, p, zero); break;
        }
    }
    a = gc_block_reduce<KIND, PK>(a, p);
    if (threadIdx.x == 0) {
        gc_store(w.cv, w.ce, w.cf, c, a);
        __threadfence();  // the partial is visible to every block before the ticket is taken
        u32 ticket = atomicAdd(w.ticket, 1u);
        last = ticket == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;  // uniform across the block
    __threadfence();
    gc_finalize<KIND, PK>(t, w, p, zero, smallk, total, o, b);
    if (threadIdx.x == 0) *w.ticket = 0u;  // ready for the next launch on this stream
}

// One kernel per kind of norm, each compiled for just that kind (fewer
// registers, more blocks per SM). Grid: max(chunks, 1) blocks of GC_THREADS.
#define GC_NORM_KERNEL(NAME, KIND, PK)                                                        \
    extern "C" __global__ void NAME(const i64* tab, int n, int chunks, int nbig, i64 chunk,    \
                                    double p, int zero, int smallk, i64 total, double* wv,     \
                                    int* wi, char* out, int res64, int mode, int skip,         \
                                    double max_norm, double eps, const void* max_norm_at) {    \
        Out o;                                                                                 \
        o.base = out;                                                                          \
        o.n = n;                                                                               \
        o.res64 = res64;                                                                       \
        Bound b;                                                                               \
        b.mode = mode;                                                                         \
        b.skip = skip;                                                                         \
        b.max_norm = max_norm;                                                                 \
        b.eps = eps;                                                                           \
        b.max_norm_at = max_norm_at;                                                           \
        gc_norm_body<KIND, PK>(gc_table(tab, n, chunks, nbig), gc_work(wv, wi, n, chunks),     \
                               chunk, p, zero != 0, smallk, total, o, b);                      \
    }

GC_NORM_KERNEL(gc_norm_p2, GC_P, 2)
GC_NORM_KERNEL(gc_norm_p1, GC_P, 1)
GC_NORM_KERNEL(gc_norm_p, GC_P, 0)
GC_NORM_KERNEL(gc_norm_inf, GC_INF, 0)
GC_NORM_KERNEL(gc_norm_neginf, GC_NEGINF, 0)
GC_NORM_KERNEL(gc_norm_zero, GC_ZERO, 0)

// Scales from norms given by the caller (norm=...): one thread per entry.
// Grid: enough blocks for `count` entries (1 for a global norm).
extern "C" __global__ void gc_given(const void* norms, int count, const i64* sizes, char* out,
                                    int res64, int mode, int skip, double max_norm, double eps,
                                    const void* max_norm_at) {
    i64 k = (i64)blockIdx.x * GC_THREADS + threadIdx.x;
    if (k >= count) return;
    Out o;
    o.base = out;
    o.n = count;
    o.res64 = res64;
    Bound b;
    b.mode = mode;
    b.skip = skip;
    b.max_norm = max_norm;
    b.eps = eps;
    b.max_norm_at = max_norm_at;
    double value = res64 ? gc_read<double>((const double*)norms + k)
                         : gc_read<float>((const float*)norms + k);
    bool finite = value <= GC_DBL_MAX && value >= -GC_DBL_MAX;
    i64 n8 = 8 * (i64)count;
    // (No RMS mode here: clip_by_block_rms takes no norm.)
    if (mode == GC_GLOBAL) gc_emit(o, b, true, value, value, finite, 0, 0, 8, 16, 17, 0);
    else gc_emit(o, b, true, value, value, finite, sizes[k], 32, 32 + n8, 32 + 2 * n8,
                 32 + 2 * n8 + count, k);
}

// --------------------------------------------------------------------- scale

__device__ __forceinline__ bool gc_finite(float x) {
    return (__float_as_uint(x) & 0x7fffffffu) < 0x7f800000u;
}
__device__ __forceinline__ bool gc_finite(double x) { return fabs(x) <= GC_DBL_MAX; }

// x * s in the leaf's dtype; `zero`: NaN/inf entries become 0. `s` is the
// scale in the leaf's (real) dtype, float32 for half and bfloat16: their
// float32 product is rounded once more, as torch's mul_ (and the generic
// path, gradclip._norms.Plan.factor_dtype) does.
template <typename R> struct ScaleReal {  // float32, float64
    R s;
    bool zero;
    __device__ __forceinline__ R operator()(R x) const {
        return zero && !gc_finite(x) ? (R)0 : gc_mul(x, s);
    }
};
template <bool HALF> struct Scale16 {  // half, bfloat16 as bits
    float s;
    bool zero;
    __device__ __forceinline__ u16 operator()(u16 x) const {
        float v = HALF ? gc_half_to_float(x) : gc_bf16_to_float(x);
        float r = zero && !gc_finite(v) ? 0.0f : gc_mul(v, s);
        return HALF ? gc_float_to_half(r) : gc_float_to_bf16(r);
    }
};
template <typename Z, typename R> struct ScaleComplex {  // each component on its own
    R s;
    bool zero;
    __device__ __forceinline__ Z operator()(Z x) const {
        bool bad = zero && !(gc_finite(x.re) && gc_finite(x.im));
        Z r;
        r.re = bad ? (R)0 : gc_mul(x.re, s);
        r.im = bad ? (R)0 : gc_mul(x.im, s);
        return r;
    }
};
template <int C> struct ScaleOp;
template <> struct ScaleOp<GC_F16> : Scale16<true> {};
template <> struct ScaleOp<GC_BF16> : Scale16<false> {};
template <> struct ScaleOp<GC_F32> : ScaleReal<float> {};
template <> struct ScaleOp<GC_F64> : ScaleReal<double> {};
template <> struct ScaleOp<GC_C64> : ScaleComplex<gc_c64, float> {};
template <> struct ScaleOp<GC_C128> : ScaleComplex<gc_c128, double> {};

// Copy one chunk unchanged: a scale of 1 in a functional call (nothing to
// clip, or nonfinite="skip" found NaN/inf), and clamp's skipped steps.
struct Same {
    template <typename T> __device__ __forceinline__ T operator()(T x) const { return x; }
};

template <int C>
__device__ void gc_scale_chunk(const void* src, void* dst, i64 start, i64 n, double s, bool zero) {
    typedef typename Elem<C>::T T;
    if (s == 1.0 && !zero) {
        // x * 1 is x, copied: the GPU's multiply gives its canonical NaN for
        // every NaN, and a half's round trip through float quiets one, where
        // "skip" returns the leaves unchanged (the CPU keeps the payload).
        gc_map<T>((const T*)src + start, (T*)dst + start, n, Same());
        return;
    }
    ScaleOp<C> op;
    op.s = gc_as<decltype(op.s)>(s);  // a float64 scale rounded to float32 for the others
    op.zero = zero;
    gc_map<T>((const T*)src + start, (T*)dst + start, n, op);
}

// Where chunk c's leaf is written: in place, or at out_base + out_offset[leaf].
__device__ __forceinline__ void* gc_dst(const Table& t, int l, u64 out_base) {
    return out_base ? (void*)(out_base + (u64)t.out[l]) : (void*)t.ptr[l];
}

// Grid: chunks blocks. `scales`: one (global) or one per leaf, result dtype.
// In place, a block whose scale is 1 exits at once (unless zeroing NaN/inf).
extern "C" __global__ void gc_scale(const i64* tab, int n, int chunks, int nbig, i64 chunk,
                                    const void* scales, int per_leaf, int res64, int zero,
                                    u64 out_base) {
    Table t = gc_table(tab, n, chunks, nbig);
    int c = blockIdx.x;
    int l = (int)t.chunk_leaf[c];
    i64 k = per_leaf ? l : 0;
    double s = res64 ? gc_read<double>((const double*)scales + k)
                     : gc_read<float>((const float*)scales + k);
    if (!out_base && !zero && s == 1.0) return;
    i64 start = t.chunk_start[c], left = t.size[l] - start;
    i64 len = left < chunk ? left : chunk;
    const void* src = (const void*)t.ptr[l];
    void* dst = gc_dst(t, l, out_base);
    bool z = zero != 0;
    switch ((int)t.code[l]) {
        case GC_F16: gc_scale_chunk<GC_F16>(src, dst, start, len, s, z); break;
        case GC_BF16: gc_scale_chunk<GC_BF16>(src, dst, start, len, s, z); break;
        case GC_F32: gc_scale_chunk<GC_F32>(src, dst, start, len, s, z); break;
        case GC_F64: gc_scale_chunk<GC_F64>(src, dst, start, len, s, z); break;
        case GC_C64: gc_scale_chunk<GC_C64>(src, dst, start, len, s, z); break;
        default: gc_scale_chunk<GC_C128>(src, dst, start, len, s, z); break;
    }
}

// --------------------------------------------------------------------- clamp

// The bounds in each real dtype, converted on the host exactly as the
// generic path's asarray(lo, dtype=...) does: half and bfloat16 as bits.
struct Bounds {
    u32 lo16, hi16, lob, hib;
    float lof, hif;
    double lod, hid;
    int has_lo, has_hi;
};

// max(lo), then min(hi), in the leaf's dtype (V: float for half, bfloat16
// and float32, double for float64); maximum() and minimum() propagate NaN.
// Compared as doubles (exact), as float32 comparisons flush under -ftz.
template <typename V> struct Clamp {
    V lo, hi;
    bool has_lo, has_hi, zero;
    __device__ __forceinline__ V operator()(V v) const {
        if (zero && !gc_finite(v)) v = (V)0;
        double w = gc_wide(v);
        if (has_lo && w == w && w < gc_wide(lo)) v = lo;
        w = gc_wide(v);
        if (has_hi && w == w && w > gc_wide(hi)) v = hi;
        return v;
    }
};

// Half and bfloat16 entries as bits: widened, clamped, and rounded back;
// entries left unchanged keep their bits.
template <bool HALF> struct Clamp16 {
    Clamp<float> c;
    __device__ __forceinline__ u16 operator()(u16 x) const {
        float v = HALF ? gc_half_to_float(x) : gc_bf16_to_float(x);
        float r = c(v);
        double wr = gc_wide(r), wv = gc_wide(v);
        if (wr == wv || wr != wr) return x;
        return HALF ? gc_float_to_half(r) : gc_float_to_bf16(r);
    }
};

template <typename V> __device__ Clamp<V> gc_clamp_op(V lo, V hi, const Bounds& b, bool zero) {
    Clamp<V> c;
    c.lo = lo;
    c.hi = hi;
    c.has_lo = b.has_lo != 0;
    c.has_hi = b.has_hi != 0;
    c.zero = zero;
    return c;
}

template <int C>
__device__ void gc_clamp_chunk(const void* src, void* dst, i64 start, i64 n, const Bounds& b,
                               bool zero) {
    typedef typename Elem<C>::T T;
    const T* x = (const T*)src + start;
    T* y = (T*)dst + start;
    if constexpr (C == GC_F16 || C == GC_BF16) {
        bool h = C == GC_F16;
        Clamp16<C == GC_F16> op;
        op.c = gc_clamp_op<float>(h ? gc_half_to_float(b.lo16) : gc_bf16_to_float(b.lob),
                                  h ? gc_half_to_float(b.hi16) : gc_bf16_to_float(b.hib), b, zero);
        gc_map<T>(x, y, n, op);
    } else if constexpr (C == GC_F32) {
        gc_map<T>(x, y, n, gc_clamp_op<float>(b.lof, b.hif, b, zero));
    } else {
        gc_map<T>(x, y, n, gc_clamp_op<double>(b.lod, b.hid, b, zero));
    }
}

// Grid: chunks blocks. Complex leaves are not clamped here (the launcher
// sends them to the generic path). `finite`: the tree's finite flag for
// nonfinite="skip", or null.
extern "C" __global__ void gc_clamp_kernel(const i64* tab, int n, int chunks, int nbig, i64 chunk,
                                           u32 lo16, u32 hi16, u32 lob, u32 hib, float lof,
                                           float hif, double lod, double hid, int has_lo,
                                           int has_hi, int zero, const bool* finite,
                                           u64 out_base) {
    Table t = gc_table(tab, n, chunks, nbig);
    int c = blockIdx.x;
    int l = (int)t.chunk_leaf[c];
    bool keep = finite != 0 && !*finite;
    if (keep && !out_base) return;  // in place and skipped: nothing to write
    Bounds b;
    b.lo16 = lo16; b.hi16 = hi16; b.lob = lob; b.hib = hib;
    b.lof = lof; b.hif = hif; b.lod = lod; b.hid = hid;
    b.has_lo = has_lo; b.has_hi = has_hi;
    i64 start = t.chunk_start[c], left = t.size[l] - start;
    i64 len = left < chunk ? left : chunk;
    const void* src = (const void*)t.ptr[l];
    void* dst = gc_dst(t, l, out_base);
    bool z = zero != 0;
    int code = (int)t.code[l];
    if (keep) {  // bytes are bytes: copied as 16-bit words, or 64-bit ones for float64
        if (code == GC_F64) gc_map<double>((const double*)src + start, (double*)dst + start, len, Same());
        else if (code == GC_F32) gc_map<float>((const float*)src + start, (float*)dst + start, len, Same());
        else gc_map<u16>((const u16*)src + start, (u16*)dst + start, len, Same());
        return;
    }
    switch (code) {
        case GC_F16: gc_clamp_chunk<GC_F16>(src, dst, start, len, b, z); break;
        case GC_BF16: gc_clamp_chunk<GC_BF16>(src, dst, start, len, b, z); break;
        case GC_F32: gc_clamp_chunk<GC_F32>(src, dst, start, len, b, z); break;
        default: gc_clamp_chunk<GC_F64>(src, dst, start, len, b, z); break;
    }
}
