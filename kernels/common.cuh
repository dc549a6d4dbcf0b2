// Shared device helpers of the talkrt kernels, included through NVRTC's include path (the
// package folder, talkrt.kernels._cuda); no standard header is needed.
//
// Float arithmetic that must match the numpy references bit for bit uses the explicit
// round-to-nearest intrinsics (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn): they are never
// contracted into FMAs, so every operation rounds exactly like a float32 numpy operation.

typedef unsigned char u8;
typedef unsigned int u32;

// ---------------------------------------------------------------- exact conversions without I2F/F2I

// The conversion instructions (I2F, F2I, FRND) run at a small fraction of the FP32 rate; kernels
// bound by them use these equivalents, which give identical results with FP32 adds only.

// (float)n, exactly, for |n| < 2^22: the float of value 1.5 * 2^23 + n has the bits
// 0x4B400000 + n, and subtracting 1.5 * 2^23 again is exact.
__device__ __forceinline__ float exact_float(int n) {
    return __fsub_rn(__int_as_float(0x4B400000 + n), 12582912.0f);
}

// floor(x + 0.5) clamped to [0, 255]: the references' rounding (numpy: floor(x + 0.5), clip).
// Bit for bit the same as fminf(fmaxf(floorf(x + 0.5f), 0), 255) converted to u8: floor clamped
// to [0, 255] equals floor of the value clamped to [0, 255] (integer bounds; NaN -> 0 in both),
// and for z in [0, 255] the sum z + 2^23 rounded down is the float 2^23 + floor(z), whose low
// mantissa byte is floor(z).
__device__ __forceinline__ float round_held(float x) {    // the float 2^23 + round_u8(x)
    return __fadd_rd(fminf(fmaxf(__fadd_rn(x, 0.5f), 0.0f), 255.0f), 8388608.0f);
}

__device__ __forceinline__ u8 round_u8(float x) {
    return (u8)__float_as_int(round_held(x));
}

__device__ __forceinline__ bool aligned4(const void* p) {
    return (((unsigned long long)p) & 3ull) == 0ull;
}

__device__ __forceinline__ bool aligned8(const void* p) {
    return (((unsigned long long)p) & 7ull) == 0ull;
}

