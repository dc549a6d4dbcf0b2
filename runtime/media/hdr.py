"""HDR (PQ or HLG transfer, BT.2020) to SDR BT.709 conversion of decoded frames (numpy, float32).

The operator, per pixel, on the decoded Y'CbCr code values (no 8-bit step before the end):

1. Y'CbCr -> non-linear R'G'B' in [0, 1] with the stream's matrix (BT.2020 non-constant
   luminance, Kr = 0.2627, Kb = 0.0593: ITU-R BT.2020 / BT.2100 Table 6) and range (limited:
   Y' = (D - 16*2^(n-8)) / (219*2^(n-8)), C = (D - 128*2^(n-8)) / (224*2^(n-8)); full:
   Y' = D / (2^n - 1)); chroma repeated to full resolution (4:2:0 -> 4:4:4, nearest).
2. Display light in cd/m2:
   * PQ: the SMPTE ST 2084 EOTF (ITU-R BT.2100 Table 4).
   * HLG: the BT.2100 HLG inverse OETF (scene light E in [0, 1]), then the HLG OOTF for a
     nominal display peak ``HLG_PEAK_NITS`` = 1000 cd/m2 and black 0:
     ``Fd = 1000 * Ys^(gamma - 1) * E`` with ``gamma = 1.2`` and ``Ys`` the scene luminance.
3. Tone mapping: light is scaled by 100/203, so that HDR reference white (203 cd/m2, ITU-R
   BT.2408) becomes SDR white, and the ITU-R BT.2390 EETF (section 5.4: identity below the
   knee ``KS``, a Hermite spline above it, computed in the PQ domain) maps the scaled source
   range [0, 1000 * 100/203] cd/m2 onto an SDR display of ``SDR_PEAK_NITS`` = 100 cd/m2,
   black 0.  Below 86 cd/m2 of source light (faces, mid-tones) the scaling is all;
   highlights roll off up to 1000 cd/m2 (HLG's nominal peak; PQ content mastered brighter
   clips there).  The curve is applied to max(R, G, B) and all three channels are scaled by
   the same factor, which keeps hue and saturation (as FFmpeg's ``tonemap`` filter does).
4. Gamut: BT.2020 -> BT.709 primaries by the linear-light 3x3 matrix of ITU-R BT.2087
   (computed from both sets of primaries, D65 white), then clipped to [0, 1] of 100 cd/m2
   (colours outside BT.709 clip; there is no gamut compression).
5. SDR code values: the inverse of the BT.1886 reference EOTF (gamma 2.4, black 0), as an SDR
   display shows them, rounded to 8-bit full-range RGB.  talkrt then writes BT.709 limited range.

Reference points (neutral input): HLG 50 % (50.6 cd/m2) -> RGB 143; HLG 75 % and PQ 58 % (both
203 cd/m2, reference white) -> 78 cd/m2 -> RGB 230; PQ 100 cd/m2 -> 189; 1000 cd/m2 -> 255.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import av
import numpy as np

HLG_PEAK_NITS = 1000.0     # BT.2100's reference HLG display peak (gamma 1.2)
SOURCE_PEAK_NITS = 1000.0  # brightest source light kept: HLG's nominal peak; PQ as mastered at 1000
REFERENCE_WHITE_NITS = 203.0  # ITU-R BT.2408 HDR reference white, shown as SDR white
SDR_PEAK_NITS = 100.0      # BT.1886 / BT.2035 SDR reference display white
SDR_GAMMA = 2.4            # BT.1886 EOTF exponent

# AVColorTransferCharacteristic values (libavutil/pixfmt.h)
_TRANSFERS = {16: "pq", 18: "hlg"}
_PRIMARIES_BT2020 = 9
# (Kr, Kb) of the Y'CbCr matrices a 10-bit HDR stream may be tagged with (AVColorSpace names)
_MATRIX_COEFFICIENTS = {"bt2020nc": (0.2627, 0.0593), "bt709": (0.2126, 0.0722),
                        "smpte170m": (0.299, 0.114), "bt470bg": (0.299, 0.114)}

# ITU-R BT.2087: linear BT.2020 RGB -> linear BT.709 RGB (rows sum to 1: white stays white)
BT2020_TO_BT709 = np.array([[1.660491, -0.587641, -0.072850],
                            [-0.124550, 1.132900, -0.008349],
                            [-0.018151, -0.100579, 1.118730]], np.float32)
_LUMA_BT2020 = np.array([0.2627, 0.6780, 0.0593], np.float32)
_LUMA_BT709 = np.array([0.2126, 0.7152, 0.0722], np.float32)

# SMPTE ST 2084 constants
_M1, _M2 = 2610 / 16384, 2523 / 4096 * 128
_C1, _C2, _C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
# BT.2100 HLG constants
_HLG_A = 0.17883277
_HLG_B = 1 - 4 * _HLG_A
_HLG_C = 0.5 - _HLG_A * np.log(4 * _HLG_A)


def hdr_transfer(color_trc: object) -> str | None:
    """'pq' (SMPTE ST 2084) or 'hlg' (ARIB STD-B67) for an AVColorTransferCharacteristic, else None."""
    try:
        return _TRANSFERS.get(int(color_trc))     # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class HdrSource:
    """What the conversion needs to know about an HDR stream.

    ``transfer`` is 'pq' or 'hlg'; ``matrix`` one of ``bt2020nc``, ``bt709``, ``smpte170m``,
    ``bt470bg`` (None: BT.2020 NCL assumed); ``bt2020_primaries`` False means the primaries
    already are BT.709 (no gamut step).
    """

    transfer: str
    matrix: str | None
    full_range: bool
    bt2020_primaries: bool

    def __post_init__(self) -> None:
        if self.transfer not in ("pq", "hlg"):
            raise ValueError(f"unknown HDR transfer {self.transfer!r}")
        if self.matrix is not None and self.matrix not in _MATRIX_COEFFICIENTS:
            raise ValueError(f"HDR with the {self.matrix} color matrix is not supported")

    def describe(self) -> str:
        name = {"pq": "PQ (SMPTE ST 2084)", "hlg": "HLG"}[self.transfer]
        return f"{name}, {'BT.2020' if self.bt2020_primaries else 'BT.709'} primaries"


def hdr_source(color_trc: object, color_primaries: object, matrix: str | None, full_range: bool) -> HdrSource | None:
    """The :class:`HdrSource` of a stream with these tags (AVColor* values; primaries left unset
    (None, 0 or 2) are taken as BT.2020), None for a transfer that is not PQ or HLG.
    Raises:
        ValueError: HDR with a matrix this conversion does not implement (e.g. BT.2020 constant luminance).
    """
    transfer = hdr_transfer(color_trc)
    if transfer is None:
        return None
    try:
        primaries = int(color_primaries)           # type: ignore[call-overload]
    except (TypeError, ValueError):
        primaries = 0
    return HdrSource(transfer, matrix, full_range, primaries in (0, 2, _PRIMARIES_BT2020))   # 2: unspecified


def pq_eotf(signal: np.ndarray) -> np.ndarray:
    """ST 2084 EOTF: non-linear PQ signal in [0, 1] -> display light in cd/m2 (0..10000)."""
    p = np.power(np.clip(signal, 0.0, 1.0), np.float32(1 / _M2))
    y = np.maximum(p - np.float32(_C1), 0.0) / (np.float32(_C2) - np.float32(_C3) * p)
    return np.float32(10000.0) * np.power(y, np.float32(1 / _M1))


def pq_inverse_eotf(nits: np.ndarray) -> np.ndarray:
    """Inverse ST 2084 EOTF: display light in cd/m2 -> PQ signal in [0, 1]."""
    y = np.power(np.clip(nits / np.float32(10000.0), 0.0, 1.0), np.float32(_M1))
    return np.power((np.float32(_C1) + np.float32(_C2) * y) / (1 + np.float32(_C3) * y), np.float32(_M2))


def hlg_inverse_oetf(signal: np.ndarray) -> np.ndarray:
    """BT.2100 HLG inverse OETF: non-linear signal in [0, 1] -> scene light in [0, 1]."""
    e = np.clip(signal, 0.0, 1.0)
    low = e * e / np.float32(3.0)
    high = (np.exp((e - np.float32(_HLG_C)) / np.float32(_HLG_A)) + np.float32(_HLG_B)) / np.float32(12.0)
    return np.where(e <= 0.5, low, high).astype(np.float32, copy=False)


def bt2390_eetf(nits: np.ndarray, source_peak: float = SOURCE_PEAK_NITS,
                target_peak: float = SDR_PEAK_NITS) -> np.ndarray:
    """BT.2390 EETF (black 0 on both sides): cd/m2 in [0, source_peak] -> [0, target_peak]."""
    peak_pq = float(pq_inverse_eotf(np.float32(source_peak)))
    max_lum = float(pq_inverse_eotf(np.float32(target_peak))) / peak_pq
    ks = 1.5 * max_lum - 0.5
    e1 = np.clip(pq_inverse_eotf(nits) / np.float32(peak_pq), 0.0, 1.0)
    t = (e1 - np.float32(ks)) / np.float32(1 - ks)
    t2, t3 = t * t, t * t * t
    spline = (2 * t3 - 3 * t2 + 1) * np.float32(ks) + (t3 - 2 * t2 + t) * np.float32(1 - ks) \
        + (-2 * t3 + 3 * t2) * np.float32(max_lum)
    e2 = np.where(e1 < ks, e1, spline)
    return pq_eotf(e2 * np.float32(peak_pq))


def ycbcr_to_rgb_signal(frame: av.VideoFrame, source: HdrSource) -> np.ndarray:
    """Non-linear R'G'B' float32 ``[H, W, 3]`` in [0, 1] of a decoded HDR frame (any planar YUV depth)."""
    planes, bits = _yuv_planes(frame)
    y, cb, cr = (p.astype(np.float32) for p in planes)
    h, w = y.shape
    cb, cr = (_upsample(c, h, w) for c in (cb, cr))
    scale = np.float32(2 ** (bits - 8))
    if source.full_range:
        top = np.float32(2 ** bits - 1)
        y, cb, cr = y / top, (cb - np.float32(2 ** (bits - 1))) / top, (cr - np.float32(2 ** (bits - 1))) / top
    else:
        y = (y - 16 * scale) / (219 * scale)
        cb, cr = (cb - 128 * scale) / (224 * scale), (cr - 128 * scale) / (224 * scale)
    kr, kb = _MATRIX_COEFFICIENTS[source.matrix or "bt2020nc"]
    kg = 1 - kr - kb
    r = y + np.float32(2 * (1 - kr)) * cr
    b = y + np.float32(2 * (1 - kb)) * cb
    g = (y - np.float32(kr) * r - np.float32(kb) * b) / np.float32(kg)
    return np.clip(np.stack([r, g, b], axis=-1), 0.0, 1.0)


