"""Heads with a known place in MNI space: the test and benchmark data of ``--space mni``.

One head image (FSL's MNI152 6th generation T1 with skull and face, the template
``--space mni`` registers to, given a longer neck so that it looks like a scan straight from
a scanner) is moved by a known affine
map (rotations up to 15 degrees, scaling up to 10 %, shifts up to 20 mm, a little shear) and
sampled on a scanner grid of any voxel order and size, with a smooth multiplicative bias
field and noise, stored as int16 NIfTI. The true map is written beside each head
(``NAME.to_template.txt``: scanner world -> template world), so a registration can be
checked in millimetres. Needs ``pip install 'slicestore[mni]'`` (the template).

    python scripts/make_heads.py OUT --heads 8 [--shape 176 256 256] [--voxel 1 1 1]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from preprocess.standard import load_template

PAD = ((10, 10), (10, 10), (60, 10))  # template voxels around the head: a neck below


@functools.lru_cache(maxsize=1)
def template_head() -> tuple[np.ndarray, np.ndarray]:
    """``(head, affine)``: the template's head (0 to 255) with a neck below, on the
    template's grid padded by :data:`PAD`."""
    template = load_template("axial", 0.05)
    head = np.pad(template.image * np.float32(255 / template.image.max()), PAD)
    x, y, z = np.indices(head.shape, sparse=True)
    neck = (x - head.shape[0] / 2) ** 2 / 35**2 + (y - head.shape[1] * 0.45) ** 2 / 40**2 < 1
    head[neck & (z < PAD[2][0])] = 110
    affine = template.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([before for before, _ in PAD])
    return head, affine


def known_motion(rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A random affine map, scanner world -> template world (4 x 4): rotations up to 15
    degrees, scaling up to 10 %, shear up to 0.05 and shifts up to 20 mm, times ``strength``."""
    rotation = np.eye(3)
    for axis, angle in enumerate(np.radians(rng.uniform(-15, 15, 3) * strength)):
        c, s = np.cos(angle), np.sin(angle)
        turn = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        rotation = rotation @ turn
    shear = np.eye(3)
    shear[0, 1], shear[1, 2] = rng.uniform(-0.05, 0.05, 2) * strength
    result = np.eye(4)
    result[:3, :3] = rotation @ np.diag(1 + rng.uniform(-0.1, 0.1, 3) * strength) @ shear
    result[:3, 3] = rng.uniform(-20, 20, 3) * strength
    return result


def scanner_grid(shape, voxel_size, orientation: str = "RAS") -> np.ndarray:
    """Voxel-to-world of a grid of ``shape`` voxels of ``voxel_size`` mm stored in the axis
    order ``orientation`` (e.g. ``LPS``, ``PIR``), centred on the world's origin."""
    ornt = orientations.axcodes2ornt(tuple(orientation))
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for stored, (world, flip) in enumerate(ornt.astype(int)):
        affine[world, stored] = flip * voxel_size[stored]
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def moved_head(
    to_template: np.ndarray,
    affine: np.ndarray,
    shape,
    rng: np.random.Generator,
    bias: float = 1.0,
    noise: float = 4.0,
) -> np.ndarray:
    """The head seen through ``to_template`` on a scanner grid, with a smooth bias field and
    noise, as int16."""
    head, head_affine = template_head()
    matrix = np.linalg.inv(head_affine) @ to_template @ affine
    data = ndimage.affine_transform(
        head, matrix, output_shape=tuple(shape), order=1, output=np.float32
    )
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij", sparse=True)
    field = np.exp(bias * (0.25 * grid[0] - 0.2 * grid[1] * grid[2] + 0.15 * grid[2] ** 2))
    data *= field.astype(np.float32)
    data += rng.normal(0, noise, data.shape).astype(np.float32)
    return np.clip(data * 8, 0, 32767).astype(np.int16)


def write_head(
    path: Path,
    rng: np.random.Generator,
    shape=(176, 256, 256),
    voxel_size=(1.0, 1.0, 1.0),
    orientation: str = "RAS",
    strength: float = 1.0,
) -> np.ndarray:
    """Write one moved head as NIfTI; returns its true scanner-to-template map."""
    to_template = known_motion(rng, strength)
    affine = scanner_grid(shape, voxel_size, orientation)
    data = moved_head(to_template, affine, shape, rng)
    nib.save(nib.Nifti1Image(data, affine), path)
    return to_template


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=Path, help="the folder to write")
    parser.add_argument("--heads", type=int, default=8, help="how many (default: 8)")
    parser.add_argument("--shape", type=int, nargs=3, default=(176, 256, 256))
    parser.add_argument("--voxel", type=float, nargs=3, default=(1.0, 1.0, 1.0), help="mm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for index in range(args.heads):
        path = args.output / f"head{index:03d}.nii.gz"
        truth = write_head(path, rng, args.shape, args.voxel)
        np.savetxt(args.output / f"head{index:03d}.to_template.txt", truth)
    print(f"wrote {args.heads} heads of {tuple(args.shape)} voxels into {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
