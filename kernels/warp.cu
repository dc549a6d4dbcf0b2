// Affine face warps (talkrt.kernels.gpu warp_crop_rgb / warp_crop_nv12 / restore_rgb /
// restore_nv12): the aligned S x S face crop cut from RGB or NV12 frames, and the generated face
// warped back into the frames with a feathered mask, in place. Bit for bit the float32 / integer
// operations of kernels/warp_reference.py (explicit round-to-nearest intrinsics, no FMA).
//
// Per-frame records come in tables passed by value (__grid_constant__), built by
// kernels/warp_launch.py, whose numpy dtypes mirror the structs below; a launch uploads nothing.
// Launch: block (32, 8); crop grid (ceil(S / 32), ceil(S / 8), B), restore grids cover the
// largest frame region (RGB: pixels, NV12: 2x2 blocks); B <= WARP_TABLE_FRAMES.
#include "common.cuh"

#define WARP_TABLE_FRAMES 32  // frames per launch (warp_launch.WARP_TABLE_FRAMES)
#define FEATHER_TAPS 129      // feather profile samples (warp_launch.FEATHER_TAPS)
#define FILL_VALUE 127.0f     // outside the frame (LatentSync's kornia warp fill)

// One frame of the crop: crop pixel (u, v) -> frame pixel (x, y) = (m0 u + m1 v + m2,
// m3 u + m4 v + m5). Each crop pixel averages nu x nv bilinear taps at the centres of an
// nu x nv grid over the pixel (u + (i + 0.5) / nu - 0.5, ...): a box prefilter when the crop
// shrinks the frame. nu == 0: no face in this frame, the crop is FILL_VALUE.
struct __align__(16) CropFrame {
    float m[6];
    int nu, nv;
};
static_assert(sizeof(CropFrame) == 32, "CropFrame: mirrored by warp_launch.CROP_FRAME");
struct WarpCropTable { CropFrame frames[WARP_TABLE_FRAMES]; };

// One frame of the restore: frame pixel (x, y) -> crop pixel (u, v) = (a0 x + a1 y + a2,
// a3 x + a4 y + a5). The feather weight along u is the profile at t = su * du + off, du the
// distance in crop pixels to the nearer of the crop's edges u = -0.5 and u = S - 0.5 (likewise
// v); off and the scales fold the feather's inset and width in frame pixels (warp_launch).
// x1, y1, w, h: the frame region that can change (the crop's footprint; for NV12 grown to even
// coordinates); w == 0 leaves the frame alone. nx, ny: face taps per frame pixel along x and y
// (a box prefilter where the frame shows the crop smaller, as the crop kernel's nu, nv).
struct __align__(16) RestoreFrame {
    float a[6];
    float su, sv, off;
    int x1, y1, w, h;
    int nx, ny, pad;
};
static_assert(sizeof(RestoreFrame) == 64, "RestoreFrame: mirrored by warp_launch.RESTORE_FRAME");
struct RestoreTable { RestoreFrame frames[WARP_TABLE_FRAMES]; };

// Edge profile, samples of a truncated Gaussian CDF from 0 (p[0]) to 1 (p[FEATHER_TAPS - 1]).
struct FeatherTable { float p[FEATHER_TAPS]; };
static_assert(sizeof(FeatherTable) == 4 * FEATHER_TAPS, "FeatherTable: warp_launch.FEATHER_TABLE");

// ----------------------------------------------------------------------------- sampling

// floor(x) as an int and the fraction x - floor(x).
__device__ __forceinline__ int floor_frac(float x, float& frac) {
    const float f = floorf(x);
    frac = __fsub_rn(x, f);
    return (int)f;
}

__device__ __forceinline__ float lerp(float a, float b, float t) {
    return __fadd_rn(a, __fmul_rn(t, __fsub_rn(b, a)));
}

// Sub-pixel offset (2i + 1) / (2n) - 0.5 of supersampling tap i of n.
__device__ __forceinline__ float tap_offset(int i, float two_n) {
    return __fsub_rn(__fdiv_rn(exact_float(2 * i + 1), two_n), 0.5f);
}