def signal_to_sdr(rgb: np.ndarray, source: HdrSource) -> np.ndarray:
    """Steps 2-5 of the module's operator: R'G'B' signal ``[..., 3]`` float32 -> SDR BT.709 RGB uint8.

    The one-variable curves are evaluated through ``_LUT_SIZE``-entry tables of the exact
    functions above (the signal quantised to 1/4095; light and the final code value indexed
    by the square root of light, which spaces the entries finely near black): the error is
    well under one 8-bit code value and a 1080p frame takes a fraction of the direct cost.
    """
    tables = _tables(source.transfer)
    light = tables.light[_lut_index(rgb)]                   # PQ: cd/m2; HLG: scene light
    if source.transfer == "hlg":
        ys = light @ (_LUMA_BT2020 if source.bt2020_primaries else _LUMA_BT709)
        gain = np.float32(HLG_PEAK_NITS) * np.power(np.maximum(ys, np.float32(1e-12)), np.float32(0.2))
        peak = _channel_max(light) * gain
    else:
        gain = None
        peak = _channel_max(light)
    scale = tables.ratio[_lut_index(np.sqrt(peak / np.float32(_LIGHT_RANGE)))]
    if gain is not None:
        scale *= gain
    light *= (scale / np.float32(SDR_PEAK_NITS))[..., None]
    if source.bt2020_primaries:
        light = (light.reshape(-1, 3) @ BT2020_TO_BT709.T).reshape(light.shape)   # out of gamut: < 0, clipped
    return tables.code[_lut_index(np.sqrt(np.maximum(light, np.float32(0.0), out=light)))]


