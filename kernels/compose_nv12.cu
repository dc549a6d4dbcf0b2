// Fused NV12 compose (talkrt.kernels.gpu.compose_nv12): resize faces[b] bilinearly to its box,
// blend it into NV12 frame b with the mask and re-encode, in place; bit for bit
// reference.compose_nv12(resize_impl="kernel").
//
// The work is cut into 2x2 pixel blocks of the box grown to even coordinates (a block shares one
// UV sample); a thread does NV12_BLOCKS blocks stacked vertically, so that consecutive output
// rows share their face rows (below). Each frame is described by an NV12Frame record (below) in
// a table that the kernel takes by value, with the color coefficients: a launch uploads nothing
// and a thread's first load is its mask.
//
// Launch (launch.nv12_compose_grid): block (32, 4), grid (ceil(max block columns / 32),
// ceil(ceil(max block rows / NV12_BLOCKS) / 4), B <= NV12_TABLE_FRAMES). Needs face_w >= 2 (the
// wrapper widens 1-pixel-wide faces, which changes no output: every tap reads the same value)
// and a 2-byte aligned nv12 buffer (W even: Y and UV pairs are 16-bit accesses).
//
// The reference, per block: decode the 4 pixels (one UV sample), blend the face into those with
// mask > 0, write their Y and the block's UV from the 2x2 mean of the 4 resulting RGB values
// (decoded body RGB for mask-0 pixels); a block with no mask > 0 pixel is left alone, and so is
// Y of a mask-0 pixel. The kernel does the same float32 / integer operations in the same order;
// the work it skips or shares provably gives the same values:
// * mask 255: blend(body, face, 255) = round_half_up(face * 255 / 255) = face, so such a pixel
//   needs neither its luma byte nor a decode; a block of four reads no luma and no UV at all.
// * the face sample is lerp_y(lerp_x(face row i0), lerp_x(face row i1)): both block columns use
//   the same rows, and consecutive output rows mostly use the same two face rows (scale < 1) or
//   one of them, so each distinct face row is interpolated once (same operations, same floats).
// * decode: the chroma products (r_v * vc, ...) are computed once per block, as in color.cu.
// * rounded channel values are held as the float 2^23 + k (round_u8's last step, common.cuh):
//   subtracting 2^23 gives the float k, the low byte of the bits is k; int -> float goes
//   through exact_float: no conversion instruction (slow on the GPU).
// * clamps that provably change nothing are left out (round_held_in_range, round_held_max255).
#include "common.cuh"

#define NV12_TABLE_FRAMES 64  // frames per launch (launch.NV12_TABLE_FRAMES)
#define NV12_BLOCKS 2         // 2x2 blocks per thread, stacked (launch.NV12_COMPOSE_BLOCKS)
#define TWO_23 8388608.0f     // 2^23; its float bits are 0x4B000000
#define TWO_23_BITS 0x4B000000u

// --------------------------------------------------------------------------- held values

// round_held(x) (common.cuh) is round_u8(x) held as the float 2^23 + k: the low byte of its
// bits is k.

// round_u8(x) for 0 <= fl(x + 0.5) < 256, where the clamps change nothing (bilinear face
// samples: a lerp between two values of [0, 255] with a weight in [0, 1] stays in [0, 255] up
// to an ulp, since float rounding is monotonic; Y: see below).
__device__ __forceinline__ float round_held_in_range(float x) {
    return __fadd_rd(__fadd_rn(x, 0.5f), TWO_23);
}

// round_u8(x) for fl(x + 0.5) >= 0, where the lower clamp changes nothing.
__device__ __forceinline__ float round_held_max255(float x) {
    return __fadd_rd(fminf(__fadd_rn(x, 0.5f), 255.0f), TWO_23);
}

// The float k of a held value, exactly.
__device__ __forceinline__ float unheld(float v) { return __fsub_rn(v, TWO_23); }

__device__ __forceinline__ u32 held_bits(float v) { return (u32)__float_as_int(v); }

