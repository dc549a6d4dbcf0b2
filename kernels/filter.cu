// Separable 8-bit Gaussian blur and unsharp mask (talkrt.kernels.gpu.gaussian_blur /
// unsharp_mask), bit-exact with cv2.GaussianBlur's uint8 fixed-point path (gaussian.py):
//   h   = sum_i w[i] * src[x + (i - r)]                  (BORDER_REFLECT_101, weights sum to 256)
//   out = (sum_j w[j] * h[y + (j - r)] + 2^15) >> 16
// mode 1 then applies the unsharp mask in float32:
//   d = src - blurred; out = |d| >= threshold ? round_half_up(src + amount * d) : src
// The double sum is exact integer arithmetic, so the kernel runs the vertical pass first
// (v = sum_j w[j] * src[y + (j - r)] <= 255 * 256 fits 16 bits), with the same result.
//
// The image is treated as rows of W*C byte "elements"; a horizontal tap moves by C elements.
// One block produces a TILE_X x TILE_Y element tile in three steps separated by barriers:
//   1) load the tile plus a halo of R = max(r, 3) rows and H = round_up(R*C, 16) elements on
//      each side into shared memory s_in (row stride S = TILE_X + 2H), through tables of
//      reflected row offsets and, for tiles whose halo leaves the frame, column offsets; rows
//      inside the frame move as 16-byte or 32-bit vectors when aligned, several per thread in
//      flight;
//   2) vertical pass into uint16 s_v (TILE_Y x S), four columns per 32-bit word (SWAR below);
//   3) horizontal pass (+ unsharp mask), straight to global memory.
// r <= 3 (ksize <= 7: the default sigma = 1) takes a fast path compiled per channel count, with
// the weights zero-padded to 7 taps: in step 2 a thread slides down a strip of FAST_STRIP rows
// keeping the sums in registers, in step 3 it makes 8 consecutive elements from 16-byte loads.
// Larger radii take a generic path with runtime loops. Every loop is strided by the block size,
// so any block (x, y, 1) computes the same result (the CPU emulator runs one thread per block).
// Launch: block (32, 8), grid (ceil(W*C/TILE_X), ceil(H/TILE_Y), B), dynamic shared memory from
// launch.filter_smem_bytes(): align16((TILE_Y + 2R) * S) + TILE_Y * S * 2 bytes (< 48 KB with
// the static arrays for any r <= 15, C <= 4). Frames must hold fewer than 2^31 bytes.
#include "common.cuh"

#define TILE_X 256      // elements per tile (multiple of 8)
#define TILE_Y 32       // rows per tile (multiple of FAST_STRIP)
#define MAX_RADIUS 15
#define MAX_TAPS (2 * MAX_RADIUS + 1)
#define FAST_RADIUS 3   // the fast path runs 2 * FAST_RADIUS + 1 taps
#define FAST_TAPS (2 * FAST_RADIUS + 1)
#define FAST_STRIP 8    // rows per thread in the fast vertical pass

typedef unsigned short u16;

// The taps travel by value in the kernel's parameter block (__grid_constant__: read in place,
// indexed at run time, never copied per thread); the first 2 * radius + 1 are used.
// launch.FILTER_TAPS mirrors it.
struct FilterTaps { int w[MAX_TAPS]; };
static_assert(sizeof(FilterTaps) == 4 * MAX_TAPS, "FilterTaps: mirrored by launch.FILTER_TAPS");

// cv::borderInterpolate(p, n, BORDER_REFLECT_101) for any p (period 2n - 2).
__device__ __forceinline__ int reflect101(int p, int n) {
    if (p >= 0 && p < n) return p;
    if (n == 1) return 0;
    const int period = 2 * n - 2;
    p %= period;
    if (p < 0) p += period;
    return p >= n ? period - p : p;
}

__device__ __forceinline__ int halo_elems(int radius, int channels) {
    return (radius * channels + 15) & ~15;   // keeps the shared rows 16-byte aligned
}

// SWAR: a 32-bit word of four source bytes splits into its even bytes (0x00ee00ee) and odd bytes
// (0x00oo00oo); w * split accumulates two 16-bit sums at once, which never carry into each
// other because the weights are non-negative and sum to 256: every sum is <= 255 * 256 < 2^16.
__device__ __forceinline__ u32 even_bytes(u32 word) { return word & 0x00FF00FFu; }
__device__ __forceinline__ u32 odd_bytes(u32 word) { return (word >> 8) & 0x00FF00FFu; }

// The even / odd SWAR sums of one word as four uint16 columns, in column order.
__device__ __forceinline__ void store_sums(u16* dst, u32 even, u32 odd) {
    *reinterpret_cast<uint2*>(dst) = {(even & 0xFFFFu) | (odd << 16),
                                      (even >> 16) | (odd & 0xFFFF0000u)};
}

