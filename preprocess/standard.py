"""Standard space: a scan bias-corrected (N4) and affinely registered to the MNI152 template.

The template is the MNI152 2009a symmetric T1 at 1 mm that ships inside nilearn's wheel
(skull-stripped; found without importing nilearn). SimpleITK does the work, with one
thread and a fixed sampling seed, so a scan gives the same numbers in any process:

1. the scan, averaged over blocks to ~2 mm, is the *working image*;
2. N4 estimates a smooth bias field on it, shrunk again to ~8 mm, and the working image
   is divided by it;
3. a similarity transform (7 parameters), then an affine one (12), are fitted by Mattes
   mutual information sampled **inside the template's brain** (dilated by 4 mm), at 8 and
   4 mm then 4 and 2 mm: the skull, neck and field of view of the scan do not pull;
4. the scan (and the bias field) are resampled once onto the template's 1 mm grid, only
   the planes of the slab.

Nothing here writes; a scan that cannot be registered is a :class:`ScanError`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from preprocess.errors import InputError, ScanError
from preprocess.slices import AXES, label_slices
from preprocess.volume import foreground

TEMPLATE_NAME = "MNI152NLin2009aSym"
TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"  # in nilearn/datasets/data
INSTALL = "pip install 'slicestore[mni]' (SimpleITK and nilearn's template)"

WORKING_MM = 2.0  # the working image's voxels
N4_SHRINK = 4  # N4 runs on the working image shrunk this much (~8 mm)
N4_ITERATIONS = (50, 50)
BRAIN_MARGIN_MM = 4  # the metric's mask: the template's brain dilated this much
SAMPLING_SEED = 1  # the metric's random sampling (SimpleITK's 0 would mean the clock)
SIMILARITY_STAGE = dict(shrink=(4, 2), sigma=(2.0, 1.0), sampling=(0.5, 0.25), iterations=100)
AFFINE_STAGE = dict(shrink=(2, 1), sigma=(1.0, 0.0), sampling=(0.5, 0.1), iterations=200)
MIN_EXTENT_MM = 40  # a scan thinner than this along any axis is not a head to register


@dataclass(frozen=True, eq=False)  # hashed by identity: one per (axis, min_foreground)
class Template:
    """The template's grid, its brain and the planes that are sliced.

    Attributes:
        image: float32 intensities on the template's grid.
        affine: voxel to world (mm) of the grid (RAS).
        brain: where the template has brain.
        positions: the planes along the slicing axis with at least ``min_foreground``
            brain: every scan gives these slices (int16, increasing, one run).
    """

    image: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    positions: np.ndarray
    axis: str

    @property
    def voxel_size(self) -> np.ndarray:
        """mm along each axis of the grid."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def planes(self, context: int = 0) -> tuple[int, int]:
        """``[first, stop)``: the planes resampled for a scan, the slab and ``context``
        planes on each side where the grid has them."""
        depth = self.image.shape[AXES[self.axis]]
        first = max(0, int(self.positions[0]) - context)
        return first, min(depth, int(self.positions[-1]) + 1 + context)

    def slab(self, volume: np.ndarray, planes: tuple[int, int]) -> np.ndarray:
        """The planes ``[first, stop)`` of a volume on the template's grid (a view)."""
        index = [slice(None)] * 3
        index[AXES[self.axis]] = slice(*planes)
        return volume[tuple(index)]

    def brain_slices(self, size: int) -> np.ndarray:
        """The brain cut at :attr:`positions` as the scans' slices are, uint8 ``(P, S, S)``."""
        return label_slices(
            self.brain.astype(np.uint8), self.positions, self.voxel_size, self.axis, size
        )

    def facts(self) -> dict:
        """What the store keeps about the template (its ``template`` attribute)."""
        return {
            "name": TEMPLATE_NAME,
            "file": f"nilearn/datasets/data/{TEMPLATE_FILE}",
            "shape": [int(n) for n in self.image.shape],
            "affine": self.affine.tolist(),
            "axis": self.axis,
            "slab": [int(self.positions[0]), int(self.positions[-1])],
        }