// One frame pixel's RGB as floats; FILL_VALUE outside the frame. NV12: decoded with the
// pixel's 2x2 UV sample (colorspace.py, as reference.nv12_to_rgb).
template <bool NV12>
__device__ __forceinline__ void fetch(const u8* __restrict__ frame, int height, int width,
                                      int x, int y, const DecodeCoeffs& k, float (&v)[3]) {
    if (x < 0 || y < 0 || x >= width || y >= height) {
        v[0] = v[1] = v[2] = FILL_VALUE;
        return;
    }
    if (NV12) {
        const u8* uv = frame + (size_t)(height + (y >> 1)) * width + (x & ~1);
        u8 r, g, b;
        decode_pixel(k, frame[(size_t)y * width + x], uv[0], uv[1], r, g, b);
        v[0] = exact_float(r); v[1] = exact_float(g); v[2] = exact_float(b);
    } else {
        const u8* p = frame + ((size_t)y * width + x) * 3;
        v[0] = exact_float(p[0]); v[1] = exact_float(p[1]); v[2] = exact_float(p[2]);
    }
}

// Bilinear sample of an S x S image of C channels at (u, v), edges replicated.
template <int C>
__device__ __forceinline__ void sample_clamped(const u8* __restrict__ img, int size, float u,
                                               float v, float (&out)[C]) {
    float fu, fv;
    const int u0 = floor_frac(u, fu), v0 = floor_frac(v, fv);
    const int i0 = min(max(u0, 0), size - 1), i1 = min(max(u0 + 1, 0), size - 1);
    const int j0 = min(max(v0, 0), size - 1), j1 = min(max(v0 + 1, 0), size - 1);
    const u8* r0 = img + (size_t)j0 * size * C;
    const u8* r1 = img + (size_t)j1 * size * C;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const float top = lerp(exact_float(r0[i0 * C + c]), exact_float(r0[i1 * C + c]), fu);
        const float bot = lerp(exact_float(r1[i0 * C + c]), exact_float(r1[i1 * C + c]), fu);
        out[c] = lerp(top, bot, fv);
    }
}

// ---------------------------------------------------------------------------- crop

template <bool NV12>
__device__ __forceinline__ void crop_pixel(const u8* __restrict__ frame, int height, int width,
                                           const CropFrame& f, const DecodeCoeffs& k, int u,
                                           int v, u8 (&rgb)[3]) {
    if (f.nu == 0) {
        rgb[0] = rgb[1] = rgb[2] = (u8)FILL_VALUE;
        return;
    }
    const float uf = exact_float(u), vf = exact_float(v);
    const float two_nu = exact_float(2 * f.nu), two_nv = exact_float(2 * f.nv);
    float acc[3];
    for (int j = 0; j < f.nv; ++j) {
        const float vv = __fadd_rn(vf, tap_offset(j, two_nv));
        for (int i = 0; i < f.nu; ++i) {
            const float uu = __fadd_rn(uf, tap_offset(i, two_nu));
            const float x = __fadd_rn(__fadd_rn(__fmul_rn(f.m[0], uu), __fmul_rn(f.m[1], vv)), f.m[2]);
            const float y = __fadd_rn(__fadd_rn(__fmul_rn(f.m[3], uu), __fmul_rn(f.m[4], vv)), f.m[5]);
            float fx, fy;
            const int x0 = floor_frac(x, fx), y0 = floor_frac(y, fy);
            float s00[3], s01[3], s10[3], s11[3];
            fetch<NV12>(frame, height, width, x0, y0, k, s00);
            fetch<NV12>(frame, height, width, x0 + 1, y0, k, s01);
            fetch<NV12>(frame, height, width, x0, y0 + 1, k, s10);
            fetch<NV12>(frame, height, width, x0 + 1, y0 + 1, k, s11);
#pragma unroll
            for (int c = 0; c < 3; ++c) {
                const float val = lerp(lerp(s00[c], s01[c], fx), lerp(s10[c], s11[c], fx), fy);
                acc[c] = (i == 0 && j == 0) ? val : __fadd_rn(acc[c], val);
            }
        }
    }
    const float count = exact_float(f.nu * f.nv);
#pragma unroll
    for (int c = 0; c < 3; ++c) rgb[c] = round_u8(__fdiv_rn(acc[c], count));
}