struct Tile {
    const u8* frame;  // this image of the batch
    u8* out;
    int height, width, channels, row_elems;
    int x0, y0;       // first element and row of the tile
    int R, H, S;      // halo rows, halo elements, shared row stride (elements)
    u8* s_in;         // (TILE_Y + 2R) x S source bytes: rows y0 - R.., elements x0 - H..
    u16* s_v;         // TILE_Y x S vertical sums of the same columns
};

// Output byte of one element from its full (vertical then horizontal) sum: the blur, or the
// unsharp mask of the original value (float32 as in reference.unsharp_from_blur; computed
// unconditionally and selected, which is cheaper than a branch per element).
__device__ __forceinline__ u8 finish(u32 acc, int orig, int mode, float amount, int threshold) {
    const int blurred = (int)((acc + 32768u) >> 16);
    if (mode == 0) return (u8)blurred;
    const int diff = orig - blurred;
    const u8 sharp =
        round_u8(__fadd_rn(exact_float(orig), __fmul_rn(amount, exact_float(diff))));
    return abs(diff) >= threshold ? sharp : (u8)orig;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (((unsigned long long)p) & 15ull) == 0ull;
}

// Copy rows x n vectors (u32 or uint4) to dst, row-major, vector (ly, q) = fetch(ly, q). Each
// thread loads BATCH vectors into registers before storing them, so that many loads are in
// flight; its (row, vector) position advances by blockDim.x * blockDim.y without divisions.
template <int BATCH, typename V, typename Fetch>
__device__ __forceinline__ void copy_rows(V* dst, int rows, int n, const Fetch& fetch) {
    const int nthreads = blockDim.x * blockDim.y;
    const int step_rows = nthreads / n, step_q = nthreads - step_rows * n;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    int ly = tid / n, q = tid - ly * n;
    for (int i0 = tid; ly < rows; i0 += BATCH * nthreads) {
        V v[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            if (ly < rows) v[u] = fetch(ly, q);
            q += step_q;
            ly += step_rows;
            if (q >= n) { q -= n; ++ly; }
        }
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int i = i0 + u * nthreads;
            if (i < rows * n) dst[i] = v[u];
        }
    }
}

__device__ __forceinline__ u32 gather4(const u8* p, int o0, int o1, int o2, int o3) {
    return (u32)p[o0] | ((u32)p[o1] << 8) | ((u32)p[o2] << 16) | ((u32)p[o3] << 24);
}

// 1) source rows [y0 - R, y0 + TILE_Y + R) x elements [x0 - H, x0 - H + S) into s_in, through
// tables of reflected row offsets (s_row) and, unless the halo columns lie inside the frame,
// reflected column offsets (s_col, in s_v which is free until step 2). Inside the frame rows are
// copied in 16-byte or 32-bit vectors when aligned. Ends with a barrier: s_in is complete and
// s_col no longer read.
__device__ void load_tile(const Tile& t, int* s_row) {
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int nthreads = blockDim.x * blockDim.y;
    const int rows = TILE_Y + 2 * t.R;
    const int xb = t.x0 - t.H;
    const bool inside_x = xb >= 0 && xb + t.S <= t.row_elems;   // the same for the whole block
    int* s_col = reinterpret_cast<int*>(t.s_v);
    for (int ly = tid; ly < rows; ly += nthreads)
        s_row[ly] = reflect101(t.y0 - t.R + ly, t.height) * t.row_elems;
    if (!inside_x) {   // one division per column
        for (int lx = tid; lx < t.S; lx += nthreads) {
            const int e = xb + lx;
            const int px = e >= 0 ? e / t.channels : -((t.channels - 1 - e) / t.channels);  // floor
            s_col[lx] = reflect101(px, t.width) * t.channels + (e - px * t.channels);
        }
    }
    __syncthreads();
    if (!inside_x) {
        copy_rows<8>(reinterpret_cast<u32*>(t.s_in), rows, t.S / 4, [&](int ly, int q) {
            const int* c = s_col + 4 * q;
            return gather4(t.frame + s_row[ly], c[0], c[1], c[2], c[3]);
        });
        __syncthreads();
        return;
    }
    const u8* base = t.frame + xb;   // element x0 - H of row 0
    if (aligned16(base) && (t.row_elems & 15) == 0) {   // every row's span aligned
        copy_rows<4>(reinterpret_cast<uint4*>(t.s_in), rows, t.S / 16, [&](int ly, int q) {
            return reinterpret_cast<const uint4*>(base + s_row[ly])[q];
        });
    } else if (aligned4(base) && (t.row_elems & 3) == 0) {
        copy_rows<8>(reinterpret_cast<u32*>(t.s_in), rows, t.S / 4, [&](int ly, int q) {
            return reinterpret_cast<const u32*>(base + s_row[ly])[q];
        });
    } else {
        copy_rows<8>(reinterpret_cast<u32*>(t.s_in), rows, t.S / 4, [&](int ly, int q) {
            return gather4(base + s_row[ly] + 4 * q, 0, 1, 2, 3);
        });
    }
    __syncthreads();
}

