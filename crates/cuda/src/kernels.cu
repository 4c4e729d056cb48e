// moestream's CUDA kernels, compiled at start-up by NVRTC for the GPU present (see device.rs).
//
// Kernels that depend on the position of the pass take it by value (`start`) or, when
// `start_at` is not null, from device memory: a decode step captured once in a CUDA graph is
// replayed at every position with only that word changed.
//
// Activations are f32 row-major. Weights stay in their checkpoint's bytes (floats, MLX group-affine
// codes, llama.cpp blocks) and are dequantized inside the products, as on the CPU. Every kernel
// has a CPU twin in moestream-kernels that the tests compare it with.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;

#define WARP 32

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float bf16_to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 load_u16(const u8* p) { return *(const u16*)p; }

// Scale kinds: 0 f32, 1 f16, 2 bf16 (FloatKind).
__device__ __forceinline__ float load_float(const u8* p, u32 kind, u64 idx) {
    if (kind == 0) return ((const float*)p)[idx];
    u16 h = ((const u16*)p)[idx];
    return kind == 1 ? half_to_float(h) : bf16_to_float(h);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Where one matrix's bytes are: `data` (floats, packed codes or blocks), and for MLX affine
// weights `scales` and `biases`. Offsets are added to a per-group base pointer (grouped launches
// over the experts of a layer) or to 0 (a plain matrix: the offsets are device addresses).
struct MatArgs {
    u64 data;
    u64 scales;
    u64 biases;
    u32 scale_kind;
    u32 group_size;
    u32 rows;
    u32 cols;
    u32 n;          // tokens
    u32 accumulate; // 1: y += W x instead of y = W x
    u64 x_group_stride;  // floats between consecutive groups' inputs (0: one shared input)
    u64 y_group_stride;  // floats between consecutive groups' outputs
};

// ---- dequantization of 32 consecutive elements (chunk c of row r) into w[32] ----

struct F32W {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        const float4* p = (const float4*)(base + a.data) + (r * a.cols + (u64)c * 32) / 4;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float4 v = p[i];
            w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
    }
};

template <int KIND>  // 1 f16, 2 bf16
struct HalfW {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        const uint4* p = (const uint4*)((const u16*)(base + a.data) + r * a.cols + (u64)c * 32);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint4 v = p[i];
            u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                u16 lo = words[j] & 0xffff, hi = words[j] >> 16;
                w[8 * i + 2 * j] = KIND == 1 ? half_to_float(lo) : bf16_to_float(lo);
                w[8 * i + 2 * j + 1] = KIND == 1 ? half_to_float(hi) : bf16_to_float(hi);
            }
        }
    }
};

// MLX affine: 32 codes of BITS bits are BITS consecutive u32 words of the row's bitstream.
template <int BITS>
struct AffineW {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        u64 elem = r * a.cols + (u64)c * 32;
        const u32* p = (const u32*)(base + a.data) + elem * BITS / 32;
        u32 words[BITS + 1];
        if (BITS % 4 == 0) {  // 16 or 32 bytes, 16-byte aligned: vector loads
#pragma unroll
            for (int i = 0; i < BITS / 4; i++) {
                uint4 v = ((const uint4*)p)[i];
                words[4 * i] = v.x; words[4 * i + 1] = v.y; words[4 * i + 2] = v.z; words[4 * i + 3] = v.w;
            }
        } else {
#pragma unroll
            for (int i = 0; i < BITS; i++) words[i] = p[i];
        }
        words[BITS] = 0;
        u64 g = elem / a.group_size;
        float s = load_float((const u8*)(base + a.scales), a.scale_kind, g);
        float b = load_float((const u8*)(base + a.biases), a.scale_kind, g);
        const u32 mask = (1u << BITS) - 1;
#pragma unroll
        for (int i = 0; i < 32; i++) {
            int bit = i * BITS, wi = bit / 32, sh = bit % 32;
            u32 q = words[wi] >> sh;
            if (sh + BITS > 32) q |= words[wi + 1] << (32 - sh);
            w[i] = s * (float)(q & mask) + b;
        }
    }
};

// llama.cpp Q8_0: 34-byte blocks of 32: f16 d, 32 int8.
struct Q8_0W {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        const u8* blk = (const u8*)(base + a.data) + (r * (a.cols / 32) + c) * 34;
        float d = half_to_float(load_u16(blk));
#pragma unroll
        for (int i = 0; i < 16; i++) {
            u16 q = load_u16(blk + 2 + 2 * i);
            w[2 * i] = d * (float)(i8)(q & 0xff);
            w[2 * i + 1] = d * (float)(i8)(q >> 8);
        }
    }
};

// Q4_0: 18-byte blocks of 32: f16 d, 16 bytes; element j low nibble, j + 16 high, minus 8.
struct Q4_0W {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        const u8* blk = (const u8*)(base + a.data) + (r * (a.cols / 32) + c) * 18;
        float d = half_to_float(load_u16(blk));
#pragma unroll
        for (int i = 0; i < 8; i++) {
            u16 q = load_u16(blk + 2 + 2 * i);
            u8 q0 = q & 0xff, q1 = q >> 8;
            w[2 * i] = d * (float)((int)(q0 & 15) - 8);
            w[2 * i + 1] = d * (float)((int)(q1 & 15) - 8);
            w[2 * i + 16] = d * (float)((int)(q0 >> 4) - 8);
            w[2 * i + 17] = d * (float)((int)(q1 >> 4) - 8);
        }
    }
};

// Q4_1: 20-byte blocks of 32: f16 d, f16 m, 16 bytes; element j low nibble, j + 16 high.
struct Q4_1W {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        const u8* blk = (const u8*)(base + a.data) + (r * (a.cols / 32) + c) * 20;
        float d = half_to_float(load_u16(blk)), m = half_to_float(load_u16(blk + 2));
#pragma unroll
        for (int i = 0; i < 8; i++) {
            u16 q = load_u16(blk + 4 + 2 * i);
            u8 q0 = q & 0xff, q1 = q >> 8;
            w[2 * i] = d * (float)(q0 & 15) + m;
            w[2 * i + 1] = d * (float)(q1 & 15) + m;
            w[2 * i + 16] = d * (float)(q0 >> 4) + m;
            w[2 * i + 17] = d * (float)(q1 >> 4) + m;
        }
    }
};

// Q5_0: 22-byte blocks of 32: f16 d, 32 high bits (u32, element j's at bit j), 16 bytes of
// nibbles; w = d·(q − 16).
struct Q5_0W {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        const u8* blk = (const u8*)(base + a.data) + (r * (a.cols / 32) + c) * 22;
        float d = half_to_float(load_u16(blk));
        u32 qh = (u32)load_u16(blk + 2) | ((u32)load_u16(blk + 4) << 16);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            u16 q = load_u16(blk + 6 + 2 * i);
            int j0 = 2 * i, j1 = 2 * i + 1;
            u8 q0 = q & 0xff, q1 = q >> 8;
            w[j0] = d * (float)((int)((q0 & 15) | (((qh >> j0) & 1) << 4)) - 16);
            w[j1] = d * (float)((int)((q1 & 15) | (((qh >> j1) & 1) << 4)) - 16);
            w[j0 + 16] = d * (float)((int)((q0 >> 4) | (((qh >> (j0 + 16)) & 1) << 4)) - 16);
            w[j1 + 16] = d * (float)((int)((q1 >> 4) | (((qh >> (j1 + 16)) & 1) << 4)) - 16);
        }
    }
};

// 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, float* sc, float* m) {
    u8 d, mn;
    if (j < 4) {
        d = q[j] & 63;
        mn = q[j + 4] & 63;
    } else {
        d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
    *sc = d;
    *m = mn;
}