// blend_u8(body, face, m) (common.cuh) of two held values, held. The blend is
// round_half_up(x / 255) of x = body * (255 - m) + face * m in [0, 65025], which equals
// (t + (t >> 8)) >> 8 with t = x + 128 (PIL's DIV255; test_div255_rounding_equals_pil checks
// every x). The held bits are 0x4B000000 + k, and 0x4B000000 * 255 = 0xB5000000 (mod 2^32),
// so t comes out of the bits directly in wrapping unsigned arithmetic.
__device__ __forceinline__ float blend_held(float body, float face, int m) {
    const u32 t = held_bits(body) * (255u - (u32)m) + held_bits(face) * (u32)m
                  + (128u - 0xB5000000u);
    return __int_as_float((int)(TWO_23_BITS | ((t + (t >> 8)) >> 8)));
}

// ---------------------------------------------------------------------------- face taps

// OpenCV's half-pixel position of destination index d, clamped at 0 (reference.linear_axis_model),
// and floor(pos): pos < 2^22, so pos + 2^23 rounded down is the float 2^23 + floor(pos).
struct AxisPos { float pos, floor_f; int floor_i; };

__device__ __forceinline__ AxisPos axis_pos(int d, float scale) {
    AxisPos a;
    a.pos = fmaxf(__fsub_rn(__fmul_rn(__fadd_rn(exact_float(d), 0.5f), scale), 0.5f), 0.0f);
    const float r = __fadd_rd(a.pos, TWO_23);
    a.floor_f = unheld(r);
    a.floor_i = (int)(held_bits(r) - TWO_23_BITS);
    return a;
}

// x tap: face columns i0 and i0 + 1 (i0 <= len - 2) and frac in [0, 1]. The reference takes
// i0 = min(floor, len - 1), i1 = min(i0 + 1, len - 1), frac = pos - i0. While floor <= len - 2
// both agree. Past it the reference returns s[len-1] + frac * 0 = s[len-1]; this tap gives
// s[len-2] + 1 * (s[len-1] - s[len-2]), the same float (integers, exact). So the two pixels of
// a tap are always adjacent: 6 bytes at one address.
struct XTap { int i0; float frac; };

__device__ __forceinline__ XTap x_tap(int d, float scale, int len, float len_minus2_f) {
    const AxisPos a = axis_pos(d, scale);
    XTap t;
    t.i0 = min(a.floor_i, len - 2);
    t.frac = fminf(__fsub_rn(a.pos, fminf(a.floor_f, len_minus2_f)), 1.0f);
    return t;
}

// y tap: the reference's i0, i1, frac exactly (rows need no adjacency).
struct YTap { int i0, i1; float frac; };

__device__ __forceinline__ YTap y_tap(int d, float scale, int len, float len_minus1_f) {
    const AxisPos a = axis_pos(d, scale);
    YTap t;
    t.i0 = min(a.floor_i, len - 1);
    t.i1 = min(t.i0 + 1, len - 1);
    t.frac = __fsub_rn(a.pos, fminf(a.floor_f, len_minus1_f));
    return t;
}

// ------------------------------------------------------------------------- face sampling

// lerp_x of one face row at both block columns: h[3k + c] = s0 + frac_k * (s1 - s0), s0 and s1
// channel c of the face pixels i0_k and i0_k + 1 (p0 points at pixel i0_0 of the row, p0 + col1
// at pixel i0_1). The difference is taken between the floats 1.5 * 2^23 + s (exact_float's
// first step): both are exact and so is their difference, s1 - s0, so s1 is never converted.
__device__ __forceinline__ void lerp_row(const u8* __restrict__ p0, int col1, float fx0,
                                         float fx1, float (&h)[6]) {
    const u8* p[2] = {p0, p0 + col1};
    const float fx[2] = {fx0, fx1};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            const float b0 = __int_as_float(0x4B400000 + p[k][c]);
            const float b1 = __int_as_float(0x4B400000 + p[k][3 + c]);
            h[3 * k + c] = __fadd_rn(__fsub_rn(b0, 12582912.0f),
                                     __fmul_rn(fx[k], __fsub_rn(b1, b0)));
        }
    }
}

