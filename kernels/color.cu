// NV12 <-> RGB color conversion (talkrt.kernels.gpu.nv12_to_rgb / rgb_to_nv12).
//
// One thread converts a group of 8 pixels x 2 rows (four NV12 chroma samples): the 8 Y bytes of
// both rows, the 8 UV bytes of the chroma row (same byte columns as Y) and the 24 RGB bytes of
// each RGB row (8 per plane when planar) are moved with 64-bit accesses when 8-byte aligned,
// 32-bit when 4-byte aligned, 32-bit between two 16-bit ones when 2-byte aligned, else bytes.
// W is even, so the last group of a row has 2, 4, 6 or 8 pixels.
// Launch: block (32, 8), grid (ceil(ceil(W/8)/32), ceil((H/2)/8), B).
//
// The float32 expressions of colorspace.py are evaluated operation for operation (__fmul_rn,
// __fadd_rn, same order), but the decoder's chroma products are computed once per chroma sample
// (shared by its 2 x 2 pixels), and int -> float and the final rounding use exact_float /
// round_u8 (common.cuh) instead of the slow conversion instructions.
#include "common.cuh"

#define GROUP 8   // pixels per thread and row

// Byte i of a little-endian word array.
template <int N>
__device__ __forceinline__ int byte_at(const u32 (&w)[N], int i) {
    return (int)((w[i >> 2] >> (8 * (i & 3))) & 0xFFu);
}

__device__ __forceinline__ u32 pack4(u32 a, u32 b, u32 c, u32 d) {
    return (a & 0xFFu) | ((b & 0xFFu) << 8) | ((c & 0xFFu) << 16) | (d << 24);
}

__device__ __forceinline__ bool aligned2(const void* p) {
    return (((unsigned long long)p) & 1ull) == 0ull;
}

typedef unsigned short u16;

// Load n <= N bytes (N a multiple of 8) into little-endian words, zero past n: 64-bit loads when
// p is 8-byte aligned and n == N, 32-bit when 4-byte aligned, 16 + 32 x (N/4 - 1) + 16 bits when
// 2-byte aligned (rows of an even width W with W % 4 == 2), else bytes.
template <int N>
__device__ __forceinline__ void load_words(const u8* __restrict__ p, u32 (&w)[N / 4], int n) {
    if (n == N && aligned8(p)) {
#pragma unroll
        for (int i = 0; i < N / 8; ++i) {
            const uint2 v = reinterpret_cast<const uint2*>(p)[i];
            w[2 * i] = v.x;
            w[2 * i + 1] = v.y;
        }
    } else if (n == N && aligned4(p)) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) w[i] = reinterpret_cast<const u32*>(p)[i];
    } else if (n == N && aligned2(p)) {   // p + 2 is 4-byte aligned
        u32 mid[N / 4 - 1];
#pragma unroll
        for (int i = 0; i < N / 4 - 1; ++i) mid[i] = reinterpret_cast<const u32*>(p + 2)[i];
        w[0] = *reinterpret_cast<const u16*>(p) | (mid[0] << 16);
#pragma unroll
        for (int i = 1; i < N / 4 - 1; ++i) w[i] = (mid[i - 1] >> 16) | (mid[i] << 16);
        const u32 tail = *reinterpret_cast<const u16*>(p + N - 2);
        w[N / 4 - 1] = (mid[N / 4 - 2] >> 16) | (tail << 16);
    } else {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) w[i] = 0;
#pragma unroll
        for (int i = 0; i < N; ++i)
            if (i < n) w[i >> 2] |= (u32)p[i] << (8 * (i & 3));
    }
}

// Store the first n <= N bytes of little-endian words (N a multiple of 8), same access widths.
template <int N>
__device__ __forceinline__ void store_words(u8* __restrict__ p, const u32 (&w)[N / 4], int n) {
    if (n == N && aligned8(p)) {
#pragma unroll
        for (int i = 0; i < N / 8; ++i) reinterpret_cast<uint2*>(p)[i] = {w[2 * i], w[2 * i + 1]};
    } else if (n == N && aligned4(p)) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) reinterpret_cast<u32*>(p)[i] = w[i];
    } else if (n == N && aligned2(p)) {   // p + 2 is 4-byte aligned
        *reinterpret_cast<u16*>(p) = (u16)w[0];
#pragma unroll
        for (int i = 0; i < N / 4 - 1; ++i)
            reinterpret_cast<u32*>(p + 2)[i] = (w[i] >> 16) | (w[i + 1] << 16);
        *reinterpret_cast<u16*>(p + N - 2) = (u16)(w[N / 4 - 1] >> 16);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i)
            if (i < n) p[i] = (u8)(w[i >> 2] >> (8 * (i & 3)));
    }
}