// frames: RGB [B, H, W, 3] or NV12 [B, H*3/2, W]; crops [B, S, S, 3] RGB.
template <bool NV12>
__device__ __forceinline__ void warp_crop(const u8* __restrict__ frames, int height, int width,
                                          u8* __restrict__ crops, int size, const DecodeCoeffs& k,
                                          const WarpCropTable& table) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    const int v = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    if (u >= size || v >= size) return;
    const size_t frame_bytes = NV12 ? (size_t)height / 2 * 3 * width : (size_t)height * width * 3;
    u8 rgb[3];
    crop_pixel<NV12>(frames + b * frame_bytes, height, width, table.frames[b], k, u, v, rgb);
    u8* dst = crops + (((size_t)b * size + v) * size + u) * 3;
    dst[0] = rgb[0]; dst[1] = rgb[1]; dst[2] = rgb[2];
}

extern "C" __global__ void warp_crop_rgb_kernel(
    const u8* __restrict__ frames, int height, int width, u8* __restrict__ crops, int size,
    const __grid_constant__ WarpCropTable table)
{
    warp_crop<false>(frames, height, width, crops, size, DecodeCoeffs{}, table);
}

extern "C" __global__ void warp_crop_nv12_kernel(
    const u8* __restrict__ nv12, int height, int width, u8* __restrict__ crops, int size,
    DecodeCoeffs dk, const __grid_constant__ WarpCropTable table)
{
    warp_crop<true>(nv12, height, width, crops, size, dk, table);
}

// -------------------------------------------------------------------------- restore

__device__ __forceinline__ float feather(const FeatherTable& ft, float t) {
    t = fminf(fmaxf(t, 0.0f), (float)(FEATHER_TAPS - 1));
    float unused;
    const int i = min(floor_frac(t, unused), FEATHER_TAPS - 2);   // t = FEATHER_TAPS - 1: frac 1
    const float frac = __fsub_rn(t, exact_float(i));
    return lerp(ft.p[i], ft.p[i + 1], frac);
}

// The blend weight (0..255) of frame pixel (x, y) and the face sample there (valid when > 0):
// round(feather_u * feather_v * paste(u, v)) at the pixel centre, paste bilinear on the S x S
// uint8 mask; the face is the mean of nx x ny bilinear taps spread over the pixel.
__device__ __forceinline__ int restore_sample(const RestoreFrame& f, const FeatherTable& ft,
                                              const u8* __restrict__ face,
                                              const u8* __restrict__ paste, int size, int x,
                                              int y, u8 (&rgb)[3]) {
    const float xf = exact_float(x), yf = exact_float(y);
    const float u = __fadd_rn(__fadd_rn(__fmul_rn(f.a[0], xf), __fmul_rn(f.a[1], yf)), f.a[2]);
    const float v = __fadd_rn(__fadd_rn(__fmul_rn(f.a[3], xf), __fmul_rn(f.a[4], yf)), f.a[5]);
    const float far_edge = __fsub_rn(exact_float(size), 0.5f);
    const float du = fminf(__fadd_rn(u, 0.5f), __fsub_rn(far_edge, u));
    const float dv = fminf(__fadd_rn(v, 0.5f), __fsub_rn(far_edge, v));
    const float weight = __fmul_rn(feather(ft, __fadd_rn(__fmul_rn(du, f.su), f.off)),
                                   feather(ft, __fadd_rn(__fmul_rn(dv, f.sv), f.off)));
    if (!(weight > 0.0f)) return 0;
    float pm[1];
    sample_clamped<1>(paste, size, u, v, pm);
    const int m = round_u8(__fmul_rn(weight, pm[0]));
    if (m == 0) return 0;
    const float two_nx = exact_float(2 * f.nx), two_ny = exact_float(2 * f.ny);
    float acc[3];
    for (int j = 0; j < f.ny; ++j) {
        const float ys = __fadd_rn(yf, tap_offset(j, two_ny));
        for (int i = 0; i < f.nx; ++i) {
            const float xs = __fadd_rn(xf, tap_offset(i, two_nx));
            const float us = __fadd_rn(__fadd_rn(__fmul_rn(f.a[0], xs), __fmul_rn(f.a[1], ys)), f.a[2]);
            const float vs = __fadd_rn(__fadd_rn(__fmul_rn(f.a[3], xs), __fmul_rn(f.a[4], ys)), f.a[5]);
            float fv[3];
            sample_clamped<3>(face, size, us, vs, fv);
#pragma unroll
            for (int c = 0; c < 3; ++c) acc[c] = (i == 0 && j == 0) ? fv[c] : __fadd_rn(acc[c], fv[c]);
        }
    }
    const float count = exact_float(f.nx * f.ny);
#pragma unroll
    for (int c = 0; c < 3; ++c) rgb[c] = round_u8(__fdiv_rn(acc[c], count));
    return m;
}