// scale_min_k4 with the 12 scale bytes in three words.
__device__ __forceinline__ u32 scale_byte(const u32* sw, int j) {
    u32 word = j < 4 ? sw[0] : (j < 8 ? sw[1] : sw[2]);
    return (word >> (8 * (j & 3))) & 0xff;
}
__device__ __forceinline__ void scale_min_k4_words(int j, const u32* sw, float* sc, float* m) {
    u32 d, mn;
    if (j < 4) {
        d = scale_byte(sw, j) & 63;
        mn = scale_byte(sw, j + 4) & 63;
    } else {
        d = (scale_byte(sw, j + 4) & 0xF) | ((scale_byte(sw, j - 4) >> 6) << 4);
        mn = (scale_byte(sw, j + 4) >> 4) | ((scale_byte(sw, j) >> 6) << 4);
    }
    *sc = d;
    *m = mn;
}

// Q4_K: 144-byte super-blocks of 256: f16 d, f16 dmin, 12 bytes of scales, 128 bytes of codes.
// Sub-blocks 2j and 2j+1 are the low and high nibbles of qs[32j .. 32j+32].
struct Q4_KW {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        // 144-byte blocks from a 256-byte-aligned base: every part is 16-byte aligned.
        const u8* blk = (const u8*)(base + a.data) + (r * (a.cols / 256) + c / 8) * 144;
        int s = c % 8;
        uint4 head = *(const uint4*)blk;  // d, dmin, scales[12]
        float d = half_to_float(head.x & 0xffff), dmin = half_to_float(head.x >> 16);
        u32 sw[3] = {head.y, head.z, head.w};
        float sc, mn;
        scale_min_k4_words(s, sw, &sc, &mn);
        float d1 = d * sc, m1 = dmin * mn;
        const uint4* qs = (const uint4*)(blk + 16 + 32 * (s / 2));
        uint4 q0 = qs[0], q1 = qs[1];
        u32 words[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
        int shift = (s % 2) * 4;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            u32 q = words[i] >> shift;
#pragma unroll
            for (int j = 0; j < 4; j++) w[4 * i + j] = d1 * (float)((q >> (8 * j)) & 15) - m1;
        }
    }
};

// Q5_K: 176 bytes: f16 d, f16 dmin, 12 bytes of scales, 32 bytes of high bits, 128 of nibbles.
struct Q5_KW {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        const u8* blk = (const u8*)(base + a.data) + (r * (a.cols / 256) + c / 8) * 176;
        int s = c % 8;
        float d = half_to_float(load_u16(blk)), dmin = half_to_float(load_u16(blk + 2));
        float sc, mn;
        scale_min_k4(s, blk + 4, &sc, &mn);
        float d1 = d * sc, m1 = dmin * mn;
        const u32* qh = (const u32*)(blk + 16);
        const u32* qs = (const u32*)(blk + 48 + 32 * (s / 2));
        int shift = (s % 2) * 4;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            u32 q = qs[i] >> shift;
            u32 h = qh[i] >> s;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                u32 v = ((q >> (8 * j)) & 15) | (((h >> (8 * j)) & 1) << 4);
                w[4 * i + j] = d1 * (float)v - m1;
            }
        }
    }
};

// Q6_K: 210 bytes: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, f16 d.
// Chunk s: half n = s / 4, part p = s % 4 (ql offset 32·(p&1), nibble p/2, qh shift 2p).
struct Q6_KW {
    static __device__ __forceinline__ void chunk(const MatArgs& a, u64 base, u64 r, u32 c, float* w) {
        const u8* blk = (const u8*)(base + a.data) + (r * (a.cols / 256) + c / 8) * 210;
        int s = c % 8, n = s / 4, p = s % 4;
        const u8* ql = blk + 64 * n + 32 * (p & 1);
        const u8* qh = blk + 128 + 32 * n;
        const i8* sc = (const i8*)(blk + 192 + 8 * n + 2 * p);
        float d = half_to_float(load_u16(blk + 208));
        float d0 = d * (float)sc[0], d1 = d * (float)sc[1];
        int nib = (p / 2) * 4, hs = 2 * p;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            u16 l2 = load_u16(ql + 2 * i), h2 = load_u16(qh + 2 * i);
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int l = 2 * i + j;
                int lo = ((j ? l2 >> 8 : l2 & 0xff) >> nib) & 15;
                int hi = ((j ? h2 >> 8 : h2 & 0xff) >> hs) & 3;
                w[l] = (l < 16 ? d0 : d1) * (float)((lo | (hi << 4)) - 32);
            }
        }
    }
};

// ---- products ----

#define TOKEN_TILE 8
#define ROWS_PER_BLOCK 4  // one warp per output row

// y[g][t][row] = Σ_k W_g[row][k] · x[g][t][k] for groups g = blockIdx.y (the experts of a layer,
// whose slots start at bases[g]; bases == 0 for a plain matrix).
// TILE tokens share each dequantized chunk; TILE = 1 is the decode-step variant, with fewer
// registers (more warps in flight) and two chunks' loads issued before their arithmetic.
// With `spans` (a prompt's experts), group g instead applies its matrix to the tokens
// spans[g] .. spans[g+1] of x and y (the rows gathered for each expert, one after the other).
template <class W, int TILE>
__device__ void matvec(const u64* bases, const u32* spans, MatArgs a, const float* x, float* y) {
    u32 row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= a.rows) return;
    u64 g = blockIdx.y;
    u64 base = bases ? bases[g] : 0;
    u32 n = a.n;
    if (spans) {
        u32 first = spans[g];
        n = spans[g + 1] - first;
        x += (u64)first * a.cols;
        y += (u64)first * a.rows;
    } else {
        x += g * a.x_group_stride;
        y += g * a.y_group_stride;
    }
    u32 chunks = a.cols / 32;
    for (u32 t0 = 0; t0 < n; t0 += TILE) {
        u32 nt = min((u32)TILE, n - t0);
        float acc[TILE];
#pragma unroll
        for (int t = 0; t < TILE; t++) acc[t] = 0.f;
#pragma unroll(TILE == 1 ? 2 : 1)
        for (u32 c = lane; c < chunks; c += WARP) {
            float w[32];
            W::chunk(a, base, row, c, w);
#pragma unroll
            for (int t = 0; t < TILE; t++) {
                if (t < nt) {
                    const float4* xp = (const float4*)(x + (u64)(t0 + t) * a.cols + (u64)c * 32);
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        float4 v = xp[i];
                        s = fmaf(w[4 * i], v.x, s);
                        s = fmaf(w[4 * i + 1], v.y, s);
                        s = fmaf(w[4 * i + 2], v.z, s);
                        s = fmaf(w[4 * i + 3], v.w, s);
                    }
                    acc[t] += s;
                }
            }
        }
#pragma unroll
        for (int t = 0; t < TILE; t++) {
            if (t < nt) {
                float s = warp_sum(acc[t]);
                if (lane == 0) {
                    float* o = y + (u64)(t0 + t) * a.rows + row;
                    *o = a.accumulate ? *o + s : s;
                }
            }
        }
    }
}

// out[r][k] = W[row0 + r][k] for `rows` rows, in f32 (the input of a cuBLAS product): one
// thread a chunk of 32 columns.
template <class W>
__device__ void dequantize(MatArgs a, u32 row0, u32 rows, float* out) {
    u32 chunks = a.cols / 32;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * chunks) return;
    u64 r = i / chunks;
    u32 c = i % chunks;
    float w[32];
    W::chunk(a, 0, row0 + r, c, w);
    float4* o = (float4*)(out + r * a.cols + (u64)c * 32);
#pragma unroll
    for (int j = 0; j < 8; j++) o[j] = make_float4(w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]);
}

