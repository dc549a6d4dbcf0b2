// Face resize, mask blend and the fused compose (talkrt.kernels.gpu.resize_to_boxes / blend /
// compose_rgb / compose_nv12). Per-frame parameters come in one int64 table `params` [B, 8]:
//   x1, y1, x2, y2 (face box, end exclusive), mask_offset, region_offset, 0, 0
// where mask_offset / region_offset index the packed mask / packed box-sized face buffers
// (talkrt.kernels.packing). The 256x256 generated face is resized with OpenCV's INTER_LINEAR
// half-pixel mapping in float32 (common.cuh: linear_tap / sample_rgb). A pixel whose mask is 0
// is never written: the blend formula would return the body pixel unchanged anyway.
// Launch: block (32, 8), grid (ceil(max box w / 32), ceil(max box h / 8), B); NV12 compose
// counts 2x2 blocks instead of pixels.
#include "common.cuh"

#define PARAM_STRIDE 8

struct FrameBox { int x1, y1, x2, y2; long long mask_off, region_off; };

__device__ __forceinline__ FrameBox load_box(const long long* __restrict__ params, int b) {
    const long long* p = params + (size_t)b * PARAM_STRIDE;
    FrameBox box;
    box.x1 = (int)p[0]; box.y1 = (int)p[1]; box.x2 = (int)p[2]; box.y2 = (int)p[3];
    box.mask_off = p[4]; box.region_off = p[5];
    return box;
}

// faces [B, face_h, face_w, 3] -> packed regions [box_h, box_w, 3] at region_off.
extern "C" __global__ void resize_to_boxes_kernel(
    const u8* __restrict__ faces, int face_h, int face_w,
    u8* __restrict__ regions, const long long* __restrict__ params)
{
    const int dx = blockIdx.x * blockDim.x + threadIdx.x;
    const int dy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    const FrameBox box = load_box(params, b);
    const int w = box.x2 - box.x1, h = box.y2 - box.y1;
    if (dx >= w || dy >= h) return;
    const u8* face = faces + (size_t)b * face_h * face_w * 3;
    const LinearTap tx = linear_tap(dx, face_w, __fdiv_rn((float)face_w, (float)w));
    const LinearTap ty = linear_tap(dy, face_h, __fdiv_rn((float)face_h, (float)h));
    u8 rgb[3];
    sample_rgb(face, face_w, tx, ty, rgb);
    u8* dst = regions + box.region_off + ((size_t)dy * w + dx) * 3;
    dst[0] = rgb[0]; dst[1] = rgb[1]; dst[2] = rgb[2];
}

// In place: frames[b] box pixels = blend(frame, packed face region, packed mask).
extern "C" __global__ void blend_kernel(
    u8* __restrict__ frames, int height, int width,
    const u8* __restrict__ regions, const u8* __restrict__ masks,
    const long long* __restrict__ params)
{
    const int dx = blockIdx.x * blockDim.x + threadIdx.x;
    const int dy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    const FrameBox box = load_box(params, b);
    const int w = box.x2 - box.x1, h = box.y2 - box.y1;
    if (dx >= w || dy >= h) return;
    const int m = masks[box.mask_off + (size_t)dy * w + dx];
    if (m == 0) return;
    const u8* face = regions + box.region_off + ((size_t)dy * w + dx) * 3;
    u8* px = frames + (((size_t)b * height + box.y1 + dy) * width + box.x1 + dx) * 3;
#pragma unroll
    for (int c = 0; c < 3; ++c) px[c] = blend_u8(px[c], face[c], m);
}

// Fused: resize faces[b] to its box, blend into the RGB frame with the mask, in place.
extern "C" __global__ void compose_rgb_kernel(
    u8* __restrict__ frames, int height, int width,
    const u8* __restrict__ faces, int face_h, int face_w,
    const u8* __restrict__ masks, const long long* __restrict__ params)
{
    const int dx = blockIdx.x * blockDim.x + threadIdx.x;
    const int dy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    const FrameBox box = load_box(params, b);
    const int w = box.x2 - box.x1, h = box.y2 - box.y1;
    if (dx >= w || dy >= h) return;
    const int m = masks[box.mask_off + (size_t)dy * w + dx];
    if (m == 0) return;
    const u8* face = faces + (size_t)b * face_h * face_w * 3;
    const LinearTap tx = linear_tap(dx, face_w, __fdiv_rn((float)face_w, (float)w));
    const LinearTap ty = linear_tap(dy, face_h, __fdiv_rn((float)face_h, (float)h));
    u8 rgb[3];
    sample_rgb(face, face_w, tx, ty, rgb);
    u8* px = frames + (((size_t)b * height + box.y1 + dy) * width + box.x1 + dx) * 3;
#pragma unroll
    for (int c = 0; c < 3; ++c) px[c] = blend_u8(px[c], rgb[c], m);
}

