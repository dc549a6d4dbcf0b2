// Separable 8-bit Gaussian blur and unsharp mask (talkrt.kernels.gpu.gaussian_blur /
// unsharp_mask), bit-exact with cv2.GaussianBlur's uint8 fixed-point path (gaussian.py):
//   h   = sum_i w[i] * src[x + (i - r)]                  (BORDER_REFLECT_101, weights sum to 256)
//   out = (sum_j w[j] * h[y + (j - r)] + 2^15) >> 16
// mode 1 then applies the unsharp mask in float32:
//   d = src - blurred; out = |d| >= threshold ? round_half_up(src + amount * d) : src
//
// The image is treated as rows of W*C byte "elements"; a horizontal tap moves by C elements.
// One 256-thread block produces a TILE_X x TILE_Y element tile in one pass: it loads the tile
// plus its halo into shared memory (reflecting at the borders), runs the horizontal pass into
// a uint16 shared buffer, then the vertical pass. Launch: block (32, 8),
// grid (ceil(W*C/TILE_X), ceil(H/TILE_Y), B), dynamic shared memory from filter_smem_bytes()
// in gpu.py: align16((TILE_Y+2r) * (TILE_X+2rC)) + (TILE_Y+2r) * TILE_X * 2.
#include "common.cuh"

#define TILE_X 128
#define TILE_Y 16
#define MAX_TAPS 31

// cv::borderInterpolate(p, n, BORDER_REFLECT_101) for any p (period 2n - 2).
__device__ __forceinline__ int reflect101(int p, int n) {
    if (n == 1) return 0;
    const int period = 2 * n - 2;
    p %= period;
    if (p < 0) p += period;
    return p >= n ? period - p : p;
}

extern "C" __global__ void gaussian_filter_kernel(
    const u8* __restrict__ src,   // [B, H, W, C]
    u8* __restrict__ dst,         // [B, H, W, C], must not alias src
    int height, int width, int channels,
    const int* __restrict__ weights, int radius,   // 2*radius + 1 integer taps, sum 256
    int mode, float amount, int threshold)         // mode 0: blur, 1: unsharp mask
{
    extern __shared__ __align__(16) u8 smem[];
    __shared__ int s_w[MAX_TAPS];

    const int ntaps = 2 * radius + 1;
    const int row_elems = width * channels;
    const int halo_x = radius * channels;
    const int in_cols = TILE_X + 2 * halo_x;
    const int in_rows = TILE_Y + 2 * radius;
    u8* s_in = smem;
    unsigned short* s_h = reinterpret_cast<unsigned short*>(smem + ((in_rows * in_cols + 15) & ~15));

    const int tile_x0 = blockIdx.x * TILE_X;
    const int tile_y0 = blockIdx.y * TILE_Y;
    const u8* frame = src + (size_t)blockIdx.z * height * row_elems;
    u8* out = dst + (size_t)blockIdx.z * height * row_elems;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int nthreads = blockDim.x * blockDim.y;

    for (int i = tid; i < ntaps; i += nthreads) s_w[i] = weights[i];
    // 1) tile + halo, reflected at the frame borders
    for (int i = tid; i < in_rows * in_cols; i += nthreads) {
        const int ly = i / in_cols, lx = i - ly * in_cols;
        const int gy = reflect101(tile_y0 - radius + ly, height);
        const int ge = tile_x0 - halo_x + lx;                         // element column, may be < 0
        const int px_raw = ge >= 0 ? ge / channels : -((-ge + channels - 1) / channels);
        const int c = ge - px_raw * channels;
        const int px = reflect101(px_raw, width);
        s_in[i] = frame[(size_t)gy * row_elems + px * channels + c];
    }
    __syncthreads();
    // 2) horizontal pass over every loaded row (<= 255 * 256, fits uint16)
    for (int i = tid; i < in_rows * TILE_X; i += nthreads) {
        const int ly = i / TILE_X, lx = i - ly * TILE_X;
        const u8* p = s_in + ly * in_cols + lx;
        int acc = 0;
        for (int k = 0; k < ntaps; ++k) acc += s_w[k] * (int)p[k * channels];
        s_h[i] = (unsigned short)acc;
    }
    __syncthreads();
    // 3) vertical pass (+ unsharp mask) on the tile's own rows
    for (int i = tid; i < TILE_Y * TILE_X; i += nthreads) {
        const int ly = i / TILE_X, lx = i - ly * TILE_X;
        const int gy = tile_y0 + ly, ge = tile_x0 + lx;
        if (gy >= height || ge >= row_elems) continue;
        int acc = 0;
        for (int k = 0; k < ntaps; ++k) acc += s_w[k] * (int)s_h[(ly + k) * TILE_X + lx];
        const int blurred = (acc + 32768) >> 16;
        u8 value;
        if (mode == 0) {
            value = (u8)blurred;
        } else {
            const int orig = s_in[(ly + radius) * in_cols + lx + halo_x];
            const int diff = orig - blurred;
            value = (abs(diff) >= threshold)
                        ? round_u8(__fadd_rn((float)orig, __fmul_rn(amount, (float)diff)))
                        : (u8)orig;
        }
        out[(size_t)gy * row_elems + ge] = value;
    }
}