// A format's tiled, spans and dequantization kernels; MATVEC adds the generic one-token kernel,
// formats with a kernel of their own for decode (below) use MATVEC_PROMPT.
#define MATVEC_PROMPT(name, W) \
    extern "C" __global__ void name##_dequant(MatArgs a, u32 row0, u32 rows, float* out) { \
        dequantize<W>(a, row0, rows, out); \
    } \
    extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * WARP) \
    name(const u64* bases, MatArgs a, const float* x, float* y) { matvec<W, TOKEN_TILE>(bases, nullptr, a, x, y); } \
    extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * WARP) \
    name##_spans(const u64* bases, const u32* spans, MatArgs a, const float* x, float* y) { \
        matvec<W, TOKEN_TILE>(bases, spans, a, x, y); \
    }
#define MATVEC(name, W) \
    MATVEC_PROMPT(name, W) \
    extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * WARP) \
    name##_1(const u64* bases, MatArgs a, const float* x, float* y) { matvec<W, 1>(bases, nullptr, a, x, y); }

MATVEC_PROMPT(matvec_f32, F32W)
MATVEC(matvec_f16, HalfW<1>)
MATVEC(matvec_bf16, HalfW<2>)
MATVEC(matvec_affine2, AffineW<2>)
MATVEC(matvec_affine3, AffineW<3>)
MATVEC(matvec_affine4, AffineW<4>)
MATVEC(matvec_affine5, AffineW<5>)
MATVEC(matvec_affine6, AffineW<6>)
MATVEC(matvec_affine8, AffineW<8>)
MATVEC(matvec_q8_0, Q8_0W)
MATVEC(matvec_q4_0, Q4_0W)
MATVEC(matvec_q4_1, Q4_1W)
MATVEC(matvec_q5_0, Q5_0W)
MATVEC_PROMPT(matvec_q4_k, Q4_KW)
MATVEC(matvec_q5_k, Q5_KW)
MATVEC_PROMPT(matvec_q6_k, Q6_KW)

// ---- decode products of the K-quants that make most of a Q4_K_M file ----
//
// The generic one-token kernel gives each lane 32 consecutive columns, so the lanes of a warp
// read x (and the codes) at a stride of 128 bytes: every load instruction touches 32 cache lines
// and the L1 throughput, not memory, bounds the product (~10% of the bandwidth measured). Here a
// warp walks its row one super-block of 256 at a time and consecutive lanes take consecutive
// bytes of the codes and consecutive columns of x, so each load is one or a few whole lines.

// Row `row` of group g = blockIdx.y (a slot at bases[g], or the plain matrix), y = W x.
__device__ __forceinline__ const u8* decode_row(const u64* bases, const MatArgs& a, u32 row,
                                                u32 block_bytes, const float** x, float** y) {
    u64 g = blockIdx.y;
    u64 base = bases ? bases[g] : 0;
    *x += g * a.x_group_stride;
    *y += g * a.y_group_stride;
    return (const u8*)(base + a.data) + (u64)row * (a.cols / 256) * block_bytes;
}

__device__ __forceinline__ void decode_store(const MatArgs& a, float* y, u32 row, float acc) {
    float s = warp_sum(acc);
    if (threadIdx.x % WARP == 0) y[row] = a.accumulate ? y[row] + s : s;
}

// Σ w·x over float4 first, first + step, ... of row `row` of group g = blockIdx.y (fused
// multiply-adds in that order), for the one-token f32 kernels below.
__device__ __forceinline__ float f32_row_part(const u64* bases, const MatArgs& a, const float* x,
                                              u32 row, u32 first, u32 step) {
    u64 g = blockIdx.y;
    u64 base = bases ? bases[g] : 0;
    const float4* xv = (const float4*)(x + g * a.x_group_stride);
    const float4* w = (const float4*)(base + a.data) + (u64)row * (a.cols / 4);
    float acc = 0.f;
#pragma unroll 4
    for (u32 i = first; i < a.cols / 4; i += step) {
        float4 wv = w[i], v = xv[i];
        acc = fmaf(wv.x, v.x, acc);
        acc = fmaf(wv.y, v.y, acc);
        acc = fmaf(wv.z, v.z, acc);
        acc = fmaf(wv.w, v.w, acc);
    }
    return acc;
}

// f32 (a large f32 matrix, e.g. an output head): lane l reads float4 l, l + 32, ... of the row
// and of x.
extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * WARP)
matvec_f32_1(const u64* bases, MatArgs a, const float* x, float* y) {
    u32 row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    if (row >= a.rows) return;
    float acc = f32_row_part(bases, a, x, row, threadIdx.x % WARP, WARP);
    decode_store(a, y + blockIdx.y * a.y_group_stride, row, acc);
}

// f32 with few rows (a router: 128 of them would leave most SMs without a warp): one block of
// ROWS_PER_BLOCK warps per row, thread t reading float4 t, t + 128, ...; the warps' sums added
// in order.
extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * WARP)
matvec_f32_1_split(const u64* bases, MatArgs a, const float* x, float* y) {
    __shared__ float part[ROWS_PER_BLOCK];
    u32 row = blockIdx.x;
    y += blockIdx.y * a.y_group_stride;
    float acc = f32_row_part(bases, a, x, row, threadIdx.x, ROWS_PER_BLOCK * WARP);
    acc = warp_sum(acc);
    if (threadIdx.x % WARP == 0) part[threadIdx.x / WARP] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int i = 0; i < ROWS_PER_BLOCK; i++) s += part[i];
        y[row] = a.accumulate ? y[row] + s : s;
    }
}

// Q4_K: lane l reads code bytes 4l .. 4l+3 of a super-block: sub-block 2j (low nibbles, columns
// 64j + 4(l%8) + 0..3) and 2j+1 (high nibbles, 32 columns on), j = l / 8. Its sums Σq·x and Σx
// per sub-block are scaled once: y += d·sc·Σq·x − dmin·m·Σx.
extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * WARP)
matvec_q4_k_1(const u64* bases, MatArgs a, const float* x, float* y) {
    u32 row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= a.rows) return;
    const u8* rowp = decode_row(bases, a, row, 144, &x, &y);
    int j = lane / 8;
    u32 c0 = 64 * j + 4 * (lane % 8);
    float acc = 0.f;
    u32 nb = a.cols / 256;
#pragma unroll 2
    for (u32 b = 0; b < nb; b++) {
        const u8* blk = rowp + (u64)b * 144;
        uint4 head = *(const uint4*)blk;
        u32 q = *(const u32*)(blk + 16 + 4 * lane);
        float4 xl = *(const float4*)(x + b * 256 + c0);
        float4 xh = *(const float4*)(x + b * 256 + c0 + 32);
        float d = half_to_float(head.x & 0xffff), dmin = half_to_float(head.x >> 16);
        u32 sw[3] = {head.y, head.z, head.w};
        float sc0, m0, sc1, m1;
        scale_min_k4_words(2 * j, sw, &sc0, &m0);
        scale_min_k4_words(2 * j + 1, sw, &sc1, &m1);
        float ql = (float)(q & 15) * xl.x + (float)((q >> 8) & 15) * xl.y +
                   (float)((q >> 16) & 15) * xl.z + (float)((q >> 24) & 15) * xl.w;
        float qh = (float)((q >> 4) & 15) * xh.x + (float)((q >> 12) & 15) * xh.y +
                   (float)((q >> 20) & 15) * xh.z + (float)(q >> 28) * xh.w;
        float sl = (xl.x + xl.y) + (xl.z + xl.w), sh = (xh.x + xh.y) + (xh.z + xh.w);
        acc += d * (sc0 * ql + sc1 * qh) - dmin * (m0 * sl + m1 * sh);
    }
    decode_store(a, y, row, acc);
}