// ------------------------------------------------------------------ fast path: r <= 3, C fixed

// Column i of a thread's uint16 window (two per word).
template <int N>
__device__ __forceinline__ u32 column(const u32 (&v)[N], int i) {
    return (i & 1) ? v[i >> 1] >> 16 : v[i >> 1] & 0xFFFFu;
}

template <int C>
__device__ void filter_fast(const Tile& t, const u32 (&w)[FAST_TAPS], int mode, float amount,
                            int threshold) {
    constexpr int H = (FAST_RADIUS * C + 15) & ~15;
    constexpr int S = TILE_X + 2 * H;          // == t.S
    constexpr int WORDS = S / 4;
    // 2) vertical: a thread owns 4 columns (one word) x FAST_STRIP rows; source row j of the strip
    // feeds output rows j - 6 .. j, so each source word is read once
    const u32* s_in32 = reinterpret_cast<const u32*>(t.s_in);
    for (int item = threadIdx.y * blockDim.x + threadIdx.x; item < TILE_Y / FAST_STRIP * WORDS;
         item += blockDim.x * blockDim.y) {
        const int strip = item / WORDS, q = item - strip * WORDS;
        const u32* src = s_in32 + strip * FAST_STRIP * WORDS + q;
        u32 even[FAST_STRIP] = {}, odd[FAST_STRIP] = {};
#pragma unroll
        for (int j = 0; j < FAST_STRIP + FAST_TAPS - 1; ++j) {
            const u32 word = src[j * WORDS];
            const u32 e = even_bytes(word), o = odd_bytes(word);
#pragma unroll
            for (int y = 0; y < FAST_STRIP; ++y) {
                if (j - y >= 0 && j - y < FAST_TAPS) {
                    even[y] += w[j - y] * e;
                    odd[y] += w[j - y] * o;
                }
            }
        }
#pragma unroll
        for (int y = 0; y < FAST_STRIP; ++y)
            store_sums(t.s_v + (strip * FAST_STRIP + y) * S + 4 * q, even[y], odd[y]);
    }
    __syncthreads();
    // 3) horizontal: a thread makes elements x0 + 8g .. + 7, whose taps are the s_v columns
    // 8g + H - 3C .. 8g + H + 7 + 3C, inside the aligned 8-column blocks FIRST .. LAST after 8g
    constexpr int FIRST = (H - FAST_RADIUS * C) / 8, LAST = (H + 7 + FAST_RADIUS * C) / 8;
    constexpr int NB = LAST - FIRST + 1;
    for (int ly = threadIdx.y; ly < TILE_Y; ly += blockDim.y) {
        const int gy = t.y0 + ly;
        if (gy >= t.height) break;
        for (int g = threadIdx.x; g < TILE_X / 8; g += blockDim.x) {
            const int x = t.x0 + 8 * g;
            if (x >= t.row_elems) break;
            u32 v[4 * NB];   // uint16 columns 8 * (g + FIRST) ..
            const uint4* src = reinterpret_cast<const uint4*>(t.s_v + ly * S + 8 * (g + FIRST));
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                const uint4 block = src[b];
                v[4 * b] = block.x;
                v[4 * b + 1] = block.y;
                v[4 * b + 2] = block.z;
                v[4 * b + 3] = block.w;
            }
            const u32* orig =
                reinterpret_cast<const u32*>(t.s_in + (ly + FAST_RADIUS) * S + H + 8 * g);
            const u32 orig_words[2] = {orig[0], orig[1]};   // the source bytes of the 8 elements
            u8 res[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                u32 acc = 0;
#pragma unroll
                for (int k = 0; k < FAST_TAPS; ++k)
                    acc += w[k] * column(v, H - 8 * FIRST + e + (k - FAST_RADIUS) * C);
                res[e] = finish(acc, (orig_words[e >> 2] >> (8 * (e & 3))) & 0xFF, mode, amount,
                                threshold);
            }
            u8* dst = t.out + (size_t)gy * t.row_elems + x;
            const int n = min(8, t.row_elems - x);
            if (n == 8 && aligned8(dst)) {
                *reinterpret_cast<uint2*>(dst) = {
                    (u32)res[0] | ((u32)res[1] << 8) | ((u32)res[2] << 16) | ((u32)res[3] << 24),
                    (u32)res[4] | ((u32)res[5] << 8) | ((u32)res[6] << 16) | ((u32)res[7] << 24)};
            } else {
                store_bytes<8>(dst, res, n);
            }
        }
    }
}

