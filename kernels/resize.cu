// Batched crop + resize (talkrt.kernels.gpu.crop_resize): one launch resizes box b of frame b
// to out_w x out_h with per-frame separable tap tables built on the host by resize_tables.py
// (OpenCV INTER_AREA / INTER_LANCZOS4 arithmetic). Tables hold absolute frame coordinates, so the
// kernel never sees the boxes. One thread computes the 3 channels of one output pixel.
// Launch: block (32, 8), grid (ceil(out_w/32), ceil(out_h/8), B).
#include "common.cuh"

#define KIND_FIXED 0         // acc = sum_j wy*(sum_i wx*s) in int32; (acc + round_add) >> shift
#define KIND_FLOAT 1         // float32 in OpenCV's order; rint(acc * post_scale)
#define KIND_FIXED_LINEAR 2  // acc = sum_j (((sum_i wx*s) >> 4) * wy) >> 16; (acc + round_add) >> shift

__device__ __forceinline__ u8 clamp_u8(int v) { return (u8)min(max(v, 0), 255); }

extern "C" __global__ void crop_resize_kernel(
    const u8* __restrict__ frames,  // [B, H, W, 3]
    u8* __restrict__ out,           // [B, out_h, out_w, 3]
    int height, int width, int out_h, int out_w,
    const int* __restrict__ x_index, const float* __restrict__ x_weight, int x_taps,  // [B, out_w, x_taps]
    const int* __restrict__ y_index, const float* __restrict__ y_weight, int y_taps,  // [B, out_h, y_taps]
    const int* __restrict__ meta)   // [B, 4]: kind, shift, round_add, float bits of post_scale
{
    const int dx = blockIdx.x * blockDim.x + threadIdx.x;
    const int dy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    if (dx >= out_w || dy >= out_h) return;

    const u8* frame = frames + (size_t)b * height * width * 3;
    const size_t xt = ((size_t)b * out_w + dx) * x_taps;
    const size_t yt = ((size_t)b * out_h + dy) * y_taps;
    const int kind = meta[4 * b + 0];
    const int shift = meta[4 * b + 1];
    const int round_add = meta[4 * b + 2];
    const float post_scale = __int_as_float(meta[4 * b + 3]);
    u8* dst = out + (((size_t)b * out_h + dy) * out_w + dx) * 3;

    if (kind == KIND_FLOAT) {
        float acc[3] = {0.0f, 0.0f, 0.0f};
        for (int j = 0; j < y_taps; ++j) {
            const float wy = y_weight[yt + j];
            if (wy == 0.0f) continue;   // padding tap: adding 0 changes nothing
            const u8* row = frame + (size_t)y_index[yt + j] * width * 3;
            float buf[3] = {0.0f, 0.0f, 0.0f};
            for (int i = 0; i < x_taps; ++i) {
                const float wx = x_weight[xt + i];
                if (wx == 0.0f) continue;
                const u8* p = row + x_index[xt + i] * 3;
#pragma unroll
                for (int c = 0; c < 3; ++c) buf[c] = __fadd_rn(buf[c], __fmul_rn((float)p[c], wx));
            }
#pragma unroll
            for (int c = 0; c < 3; ++c) acc[c] = __fadd_rn(acc[c], __fmul_rn(wy, buf[c]));
        }
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            const float v = (post_scale != 1.0f) ? __fmul_rn(acc[c], post_scale) : acc[c];
            dst[c] = clamp_u8(__float2int_rn(v));   // round half to even, like cvRound
        }
    } else {
        int acc[3] = {0, 0, 0};
        for (int j = 0; j < y_taps; ++j) {
            const int wy = (int)y_weight[yt + j];
            if (wy == 0) continue;
            const u8* row = frame + (size_t)y_index[yt + j] * width * 3;
            int h[3] = {0, 0, 0};
            for (int i = 0; i < x_taps; ++i) {
                const int wx = (int)x_weight[xt + i];
                if (wx == 0) continue;
                const u8* p = row + x_index[xt + i] * 3;
#pragma unroll
                for (int c = 0; c < 3; ++c) h[c] += wx * (int)p[c];
            }
#pragma unroll
            for (int c = 0; c < 3; ++c)
                acc[c] += (kind == KIND_FIXED_LINEAR) ? (((h[c] >> 4) * wy) >> 16) : wy * h[c];
        }
#pragma unroll
        for (int c = 0; c < 3; ++c) dst[c] = clamp_u8((acc[c] + round_add) >> shift);
    }
}