// Q6_K (210-byte blocks, so byte loads): lane l takes columns 128n + 32i + l (n < 2, i < 4):
// low nibble of ql[64n + l] (i = 0) or ql[64n + 32 + l] (i = 1), their high nibbles (i = 2, 3),
// and 2 bits of qh[32n + l] each; scale sc[8n + 2i + l/16].
extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * WARP)
matvec_q6_k_1(const u64* bases, MatArgs a, const float* x, float* y) {
    u32 row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= a.rows) return;
    const u8* rowp = decode_row(bases, a, row, 210, &x, &y);
    float acc = 0.f;
    u32 nb = a.cols / 256;
    for (u32 b = 0; b < nb; b++) {
        const u8* blk = rowp + (u64)b * 210;
        const float* xb = x + b * 256 + lane;
        float d = half_to_float(load_u16(blk + 208));
        const i8* sc = (const i8*)(blk + 192) + lane / 16;
        float s = 0.f;
#pragma unroll
        for (int n = 0; n < 2; n++) {
            u32 l0 = blk[64 * n + lane], l1 = blk[64 * n + 32 + lane], h = blk[128 + 32 * n + lane];
            int q0 = (int)((l0 & 15) | ((h & 3) << 4)) - 32;
            int q1 = (int)((l1 & 15) | (((h >> 2) & 3) << 4)) - 32;
            int q2 = (int)((l0 >> 4) | (((h >> 4) & 3) << 4)) - 32;
            int q3 = (int)((l1 >> 4) | ((h >> 6) << 4)) - 32;
            const float* xn = xb + 128 * n;
            s += (float)sc[8 * n] * ((float)q0 * xn[0]) + (float)sc[8 * n + 2] * ((float)q1 * xn[32]) +
                 (float)sc[8 * n + 4] * ((float)q2 * xn[64]) + (float)sc[8 * n + 6] * ((float)q3 * xn[96]);
        }
        acc += d * s;
    }
    decode_store(a, y, row, acc);
}

// ---- block reductions (blockDim.x a multiple of 32, at most 1024) ----

__device__ float block_sum(float v, float* red) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* red) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : __int_as_float(0xff800000);
    return warp_max(v);
}

// ---- decode products with int8 activations (ActivationPrecision::Int8) ----
//
// The f32 one-token kernels above spend most of their time in instructions, not memory: every
// lane converts and multiplies 8 codes per 144-byte super-block and unpacks two scales for them.
// With the token's activations rounded to int8 once per 32 columns (the CPU's int8 method,
// `matmul/ggml_blocks/int8.rs`: step = max|x| / 127 per span, plus the span's exact f32 sum and
// rounding residual), a lane takes 32 weights at a time: 16 bytes of codes, 8 `dp4a`, one scale
// unpack, and the warp walks 4 super-blocks at once (8 lanes each).

// A token's activations in int8: q[i] for element i, and per span of 32 (element i's span is
// i / 32) the step, the f32 sum of the exact values and the sum of the rounding residuals.
struct Q8 {
    u64 q;
    u64 step;
    u64 sum;
    u64 res;
};

// Lane (i % 32) of a full warp quantizes element i (value v); the warp covers one span.
__device__ __forceinline__ void q8_store(Q8 o, u64 i, float v) {
    // The largest |v| through the bit patterns (NaN's exceed every finite value's), as the CPU.
    u32 top = __float_as_uint(v) & 0x7fffffffu;
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) top = max(top, __shfl_xor_sync(0xffffffffu, top, k));
    float largest = __uint_as_float(top);
    float step = isfinite(largest) ? largest / 127.0f : __int_as_float(0x7fc00000);
    if (step < 1.17549435e-38f) step = 0.f;  // also false for NaN
    float inverse = step > 0.f ? 1.0f / step : 0.f;
    int q = __float2int_rn(v * inverse);
    ((i8*)o.q)[i] = (i8)q;
    float sum = warp_sum(v), res = warp_sum(v - step * (float)q);
    if (i % WARP == 0) {
        u64 s = i / WARP;
        ((float*)o.step)[s] = step;
        ((float*)o.sum)[s] = sum;
        ((float*)o.res)[s] = res;
    }
}

// o = int8(x) for n elements (a multiple of 32).
extern "C" __global__ void quantize_q8(const float* x, Q8 o, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) q8_store(o, i, x[i]);
}

// x moved to a group's input, `e` activations on.
__device__ __forceinline__ Q8 q8_at(Q8 x, u64 e) {
    x.q += e;
    x.step += 4 * (e / WARP);
    x.sum += 4 * (e / WARP);
    x.res += 4 * (e / WARP);
    return x;
}

// Q4_K, per sub-block j: y += d·sc_j·(step_j·Σq·xq + 7.5·res_j) − dmin·m_j·sum_j (the CPU's
// formula). Lane l takes super-block 4i + l/8 and its code bytes 16p .. 16p+15 (p = l % 8):
// sub-blocks 2(p/2) (low nibbles) and 2(p/2)+1 (high), 16 columns of each; the even lane of
// each pair adds the pair's residual and minimum terms. Returns the lane's share of the row.
struct Q4_KQ8 {
    static constexpr u32 BLOCK = 144;
    static __device__ __forceinline__ float lane_dot(const u8* rowp, const Q8& x, u32 nb, int lane) {
        const i8* xq = (const i8*)x.q;
        const float *step = (const float*)x.step, *sum = (const float*)x.sum,
                    *res = (const float*)x.res;
        int p = lane % 8, j = p / 2, half = p % 2;
        float acc = 0.f;
        for (u32 b = lane / 8; b < nb; b += 4) {
            const u8* blk = rowp + (u64)b * 144;
            uint4 head = *(const uint4*)blk;
            uint4 c = *(const uint4*)(blk + 16 + 32 * j + 16 * half);
            u32 c0 = b * 256 + 64 * j + 16 * half;
            int4 xl = *(const int4*)(xq + c0), xh = *(const int4*)(xq + c0 + 32);
            int dl = 0, dh = 0;
            dl = __dp4a((int)(c.x & 0x0f0f0f0fu), xl.x, dl);
            dl = __dp4a((int)(c.y & 0x0f0f0f0fu), xl.y, dl);
            dl = __dp4a((int)(c.z & 0x0f0f0f0fu), xl.z, dl);
            dl = __dp4a((int)(c.w & 0x0f0f0f0fu), xl.w, dl);
            dh = __dp4a((int)((c.x >> 4) & 0x0f0f0f0fu), xh.x, dh);
            dh = __dp4a((int)((c.y >> 4) & 0x0f0f0f0fu), xh.y, dh);
            dh = __dp4a((int)((c.z >> 4) & 0x0f0f0f0fu), xh.z, dh);
            dh = __dp4a((int)((c.w >> 4) & 0x0f0f0f0fu), xh.w, dh);
            float d = half_to_float(head.x & 0xffff), dmin = half_to_float(head.x >> 16);
            u32 sw[3] = {head.y, head.z, head.w};
            float sc0, m0, sc1, m1;
            scale_min_k4_words(2 * j, sw, &sc0, &m0);
            scale_min_k4_words(2 * j + 1, sw, &sc1, &m1);
            u32 s0 = b * 8 + 2 * j, s1 = s0 + 1;
            float v = sc0 * (step[s0] * (float)dl) + sc1 * (step[s1] * (float)dh);
            if (half == 0) v += 7.5f * (sc0 * res[s0] + sc1 * res[s1]);
            acc += d * v;
            if (half == 0) acc -= dmin * (m0 * sum[s0] + m1 * sum[s1]);
        }
        return acc;
    }
};

// 8 bytes at a 2-byte aligned address (Q6_K's 210-byte blocks): three aligned words, shifted.
__device__ __forceinline__ uint2 load8_a2(const u8* p) {
    const u32* w = (const u32*)((u64)p & ~3ull);
    u32 sh = ((u32)(u64)p & 3u) * 8;
    u32 w0 = w[0], w1 = w[1], w2 = w[2];
    return make_uint2(__funnelshift_r(w0, w1, sh), __funnelshift_r(w1, w2, sh));
}