// Fused NV12: one thread per 2x2 block of the box grown to even coordinates. It decodes the
// block, blends the face into the pixels with mask > 0, re-encodes Y of those pixels and the
// block's UV from the 2x2 mean of the resulting RGB. A block with no mask > 0 pixel is left
// untouched, so is Y of every pixel with mask 0 (reference.compose_nv12 has the same rule).
extern "C" __global__ void compose_nv12_kernel(
    u8* __restrict__ nv12, int height, int width,    // [B, H*3/2, W], in place
    const u8* __restrict__ faces, int face_h, int face_w,
    const u8* __restrict__ masks, const long long* __restrict__ params,
    float d_y_offset, float d_y_scale, float d_r_v, float d_g_u, float d_g_v, float d_b_u,
    float e_y_r, float e_y_g, float e_y_b, float e_u_r, float e_u_g, float e_u_b,
    float e_v_r, float e_v_g, float e_v_b, float e_y_offset)
{
    const int bx = blockIdx.x * blockDim.x + threadIdx.x;   // 2x2 block column within the box
    const int by = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    const FrameBox box = load_box(params, b);
    const int ex1 = box.x1 & ~1, ey1 = box.y1 & ~1;
    const int ex2 = (box.x2 + 1) & ~1, ey2 = (box.y2 + 1) & ~1;
    if (bx >= (ex2 - ex1) / 2 || by >= (ey2 - ey1) / 2) return;
    const int w = box.x2 - box.x1, h = box.y2 - box.y1;
    const int px0 = ex1 + 2 * bx, py0 = ey1 + 2 * by;

    int m[4];   // pixel p = 2*row + col
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const int x = px0 + (p & 1), y = py0 + (p >> 1);
        const bool inside = x >= box.x1 && x < box.x2 && y >= box.y1 && y < box.y2;
        m[p] = inside ? (int)masks[box.mask_off + (size_t)(y - box.y1) * w + (x - box.x1)] : 0;
    }
    if ((m[0] | m[1] | m[2] | m[3]) == 0) return;

    const DecodeCoeffs dk = {d_y_offset, d_y_scale, d_r_v, d_g_u, d_g_v, d_b_u};
    const EncodeCoeffs ek = {e_y_r, e_y_g, e_y_b, e_u_r, e_u_g, e_u_b, e_v_r, e_v_g, e_v_b, e_y_offset};
    u8* frame = nv12 + (size_t)b * ((size_t)height * width * 3 / 2);
    u8* uv = frame + (size_t)(height + py0 / 2) * width + px0;
    const int u = uv[0], v = uv[1];
    const u8* face = faces + (size_t)b * face_h * face_w * 3;
    const float scale_x = __fdiv_rn((float)face_w, (float)w);
    const float scale_y = __fdiv_rn((float)face_h, (float)h);
    // The block's two columns and two rows share their taps: 2 + 2 instead of 4 + 4.
    const LinearTap tx[2] = {linear_tap(px0 - box.x1, face_w, scale_x),
                             linear_tap(px0 + 1 - box.x1, face_w, scale_x)};
    const LinearTap ty[2] = {linear_tap(py0 - box.y1, face_h, scale_y),
                             linear_tap(py0 + 1 - box.y1, face_h, scale_y)};

    int r_sum = 0, g_sum = 0, b_sum = 0;
#pragma unroll
    for (int row = 0; row < 2; ++row) {
        // both luma bytes of the row in one 16-bit access (px0 and the frame pitch are even)
        unsigned short* luma2 = reinterpret_cast<unsigned short*>(frame + (size_t)(py0 + row) * width + px0);
        const unsigned short pair = *luma2;
        u8 luma[2] = {(u8)(pair & 0xff), (u8)(pair >> 8)};
        bool changed = false;
#pragma unroll
        for (int col = 0; col < 2; ++col) {
            const int p = 2 * row + col;
            u8 rgb[3];
            decode_pixel(dk, luma[col], u, v, rgb[0], rgb[1], rgb[2]);
            if (m[p] > 0) {
                u8 f[3];
                sample_rgb(face, face_w, tx[col], ty[row], f);
#pragma unroll
                for (int c = 0; c < 3; ++c) rgb[c] = blend_u8(rgb[c], f[c], m[p]);
                luma[col] = encode_y(ek, rgb[0], rgb[1], rgb[2]);
                changed = true;
            }
            r_sum += rgb[0]; g_sum += rgb[1]; b_sum += rgb[2];
        }
        if (changed) *luma2 = (unsigned short)(luma[0] | (luma[1] << 8));
    }
    u8 nu, nv;
    encode_uv(ek, r_sum, g_sum, b_sum, nu, nv);
    uv[0] = nu; uv[1] = nv;
}