// ------------------------------------------------------------------ generic path: any r <= 15

__device__ void filter_generic(const Tile& t, const u32* s_w, int mode, float amount,
                               int threshold) {
    const int ntaps = 2 * t.R + 1;
    const int words = t.S / 4;
    // 2) vertical, SWAR on 4 columns per thread
    const u32* s_in32 = reinterpret_cast<const u32*>(t.s_in);
    for (int ly = threadIdx.y; ly < TILE_Y; ly += blockDim.y) {
        for (int q = threadIdx.x; q < words; q += blockDim.x) {
            const u32* src = s_in32 + ly * words + q;
            u32 even = 0, odd = 0;
            for (int k = 0; k < ntaps; ++k) {
                const u32 word = src[k * words];
                even += s_w[k] * even_bytes(word);
                odd += s_w[k] * odd_bytes(word);
            }
            store_sums(t.s_v + ly * t.S + 4 * q, even, odd);
        }
    }
    __syncthreads();
    // 3) horizontal, one element per thread
    for (int ly = threadIdx.y; ly < TILE_Y; ly += blockDim.y) {
        const int gy = t.y0 + ly;
        if (gy >= t.height) break;
        for (int lx = threadIdx.x; lx < TILE_X; lx += blockDim.x) {
            const int x = t.x0 + lx;
            if (x >= t.row_elems) break;
            const u16* src = t.s_v + ly * t.S + t.H + lx - t.R * t.channels;
            u32 acc = 0;
            for (int k = 0; k < ntaps; ++k) acc += s_w[k] * src[k * t.channels];
            const int orig = t.s_in[(ly + t.R) * t.S + t.H + lx];
            t.out[(size_t)gy * t.row_elems + x] = finish(acc, orig, mode, amount, threshold);
        }
    }
}

extern "C" __global__ void gaussian_filter_kernel(
    const u8* __restrict__ src,   // [B, H, W, C]
    u8* __restrict__ dst,         // [B, H, W, C], must not alias src
    int height, int width, int channels,
    const __grid_constant__ FilterTaps weights,    // 2*radius + 1 integer taps >= 0, sum 256
    int radius,
    int mode, float amount, int threshold)         // mode 0: blur, 1: unsharp mask
{
    extern __shared__ __align__(16) u8 smem[];
    __shared__ u32 s_w[MAX_TAPS];
    __shared__ int s_row[TILE_Y + 2 * MAX_RADIUS];

    Tile t;
    t.height = height;
    t.width = width;
    t.channels = channels;
    t.row_elems = width * channels;
    t.frame = src + (size_t)blockIdx.z * height * t.row_elems;
    t.out = dst + (size_t)blockIdx.z * height * t.row_elems;
    t.x0 = blockIdx.x * TILE_X;
    t.y0 = blockIdx.y * TILE_Y;
    t.R = max(radius, FAST_RADIUS);
    t.H = halo_elems(t.R, channels);
    t.S = TILE_X + 2 * t.H;
    t.s_in = smem;
    t.s_v = reinterpret_cast<u16*>(smem + (((TILE_Y + 2 * t.R) * t.S + 15) & ~15));

    if (radius > FAST_RADIUS) {   // generic path's weights, visible after load_tile's barriers
        const int tid = threadIdx.y * blockDim.x + threadIdx.x;
        for (int k = tid; k < 2 * radius + 1; k += blockDim.x * blockDim.y)
            s_w[k] = (u32)weights.w[k];
    }
    load_tile(t, s_row);
    if (radius <= FAST_RADIUS) {
        u32 w[FAST_TAPS];   // zero-padded to FAST_TAPS: same sums
#pragma unroll
        for (int k = 0; k < FAST_TAPS; ++k) {
            const int i = k - FAST_RADIUS + radius;
            w[k] = (i >= 0 && i <= 2 * radius) ? (u32)weights.w[i] : 0u;
        }
        switch (channels) {
            case 1: filter_fast<1>(t, w, mode, amount, threshold); break;
            case 2: filter_fast<2>(t, w, mode, amount, threshold); break;
            case 3: filter_fast<3>(t, w, mode, amount, threshold); break;
            default: filter_fast<4>(t, w, mode, amount, threshold); break;
        }
    } else {
        filter_generic(t, s_w, mode, amount, threshold);
    }
}
