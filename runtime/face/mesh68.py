"""Reduce the 468-point MediaPipe face mesh to the 68-point iBUG (300-W) layout.

Each iBUG point is one mesh vertex or the midpoint of two adjacent vertices.
How the table was derived (on a frontal face, ``skimage.data.astronaut()``):

* Named mesh features give the fixed points directly: outer/inner eye corners
  (33, 133 | 362, 263), mouth corners (61, 291), upper-lip top centre (0),
  lower-lip bottom centre (17), inner-lip centres (13, 14), inner-lip corners
  (78, 308), nasion (168), nose tip (1), subnasale (2), alar bases (98, 327),
  chin (152), and the outermost silhouette points at eye-corner height
  (127, 356).
* iBUG annotates the points between such anchors at (nearly) equal arc-length
  spacing along the contour. So for each stretch - the jaw from 127 (resp. 356)
  along the mesh face oval to the chin 152, upper/lower outer lip, upper/lower
  inner lip, eyelids - we measured the arc length along the mesh's own contour
  and took, for each equal subdivision, the vertex or adjacent-vertex midpoint
  whose arc position is closest. Left and right sides came out mirror-symmetric
  in the mesh topology, as they should.
* Nose bridge 27..30 runs nasion 168 -> 197 -> 5 -> tip 1 (near-equal spacing).
* Brows: iBUG's five points per brow are taken on the brow centre line, as the
  midpoint of the mesh's upper and lower brow contours.

"Right"/"left" below are the subject's; iBUG point 0 is on the image left of a
non-mirrored frontal face. Accuracy: visually within a few pixels of where an
iBUG annotator would click on a 100 px face; the jaw follows the mesh
silhouette, so on strongly turned heads the far-side jaw is the mesh's
projected outline rather than the visible occluding contour.
"""

from __future__ import annotations

import numpy as np

from talkrt.errors import TalkrtError

__all__ = ["MESH_TO_IBUG68", "mesh_to_ibug68"]

# One (a, b) pair per iBUG point; the iBUG point is the midpoint of mesh vertices
# a and b (a == b for a single vertex).
MESH_TO_IBUG68: tuple[tuple[int, int], ...] = (
    # jaw 0..16: right silhouette at eye height -> chin 152 -> left silhouette
    (127, 127), (234, 93), (93, 132), (132, 58), (172, 172), (136, 150), (149, 149), (176, 148),
    (152, 152),
    (377, 400), (378, 378), (365, 379), (397, 397), (361, 288), (323, 361), (454, 323), (356, 356),
    # right brow 17..21, outer -> inner (upper/lower contour midpoints)
    (70, 46), (63, 53), (105, 52), (66, 65), (107, 55),
    # left brow 22..26, inner -> outer
    (336, 285), (296, 295), (334, 282), (293, 283), (300, 276),
    # nose bridge 27..30: nasion -> tip
    (168, 168), (197, 197), (5, 5), (1, 1),
    # nostril base 31..35: right alar -> subnasale -> left alar
    (98, 98), (97, 97), (2, 2), (326, 326), (327, 327),
    # right eye 36..41: outer corner, upper lid x2, inner corner, lower lid x2
    (33, 33), (160, 160), (158, 158), (133, 133), (153, 153), (144, 144),
    # left eye 42..47: inner corner, upper lid x2, outer corner, lower lid x2
    (362, 362), (385, 385), (387, 387), (263, 263), (373, 373), (380, 380),
    # outer lips 48..59: right corner, upper lip -> left corner, lower lip back
    (61, 61), (40, 39), (37, 37), (0, 0), (267, 267), (269, 270), (291, 291),
    (321, 321), (405, 314), (17, 17), (84, 181), (91, 91),
    # inner lips 60..67: right corner, upper, left corner, lower
    (78, 78), (81, 81), (13, 13), (311, 311), (308, 308), (402, 402), (14, 14), (178, 178),
)

_INDEX_A = np.array([a for a, _ in MESH_TO_IBUG68], dtype=np.int64)
_INDEX_B = np.array([b for _, b in MESH_TO_IBUG68], dtype=np.int64)
assert len(MESH_TO_IBUG68) == 68


def mesh_to_ibug68(mesh: np.ndarray) -> np.ndarray:
    """Map face-mesh points [468, 2 or 3] to iBUG-68 (x, y) float32 [68, 2]."""
    pts = np.asarray(mesh, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[0] != 468 or pts.shape[1] < 2:
        raise TalkrtError(f"face mesh must be [468, 2|3], got {pts.shape}")
    xy = pts[:, :2]
    return ((xy[_INDEX_A] + xy[_INDEX_B]) * 0.5).astype(np.float32)
