// Face resize, mask blend and the fused RGB compose (talkrt.kernels.gpu.resize_to_boxes / blend /
// compose_rgb; the fused NV12 compose is compose_nv12.cu). Per-frame parameters come in an
// uploaded table of FrameBox records, one per frame (below). The 256x256 generated face is
// resized with OpenCV's INTER_LINEAR half-pixel mapping in float32 (common.cuh: linear_tap /
// sample_rgb). A pixel whose mask is 0 is never written: the blend formula would return the body
// pixel unchanged anyway.
// Launch: block (32, 8), grid (ceil(max box w / 32), ceil(max box h / 8), B).
#include "common.cuh"

// The face box (end exclusive) and the frame's offsets into the packed masks / packed
// box-sized faces (talkrt.kernels.packing); launch.FRAME_BOX mirrors it (launch.box_params).
struct FrameBox { int x1, y1, x2, y2; long long mask_off, region_off; };
static_assert(sizeof(FrameBox) == 32, "FrameBox: mirrored by launch.FRAME_BOX");

// faces [B, face_h, face_w, 3] -> packed regions [box_h, box_w, 3] at region_off.
extern "C" __global__ void resize_to_boxes_kernel(
    const u8* __restrict__ faces, int face_h, int face_w,
    u8* __restrict__ regions, const FrameBox* __restrict__ params)
{
    const int dx = blockIdx.x * blockDim.x + threadIdx.x;
    const int dy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    const FrameBox box = params[b];
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
    const FrameBox* __restrict__ params)
{
    const int dx = blockIdx.x * blockDim.x + threadIdx.x;
    const int dy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    const FrameBox box = params[b];
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
    const u8* __restrict__ masks, const FrameBox* __restrict__ params)
{
    const int dx = blockIdx.x * blockDim.x + threadIdx.x;
    const int dy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    const FrameBox box = params[b];
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