// frames [B, H, W, 3] in place; faces [B, S, S, 3]; paste [S, S].
extern "C" __global__ void restore_rgb_kernel(
    u8* __restrict__ frames, int height, int width, const u8* __restrict__ faces, int size,
    const u8* __restrict__ paste, const __grid_constant__ FeatherTable feather_table,
    const __grid_constant__ RestoreTable table)
{
    const int dx = blockIdx.x * blockDim.x + threadIdx.x;
    const int dy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    const RestoreFrame& f = table.frames[b];
    if (dx >= f.w || dy >= f.h) return;
    const int x = f.x1 + dx, y = f.y1 + dy;
    u8 face[3];
    const int m = restore_sample(f, feather_table, faces + (size_t)b * size * size * 3, paste,
                                 size, x, y, face);
    if (m == 0) return;
    u8* px = frames + (((size_t)b * height + y) * width + x) * 3;
#pragma unroll
    for (int c = 0; c < 3; ++c) px[c] = blend_u8(px[c], face[c], m);
}

// NV12 [B, H*3/2, W] in place, one thread per 2x2 block of the region (even coordinates): the
// chroma rule of compose_nv12 (kernels/README.md): pixels with weight 0 keep their Y, a block
// without any keeps its UV, else UV is encoded from the 2x2 mean of the blended RGB.
extern "C" __global__ void restore_nv12_kernel(
    u8* __restrict__ nv12, int height, int width, const u8* __restrict__ faces, int size,
    const u8* __restrict__ paste, DecodeCoeffs dk, EncodeCoeffs ek,
    const __grid_constant__ FeatherTable feather_table, const __grid_constant__ RestoreTable table)
{
    const int bx = blockIdx.x * blockDim.x + threadIdx.x;
    const int by = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    const RestoreFrame& f = table.frames[b];
    if (2 * bx >= f.w || 2 * by >= f.h) return;
    const int x = f.x1 + 2 * bx, y = f.y1 + 2 * by;
    const u8* face = faces + (size_t)b * size * size * 3;
    int m[4];
    u8 fv[4][3];
    int any = 0;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        m[p] = restore_sample(f, feather_table, face, paste, size, x + (p & 1), y + (p >> 1), fv[p]);
        any |= m[p];
    }
    if (any == 0) return;
    u8* frame = nv12 + (size_t)b * (height / 2 * 3) * width;
    u8* uv = frame + (size_t)(height + (y >> 1)) * width + x;
    int sum[3] = {0, 0, 0};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        u8* luma = frame + (size_t)(y + (p >> 1)) * width + x + (p & 1);
        u8 rgb[3];
        decode_pixel(dk, *luma, uv[0], uv[1], rgb[0], rgb[1], rgb[2]);
        if (m[p] > 0) {
#pragma unroll
            for (int c = 0; c < 3; ++c) rgb[c] = blend_u8(rgb[c], fv[p][c], m[p]);
        }
        for (int c = 0; c < 3; ++c) sum[c] += rgb[c];
        if (m[p] > 0) *luma = encode_y(ek, rgb[0], rgb[1], rgb[2]);
    }
    u8 u_out, v_out;
    encode_uv(ek, sum[0], sum[1], sum[2], u_out, v_out);
    uv[0] = u_out; uv[1] = v_out;
}