// Codes 0..63 of 4 columns from their low-nibble word and high-bit word (already shifted to
// bits 4-5 of each byte), minus 32 per byte.
__device__ __forceinline__ int q6_codes(u32 low, u32 high) {
    return (int)__vsub4((low & 0x0f0f0f0fu) | (high & 0x30303030u), 0x20202020u);
}

// Q6_K, per group g of 16: y += d·sc_g·step·Σ(q−32)·xq. Lane l takes super-block 4i + l/8 and,
// with p = l % 8, half n = p/4 and columns 128n + 32i + l0 .. +8 (l0 = 8(p%4), i < 4): 8 bytes
// each of ql[64n + l0], ql[64n + 32 + l0] and qh[32n + l0].
struct Q6_KQ8 {
    static constexpr u32 BLOCK = 210;
    static __device__ __forceinline__ float lane_dot(const u8* rowp, const Q8& x, u32 nb, int lane) {
        const i8* xq = (const i8*)x.q;
        const float* step = (const float*)x.step;
        int p = lane % 8, n = p / 4, l0 = 8 * (p % 4);
        float acc = 0.f;
        for (u32 b = lane / 8; b < nb; b += 4) {
            const u8* blk = rowp + (u64)b * 210;
            uint2 la = load8_a2(blk + 64 * n + l0), lb = load8_a2(blk + 64 * n + 32 + l0);
            uint2 h = load8_a2(blk + 128 + 32 * n + l0);
            float d = half_to_float(load_u16(blk + 208));
            const i8* sc = (const i8*)(blk + 192 + 8 * n + l0 / 16);
            u32 c0 = b * 256 + 128 * n + l0;
            int words[4][2] = {
                {q6_codes(la.x, h.x << 4), q6_codes(la.y, h.y << 4)},
                {q6_codes(lb.x, h.x << 2), q6_codes(lb.y, h.y << 2)},
                {q6_codes(la.x >> 4, h.x), q6_codes(la.y >> 4, h.y)},
                {q6_codes(lb.x >> 4, h.x >> 2), q6_codes(lb.y >> 4, h.y >> 2)},
            };
            float v = 0.f;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int2 xv = *(const int2*)(xq + c0 + 32 * i);
                int s = __dp4a(words[i][1], xv.y, __dp4a(words[i][0], xv.x, 0));
                v += (float)sc[2 * i] * (step[b * 8 + 4 * n + i] * (float)s);
            }
            acc += d * v;
        }
        return acc;
    }
};

// y = W x for row `row` of group g = blockIdx.y (a slot at bases[g], or the plain matrix), its
// activations x_group_stride · g on.
template <class K>
__device__ __forceinline__ void matvec_q8(const u64* bases, const MatArgs& a, Q8 x, float* y) {
    u32 row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP;
    if (row >= a.rows) return;
    u64 g = blockIdx.y;
    u64 base = bases ? bases[g] : 0;
    u32 nb = a.cols / 256;
    const u8* rowp = (const u8*)(base + a.data) + (u64)row * nb * K::BLOCK;
    float acc = K::lane_dot(rowp, q8_at(x, g * a.x_group_stride), nb, threadIdx.x % WARP);
    decode_store(a, y + g * a.y_group_stride, row, acc);
}

// One token's experts and their weighted sum in one launch: y (+)= Σ_g weights[g] · W_g x_g in
// ascending g, as combine_experts adds the separate products. One block per output row, warp g
// on expert g (blockDim = 32 · groups, groups <= 32), so the experts' loads are in flight at
// once; warp 0 adds the products in order.
template <class K>
__device__ __forceinline__ void matvec_q8_combine(const u64* bases, const MatArgs& a, Q8 x,
                                                  const float* weights, u32 groups, float* y) {
    __shared__ float part[32];
    u32 row = blockIdx.x, g = threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    u32 nb = a.cols / 256;
    const u8* rowp = (const u8*)(bases[g] + a.data) + (u64)row * nb * K::BLOCK;
    float s = warp_sum(K::lane_dot(rowp, q8_at(x, g * a.x_group_stride), nb, lane));
    if (lane == 0) part[g] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (u32 i = 0; i < groups; i++) total += weights[i] * part[i];
        y[row] = a.accumulate ? y[row] + total : total;
    }
}

#define MATVEC_Q8(name, K) \
    extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * WARP) \
    name##_q8(const u64* bases, MatArgs a, Q8 x, float* y) { matvec_q8<K>(bases, a, x, y); } \
    extern "C" __global__ void __launch_bounds__(1024) \
    name##_q8_combine(const u64* bases, MatArgs a, Q8 x, const float* weights, u32 groups, float* y) { \
        matvec_q8_combine<K>(bases, a, x, weights, groups, y); \
    }
MATVEC_Q8(matvec_q4_k, Q4_KQ8)
MATVEC_Q8(matvec_q6_k, Q6_KQ8)

// Up to MULTI_MAX matrices multiplying the same int8 activations in one launch (a layer's q, k
// and v; a Gated DeltaNet layer's input projections): matrix i takes the blocks from
// first_block[i] on, kind[i] 0 for Q4_K, 1 for Q6_K. Each row gets the bits of matvec_q8.
#define MULTI_MAX 4
struct MultiArgs {
    MatArgs a[MULTI_MAX];
    u64 y[MULTI_MAX];
    u32 kind[MULTI_MAX];
    u32 first_block[MULTI_MAX + 1];
    u32 count;
};
extern "C" __global__ void __launch_bounds__(ROWS_PER_BLOCK * WARP)
matvec_q8_multi(MultiArgs m, Q8 x) {
    u32 i = 0;
    while (i + 1 < m.count && blockIdx.x >= m.first_block[i + 1]) i++;
    const MatArgs& a = m.a[i];
    u32 row = (blockIdx.x - m.first_block[i]) * ROWS_PER_BLOCK + threadIdx.x / WARP;
    if (row >= a.rows) return;
    u32 nb = a.cols / 256;
    int lane = threadIdx.x % WARP;
    float acc = m.kind[i] == 0
        ? Q4_KQ8::lane_dot((const u8*)a.data + (u64)row * nb * Q4_KQ8::BLOCK, x, nb, lane)
        : Q6_KQ8::lane_dot((const u8*)a.data + (u64)row * nb * Q6_KQ8::BLOCK, x, nb, lane);
    decode_store(a, (float*)m.y[i], row, acc);
}

// As rms_norm, and the output also rounded to int8 into `q` (one row: a decode step). Launched
// with 1024 threads for rows of up to 4096: each thread loads its (at most 4) elements and
// weights once, before the reduction, so the block waits for memory once.
#define NORM_Q8_PER_THREAD 4
extern "C" __global__ void rms_norm_q8(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ out, u32 width, float eps, Q8 q) {
    __shared__ float part[32];
    float xv[NORM_Q8_PER_THREAD], wv[NORM_Q8_PER_THREAD];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_Q8_PER_THREAD; k++) {
        u32 i = threadIdx.x + k * blockDim.x;
        xv[k] = i < width ? x[i] : 0.f;
        wv[k] = i < width ? w[i] : 0.f;
        s += xv[k] * xv[k];
    }
    float r = 1.0f / sqrtf(block_sum(s, part) / (float)width + eps);
    // width is a multiple of 32 and so is blockDim.x: a warp's lanes stay together.
#pragma unroll
    for (int k = 0; k < NORM_Q8_PER_THREAD; k++) {
        u32 i = threadIdx.x + k * blockDim.x;
        if (i < width) {
            float v = wv[k] * (xv[k] * r);
            out[i] = v;
            q8_store(q, i, v);
        }
    }
}

// As silu_mul, and the output also rounded to int8 into `q` (n a multiple of 32).
extern "C" __global__ void silu_mul_q8(const float* g, const float* u, float* out, u64 n, Q8 q) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float x = g[i];
        float v = x / (1.0f + expf(-x)) * u[i];
        out[i] = v;
        q8_store(q, i, v);
    }
}