// The held face values of one output row: round(top + fy * (bottom - top)).
__device__ __forceinline__ void lerp_y(const float (&top)[6], const float (&bottom)[6], float fy,
                                       float (&out)[2][3]) {
#pragma unroll
    for (int i = 0; i < 6; ++i)
        out[i / 3][i % 3] = round_held_in_range(
            __fadd_rn(top[i], __fmul_rn(fy, __fsub_rn(bottom[i], top[i]))));
}

// ------------------------------------------------------------------------------ one block

// Encoding clamps: for R, G, B in [0, 255] the encoders' float results stay where the clamps
// of round_u8 change nothing, except U / V = 255.5 (+0.5 = 256) at full range: each is a sum of
// products with fixed-sign coefficients, monotonic in every input, so its extremes are at the
// corners of the RGB cube, which tests/test_kernels_reference.py checks for every color spec
// (0 <= fl(Y + 0.5) < 256 and fl(U + 0.5), fl(V + 0.5) >= 0).

// encode_y (common.cuh) of exact float channels in [0, 255], held.
__device__ __forceinline__ u32 encode_y_bits(const EncodeCoeffs& k, const float (&rgb)[3]) {
    return held_bits(round_held_in_range(
        __fadd_rn(dot3(k.y_r, k.y_g, k.y_b, rgb[0], rgb[1], rgb[2]), k.y_offset)));
}

__device__ __forceinline__ void store_pair(u8* p, u32 lo, u32 hi) {
    *reinterpret_cast<unsigned short*>(p) = (unsigned short)((lo & 0xFFu) | ((hi & 0xFFu) << 8));
}

// decode_pixel's (common.cuh) chroma products of a block's UV sample, shared by its 4 pixels.
struct Chroma { float r_vc, g_uc, g_vc, b_uc; };

__device__ __forceinline__ Chroma block_chroma(const DecodeCoeffs& k, u32 uv) {
    const float uc = exact_float((int)(uv & 0xFFu) - 128), vc = exact_float((int)(uv >> 8) - 128);
    return {__fmul_rn(k.r_v, vc), __fmul_rn(k.g_u, uc), __fmul_rn(k.g_v, vc), __fmul_rn(k.b_u, uc)};
}

// One row of a block: the two pixels' RGB after the blend (added to sum, exact integers in
// float: in any order the same floats as encode_uv's (float)(r0 + r1 + r2 + r3)) and their Y.
// fv: held face values [col][channel]; mask: the two pixels' masks in bytes 0 and 1; full: all
// four pixels of the block have mask 255 (then ch and old, the row's luma pair, are unused).
template <bool FIRST_ROW>
__device__ __forceinline__ void compose_row(const float (&fv)[2][3], u32 mask, bool full, u32 old,
                                            u8* luma, const Chroma& ch, const DecodeCoeffs& dk,
                                            const EncodeCoeffs& ek, float (&sum)[3]) {
    u32 y[2];
#pragma unroll
    for (int col = 0; col < 2; ++col) {
        const int m = (int)((mask >> (8 * col)) & 0xFFu);
        const u32 old_y = (old >> (8 * col)) & 0xFFu;
        float v[3];   // held
        if (full || m == 255) {
            // blend(body, face, 255) == face: neither the luma byte nor the decode is needed
#pragma unroll
            for (int c = 0; c < 3; ++c) v[c] = fv[col][c];
        } else {
            const float yv = __fmul_rn(dk.y_scale, __fsub_rn(exact_float((int)old_y), dk.y_offset));
            v[0] = round_held(__fadd_rn(yv, ch.r_vc));
            v[1] = round_held(__fadd_rn(__fadd_rn(yv, ch.g_uc), ch.g_vc));
            v[2] = round_held(__fadd_rn(yv, ch.b_uc));
            if (m > 0) {
#pragma unroll
                for (int c = 0; c < 3; ++c) v[c] = blend_held(v[c], fv[col][c], m);
            }
        }
        float rgb[3];
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            rgb[c] = unheld(v[c]);
            sum[c] = (FIRST_ROW && col == 0) ? rgb[c] : __fadd_rn(sum[c], rgb[c]);
        }
        y[col] = (full || m > 0) ? encode_y_bits(ek, rgb) : old_y;   // mask 0 keeps its Y
    }
    if (full || (mask & 0xFFFFu)) store_pair(luma, y[0], y[1]);
}