// Load n <= N bytes (N a multiple of 4); 32-bit loads when p is 4-byte aligned and n == N.
template <int N>
__device__ __forceinline__ void load_bytes(const u8* __restrict__ p, u8 (&v)[N], int n) {
    if (n == N && aligned4(p)) {
#pragma unroll
        for (int w = 0; w < N / 4; ++w) {
            const u32 word = reinterpret_cast<const u32*>(p)[w];
            v[4 * w + 0] = (u8)(word);
            v[4 * w + 1] = (u8)(word >> 8);
            v[4 * w + 2] = (u8)(word >> 16);
            v[4 * w + 3] = (u8)(word >> 24);
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = (i < n) ? p[i] : (u8)0;
    }
}

// Store the first n <= N bytes of v; 32-bit stores when p is 4-byte aligned and n == N.
template <int N>
__device__ __forceinline__ void store_bytes(u8* __restrict__ p, const u8 (&v)[N], int n) {
    if (n == N && aligned4(p)) {
#pragma unroll
        for (int w = 0; w < N / 4; ++w) {
            reinterpret_cast<u32*>(p)[w] = (u32)v[4 * w] | ((u32)v[4 * w + 1] << 8) |
                                           ((u32)v[4 * w + 2] << 16) | ((u32)v[4 * w + 3] << 24);
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i)
            if (i < n) p[i] = v[i];
    }
}

// ---------------------------------------------------------------- color conversion (colorspace.py)

// Kernels take these by value; colorspace.DECODE_COEFFS / ENCODE_COEFFS mirror them.
struct DecodeCoeffs { float y_offset, y_scale, r_v, g_u, g_v, b_u; };
struct EncodeCoeffs { float y_r, y_g, y_b, u_r, u_g, u_b, v_r, v_g, v_b, y_offset; };
static_assert(sizeof(DecodeCoeffs) == 24, "DecodeCoeffs: mirrored by colorspace.DECODE_COEFFS");
static_assert(sizeof(EncodeCoeffs) == 40, "EncodeCoeffs: mirrored by colorspace.ENCODE_COEFFS");

// YUV -> RGB in the float32 order of colorspace.py.
__device__ __forceinline__ void decode_pixel(const DecodeCoeffs& k, int y, int u, int v,
                                             u8& r, u8& g, u8& b) {
    const float yv = __fmul_rn(k.y_scale, __fsub_rn(exact_float(y), k.y_offset));
    const float uc = exact_float(u - 128);
    const float vc = exact_float(v - 128);
    r = round_u8(__fadd_rn(yv, __fmul_rn(k.r_v, vc)));
    g = round_u8(__fadd_rn(__fadd_rn(yv, __fmul_rn(k.g_u, uc)), __fmul_rn(k.g_v, vc)));
    b = round_u8(__fadd_rn(yv, __fmul_rn(k.b_u, uc)));
}

__device__ __forceinline__ float dot3(float c0, float c1, float c2, float a, float b, float c) {
    return __fadd_rn(__fadd_rn(__fmul_rn(c0, a), __fmul_rn(c1, b)), __fmul_rn(c2, c));
}

__device__ __forceinline__ u8 encode_y(const EncodeCoeffs& k, int r, int g, int b) {
    return round_u8(__fadd_rn(dot3(k.y_r, k.y_g, k.y_b, exact_float(r), exact_float(g), exact_float(b)), k.y_offset));
}

// Chroma of a 2x2 block from the sums of its four R, G and B values (mean = sum * 0.25, exact).
__device__ __forceinline__ void encode_uv(const EncodeCoeffs& k, int r_sum, int g_sum, int b_sum,
                                          u8& u, u8& v) {
    const float r = __fmul_rn(exact_float(r_sum), 0.25f);
    const float g = __fmul_rn(exact_float(g_sum), 0.25f);
    const float b = __fmul_rn(exact_float(b_sum), 0.25f);
    u = round_u8(__fadd_rn(dot3(k.u_r, k.u_g, k.u_b, r, g, b), 128.0f));
    v = round_u8(__fadd_rn(dot3(k.v_r, k.v_g, k.v_b, r, g, b), 128.0f));
}

// ---------------------------------------------------------------- bilinear face sampling

// One axis of OpenCV's INTER_LINEAR mapping src = (dst + 0.5) * scale - 0.5, clamped
// (reference.linear_axis_model is the numpy twin).
struct LinearTap { int i0, i1; float frac; };

__device__ __forceinline__ LinearTap linear_tap(int d, int src_len, float scale) {
    float pos = __fsub_rn(__fmul_rn(__fadd_rn((float)d, 0.5f), scale), 0.5f);
    pos = fmaxf(pos, 0.0f);
    LinearTap t;
    t.i0 = min((int)floorf(pos), src_len - 1);
    t.i1 = min(t.i0 + 1, src_len - 1);
    t.frac = __fsub_rn(pos, (float)t.i0);
    return t;
}

// Bilinear sample of an interleaved 3-channel uint8 image (row pitch fw*3), rounded half up.
__device__ __forceinline__ void sample_rgb(const u8* __restrict__ img, int fw, LinearTap tx,
                                           LinearTap ty, u8 (&out)[3]) {
    const u8* r0 = img + (size_t)ty.i0 * fw * 3;
    const u8* r1 = img + (size_t)ty.i1 * fw * 3;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        const float s00 = exact_float(r0[tx.i0 * 3 + c]), s01 = exact_float(r0[tx.i1 * 3 + c]);
        const float s10 = exact_float(r1[tx.i0 * 3 + c]), s11 = exact_float(r1[tx.i1 * 3 + c]);
        const float top = __fadd_rn(s00, __fmul_rn(tx.frac, __fsub_rn(s01, s00)));
        const float bot = __fadd_rn(s10, __fmul_rn(tx.frac, __fsub_rn(s11, s10)));
        out[c] = round_u8(__fadd_rn(top, __fmul_rn(ty.frac, __fsub_rn(bot, top))));
    }
}

// round_half_up((body*(255-m) + face*m) / 255), exact in integers (equals PIL's paste).
__device__ __forceinline__ u8 blend_u8(int body, int face, int m) {
    const int mixed = body * (255 - m) + face * m;
    return (u8)((2 * mixed + 255) / 510);
}