// ---- element-wise and normalisation ----

// out[r] = w · x[r] / rms(x[r]) for rows of `width`; one block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, u32 width, float eps) {
    __shared__ float part[32];
    const float* xr = x + (u64)blockIdx.x * width;
    float* orow = out + (u64)blockIdx.x * width;
    float s = 0.f;
    for (u32 i = threadIdx.x; i < width; i += blockDim.x) s += xr[i] * xr[i];
    float r = 1.0f / sqrtf(block_sum(s, part) / (float)width + eps);
    for (u32 i = threadIdx.x; i < width; i += blockDim.x) orow[i] = w[i] * (xr[i] * r);
}

// NeoX rotary embedding on the first `rot` dims of every head; token t is at position start + t.
extern "C" __global__ void rope(float* x, u32 n_tokens, u32 n_heads, u32 head_dim, u32 rot,
                                const float* inv_freq, u32 start) {
    u32 half = rot / 2;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 total = (u64)n_tokens * n_heads * half;
    if (i >= total) return;
    u32 k = i % half;
    u64 th = i / half;  // token * n_heads + head
    u32 t = th / n_heads;
    float f = (float)(start + t) * inv_freq[k];
    float c = cosf(f), s = sinf(f);
    float* h = x + th * head_dim;
    float a = h[k], b = h[k + half];
    h[k] = a * c - b * s;
    h[k + half] = b * c + a * s;
}

// Causal attention over the cache: query t of the pass (position start + t) of head h attends to
// positions 0..=start+t of kv head h / (n_heads / n_kv).
#define ATT_WARPS 16
#define MAX_DIMS_PER_LANE 8  // head_dim <= 256
// One block of ATT_WARPS warps per (head, token); each warp keeps an online softmax over every
// ATT_WARPS-th position, then the warps are merged.
// Split (decode, `part` not null): block z = blockIdx.z of gridDim.z takes an equal share of the
// positions (reckoned here, so a recorded graph stays right as the sequence grows) and writes
// its running max, sum and unnormalised output to part[(t·n_heads + h)·splits + z] (head_dim + 2
// floats each), which attention_combine merges; otherwise it writes the output itself.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * WARP)
attention(const float* q, const float* k, const float* v, float* out, u32 start, u32 n_heads,
          u32 n_kv, u32 head_dim, float scale, const u32* start_at, float* part) {
    u32 h = blockIdx.x, t = blockIdx.y;
    if (start_at) start = *start_at;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    u32 kvh = h / (n_heads / n_kv);
    u32 per_lane = head_dim / WARP;
    u64 kv_width = (u64)n_kv * head_dim;
    const float* qh = q + ((u64)t * n_heads + h) * head_dim;
    float qr[MAX_DIMS_PER_LANE], acc[MAX_DIMS_PER_LANE];
#pragma unroll
    for (int j = 0; j < MAX_DIMS_PER_LANE; j++) {
        qr[j] = j < per_lane ? qh[lane + WARP * j] : 0.f;
        acc[j] = 0.f;
    }
    float m = __int_as_float(0xff800000), l = 0.f;  // -inf
    u32 first = 0, end = start + t + 1;
    if (part) {
        u32 share = (end + gridDim.z - 1) / gridDim.z;
        first = min(end, blockIdx.z * share);
        end = min(end, first + share);
    }
    for (u32 p = first + warp; p < end; p += ATT_WARPS) {
        const float* kp = k + p * kv_width + (u64)kvh * head_dim;
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < MAX_DIMS_PER_LANE; j++)
            if (j < per_lane) s = fmaf(qr[j], kp[lane + WARP * j], s);
        s = warp_sum(s) * scale;
        float m2 = fmaxf(m, s);
        float corr = expf(m - m2), e = expf(s - m2);
        l = l * corr + e;
        const float* vp = v + p * kv_width + (u64)kvh * head_dim;
#pragma unroll
        for (int j = 0; j < MAX_DIMS_PER_LANE; j++)
            if (j < per_lane) acc[j] = acc[j] * corr + e * vp[lane + WARP * j];
        m = m2;
    }
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][256];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
    for (int j = 0; j < MAX_DIMS_PER_LANE; j++)
        if (j < per_lane) sacc[warp][lane + WARP * j] = acc[j];
    __syncthreads();
    float mall = __int_as_float(0xff800000);
    for (int w = 0; w < ATT_WARPS; w++) mall = fmaxf(mall, sm[w]);
    float lall = 0.f;
    for (int w = 0; w < ATT_WARPS; w++) if (sl[w] > 0.f) lall += sl[w] * expf(sm[w] - mall);
    if (part) {
        float* ph = part + (((u64)t * n_heads + h) * gridDim.z + blockIdx.z) * (head_dim + 2);
        if (threadIdx.x == 0) { ph[0] = mall; ph[1] = lall; }
        for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) {
            float s = 0.f;
            for (int w = 0; w < ATT_WARPS; w++) if (sl[w] > 0.f) s += sacc[w][i] * expf(sm[w] - mall);
            ph[2 + i] = s;
        }
        return;
    }
    float* oh = out + ((u64)t * n_heads + h) * head_dim;
    for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float s = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) if (sl[w] > 0.f) s += sacc[w][i] * expf(sm[w] - mall);
        oh[i] = s / lall;
    }
}

// Merges the `splits` partial results of split attention: one block per (token, head).
// With q.q not 0, the output is also rounded to int8 there (o_proj's input in a decode step).
extern "C" __global__ void attention_combine(const float* part, float* out, u32 splits,
                                             u32 head_dim, Q8 q) {
    u64 th = blockIdx.x;
    const float* ph = part + th * splits * (head_dim + 2);
    float mall = __int_as_float(0xff800000);
    for (u32 z = 0; z < splits; z++)
        if (ph[z * (head_dim + 2) + 1] > 0.f) mall = fmaxf(mall, ph[z * (head_dim + 2)]);
    float lall = 0.f;
    for (u32 z = 0; z < splits; z++) {
        const float* pz = ph + z * (head_dim + 2);
        if (pz[1] > 0.f) lall += pz[1] * expf(pz[0] - mall);
    }
    for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float s = 0.f;
        for (u32 z = 0; z < splits; z++) {
            const float* pz = ph + z * (head_dim + 2);
            if (pz[1] > 0.f) s += pz[2 + i] * expf(pz[0] - mall);
        }
        out[th * head_dim + i] = s / lall;
        // head_dim is a multiple of 32 and blockDim.x too: whole warps reach this.
        if (q.q) q8_store(q, th * head_dim + i, s / lall);
    }
}

extern "C" __global__ void silu_mul(const float* g, const float* u, float* out, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float x = g[i];
        out[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

// x += d
extern "C" __global__ void add_into(float* x, const float* d, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += d[i];
}

// Splits q_proj's [query | gate] per head (Qwen3-Next/Qwen3.5) into q and gate.
extern "C" __global__ void split_query_gate(const float* qg, float* q, float* gate, u64 heads,
                                            u32 head_dim) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= heads * head_dim) return;
    u64 hd = i / head_dim, j = i % head_dim;
    q[i] = qg[hd * 2 * head_dim + j];
    gate[i] = qg[hd * 2 * head_dim + head_dim + j];
}

// o *= sigmoid(gate)
extern "C" __global__ void mul_sigmoid(float* o, const float* gate, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) o[i] *= 1.0f / (1.0f + expf(-gate[i]));
}

// out[t] (+)= Σ_g weight[t][g] · y[t][g] in ascending g (one token's experts, in the order the
// CPU adds them), for `n` tokens of `groups` expert outputs of width h.
extern "C" __global__ void combine_experts(const float* y, const float* weights, float* out,
                                           u32 groups, u32 h, u32 n, u32 accumulate) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n * h) return;
    u64 t = i / h, j = i % h;
    float s = 0.f;
    for (u32 g = 0; g < groups; g++) s += weights[t * groups + g] * y[(t * groups + g) * h + j];
    out[i] = accumulate ? out[i] + s : s;
}