// The block's UV from the sums of its 4 RGB values (mean = sum * 0.25, exact): encode_uv.
__device__ __forceinline__ void store_uv(u8* uvp, const EncodeCoeffs& k, const float (&sum)[3]) {
    const float r = __fmul_rn(sum[0], 0.25f), g = __fmul_rn(sum[1], 0.25f);
    const float b = __fmul_rn(sum[2], 0.25f);
    const float u = __fadd_rn(dot3(k.u_r, k.u_g, k.u_b, r, g, b), 128.0f);
    const float v = __fadd_rn(dot3(k.v_r, k.v_g, k.v_b, r, g, b), 128.0f);
    store_pair(uvp, held_bits(round_held_max255(u)), held_bits(round_held_max255(v)));
}

// --------------------------------------------------------------------------------- kernel

// One frame of the launch, for a box x1, y1, x2, y2 (end exclusive) grown to even coordinates
// ex1 = x1 & ~1, ey1 = y1 & ~1, ex2 = (x2 + 1) & ~1, ey2. Built by launch.nv12_compose_params,
// whose numpy dtype launch.NV12_FRAME mirrors this layout (48 bytes, 16-byte aligned records).
// When the mask's non-zero rows are known, the grid leaves out the block rows above and below
// them: rows counts from the first kept block row, ey1 moves down by 2 per skipped block row
// and y_odd becomes (y1 & 1) - 2 * skipped (it only maps block rows to box rows).
struct __align__(16) NV12Frame {
    int cols, rows;            // 2x2 block columns (ex2 - ex1) / 2 and rows (ey2 - ey1) / 2
    int ex1, ey1;              // frame position of block (0, 0)
    int x_odd, y_odd;          // x1 & 1, y1 & 1 (see above)
    int w, h;                  // box size x2 - x1, y2 - y1
    long long mask_off;        // the frame's mask in the packed masks ([h, w] uint8)
    float scale_x, scale_y;    // face_w / w, face_h / h (IEEE division on the host: __fdiv_rn)
};
static_assert(sizeof(NV12Frame) == 48, "NV12Frame: mirrored by launch.NV12_FRAME");

// Passed by value and declared __grid_constant__: read in place from the parameter bank,
// indexed by the frame (launch.NV12_TABLE; frames past the grid are never read).
struct NV12ComposeTable { NV12Frame frames[NV12_TABLE_FRAMES]; };