// The GROUP bytes of one plane row.
__device__ __forceinline__ void store_plane(u8* __restrict__ p, const u32 (&v)[GROUP], int n) {
    const u32 words[GROUP / 4] = {pack4(v[0], v[1], v[2], v[3]), pack4(v[4], v[5], v[6], v[7])};
    store_words<GROUP>(p, words, n);
}

extern "C" __global__ void nv12_to_rgb_kernel(
    const u8* __restrict__ nv12,   // [B, H*3/2, W]
    u8* __restrict__ out,          // [B, H, W, 3] (planar == 0) or [B, 3, H, W] (planar == 1)
    int height, int width, int planar, int bgr, DecodeCoeffs k)
{
    const float y_offset = k.y_offset, y_scale = k.y_scale;
    const float r_v = k.r_v, g_u = k.g_u, g_v = k.g_v, b_u = k.b_u;
    const int gx = blockIdx.x * blockDim.x + threadIdx.x;   // group of 8 pixels
    const int gy = blockIdx.y * blockDim.y + threadIdx.y;   // chroma row (luma rows 2gy, 2gy+1)
    const int b = blockIdx.z;
    if (gx >= (width + GROUP - 1) / GROUP || gy >= height / 2) return;
    const int x0 = gx * GROUP;
    const int npix = min(GROUP, width - x0);                // 8, or 2, 4, 6 (width is even)

    const u8* frame = nv12 + (size_t)b * ((size_t)height * width * 3 / 2);
    u32 luma[2][GROUP / 4], uv[GROUP / 4];
    load_words<GROUP>(frame + (size_t)(2 * gy) * width + x0, luma[0], npix);
    load_words<GROUP>(frame + (size_t)(2 * gy + 1) * width + x0, luma[1], npix);
    load_words<GROUP>(frame + (size_t)(height + gy) * width + x0, uv, npix);

    // colorspace.py's chroma terms, once per chroma sample: uc = U - 128, vc = V - 128 (exact)
    float r_vc[GROUP / 2], g_uc[GROUP / 2], g_vc[GROUP / 2], b_uc[GROUP / 2];
#pragma unroll
    for (int s = 0; s < GROUP / 2; ++s) {
        const float uc = exact_float(byte_at(uv, 2 * s) - 128);
        const float vc = exact_float(byte_at(uv, 2 * s + 1) - 128);
        r_vc[s] = __fmul_rn(r_v, vc);
        g_uc[s] = __fmul_rn(g_u, uc);
        g_vc[s] = __fmul_rn(g_v, vc);
        b_uc[s] = __fmul_rn(b_u, uc);
    }

#pragma unroll
    for (int row = 0; row < 2; ++row) {
        const int y = 2 * gy + row;
        u32 c0[GROUP], c1[GROUP], c2[GROUP];   // output channel order
#pragma unroll
        for (int p = 0; p < GROUP; ++p) {
            const int s = p / 2;
            const float yf = exact_float(byte_at(luma[row], p));
            const float yv = __fmul_rn(y_scale, __fsub_rn(yf, y_offset));
            const u8 r = round_u8(__fadd_rn(yv, r_vc[s]));
            const u8 g = round_u8(__fadd_rn(__fadd_rn(yv, g_uc[s]), g_vc[s]));
            const u8 bl = round_u8(__fadd_rn(yv, b_uc[s]));
            c0[p] = bgr ? bl : r;
            c1[p] = g;
            c2[p] = bgr ? r : bl;
        }
        if (!planar) {
            u32 rgb[3 * GROUP / 4];   // pixel p's channels are bytes 3p, 3p + 1, 3p + 2
#pragma unroll
            for (int h = 0; h < GROUP / 4; ++h) {
                const int p = 4 * h;
                rgb[3 * h + 0] = pack4(c0[p], c1[p], c2[p], c0[p + 1]);
                rgb[3 * h + 1] = pack4(c1[p + 1], c2[p + 1], c0[p + 2], c1[p + 2]);
                rgb[3 * h + 2] = pack4(c2[p + 2], c0[p + 3], c1[p + 3], c2[p + 3]);
            }
            u8* dst = out + (((size_t)b * height + y) * width + x0) * 3;
            store_words<3 * GROUP>(dst, rgb, npix * 3);
        } else {
            u8* dst = out + ((size_t)b * 3 * height + y) * width + x0;
            const size_t plane = (size_t)height * width;
            store_plane(dst, c0, npix);
            store_plane(dst + plane, c1, npix);
            store_plane(dst + 2 * plane, c2, npix);
        }
    }
}