def template_path() -> Path:
    """The template file inside nilearn's installed wheel.

    Raises:
        InputError: nilearn (or SimpleITK) is not installed.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"--space mni needs nilearn's MNI152 template: {INSTALL}")
    if importlib.util.find_spec("SimpleITK") is None:
        raise InputError(f"--space mni needs SimpleITK: {INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / TEMPLATE_FILE
    if not path.is_file():
        raise InputError(f"{path}: nilearn's wheel lacks the MNI152 template; {INSTALL}")
    return path


@functools.lru_cache(maxsize=4)
def load_template(axis: str, min_foreground: float) -> Template:
    """The template, its brain (the voxels above 0, holes filled) and the planes kept.

    Raises:
        InputError: the template or SimpleITK is missing, or no plane has enough brain.
    """
    image = nib.load(template_path())
    data = np.asarray(image.dataobj, dtype=np.float32)
    brain = ndimage.binary_fill_holes(data > 0)
    along = AXES[axis]
    in_plane = tuple(a for a in range(3) if a != along)
    share = brain.sum(axis=in_plane) / (brain.shape[in_plane[0]] * brain.shape[in_plane[1]])
    positions = np.flatnonzero(share >= min_foreground).astype(np.int16)
    if positions.size == 0:
        raise InputError(
            f"--min-foreground {min_foreground}: no {axis} plane of the template has that much "
            f"brain (the most is {share.max():.1%})"
        )
    return Template(data, image.affine, brain, positions, axis)


@dataclass
class Registration:
    """A scan brought onto the template's grid.

    Attributes:
        to_template: world (mm) of the scan -> world of the template, 4 x 4.
        data: the bias-corrected intensities on the template's grid, planes ``planes``
            along the slicing axis.
        planes: ``[first, stop)``, see :meth:`Template.planes`.
        similarity: the correlation with the template over its brain in the slab.
    """

    to_template: np.ndarray
    data: np.ndarray
    planes: tuple[int, int]
    similarity: float


def register(volume, template: Template, context: int = 0) -> Registration:
    """Bias-correct a canonical volume and register it affinely to the template.

    Args:
        volume: a :class:`preprocess.volume.Volume`.
        template: from :func:`load_template`.
        context: planes to resample beyond each side of the slab (``--context``).

    Raises:
        ScanError: too thin to be a head, or the registration failed.
    """
    extent = np.array(volume.shape) * volume.voxel_size
    if extent.min() < MIN_EXTENT_MM:
        raise ScanError(
            f"cannot register a scan of {' x '.join(f'{e:g}' for e in extent)} mm to the "
            f"template: every side must be at least {MIN_EXTENT_MM} mm (a 3-D head)"
        )
    sitk = _simpleitk()
    work, work_affine = working_image(volume)
    moving, log_bias = _corrected(sitk, work, work_affine)
    try:
        to_scan = _fit(sitk, moving, template)
    except RuntimeError as exc:  # ITK's exceptions, e.g. no samples inside both images
        lines = str(exc).strip().splitlines()
        raise ScanError(f"registration failed ({lines[-1] if lines else 'ITK error'})") from exc
    planes = template.planes(context)
    data = _on_template(volume, log_bias, work_affine, to_scan, template, planes)
    similarity = _correlation(data, template, planes)
    return Registration(np.linalg.inv(to_scan), data, planes, similarity)


def moved(
    volume, to_template: np.ndarray, template: Template, planes, labels: bool = False
) -> np.ndarray:
    """Another image of the scan's session onto the template's grid with the scan's transform:
    a modality bias-corrected on its own (float32), or a label mask (uint8, nearest voxel).

    Args:
        volume: the image, in the scanner's world as the registered scan.
        to_template: the scan's :attr:`Registration.to_template`.
        planes: ``[first, stop)`` along the slicing axis.
        labels: a label mask: no bias correction, no interpolation between labels.
    """
    to_scan = np.linalg.inv(to_template)
    if labels:
        return onto_template(volume.voxels, volume.affine, to_scan, template, planes, order=0)
    sitk = _simpleitk()
    work, work_affine = working_image(volume)
    _, log_bias = _corrected(sitk, work, work_affine)
    return _on_template(volume, log_bias, work_affine, to_scan, template, planes)


def onto_template(
    voxels: np.ndarray,
    affine: np.ndarray,
    to_scan: np.ndarray,
    template: Template,
    planes: tuple[int, int],
    order: int,
) -> np.ndarray:
    """A volume resampled onto planes ``[first, stop)`` of the template's grid: ``order`` 1
    for intensities (float32), 0 for labels (their type); outside the volume, its minimum.

    Args:
        voxels: the volume.
        affine: its voxel-to-world.
        to_scan: template world -> the volume's world.
    """
    along = AXES[template.axis]
    shape = list(template.image.shape)
    shape[along] = planes[1] - planes[0]
    start = np.eye(4)
    start[along, 3] = planes[0]  # resampled voxel -> template voxel
    matrix = np.linalg.inv(affine) @ to_scan @ template.affine @ start
    return ndimage.affine_transform(
        voxels,
        matrix,
        output_shape=tuple(shape),
        order=order,
        mode="constant",
        cval=float(voxels.min()),
        output=np.float32 if order else voxels.dtype,
        prefilter=False,
    )


def from_template(
    maps: np.ndarray,
    planes: tuple[int, int],
    to_template: np.ndarray,
    template: Template,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    outside: np.ndarray,
) -> np.ndarray:
    """Maps on planes ``[first, stop)`` of the template's grid, back on a scan's own grid:
    the inverse of the registration and resampling (linear, per map).

    Args:
        maps: ``(x, y, planes, K)`` for axial slicing (the slab's planes along the axis).
        to_template: the scan's scanner world -> template world.
        affine: the scan's (canonical) voxel-to-world; ``shape`` its shape.
        outside: ``(K,)``, the value where the scan lies outside the slab.

    Returns:
        float32 ``(x, y, z, K)`` on the scan's grid.
    """
    start = np.eye(4)
    start[AXES[template.axis], 3] = planes[0]
    matrix = np.linalg.inv(template.affine @ start) @ to_template @ affine
    return np.stack(
        [
            ndimage.affine_transform(
                maps[..., k],
                matrix,
                output_shape=tuple(shape),
                order=1,
                mode="constant",
                cval=float(outside[k]),
                output=np.float32,
                prefilter=False,
            )
            for k in range(maps.shape[-1])
        ],
        axis=-1,
    )


def _on_template(volume, log_bias, work_affine, to_scan, template, planes) -> np.ndarray:
    """A volume's intensities on the template's planes, divided by its bias field."""
    sitk = _simpleitk()
    data = onto_template(volume.voxels, volume.affine, to_scan, template, planes, order=1)
    if volume.slope != 1:
        data *= np.float32(volume.slope)
    if volume.inter != 0:
        data += np.float32(volume.inter)
    bias = sitk.GetArrayFromImage(log_bias).transpose(2, 1, 0)
    data /= np.exp(onto_template(bias, work_affine, to_scan, template, planes, order=1))
    return data


def _correlation(data: np.ndarray, template: Template, planes) -> float:
    """Pearson correlation of a registered scan with the template over its brain, in the
    slab."""
    slab = (int(template.positions[0]) - planes[0], int(template.positions[-1]) + 1 - planes[0])
    brain = template.slab(template.slab(template.brain, planes), slab)
    a = template.slab(data, slab)[brain].astype(np.float64)
    b = template.slab(template.slab(template.image, planes), slab)[brain].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def working_image(volume) -> tuple[np.ndarray, np.ndarray]:
    """The volume's intensities averaged over blocks of about ``WORKING_MM``, and its affine."""
    factors = np.round(WORKING_MM / volume.voxel_size).astype(int)
    factors = np.clip(factors, 1, np.maximum(1, np.array(volume.shape) // 2))
    work = _block_mean(volume.voxels, factors) * np.float32(volume.slope)
    work += np.float32(volume.inter)
    return work, _block_affine(volume.affine, factors)


def _block_mean(data: np.ndarray, factors) -> np.ndarray:
    """float32 means over blocks of ``factors`` voxels (a partial block at the end is left out).

    >>> _block_mean(np.arange(8).reshape(2, 2, 2), (2, 1, 1)).tolist()
    [[[2.0, 3.0], [4.0, 5.0]]]
    """
    counts = np.array(data.shape) // factors
    cut = data[tuple(slice(0, n * f) for n, f in zip(counts, factors, strict=True))]
    shape = [size for pair in zip(counts, factors, strict=True) for size in pair]
    return cut.reshape(shape).mean(axis=(1, 3, 5), dtype=np.float32)


def _block_affine(affine: np.ndarray, factors) -> np.ndarray:
    """The voxel-to-world of :func:`_block_mean`'s output: a block's centre."""
    factors = np.asarray(factors, dtype=np.float64)
    result = affine.copy()
    result[:3, :3] = affine[:3, :3] * factors
    result[:3, 3] = affine[:3, :3] @ ((factors - 1) / 2) + affine[:3, 3]
    return result


def _simpleitk():
    """SimpleITK with one thread (set before import, and again after)."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise InputError(f"--space mni needs SimpleITK: {INSTALL}") from exc
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    return sitk


def _image(sitk, data: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of a RAS volume, in the same world coordinates (mm)."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    return image


def _corrected(sitk, work: np.ndarray, work_affine: np.ndarray):
    """``(corrected, log_bias)``: the working image divided by N4's bias field, and the
    field's log on the working grid (estimated on the foreground, shrunk to ~8 mm)."""
    moving = _image(sitk, work, work_affine)
    mask = _image(sitk, foreground(work).astype(np.uint8), work_affine)
    shrink = [min(N4_SHRINK, max(1, n // 4)) for n in moving.GetSize()]
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    corrector.Execute(sitk.Shrink(moving, shrink), sitk.Shrink(mask, shrink))
    log_bias = corrector.GetLogBiasFieldAsImage(moving)
    return sitk.Cast(moving / sitk.Exp(log_bias), sitk.sitkFloat32), log_bias


@functools.lru_cache(maxsize=4)
def _fixed(template: Template):
    """The template and its brain (dilated by ``BRAIN_MARGIN_MM``) as SimpleITK images on
    a ~2 mm grid."""
    sitk = _simpleitk()
    factors = np.maximum(1, np.round(WORKING_MM / template.voxel_size)).astype(int)
    image = _block_mean(template.image, factors)
    brain = _block_mean(template.brain, factors) > 0.5
    margin = max(1, round(BRAIN_MARGIN_MM / WORKING_MM))
    brain = ndimage.binary_dilation(brain, iterations=margin)
    affine = _block_affine(template.affine, factors)
    return _image(sitk, image, affine), _image(sitk, brain.astype(np.uint8), affine)


def _fit(sitk, moving, template: Template) -> np.ndarray:
    """Template world -> scan world, 4 x 4: similarity, then affine, from the centres of mass."""
    fixed, brain = _fixed(template)
    similarity = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    _stage(sitk, fixed, brain, moving, similarity, **SIMILARITY_STAGE)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    _stage(sitk, fixed, brain, moving, affine, **AFFINE_STAGE)
    matrix = np.array(affine.GetMatrix()).reshape(3, 3)
    centre = np.array(affine.GetCenter())
    result = np.eye(4)
    result[:3, :3] = matrix
    result[:3, 3] = np.array(affine.GetTranslation()) + centre - matrix @ centre
    if not np.all(np.isfinite(result)) or abs(np.linalg.det(matrix)) < 1e-3:
        raise ScanError("registration failed (a degenerate transform)")
    return result


def _stage(sitk, fixed, brain, moving, transform, shrink, sigma, sampling, iterations) -> None:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(list(sampling), SAMPLING_SEED)
    method.SetMetricFixedMask(brain)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, iterations, relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(sigma))
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
