"""DICOM series written by the tests from volumes, with pydicom: one file per slice (MR Image
Storage) or one enhanced multi-frame file, plain or JPEG-LS lossless, and the identifying
values each carries (so a test can look for them in a store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"  # a structured report: no image
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI's RAS world to DICOM's LPS


def patient(number: int) -> dict[str, str]:
    """The identifying values of a made-up patient: what must never reach a store."""
    return {
        "PatientName": f"Doe^Jane{number}^Q",
        "PatientID": f"MRN{number:05d}7731",
        "PatientBirthDate": f"19{(50 + number) % 100:02d}0314",
        "PatientAddress": f"{number} Elm Street, Springfield",
        "InstitutionName": "Springfield General",
        "ReferringPhysicianName": "House^Gregory",
        "AccessionNumber": f"ACC{number:06d}",
        "OtherPatientIDs": f"OTH{number:04d}",
    }


def _geometry(affine: np.ndarray, k: int) -> tuple[list, list, list]:
    """Position (of slice ``k``'s first pixel), orientation and pixel spacing in LPS."""
    columns_dir = LPS @ affine[:3, 0]  # along a row of the pixel array: voxel axis i
    rows_dir = LPS @ affine[:3, 1]  # down a column: voxel axis j
    spacing = [float(np.linalg.norm(rows_dir)), float(np.linalg.norm(columns_dir))]
    orientation = [*(columns_dir / spacing[1]), *(rows_dir / spacing[0])]
    position = LPS @ (affine[:3, :3] @ [0, 0, k] + affine[:3, 3])
    return [float(v) for v in position], [round(float(v), 8) for v in orientation], spacing


def _base(
    who: dict, study: str, series: str, number: int, description: str, sop_class: str
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.Modality = "MR"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.PatientPosition = "HFS"
    ds.MagneticFieldStrength = 3
    for key, value in who.items():
        setattr(ds, key, value)
    ds.PatientSex = "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyDate, ds.StudyTime, ds.SeriesDate = "20240102", "101500", "20240102"
    ds.StudyID = "1"
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesNumber = number
    ds.SeriesDescription = ds.ProtocolName = description
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = 2.3, 2300, 9
    return ds


def write_series(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    who: dict,
    study: str | None = None,
    number: int = 3,
    description: str = "t1_mprage_sag",
    skip: tuple[int, ...] = (),
    compressed: bool = False,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    names: str = "IM{:04d}",
    timing: tuple[float, float, float] | None = None,
) -> str:
    """One file per slice (along voxel axis k) of an int16 volume; returns the study UID.

    Args:
        skip: slices left out (a missing file).
        compressed: JPEG-LS lossless pixel data.
        names: file names by instance number (no ``.dcm``, as scanners write them).
        timing: echo time, repetition time (ms) and flip angle; a T1's by default.
    """
    study = study or generate_uid()
    series = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    values = np.asarray(data, dtype=np.int16)
    for k in range(values.shape[2]):
        if k in skip:
            continue
        ds = _slice(_base(who, study, series, number, description, MR_IMAGE), affine, k)
        ds.InstanceNumber = k + 1
        ds.ImageType = list(image_type)
        if timing is not None:
            ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = timing
        pixels = _pixels(ds, values[:, :, k])
        if compressed:
            ds.compress(JPEGLSLossless, pixels)
        ds.save_as(folder / names.format(k + 1), enforce_file_format=True)
    return study


def _slice(ds: Dataset, affine: np.ndarray, k: int) -> Dataset:
    """``ds`` as slice ``k`` of a volume on ``affine``: a new instance, placed."""
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    position, orientation, spacing = _geometry(affine, k)
    ds.ImagePositionPatient, ds.ImageOrientationPatient = position, orientation
    ds.PixelSpacing = spacing
    ds.SliceThickness = float(np.linalg.norm(affine[:3, 2]))
    return ds


def _pixels(ds: Dataset, plane: np.ndarray) -> np.ndarray:
    """A slice's pixel data (rows along voxel axis j, columns along i); returns the pixels."""
    pixels = np.ascontiguousarray(plane.T)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return pixels


def write_volumes(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    who: dict,
    study: str | None = None,
    number: int = 6,
    description: str = "Axial",
    bvalues: tuple[float, ...] = (),
    timing: tuple[float, float] = (90.0, 8000.0),
    sequence: str = "EP",
) -> str:
    """A 4-D series (volumes along the last axis of ``data``), one file per slice of each
    volume, as diffusion and fMRI series are written; returns the study UID.

    Args:
        bvalues: one per volume, in the standard DiffusionBValue tag (a diffusion series).
        timing: echo and repetition times in ms.
        sequence: ScanningSequence (``EP``: echo-planar).
    """
    study = study or generate_uid()
    series = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    values = np.asarray(data, dtype=np.int16)
    slices, volumes = values.shape[2:]
    for volume in range(volumes):
        for k in range(slices):
            ds = _slice(_base(who, study, series, number, description, MR_IMAGE), affine, k)
            ds.InstanceNumber = volume * slices + k + 1
            ds.AcquisitionNumber = ds.TemporalPositionIdentifier = volume + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = *timing, 90
            ds.ScanningSequence = sequence
            if bvalues:
                ds.DiffusionBValue = float(bvalues[volume])
                ds.DiffusionGradientOrientation = [1.0, 0.0, 0.0]
            _pixels(ds, values[:, :, k, volume])
            ds.save_as(folder / f"IM{ds.InstanceNumber:04d}", enforce_file_format=True)
    return study


def write_enhanced(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    who: dict,
    study: str | None = None,
    number: int = 5,
    description: str = "t1_mprage_enhanced",
) -> str:
    """The volume as one enhanced multi-frame MR file; returns the study UID."""
    study = study or generate_uid()
    ds = _base(who, study, generate_uid(), number, description, ENHANCED_MR_IMAGE)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ContentQualification = "PRODUCT"
    values = np.asarray(data, dtype=np.int16)
    frames = values.shape[2]
    _, orientation, spacing = _geometry(affine, 0)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = spacing
    measures.SliceThickness = float(np.linalg.norm(affine[:3, 2]))
    shared.PixelMeasuresSequence = Sequence([measures])
    plane = Dataset()
    plane.ImageOrientationPatient = orientation
    shared.PlaneOrientationSequence = Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(frames):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = _geometry(affine, k)[0]
        item.PlanePositionSequence = Sequence([position])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        content.DimensionIndexValues = [1, k + 1]
        item.FrameContentSequence = Sequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = frames
    pixels = np.ascontiguousarray(values.transpose(2, 1, 0))  # frames, rows (j), columns (i)
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return study


def write_report(path: Path, who: dict, study: str, number: int = 99) -> None:
    """A DICOM file holding no image, as the protocol report (Siemens' PhoenixZIPReport,
    an enhanced structured report) an exam's export carries beside its series."""
    ds = _base(who, study, generate_uid(), number, "PhoenixZIPReport", ENHANCED_SR)
    ds.Modality = "SR"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 1
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