extern "C" __global__ void rgb_to_nv12_kernel(
    const u8* __restrict__ rgb,    // [B, H, W, 3]
    u8* __restrict__ nv12,         // [B, H*3/2, W]
    int height, int width, int bgr, EncodeCoeffs k)
{
    const float y_r = k.y_r, y_g = k.y_g, y_b = k.y_b, y_offset = k.y_offset;
    const float u_r = k.u_r, u_g = k.u_g, u_b = k.u_b, v_r = k.v_r, v_g = k.v_g, v_b = k.v_b;
    const int gx = blockIdx.x * blockDim.x + threadIdx.x;
    const int gy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    if (gx >= (width + GROUP - 1) / GROUP || gy >= height / 2) return;
    const int x0 = gx * GROUP;
    const int npix = min(GROUP, width - x0);

    u32 px[2][3 * GROUP / 4];   // both rows' RGB bytes
    const u8* src = rgb + (((size_t)b * height + 2 * gy) * width + x0) * 3;
    load_words<3 * GROUP>(src, px[0], npix * 3);
    load_words<3 * GROUP>(src + (size_t)width * 3, px[1], npix * 3);

    u8* frame = nv12 + (size_t)b * ((size_t)height * width * 3 / 2);
    u32 uv[GROUP];   // U, V of the 4 chroma samples
#pragma unroll
    for (int s = 0; s < GROUP / 2; ++s) {
        int r_sum = 0, g_sum = 0, b_sum = 0;
#pragma unroll
        for (int row = 0; row < 2; ++row)
#pragma unroll
            for (int p = 2 * s; p < 2 * s + 2; ++p) {
                const int c0 = byte_at(px[row], 3 * p), c2 = byte_at(px[row], 3 * p + 2);
                r_sum += bgr ? c2 : c0;
                g_sum += byte_at(px[row], 3 * p + 1);
                b_sum += bgr ? c0 : c2;
            }
        // encode_uv of common.cuh: the 2x2 mean (sum * 0.25, exact), then the U and V rows
        const float r = __fmul_rn(exact_float(r_sum), 0.25f);
        const float g = __fmul_rn(exact_float(g_sum), 0.25f);
        const float bl = __fmul_rn(exact_float(b_sum), 0.25f);
        uv[2 * s] = round_u8(__fadd_rn(dot3(u_r, u_g, u_b, r, g, bl), 128.0f));
        uv[2 * s + 1] = round_u8(__fadd_rn(dot3(v_r, v_g, v_b, r, g, bl), 128.0f));
    }
#pragma unroll
    for (int row = 0; row < 2; ++row) {
        u32 luma[GROUP];
#pragma unroll
        for (int p = 0; p < GROUP; ++p) {   // encode_y of common.cuh
            const int c0 = byte_at(px[row], 3 * p), c2 = byte_at(px[row], 3 * p + 2);
            const float r = exact_float(bgr ? c2 : c0);
            const float g = exact_float(byte_at(px[row], 3 * p + 1));
            const float bl = exact_float(bgr ? c0 : c2);
            luma[p] = round_u8(__fadd_rn(dot3(y_r, y_g, y_b, r, g, bl), y_offset));
        }
        const u32 words[GROUP / 4] = {pack4(luma[0], luma[1], luma[2], luma[3]),
                                      pack4(luma[4], luma[5], luma[6], luma[7])};
        store_words<GROUP>(frame + (size_t)(2 * gy + row) * width + x0, words, npix);
    }
    const u32 words[GROUP / 4] = {pack4(uv[0], uv[1], uv[2], uv[3]),
                                  pack4(uv[4], uv[5], uv[6], uv[7])};
    store_words<GROUP>(frame + (size_t)(height + gy) * width + x0, words, npix);
}