@dataclass(frozen=True)
class _Tables:
    light: np.ndarray   # signal index -> display light in cd/m2 (PQ) or scene light (HLG)
    ratio: np.ndarray   # sqrt(peak / _LIGHT_RANGE) index -> EETF(peak) / peak
    code: np.ndarray    # sqrt(relative SDR light) index -> 8-bit code value (inverse BT.1886)


_LUT_SIZE = 4096
_LIGHT_RANGE = 10000.0   # cd/m2 covered by the ratio table (PQ's whole range)


@functools.lru_cache(maxsize=None)
def _tables(transfer: str) -> _Tables:
    grid = np.linspace(0.0, 1.0, _LUT_SIZE, dtype=np.float32)
    light = pq_eotf(grid) if transfer == "pq" else hlg_inverse_oetf(grid)
    peak = grid * grid * np.float32(_LIGHT_RANGE)
    anchor = np.float32(SDR_PEAK_NITS / REFERENCE_WHITE_NITS)
    ratio = np.full_like(grid, anchor)
    ratio[1:] = bt2390_eetf(peak[1:] * anchor, SOURCE_PEAK_NITS * float(anchor)) / peak[1:]
    code = np.rint(np.power(grid * grid, np.float32(1 / SDR_GAMMA)) * 255).astype(np.uint8)
    return _Tables(light.astype(np.float32), ratio.astype(np.float32), code)