// Largest value, ties to the lower index (ops::top_k's order).
__device__ void block_argmax(float v, int i, float* red, int* redi, float* best, int* besti) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
    }
    __syncthreads();
    if (lane == 0) { red[w] = v; redi[w] = i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < nw; k++)
            if (red[k] > red[0] || (red[k] == red[0] && redi[k] < redi[0])) { red[0] = red[k]; redi[0] = redi[k]; }
        *best = red[0];
        *besti = redi[0];
    }
    __syncthreads();
}

// One token's routing on the GPU when every expert of the layer is resident: softmax over the
// E router logits, top-k (ties to the lower index), optional renormalisation (summed best
// first, as the CPU does), then the chosen experts in ascending id order into
// table = [k gate bases][k up bases (= gate base + up_delta)][k weights].
#define MAX_EXPERTS 1024
#define MAX_TOP_K 64
extern "C" __global__ void route_top_k(const float* logits, u32 E, u32 k, u32 renormalize,
                                       const u64* slot_bases, u64 up_delta, u64* table) {
    // One warp: shuffles only, no block barriers.
    __shared__ float p[MAX_EXPERTS];
    __shared__ float cw[MAX_TOP_K];
    __shared__ int ci[MAX_TOP_K];
    int lane = threadIdx.x;
    float m = __int_as_float(0xff800000);
    for (u32 i = lane; i < E; i += WARP) m = fmaxf(m, logits[i]);
    m = warp_max(m);
    float s = 0.f;
    for (u32 i = lane; i < E; i += WARP) {
        p[i] = expf(logits[i] - m);
        s += p[i];
    }
    s = warp_sum(s);
    float inv = 1.0f / s;
    for (u32 i = lane; i < E; i += WARP) p[i] *= inv;
    __syncwarp();
    for (u32 j = 0; j < k; j++) {
        float v = -2.0f;
        int vi = 0x7fffffff;
        for (u32 i = lane; i < E; i += WARP)
            if (p[i] > v) { v = p[i]; vi = i; }  // ascending i: ties keep the lower index
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float v2 = __shfl_xor_sync(0xffffffffu, v, o);
            int i2 = __shfl_xor_sync(0xffffffffu, vi, o);
            if (v2 > v || (v2 == v && i2 < vi)) { v = v2; vi = i2; }
        }
        if (lane == 0) {
            cw[j] = v;
            ci[j] = vi;
            p[vi] = -1.0f;  // probabilities are >= 0: never chosen again
        }
        __syncwarp();
    }
    // Lane j writes choice j at its rank in ascending expert id, all lanes at once (one
    // lane's dependent loads of slot_bases were most of this kernel's time).
    float t = 0.f;
    if (renormalize)
        for (u32 j = 0; j < k; j++) t += cw[j];  // in the order chosen, as the CPU
    float* weights = (float*)(table + 2 * k);
    for (u32 j = lane; j < k; j += WARP) {
        int id = ci[j];
        u32 rank = 0;
        for (u32 i = 0; i < k; i++) rank += ci[i] < id;
        u64 base = slot_bases[id];
        table[rank] = base;
        table[k + rank] = base + up_delta;
        weights[rank] = renormalize ? cw[j] / t : cw[j];
    }
}

// Per-head RMSNorm (when w is given) then NeoX RoPE on the first `rot` dims of head xh at
// position pos, in place; with `copy`, the result also goes there. One block per head.
__device__ __forceinline__ void norm_rope_head(float* xh, float* copy, u32 head_dim, const float* w,
                                               float eps, u32 rot, const float* inv_freq, u32 pos) {
    __shared__ float v[256];
    __shared__ float red[32];
    float ss = 0.f;
    for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) {
        v[i] = xh[i];
        ss += v[i] * v[i];
    }
    if (w) {
        ss = block_sum(ss, red);
        float r = 1.0f / sqrtf(ss / (float)head_dim + eps);
        for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) v[i] = w[i] * (v[i] * r);
    }
    __syncthreads();
    u32 half = rot / 2;
    for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float o = v[i];
        if (i < rot) {
            u32 k = i < half ? i : i - half;
            float f = (float)pos * inv_freq[k];
            float c = cosf(f), s = sinf(f);
            o = i < half ? v[i] * c - v[i + half] * s : v[i] * c + v[i - half] * s;
        }
        xh[i] = o;
        if (copy) copy[i] = o;
    }
}

// Per-head RMSNorm then RoPE, in place, for the heads of n tokens (token t at position
// start + t). One block per (head, token).
extern "C" __global__ void head_norm_rope(float* x, u32 n_heads, u32 head_dim, const float* w,
                                          float eps, u32 rot, const float* inv_freq, u32 start,
                                          const u32* start_at) {
    if (start_at) start = *start_at;
    u32 h = blockIdx.x, t = blockIdx.y;
    norm_rope_head(x + ((u64)t * n_heads + h) * head_dim, nullptr, head_dim, w, eps, rot,
                   inv_freq, start + t);
}

// head_norm_rope of the queries and the keys, and append_kv, in one launch: blocks
// 0 .. n_heads−1 take the query heads, the next n_kv the key heads, whose results (and the
// values' heads) also go to the caches at position start + t.
extern "C" __global__ void qk_norm_rope_append(float* q, float* k, const float* v, u32 n_heads,
                                               u32 n_kv, u32 head_dim, const float* qw, float qe,
                                               const float* kw, float ke, u32 rot,
                                               const float* inv_freq, u32 start,
                                               const u32* start_at, float* k_cache,
                                               float* v_cache) {
    if (start_at) start = *start_at;
    u32 h = blockIdx.x, t = blockIdx.y, pos = start + t;
    if (h < n_heads) {
        norm_rope_head(q + ((u64)t * n_heads + h) * head_dim, nullptr, head_dim, qw, qe, rot,
                       inv_freq, pos);
        return;
    }
    u64 head = ((u64)t * n_kv + (h - n_heads)) * head_dim;
    u64 at = (u64)pos * n_kv * head_dim + (h - n_heads) * head_dim;
    norm_rope_head(k + head, k_cache + at, head_dim, kw, ke, rot, inv_freq, pos);
    for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) v_cache[at + i] = v[head + i];
}

// out[t] (+)= Σ_j weights[t·k + j] · y[at[t·k + j]] for the k experts of each token of a prompt
// (rows of width h; `at` lists each token's rows in y in ascending expert order).
extern "C" __global__ void combine_rows(const float* y, const u32* at, const float* weights,
                                        float* out, u32 k, u32 h, u32 n, u32 accumulate) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n * h) return;
    u64 t = i / h, c = i % h;
    float s = 0.f;
    for (u32 j = 0; j < k; j++) s += weights[t * k + j] * y[(u64)at[t * k + j] * h + c];
    out[i] = accumulate ? out[i] + s : s;
}

// dst[j] = src[rows[j]] (rows of width h).
extern "C" __global__ void gather_rows(const float* src, const u32* rows, float* dst, u32 count,
                                       u32 h) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)count * h) return;
    u64 j = i / h, c = i % h;
    dst[i] = src[(u64)rows[j] * h + c];
}

// out[t] += sigmoid(g[t]) · y[t] (the shared expert of Qwen3-Next/Qwen3.5 MoE blocks).
extern "C" __global__ void add_gated(float* out, const float* y, const float* g, u32 h, u32 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n * h) return;
    out[i] += 1.0f / (1.0f + expf(-g[i / h])) * y[i];
}