extern "C" __global__ void compose_nv12_kernel(
    u8* __restrict__ nv12, int height, int width,    // [B, H*3/2, W], in place
    const u8* __restrict__ faces, int face_h, int face_w,   // [B, face_h, face_w, 3]
    const u8* __restrict__ masks, DecodeCoeffs dk, EncodeCoeffs ek,
    const __grid_constant__ NV12ComposeTable table)
{
    const int bx = blockIdx.x * blockDim.x + threadIdx.x;                  // block column
    const int by = (blockIdx.y * blockDim.y + threadIdx.y) * NV12_BLOCKS;  // first block row
    const int b = blockIdx.z;
    const NV12Frame f = table.frames[b];   // the whole record: three 16-byte parameter loads
    if (bx >= f.cols || by >= f.rows) return;

    // Masks of the thread's blocks, pixel p = 2 * row + col in byte p; 0 outside the box (odd
    // x1, y1, x2 or y2 put the grown box's edge pixels outside it; rows past the box too).
    const int w = f.w, h = f.h;
    const int dx = 2 * bx - f.x_odd, dy = 2 * by - f.y_odd;   // box coordinates (>= -1)
    const bool in_l = dx >= 0, in_r = dx + 1 < w;
    const u8* mrow = masks + f.mask_off + (dy * w + dx);
    u32 mk[NV12_BLOCKS];
    u32 any = 0;
#pragma unroll
    for (int k = 0; k < NV12_BLOCKS; ++k) {
        u32 pair[2];
#pragma unroll
        for (int r = 0; r < 2; ++r, mrow += w) {
            const bool in_y = (unsigned)(dy + 2 * k + r) < (unsigned)h;
            const u32 lo = (in_y && in_l) ? mrow[0] : 0u, hi = (in_y && in_r) ? mrow[1] : 0u;
            pair[r] = __byte_perm(lo, hi, 0x0040);
        }
        mk[k] = __byte_perm(pair[0], pair[1], 0x5410);
        any |= mk[k];
    }
    if (any == 0) return;                               // the reference leaves these blocks alone

    // Face taps of the two columns (pixels outside the box get clamped taps, never used).
    const float scale_x = f.scale_x, scale_y = f.scale_y;
    const float face_w2f = exact_float(face_w - 2), face_h1f = exact_float(face_h - 1);
    const XTap tx0 = x_tap(dx, scale_x, face_w, face_w2f);
    const XTap tx1 = x_tap(dx + 1, scale_x, face_w, face_w2f);
    const u32 pitch = 3u * (u32)face_w;
    const u8* face = faces + (unsigned long long)(u32)b * ((u32)face_h * pitch);
    const u8* col0 = face + 3 * tx0.i0;
    const int col1 = 3 * (tx1.i0 - tx0.i0);             // second column, from the first
    u8* frame = nv12 + (unsigned long long)(u32)b * (u32)(height * width / 2 * 3);
    const int px0 = f.ex1 + 2 * bx, py0 = f.ey1 + 2 * by;   // frame coordinates
    u8* luma = frame + (py0 * width + px0);             // 32-bit offsets within a frame
    u8* uvp = frame + ((height + (py0 >> 1)) * width + px0);

    // lerp_x of the last two face rows interpolated (rows row_a, row_b; -1: none yet), carried
    // from block to block: the value is the same float whichever output row asks for it.
    int row_a = -1, row_b = -1;
    float ha[6], hb[6];
    int d = dy;                                         // box row of the block's first row
#pragma unroll 1
    for (int k = 0; k < NV12_BLOCKS; ++k, d += 2, luma += 2 * width, uvp += width) {
        const u32 m = mk[0];
#pragma unroll
        for (int i = 0; i + 1 < NV12_BLOCKS; ++i) mk[i] = mk[i + 1];   // (no indexing by k)
        if (m == 0) continue;
        const bool full = m == 0xFFFFFFFFu;   // every pixel takes the face: no luma, no UV read
        u32 uv = 0, old0 = 0, old1 = 0;       // (loaded before any store of the block)
        if (!full) {
            uv = *reinterpret_cast<const unsigned short*>(uvp);
            old0 = *reinterpret_cast<const unsigned short*>(luma);
            old1 = *reinterpret_cast<const unsigned short*>(luma + width);
        }
        const Chroma ch = full ? Chroma{} : block_chroma(dk, uv);
        float sum[3];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            // y taps and the face rows are the same for the whole warp (one output row)
            const YTap t = y_tap(d + r, scale_y, face_h, face_h1f);
            if (t.i0 != row_a) {
                if (t.i0 == row_b) {
#pragma unroll
                    for (int i = 0; i < 6; ++i) ha[i] = hb[i];
                } else {
                    lerp_row(col0 + t.i0 * pitch, col1, tx0.frac, tx1.frac, ha);
                }
                row_a = t.i0;
            }
            if (t.i1 != row_b) {
                lerp_row(col0 + t.i1 * pitch, col1, tx0.frac, tx1.frac, hb);
                row_b = t.i1;
            }
            float fv[2][3];
            lerp_y(ha, hb, t.frac, fv);
            if (r == 0) compose_row<true>(fv, m, full, old0, luma, ch, dk, ek, sum);
            else compose_row<false>(fv, m >> 16, full, old1, luma + width, ch, dk, ek, sum);
        }
        store_uv(uvp, ek, sum);
    }
}
