"""Standard space: a scan bias-corrected (N4) and affinely registered to an MNI152 head.

Every scan is registered to a template **with skull**, FSL's MNI152 6th generation
(``MNI152NLin6Asym``, 2 mm, from the files inside nimare's wheel, found without importing
nimare): a head with skull, face and neck does not fit a brain-only template, and a
registration onto one misplaced real heads by 15-38 mm. SimpleITK does the work, with one
thread and a fixed sampling seed, so a scan gives the same numbers in any process:

1. the scan, averaged over blocks to ~2 mm, is the *working image*;
2. N4 estimates a smooth bias field on it, shrunk again to ~12 mm, and the working image
   is divided by it;
3. the neck is cut off: only the top ``HEAD_MM`` of the head is registered (as FSL's
   ``robustfov``), so a long neck or shoulders do not pull the start down;
4. a similarity transform (7 parameters) from the centres of mass, then an affine one (12),
   are fitted by Mattes mutual information sampled inside the template's head (dilated by
   4 mm), at 8 and 4 mm then 4 and 2 mm (the levels at 8 and 4 mm on the head averaged
   to 4 mm);
5. the scan (and the bias field) are resampled once onto the 1 mm grid of the store's
   template (:data:`TEMPLATES`), only the planes of the slab.
6. the result's *similarity* is the correlation ratio of the template on the scan inside
   the template's brain (:func:`correlation_ratio`): how well the scan's intensities, through any
   mapping, predict the template's; so a T2w, PD or FLAIR scan is judged as a T1w is;
7. where the similarity ends below :data:`CHECK_FLOOR`, steps 4-6 start again from the scan
   turned (a head on a side, prone or bent whose header does not say so): each of
   :data:`TURNS` is screened by its similarity stage alone, the :data:`TURNS_FITTED` most
   promising are fitted whole, and the most similar result is kept.

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

INSTALL = (
    "pip install 'slicestore[mni]' (SimpleITK, and the MNI152 templates of nimare and nilearn)"
)


@dataclass(frozen=True)
class TemplateFiles:
    """Where a template's files are: a folder inside an installed package's wheel."""

    package: str
    folder: str
    image: str  # the 1 mm T1 whose grid the slices are cut from
    brain: str | None  # its brain mask; None: the image is skull-stripped (brain = above 0)
    licence: str

    def path(self, name: str) -> Path:
        """A file of the template, inside its package.

        Raises:
            InputError: the package (or SimpleITK) is not installed, or lacks the file.
        """
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"--space mni needs {self.package}'s MNI152 template: {INSTALL}")
        if importlib.util.find_spec("SimpleITK") is None:
            raise InputError(f"--space mni needs SimpleITK: {INSTALL}")
        path = Path(spec.submodule_search_locations[0], self.folder, name)
        if not path.is_file():
            raise InputError(f"{path}: {self.package}'s wheel lacks the template; {INSTALL}")
        return path


NIMARE = dict(package="nimare", folder="resources/templates", licence="FSL's MNI152 licence")
# The templates a store's slices can be cut from, by the name the store keeps.
TEMPLATES = {
    # FSL's MNI152 6th generation (FSL, fMRIPrep), with skull: the default since 2026-12
    "MNI152NLin6Asym": TemplateFiles(
        image="tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
        brain="tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
        **NIMARE,
    ),
    # the 2009a symmetric template inside nilearn's wheel, brain only: stores written before
    # (their runs still predict); its world agrees with MNI152NLin6Asym's to 1.3 mm (mean over
    # the brain; 2.2 mm worst), so a scan registered to the head below is resampled onto it
    # as it is
    "MNI152NLin2009aSym": TemplateFiles(
        "nilearn",
        "datasets/data",
        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        None,
        "the ICBM 2009a licence (copy with notice)",
    ),
}
TEMPLATE_NAME = "MNI152NLin6Asym"  # of new stores
OLD_TEMPLATE = "MNI152NLin2009aSym"  # of standard-space stores whose config names none
HEAD = TEMPLATES["MNI152NLin6Asym"], "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz"  # registered to

WORKING_MM = 2.0  # the working image's voxels
N4_SHRINK = 6  # N4 runs on the working image shrunk this much (~12 mm)
N4_ITERATIONS = (50, 50)
HEAD_MM = 170  # the top of a head that is registered (robustfov's 170 mm): no neck
HEAD_MARGIN_MM = 4  # the metric's mask: the template's head dilated this much
SAMPLING_SEED = 1  # the metric's random sampling (SimpleITK's 0 would mean the clock)
# step: the optimiser's first step (mm); the affine stage starts where the similarity one
# ended, and a shorter first step keeps it from wandering (up to 200 iterations, measured).
# Its two levels run apart: the one at 4 mm reads the head averaged to 4 mm, as the
# similarity stage does (see _fit).
SIMILARITY_STAGE = dict(
    shrink=(4, 2), sigma=(2.0, 1.0), sampling=(0.5, 0.25), iterations=60, step=1.0
)
AFFINE_COARSE = dict(shrink=(2,), sigma=(1.0,), sampling=(0.2,), iterations=200, step=0.5)
AFFINE_FINE = dict(shrink=(1,), sigma=(0.0,), sampling=(0.05,), iterations=200, step=0.5)
MIN_STEP_MM = 0.01  # a stage's level ends when the optimiser's step is this small
MIN_EXTENT_MM = 40  # a scan thinner than this along any axis is not a head to register

# A registration is listed for checking when its similarity (see correlation_ratio()) is
# below this. Measured on 8 real scans of T1w, T2w and PD contrast and moved copies of them
# (scripts/README.md, "Standard space on real heads"): correct registrations 0.41-0.67, the
# scans' reference registrations 6 mm off 0.29-0.52, 9 mm off 0.21-0.44, 12 mm off
# 0.16-0.38, a start turned the wrong way 0.18-0.33. It is not relative to the run's other
# scans: correct ones differ by as much as a failure's margin would.
CHECK_FLOOR = 0.40
SIMILARITY_BINS = 64  # the scan's intensities in this many bins of equal count
# What /subjects/similarity holds, as the store's template attribute says (see loader.schema)
SIMILARITY_MEASURE = "correlation ratio"


def check_line(source: str, similarity: float) -> str:
    """The line that lists a registration below :data:`CHECK_FLOOR` for a look (preprocess's
    summary, predict's warnings).

    >>> check_line("sub-07/anat/sub-07_T1w.nii.gz", 0.213)
    'check registration: sub-07/anat/sub-07_T1w.nii.gz (similarity 0.21)'
    """
    return f"check registration: {source} (similarity {similarity:.2f})"


def _turn(axis: int, degrees: int) -> np.ndarray:
    """A rotation matrix about one axis of the world."""
    i, j = [k for k in range(3) if k != axis]
    c, s = round(np.cos(np.radians(degrees))), round(np.sin(np.radians(degrees)))
    result = np.eye(3)
    result[i, i], result[i, j], result[j, i], result[j, j] = c, -s, s, c
    return result


# Where a registration from the centres of mass ends below CHECK_FLOOR, it starts again from
# the head turned by each of these (a header that does not say the patient lay on a side,
# prone, or with the head bent), and the most similar result is kept.
TURNS = (
    _turn(2, 90), _turn(2, -90), _turn(2, 180), _turn(0, 90), _turn(0, -90), _turn(1, 90),
    _turn(1, -90),
)  # fmt: skip
# Of the turned starts, only the most promising few are fitted whole (see register): the one
# that lands came first in every turned, prone and bent copy of 4 real scans of three
# contrasts (scripts/README.md, "Standard space on real heads").
TURNS_FITTED = 2


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
    name: str = TEMPLATE_NAME

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
        files = TEMPLATES[self.name]
        return {
            "name": self.name,
            "file": f"{files.package}/{files.folder}/{files.image}",
            "registered_to": f"{HEAD[0].package}/{HEAD[0].folder}/{HEAD[1]}",
            "shape": [int(n) for n in self.image.shape],
            "affine": self.affine.tolist(),
            "axis": self.axis,
            "slab": [int(self.positions[0]), int(self.positions[-1])],
            "similarity": SIMILARITY_MEASURE,
        }


def template_path(name: str = TEMPLATE_NAME) -> Path:
    """The 1 mm image of a template, inside its package's installed wheel.

    Raises:
        InputError: the package or SimpleITK is not installed.
    """
    return TEMPLATES[name].path(TEMPLATES[name].image)


@functools.lru_cache(maxsize=4)
def load_template(axis: str, min_foreground: float, name: str = TEMPLATE_NAME) -> Template:
    """A template, its brain (its mask, else the voxels above 0, holes filled) and the
    planes kept.

    Raises:
        InputError: the template or SimpleITK is missing, or no plane has enough brain.
    """
    files = TEMPLATES[name]
    image = nib.load(files.path(files.image))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if files.brain is None:
        brain = ndimage.binary_fill_holes(data > 0)
    else:
        brain = np.asarray(nib.load(files.path(files.brain)).dataobj) > 0
    along = AXES[axis]
    in_plane = tuple(a for a in range(3) if a != along)
    share = brain.sum(axis=in_plane) / (brain.shape[in_plane[0]] * brain.shape[in_plane[1]])
    positions = np.flatnonzero(share >= min_foreground).astype(np.int16)
    if positions.size == 0:
        raise InputError(
            f"--min-foreground {min_foreground}: no {axis} plane of the template has that much "
            f"brain (the most is {share.max():.1%})"
        )
    return Template(data, image.affine, brain, positions, axis, name)


@dataclass
class Registration:
    """A scan brought onto the template's grid.

    Attributes:
        to_template: world (mm) of the scan -> world of the template, 4 x 4.
        data: the bias-corrected intensities on the template's grid, planes ``planes``
            along the slicing axis.
        planes: ``[first, stop)``, see :meth:`Template.planes`.
        similarity: :func:`similarity_to_template` of ``data``, 0 to 1.
    """

    to_template: np.ndarray
    data: np.ndarray
    planes: tuple[int, int]
    similarity: float


def register(volume, template: Template, context: int = 0) -> Registration:
    """Bias-correct a canonical volume, register it affinely to the MNI152 head (:data:`HEAD`)
    and resample it onto the template's grid; below :data:`CHECK_FLOOR`, again from the
    :data:`TURNS_FITTED` most promising of :data:`TURNS`, keeping the most similar.

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
    planes = template.planes(context)

    def registered(turn: np.ndarray) -> Registration:
        to_scan = _fit(sitk, moving, work_affine, turn)
        data = _on_template(volume, log_bias, work_affine, to_scan, template, planes)
        similarity = similarity_to_template(data, template, planes)
        return Registration(np.linalg.inv(to_scan), data, planes, similarity)

    try:
        best = registered(np.eye(3))
        if best.similarity >= CHECK_FLOOR:
            return best
        # the turned starts, the most promising first: by the mutual information their
        # similarity stage reaches (~0.5 s each, a whole fit 1-4 s)
        screened = sorted(TURNS, key=lambda turn: _screen(sitk, moving, work_affine, turn))
        for turn in screened[:TURNS_FITTED]:
            candidate = registered(turn)
            if candidate.similarity > best.similarity:
                best = candidate
            if best.similarity >= CHECK_FLOOR:
                break
    except RuntimeError as exc:  # ITK's exceptions, e.g. no samples inside both images
        lines = str(exc).strip().splitlines()
        raise ScanError(f"registration failed ({lines[-1] if lines else 'ITK error'})") from exc
    return best


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
    step: int = 1,
    mode: str = "constant",
) -> np.ndarray:
    """A volume resampled onto planes ``[first, stop)`` of the template's grid: ``order`` 1
    for intensities (float32), 0 for labels (their type); outside the volume, its minimum.

    Args:
        voxels: the volume.
        affine: its voxel-to-world.
        to_scan: template world -> the volume's world.
        step: resample every ``step``-th voxel along each axis (at the centre of each block
            of ``step`` voxels), for the caller to repeat: ``ceil(shape / step)`` voxels.
        mode: outside the volume: ``"constant"`` (its minimum) or ``"nearest"`` (the
            nearest voxel's value, for a smooth field).
    """
    along = AXES[template.axis]
    shape = list(template.image.shape)
    shape[along] = planes[1] - planes[0]
    start = np.diag([step, step, step, 1.0])
    start[:3, 3] = (step - 1) / 2
    start[along, 3] += planes[0]  # resampled voxel -> template voxel
    shape = [-(-n // step) for n in shape]
    matrix = np.linalg.inv(affine) @ to_scan @ template.affine @ start
    return ndimage.affine_transform(
        np.ascontiguousarray(voxels),  # a NIfTI's Fortran order: 3.5x slower to resample
        matrix,
        output_shape=tuple(shape),
        order=order,
        mode=mode,
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
    # The bias field is smooth (N4's B-spline), and goes on smoothly past the working grid's
    # edge. Resampled at every other voxel and repeated in blocks of 2 x 2 x 2, it differs
    # from the field resampled at every voxel by under 0.3 % (measured on the real heads and
    # make_heads'), below a uint8 step, in a fifth of the time.
    bias = sitk.GetArrayFromImage(log_bias).transpose(2, 1, 0)
    coarse = onto_template(bias, work_affine, to_scan, template, planes, 1, 2, "nearest")
    coarse = np.exp(-coarse)
    for axis in range(3):
        coarse = np.repeat(coarse, 2, axis=axis)
    data *= coarse[: data.shape[0], : data.shape[1], : data.shape[2]]
    return data


def similarity_to_template(data: np.ndarray, template: Template, planes) -> float:
    """The registered scan's :func:`correlation_ratio` with the template over the template's
    brain, in the slab."""
    slab = (int(template.positions[0]) - planes[0], int(template.positions[-1]) + 1 - planes[0])
    brain = template.slab(template.slab(template.brain, planes), slab)
    reference = template.slab(template.slab(template.image, planes), slab)[brain]
    return correlation_ratio(template.slab(data, slab)[brain], reference)


def correlation_ratio(scan: np.ndarray, reference: np.ndarray) -> float:
    """How much of the reference's variance the scan's intensities explain, through any
    mapping: the square root of 1 - (variance of the reference within bins of the scan's
    intensity) / (its whole variance), with :data:`SIMILARITY_BINS` bins of equal count
    (Roche et al., 1998; FSL FLIRT's default cost). 1 when the scan determines the reference,
    0 when it says nothing of it; unlike a correlation, the same for a T1w and for the same
    anatomy in a T2w, PD or FLAIR contrast.

    >>> scan = np.linspace(0.0, 1.0, 100_000)
    >>> round(correlation_ratio(scan, scan), 2)  # the same image
    1.0
    >>> folded = (scan - 0.5) ** 2  # a contrast the scan determines, not correlated with it
    >>> abs(round(float(np.corrcoef(scan, folded)[0, 1]), 2))
    0.0
    >>> round(correlation_ratio(scan, folded), 2)
    1.0
    >>> round(correlation_ratio(np.random.default_rng(0).random(100_000), scan), 2)  # noise
    0.03
    """
    scan = np.asarray(scan)
    reference = np.asarray(reference, dtype=np.float64)
    if scan.size == 0:
        return 0.0
    # the bins' edges from every 8th value: as good as from all, an eighth of the sorting
    edges = np.quantile(scan[::8], np.linspace(0.0, 1.0, SIMILARITY_BINS + 1)[1:-1])
    bins = np.searchsorted(edges.astype(scan.dtype), scan)
    count = np.bincount(bins, minlength=SIMILARITY_BINS)
    total = np.bincount(bins, reference, SIMILARITY_BINS)
    squares = np.bincount(bins, reference * reference, SIMILARITY_BINS)
    within = float((squares - total * total / np.maximum(count, 1)).sum())
    whole = float(((reference - reference.mean()) ** 2).sum())
    return float(np.sqrt(max(0.0, 1.0 - within / whole))) if whole > 0 else 0.0


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
    field's log on the working grid (estimated on the foreground, shrunk to ~12 mm)."""
    moving = _image(sitk, work, work_affine)
    mask = _image(sitk, foreground(work).astype(np.uint8), work_affine)
    shrink = [min(N4_SHRINK, max(1, n // 4)) for n in moving.GetSize()]
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    corrector.Execute(sitk.Shrink(moving, shrink), sitk.Shrink(mask, shrink))
    log_bias = corrector.GetLogBiasFieldAsImage(moving)
    return sitk.Cast(moving / sitk.Exp(log_bias), sitk.sitkFloat32), log_bias


@functools.lru_cache(maxsize=1)
def _head():
    """The head every scan is registered to, and where the metric samples it (the head,
    dilated by ``HEAD_MARGIN_MM``), as SimpleITK images on its 2 mm grid."""
    sitk = _simpleitk()
    files, name = HEAD
    image = nib.load(files.path(name))
    data = np.asarray(image.dataobj, dtype=np.float32)
    spacing = float(np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0)).min())
    head = ndimage.binary_fill_holes(foreground(data))
    head = ndimage.binary_dilation(head, iterations=max(1, round(HEAD_MARGIN_MM / spacing)))
    return _image(sitk, data, image.affine), _image(sitk, head.astype(np.uint8), image.affine)


def top_of_head(work: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The working image's planes in the top ``HEAD_MM`` of its foreground along the
    superior axis (a view), and their affine: the neck and shoulders cut off.

    >>> head = np.zeros((4, 4, 100), np.float32); head[1:3, 1:3, :90] = 1
    >>> top, affine = top_of_head(head, np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> top.shape, float(affine[2, 3])  # planes 5 to 99: the 85 planes of 2 mm up to the top
    ((4, 4, 95), 10.0)
    """
    planes = np.flatnonzero(foreground(work).any(axis=(0, 1)))
    if planes.size == 0:
        return work, affine
    keep = round(HEAD_MM / float(np.linalg.norm(affine[:3, 2])))
    first = max(0, int(planes[-1]) + 1 - keep)
    result = affine.copy()
    result[:3, 3] += affine[:3, 2] * first
    return work[:, :, first:], result


def _start(sitk, moving, work_affine, turn: np.ndarray):
    """``(head, coarse, similarity, turned)``: the top of the head as a SimpleITK image placed
    turned by ``turn`` (3 x 3) about its centre, the same averaged to ~4 mm, the similarity
    transform from the centres of mass, and the turn as a 4 x 4 map."""
    fixed, _ = _head()
    work = sitk.GetArrayFromImage(moving).transpose(2, 1, 0)
    top, top_affine = top_of_head(work, work_affine)
    turned = np.eye(4)  # the scan turned about its centre: no rotation the optimiser must make
    centre = top_affine @ np.r_[(np.array(top.shape) - 1) / 2, 1]
    turned[:3, :3], turned[:3, 3] = turn, centre[:3] - turn @ centre[:3]
    head = _image(sitk, top, turned @ top_affine)
    similarity = sitk.CenteredTransformInitializer(
        fixed, head, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    # The levels at 8 and 4 mm read the head averaged to ~4 mm: each level's gradient image
    # of it costs an eighth (measured: 2.5-4 s a real scan less, as accurate).
    factors = np.minimum(2, np.array(top.shape) // 8).clip(1)
    coarse = _image(sitk, _block_mean(top, factors), _block_affine(turned @ top_affine, factors))
    return head, coarse, similarity, turned


def _screen(sitk, moving, work_affine, turn: np.ndarray) -> float:
    """How promising a start turned by ``turn`` is: the metric (minus Mattes mutual
    information, lower is better) at the end of its similarity stage alone; infinite where
    ITK cannot fit it (e.g. no samples inside both images), so it comes last."""
    fixed, mask = _head()
    _, coarse, similarity, _ = _start(sitk, moving, work_affine, turn)
    try:
        return _stage(sitk, fixed, mask, coarse, similarity, **SIMILARITY_STAGE)
    except RuntimeError:
        return float("inf")


def _fit(sitk, moving, work_affine, turn: np.ndarray | None = None) -> np.ndarray:
    """Template world -> scan world, 4 x 4: the top of the head registered to the template's
    head, similarity then affine, from the centres of mass (and the head turned by ``turn``
    about its centre, 3 x 3)."""
    fixed, mask = _head()
    head, coarse, similarity, turned = _start(
        sitk, moving, work_affine, np.eye(3) if turn is None else turn
    )
    _stage(sitk, fixed, mask, coarse, similarity, **SIMILARITY_STAGE)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    _stage(sitk, fixed, mask, coarse, affine, **AFFINE_COARSE)
    _stage(sitk, fixed, mask, head, affine, **AFFINE_FINE)
    matrix = np.array(affine.GetMatrix()).reshape(3, 3)
    centre = np.array(affine.GetCenter())
    result = np.eye(4)
    result[:3, :3] = matrix
    result[:3, 3] = np.array(affine.GetTranslation()) + centre - matrix @ centre
    if not np.all(np.isfinite(result)) or abs(np.linalg.det(matrix)) < 1e-3:
        raise ScanError("registration failed (a degenerate transform)")
    return np.linalg.inv(turned) @ result


def _stage(sitk, fixed, head, moving, transform, shrink, sigma, sampling, iterations, step):
    """Fit ``transform`` in place; the metric's last value."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(list(sampling), SAMPLING_SEED)
    method.SetMetricFixedMask(head)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        step, MIN_STEP_MM, iterations, relaxationFactor=0.5
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(sigma))
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return method.GetMetricValue()