def _channel_max(rgb: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])   # ~9x faster than max(axis=-1)


def _lut_index(x: np.ndarray) -> np.ndarray:
    """Table index of values in [0, 1] (clipped), rounded to the nearest entry."""
    scaled = np.clip(x, 0.0, 1.0) * np.float32(_LUT_SIZE - 1) + np.float32(0.5)
    return scaled.astype(np.intp)


def frame_to_sdr_rgb(frame: av.VideoFrame, source: HdrSource) -> np.ndarray:
    """A decoded HDR frame as SDR BT.709 RGB uint8 ``[H, W, 3]`` (the module's operator)."""
    return signal_to_sdr(ycbcr_to_rgb_signal(frame, source), source)


def _yuv_planes(frame: av.VideoFrame) -> tuple[list[np.ndarray], int]:
    """The Y, Cb, Cr planes (native resolution, integer code values) and their bit depth."""
    fmt = frame.format
    components = list(fmt.components)
    bits = max(int(c.bits) for c in components)
    planar = len(frame.planes) == 3 and not fmt.is_rgb and (bits == 8 or fmt.name.endswith("le"))
    if not planar:                  # semi-planar (P010) or packed: let swscale unpack, no matrix involved
        frame = frame.reformat(format="yuv444p16le")
        bits = 16
    dtype = np.dtype(np.uint8 if bits == 8 else "<u2")
    planes = []
    for plane in frame.planes:
        rows = np.frombuffer(plane, dtype).reshape(plane.height, plane.line_size // dtype.itemsize)
        planes.append(rows[:, : plane.width])
    return planes, bits


def _upsample(chroma: np.ndarray, height: int, width: int) -> np.ndarray:
    ry, rx = -(-height // chroma.shape[0]), -(-width // chroma.shape[1])
    if ry > 1:
        chroma = np.repeat(chroma, ry, axis=0)
    if rx > 1:
        chroma = np.repeat(chroma, rx, axis=1)
    return chroma[:height, :width]