// Appends n tokens' keys and values (rows of `width`) to the caches at position start.
extern "C" __global__ void append_kv(const float* k, const float* v, float* k_cache, float* v_cache,
                                     u32 width, u32 n, u32 start, const u32* start_at) {
    if (start_at) start = *start_at;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n * width) return;
    u64 at = (u64)start * width + i;
    k_cache[at] = k[i];
    v_cache[at] = v[i];
}

// ---- Gated DeltaNet (Qwen3-Next, Qwen3.5) ----

// silu(causal depthwise conv) over n rows of C channels, taps w[c·K + j] (tap K−1 on the current
// token); `state` holds the K−1 previous input rows (oldest first) and is advanced in place.
// One thread per channel walks the tokens in order.
#define MAX_TAPS 8
extern "C" __global__ void conv1d_silu(const float* x, const float* w, float* state, float* out,
                                       u32 n, u32 C, u32 K) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float win[MAX_TAPS];
    u32 hist = K - 1;
#pragma unroll
    for (int j = 0; j < MAX_TAPS; j++) win[j] = (u32)j < hist ? state[(u64)j * C + c] : 0.f;
    for (u32 t = 0; t < n; t++) {
        float cur = x[(u64)t * C + c];
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < MAX_TAPS; j++) {
            if ((u32)j < hist) acc += w[(u64)c * K + j] * win[j];
        }
        acc += w[(u64)c * K + hist] * cur;
        out[(u64)t * C + c] = acc / (1.0f + expf(-acc));
        // Shift the window: drop the oldest, append the current input.
#pragma unroll
        for (int j = 0; j + 1 < MAX_TAPS; j++)
            if ((u32)(j + 1) < hist) win[j] = win[j + 1];
        if (hist > 0) {
#pragma unroll
            for (int j = 0; j < MAX_TAPS; j++)
                if ((u32)j == hist - 1) win[j] = cur;
        }
    }
#pragma unroll
    for (int j = 0; j < MAX_TAPS; j++)
        if ((u32)j < hist) state[(u64)j * C + c] = win[j];
}

// x · scale / sqrt(Σx² + 1e-6) over each `dim`-wide head of n rows (row stride `stride`), in
// place. One warp per (token, head).
extern "C" __global__ void l2norm_heads(float* x, u32 n, u32 heads, u32 dim, u64 stride,
                                        float scale) {
    u64 wid = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    if (wid >= (u64)n * heads) return;
    u64 t = wid / heads, h = wid % heads;
    float* r = x + t * stride + h * dim;
    float ss = 0.f;
    for (u32 i = lane; i < dim; i += WARP) ss += r[i] * r[i];
    ss = warp_sum(ss);
    float inv = scale / sqrtf(ss + 1e-6f);
    for (u32 i = lane; i < dim; i += WARP) r[i] *= inv;
}

// beta = sigmoid(b), g = neg_a[h] · softplus(a + dt_bias[h]) for n × nv.
extern "C" __global__ void delta_gates(const float* b, const float* a, const float* neg_a,
                                       const float* dt_bias, float* beta, float* g, u32 n, u32 nv) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n * nv) return;
    u32 h = i % nv;
    beta[i] = 1.0f / (1.0f + expf(-b[i]));
    float x = a[i] + dt_bias[h];
    float sp = x > 20.0f ? x : log1pf(expf(x));
    g[i] = neg_a[h] * sp;
}

// The delta rule, token by token, for one value head per block of dv threads: thread j holds
// column j of the head's state S (dk values) in registers.
//   S ← e^g S;  δ = β (v − Sᵀ k);  S ← S + k ⊗ δ;  o = Sᵀ q
// q, k, v are read from the convolution output rows (stride C) after L2 normalisation; value
// head h reads key head h / (nv / nk), or h % nk when `tiled`.
#define MAX_DK 128
extern "C" __global__ void __launch_bounds__(256)
gated_delta(float* S, const float* xc, u64 stride, const float* g, const float* beta, float* o,
            u32 n, u32 nk, u32 nv, u32 dk, u32 dv, u32 tiled) {
    __shared__ float qs[MAX_DK], ks[MAX_DK];
    u32 h = blockIdx.x, j = threadIdx.x;
    u32 kh = tiled ? h % nk : h / (nv / nk);
    float* sh = S + (u64)h * dk * dv;
    float s[MAX_DK];
#pragma unroll
    for (int i = 0; i < MAX_DK; i++) s[i] = (u32)i < dk && j < dv ? sh[(u64)i * dv + j] : 0.f;
    for (u32 t = 0; t < n; t++) {
        const float* row = xc + (u64)t * stride;
        __syncthreads();
        for (u32 i = j; i < dk; i += blockDim.x) {
            qs[i] = row[kh * dk + i];
            ks[i] = row[nk * dk + kh * dk + i];
        }
        __syncthreads();
        if (j < dv) {
            float decay = expf(g[(u64)t * nv + h]), bt = beta[(u64)t * nv + h];
            float kv = 0.f;
#pragma unroll
            for (int i = 0; i < MAX_DK; i++)
                if ((u32)i < dk) kv += s[i] * ks[i];
            float vj = row[2 * nk * dk + h * dv + j];
            float delta = bt * (vj - decay * kv);
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < MAX_DK; i++) {
                if ((u32)i < dk) {
                    s[i] = decay * s[i] + ks[i] * delta;
                    acc += qs[i] * s[i];
                }
            }
            o[((u64)t * nv + h) * dv + j] = acc;
        }
    }
    if (j < dv) {
#pragma unroll
        for (int i = 0; i < MAX_DK; i++)
            if ((u32)i < dk) sh[(u64)i * dv + j] = s[i];
    }
}

// Gated RMSNorm per head: o = (w · o / rms(o)) · silu(z), rows of dv; one warp per row.
extern "C" __global__ void gated_rms_norm(float* o, const float* z, const float* w, float eps,
                                          u32 rows, u32 dv) {
    u64 r = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    if (r >= rows) return;
    float* orow = o + r * dv;
    const float* zr = z + r * dv;
    float ss = 0.f;
    for (u32 i = lane; i < dv; i += WARP) ss += orow[i] * orow[i];
    ss = warp_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)dv + eps);
    for (u32 i = lane; i < dv; i += WARP) {
        float zv = zr[i];
        orow[i] = (w[i] * (orow[i] * inv)) * (zv / (1.0f + expf(-zv)));
    }
}

// Qwen3-Next's fused projections, grouped by key head g: qkvz rows [q (dk) | k (dk) | v (r·dv) |
// z (r·dv)] and ba rows [b (r) | a (r)], into mixed = [Q | K | V], z, b and a.
extern "C" __global__ void unfuse_qkvz(const float* raw, const float* raw_ba, float* mixed,
                                       float* z, float* b, float* a, u32 n, u32 nk, u32 dk,
                                       u32 r, u32 dv) {
    u64 group = 2 * dk + 2 * (u64)r * dv;
    u64 total = (u64)n * nk * group;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 C = 2 * (u64)nk * dk + (u64)nk * r * dv, nvdv = (u64)nk * r * dv;
    if (i < total) {
        u64 t = i / (nk * group), rem = i % (nk * group), g = rem / group, e = rem % group;
        float x = raw[i];
        float* m = mixed + t * C;
        if (e < dk) m[g * dk + e] = x;
        else if (e < 2 * dk) m[nk * dk + g * dk + (e - dk)] = x;
        else if (e < 2 * dk + (u64)r * dv) m[2 * nk * dk + g * r * dv + (e - 2 * dk)] = x;
        else z[t * nvdv + g * r * dv + (e - 2 * dk - (u64)r * dv)] = x;
    }
    if (i < (u64)n * nk * 2 * r) {
        u64 t = i / (nk * 2 * r), rem = i % (nk * 2 * r), g = rem / (2 * r), e = rem % (2 * r);
        u64 nv = (u64)nk * r;
        if (e < r) b[t * nv + g * r + e] = raw_ba[i];
        else a[t * nv + g * r + (e - r)] = raw_ba[i];
    }
}
