// NV12 <-> RGB colour conversion (talkrt.kernels.gpu.nv12_to_rgb / rgb_to_nv12).
//
// One thread converts a group of 4 pixels x 2 rows (two NV12 chroma samples): the Y bytes of
// both rows, the UV bytes of the chroma row (same byte columns as Y) and the 12 RGB bytes of
// each output row are moved with 32-bit accesses when aligned. When W % 4 == 2 the last group of
// a row has 2 pixels. Launch: block (32, 8), grid (ceil(ceil(W/4)/32), ceil((H/2)/8), B).
#include "common.cuh"

extern "C" __global__ void nv12_to_rgb_kernel(
    const u8* __restrict__ nv12,   // [B, H*3/2, W]
    u8* __restrict__ out,          // [B, H, W, 3] (planar == 0) or [B, 3, H, W] (planar == 1)
    int height, int width, int planar, int bgr,
    float y_offset, float y_scale, float r_v, float g_u, float g_v, float b_u)
{
    const int gx = blockIdx.x * blockDim.x + threadIdx.x;   // group of 4 pixels
    const int gy = blockIdx.y * blockDim.y + threadIdx.y;   // chroma row (luma rows 2gy, 2gy+1)
    const int b = blockIdx.z;
    if (gx >= (width + 3) / 4 || gy >= height / 2) return;
    const int x0 = gx * 4;
    const int npix = min(4, width - x0);                    // 4, or 2 (width is even)
    const DecodeCoeffs k = {y_offset, y_scale, r_v, g_u, g_v, b_u};

    const u8* frame = nv12 + (size_t)b * ((size_t)height * width * 3 / 2);
    u8 luma[2][4], uv[4];
    load_bytes<4>(frame + (size_t)(2 * gy) * width + x0, luma[0], npix);
    load_bytes<4>(frame + (size_t)(2 * gy + 1) * width + x0, luma[1], npix);
    load_bytes<4>(frame + (size_t)(height + gy) * width + x0, uv, npix);

#pragma unroll
    for (int row = 0; row < 2; ++row) {
        const int y = 2 * gy + row;
        u8 rgb[12];      // interleaved, output channel order
        u8 plane[3][4];  // planar, output channel order
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            u8 r = 0, g = 0, bl = 0;
            if (p < npix) decode_pixel(k, luma[row][p], uv[p & ~1], uv[(p & ~1) + 1], r, g, bl);
            const u8 c0 = bgr ? bl : r, c2 = bgr ? r : bl;
            rgb[3 * p + 0] = c0; rgb[3 * p + 1] = g; rgb[3 * p + 2] = c2;
            plane[0][p] = c0; plane[1][p] = g; plane[2][p] = c2;
        }
        if (!planar) {
            u8* dst = out + (((size_t)b * height + y) * width + x0) * 3;
            store_bytes<12>(dst, rgb, npix * 3);
        } else {
#pragma unroll
            for (int c = 0; c < 3; ++c) {
                u8* dst = out + (((size_t)b * 3 + c) * height + y) * width + x0;
                store_bytes<4>(dst, plane[c], npix);
            }
        }
    }
}

extern "C" __global__ void rgb_to_nv12_kernel(
    const u8* __restrict__ rgb,    // [B, H, W, 3]
    u8* __restrict__ nv12,         // [B, H*3/2, W]
    int height, int width, int bgr,
    float y_r, float y_g, float y_b, float u_r, float u_g, float u_b,
    float v_r, float v_g, float v_b, float y_offset)
{
    const int gx = blockIdx.x * blockDim.x + threadIdx.x;
    const int gy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    if (gx >= (width + 3) / 4 || gy >= height / 2) return;
    const int x0 = gx * 4;
    const int npix = min(4, width - x0);
    const EncodeCoeffs k = {y_r, y_g, y_b, u_r, u_g, u_b, v_r, v_g, v_b, y_offset};

    u8 px[2][12];
    load_bytes<12>(rgb + (((size_t)b * height + 2 * gy) * width + x0) * 3, px[0], npix * 3);
    load_bytes<12>(rgb + (((size_t)b * height + 2 * gy + 1) * width + x0) * 3, px[1], npix * 3);

    u8* frame = nv12 + (size_t)b * ((size_t)height * width * 3 / 2);
    u8 uv[4];
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
        int r_sum = 0, g_sum = 0, b_sum = 0;
#pragma unroll
        for (int row = 0; row < 2; ++row)
#pragma unroll
            for (int p = 2 * pair; p < 2 * pair + 2; ++p) {
                const int c0 = px[row][3 * p], c2 = px[row][3 * p + 2];
                r_sum += bgr ? c2 : c0;
                g_sum += px[row][3 * p + 1];
                b_sum += bgr ? c0 : c2;
            }
        encode_uv(k, r_sum, g_sum, b_sum, uv[2 * pair], uv[2 * pair + 1]);
    }
#pragma unroll
    for (int row = 0; row < 2; ++row) {
        u8 luma[4];
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const int c0 = px[row][3 * p], c2 = px[row][3 * p + 2];
            luma[p] = encode_y(k, bgr ? c2 : c0, px[row][3 * p + 1], bgr ? c0 : c2);
        }
        store_bytes<4>(frame + (size_t)(2 * gy + row) * width + x0, luma, npix);
    }
    store_bytes<4>(frame + (size_t)(height + gy) * width + x0, uv, npix);
}
