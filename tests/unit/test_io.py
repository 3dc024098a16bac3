"""Readers on the real shared data, the formats' geometry, and every bad input named in the issue."""

from __future__ import annotations

import csv
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from common.io import CTReadError, CTReader, read_ct, read_dicom_series, read_rtstruct, scan_dicom_folder
from common.lungmask import hu_threshold_lung_mask
from tests.conftest import DEEPLESION, LIDC_DIR, TOTALSEG_B, sorted_by_position

# --------------------------------------------------------------------------- DICOM


@pytest.fixture(scope="module")
def lidc():
    return read_ct(LIDC_DIR)


def test_lidc_series_geometry_and_hu(lidc):
    assert lidc.shape == (512, 512, 133)
    assert lidc.spacing == pytest.approx((0.859375, 0.859375, 2.5), abs=1e-4)
    assert lidc.meta["modality"] == "CT" and lidc.meta["format"] == "dicom"
    positions = np.asarray(lidc.meta["slice_positions_mm"])
    assert np.all(np.diff(positions) > 0), "slices must be sorted by position, not by file name"
    lungs = hu_threshold_lung_mask(lidc.hu, lidc.spacing)
    assert lungs.sum() * lidc.voxel_volume_ml > 3000  # an adult's two lungs
    assert np.median(lidc.hu[lungs]) < -500  # lungs below -500 HU


def test_lidc_matches_simpleitk(lidc):
    """An independent reader (ITK/GDCM) must give the same voxels and world geometry."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(LIDC_DIR)))
    img = reader.Execute()
    ref = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    assert np.array_equal(ref.astype(np.float32), lidc.hu)
    # ITK's origin is LPS: the RAS affine's translation is it with x and y negated.
    assert lidc.affine[:3, 3] == pytest.approx(np.asarray(img.GetOrigin()) * [-1, -1, 1])
    assert lidc.spacing == pytest.approx(img.GetSpacing())


def test_slices_sorted_by_position_not_name(lidc_subset):
    files = sorted_by_position(lidc_subset)
    # Rename so that the file-name order is the reverse of the anatomical order.
    for n, f in enumerate(reversed(files)):
        f.rename(lidc_subset / f"slice_{n:03d}.dcm")
    vol = read_ct(lidc_subset)
    assert np.all(np.diff(vol.meta["slice_positions_mm"]) > 0)
    first = pydicom.dcmread(lidc_subset / "slice_011.dcm")  # lowest z after the renaming
    assert np.array_equal(
        vol.hu[:, :, 0],
        (first.pixel_array.T * float(first.RescaleSlope) + float(first.RescaleIntercept)).astype(np.float32),
    )


def test_rescale_slope_and_intercept_applied(lidc_subset):
    files = sorted_by_position(lidc_subset)
    before = read_ct(lidc_subset).hu.copy()
    ds = pydicom.dcmread(files[3])
    stored = ds.pixel_array.astype(np.int32)
    # Same HU, stored with slope 2 and another intercept: HU = 2 * P' - 2048.
    new = ((stored - 1024 + 2048) // 2).astype(np.int16)
    ds.PixelData = new.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -2048
    ds.save_as(files[3])
    after = read_ct(lidc_subset)
    assert np.abs(after.hu[:, :, 3] - before[:, :, 3]).max() <= 1.0
    assert np.array_equal(after.hu[:, :, 4], before[:, :, 4])
    assert after.meta["rescale_slopes"] == [1.0, 2.0]


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_series_reads_the_same_hu(lidc_subset, syntax):
    import pydicom.uid

    before = read_ct(lidc_subset)
    for f in lidc_subset.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.compress(getattr(pydicom.uid, syntax))
        ds.save_as(f)
    assert pydicom.dcmread(next(lidc_subset.glob("*.dcm"))).file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    after = read_ct(lidc_subset)
    assert np.array_equal(after.hu, before.hu) and np.allclose(after.affine, before.affine)


def _copy_as_new_series(src, dst, description="second series"):
    dst.mkdir()
    uid = generate_uid()
    for f in src.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesDescription = uid, generate_uid(), description
        ds.save_as(dst / f"b_{f.name}")
    return uid


def test_mixed_series_are_split_and_named(lidc_subset, tmp_path):
    uid2 = _copy_as_new_series(lidc_subset, tmp_path / "b")
    for f in (tmp_path / "b").iterdir():
        shutil.move(str(f), lidc_subset / f.name)
    scan = scan_dicom_folder(lidc_subset)
    assert len(scan.series) == 2 and all(len(s) == 12 for s in scan.series.values())
    with pytest.raises(CTReadError, match="2 series in one folder") as err:
        read_ct(lidc_subset)
    assert str(lidc_subset) in str(err.value) and uid2 in str(err.value)
    vol = read_dicom_series(lidc_subset, series_uid=uid2)
    assert vol.shape == (512, 512, 12) and vol.meta["series_uid"] == uid2


def test_truncated_dicom_names_the_file(lidc_subset):
    victim = sorted_by_position(lidc_subset)[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CTReadError) as err:
        read_ct(lidc_subset)
    assert victim.name in str(err.value) and "truncated" in str(err.value)


def test_garbage_dcm_is_listed_not_fatal(lidc_subset):
    (lidc_subset / "garbage.dcm").write_bytes(b"this is not dicom" * 10)
    scan = scan_dicom_folder(lidc_subset)
    assert [p.name for p in scan.unreadable] == ["garbage.dcm"]
    assert read_ct(lidc_subset).shape[2] == 12  # the series itself still reads


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no scans here")
    with pytest.raises(CTReadError, match="no images") as err:
        read_ct(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_only_corrupt_dicom_in_folder(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(CTReadError, match="no DICOM images found.*a.dcm"):
        read_ct(tmp_path)


# --------------------------------------------------------------------------- RTSTRUCT


def _rtstruct(ct_folder, out, frame_uid, contours_by_roi):
    """A minimal RTSTRUCT: {roi_name: [list of (N, 3) LPS point arrays]}."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.Modality, ds.SOPClassUID, ds.SOPInstanceUID = (
        "RTSTRUCT",
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.SeriesInstanceUID = generate_uid()
    rois, roi_contours = [], []
    for number, (name, polygons) in enumerate(contours_by_roi.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame_uid
        rois.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        seq = []
        for pts in polygons:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.3f}" for v in np.asarray(pts).ravel()]
            seq.append(c)
        rc.ContourSequence = Sequence(seq)
        roi_contours.append(rc)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.save_as(out, enforce_file_format=True)
    return out


def _rectangle(x0, y0, x1, y1, z):
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=float)


def test_rtstruct_rasterised_on_ct_grid(lidc_subset, tmp_path):
    ct = read_ct(lidc_subset)
    z = ct.meta["slice_positions_mm"][5]
    frame = ct.meta["frame_of_reference_uid"]
    # A 40 x 30 mm rectangle with a 10 x 10 mm hole, and a second ROI on another slice (LPS mm).
    rs = _rtstruct(
        lidc_subset,
        tmp_path / "rs.dcm",
        frame,
        {
            "tumour": [_rectangle(-50, -20, -10, 10, z), _rectangle(-35, -10, -25, 0, z)],
            "node": [_rectangle(20, 20, 30, 30, ct.meta["slice_positions_mm"][8])],
        },
    )
    masks = read_rtstruct(rs, ct)
    assert set(masks) == {"tumour", "node"}
    tumour = masks["tumour"]
    assert tumour.shape == ct.shape and tumour[:, :, 5].any() and tumour.sum() == tumour[:, :, 5].sum()
    pixel_mm2 = ct.spacing[0] * ct.spacing[1]
    assert tumour.sum() * pixel_mm2 == pytest.approx(40 * 30 - 10 * 10, rel=0.08)
    # The hole's centre (LPS -30, -5) must be empty, the ring around it filled.
    inv = np.linalg.inv(ct.affine)
    i, j, _ = np.rint(inv @ [30, 5, z, 1])[:3].astype(int)  # LPS -> RAS negates x and y
    assert not tumour[i, j, 5]
    i2, j2, _ = np.rint(inv @ [45, -5, z, 1])[:3].astype(int)
    assert tumour[i2, j2, 5]
    assert masks["node"][:, :, 8].sum() * pixel_mm2 == pytest.approx(100, rel=0.2)


def test_rtstruct_from_another_frame_is_rejected(lidc_subset, tmp_path):
    ct = read_ct(lidc_subset)
    rs = _rtstruct(
        lidc_subset,
        tmp_path / "rs.dcm",
        generate_uid(),
        {"x": [_rectangle(0, 0, 10, 10, ct.meta["slice_positions_mm"][0])]},
    )
    with pytest.raises(CTReadError, match="frame of reference") as err:
        read_rtstruct(rs, ct)
    assert "rs.dcm" in str(err.value)


def test_rtstruct_listed_apart_from_images(lidc_subset, tmp_path):
    ct = read_ct(lidc_subset)
    _rtstruct(
        lidc_subset,
        lidc_subset / "rs.dcm",
        ct.meta["frame_of_reference_uid"],
        {"x": [_rectangle(0, 0, 10, 10, ct.meta["slice_positions_mm"][0])]},
    )
    scan = scan_dicom_folder(lidc_subset)
    assert [p.name for p in scan.rtstructs] == ["rs.dcm"] and len(scan.series) == 1


# --------------------------------------------------------------------------- NIfTI, NRRD/MHA


def test_nifti_real_crop():
    vol = read_ct(TOTALSEG_B)
    img = nib.load(str(TOTALSEG_B))
    assert vol.shape == (122, 102, 112) and vol.spacing == pytest.approx((1.5, 1.5, 1.5))
    assert np.allclose(vol.affine, img.affine)
    assert np.array_equal(vol.hu, np.asarray(img.dataobj).astype(np.float32))


@pytest.mark.parametrize("affine", [np.zeros((4, 4)), np.diag([1.0, 1.0, np.nan, 1.0])])
def test_nifti_broken_affine(tmp_path, affine):
    path = tmp_path / "broken.nii.gz"
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4))
    img.set_qform(None, code=0)
    header = img.header  # written field by field: nibabel refuses to build such an affine itself
    header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), None, header), str(path))
    with pytest.raises(CTReadError, match="broken affine") as err:
        read_ct(path)
    assert "broken.nii.gz" in str(err.value)


def test_nifti_not_3d(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), str(path))
    with pytest.raises(CTReadError, match="3D"):
        read_ct(path)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_geometry(tmp_path, suffix):
    import SimpleITK as sitk

    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)  # ITK array order [k, j, i]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-100.0, -120.0, 50.0))
    sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
    vol = read_ct(tmp_path / f"v{suffix}")
    assert vol.shape == (4, 5, 6) and vol.hu[3, 2, 1] == arr[1, 2, 3]
    # LPS identity direction -> RAS affine flips x and y.
    assert np.allclose(vol.affine, [[-0.7, 0, 0, 100], [0, -0.8, 0, 120], [0, 0, 2.5, 50], [0, 0, 0, 1]])


def test_itk_corrupt_file(tmp_path):
    (tmp_path / "bad.nrrd").write_text("NRRD0004\ntype: nonsense\n")
    with pytest.raises(CTReadError, match="bad.nrrd"):
        read_ct(tmp_path / "bad.nrrd")


def test_pyradiomics_lung_ct(default_manifest):
    case = next((c for c in default_manifest["cases"] if c["id"] == "pyradiomics_lung1"), None)
    if case is None:
        pytest.fail(f"pyradiomics CTs missing from the default data: {default_manifest['notes']}")
    vol = read_ct(case["path"])
    assert vol.shape == (512, 512, 48)
    assert vol.spacing == pytest.approx((0.5703, 0.5703, 5.0), abs=1e-3)
    lungs = hu_threshold_lung_mask(vol.hu, vol.spacing)
    assert np.median(vol.hu[lungs]) < -500


# --------------------------------------------------------------------------- DeepLesion, RAD-ChestCT


def test_deeplesion_png_stack():
    from PIL import Image

    folder = DEEPLESION / "000001_01_01"
    vol = read_ct(folder)
    assert vol.shape == (512, 512, 13) and vol.meta["spacing_assumed"]
    raw = np.asarray(Image.open(folder / "103.png")).astype(np.float32)
    assert np.array_equal(vol.hu[:, :, 0], raw.T - 32768)
    assert vol.meta["slice_numbers"] == list(range(103, 116))


def test_deeplesion_spacing_from_dl_info(tmp_path):
    csv_path = tmp_path / "DL_info.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["File_name", "Spacing_mm_px_"])
        w.writerow(["000001_01_01_109.png", "0.488281, 0.488281, 5"])
    vol = read_ct(DEEPLESION / "000001_01_01", dl_info_csv=csv_path)
    assert vol.spacing == pytest.approx((0.488281, 0.488281, 5.0)) and not vol.meta["spacing_assumed"]


def test_deeplesion_rejects_8bit_png(tmp_path):
    from PIL import Image

    folder = tmp_path / "000002_01_01"
    folder.mkdir()
    shutil.copy(DEEPLESION / "000001_01_01" / "103.png", folder / "001.png")
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(folder / "002.png")
    with pytest.raises(CTReadError, match="16-bit") as err:
        read_ct(folder)
    assert "002.png" in str(err.value)


def test_radchestct_npz_with_labels(tmp_path, rng):
    ct = rng.integers(-1000, 1000, size=(7, 20, 30)).astype(np.int16)  # [slice, row, column]
    np.savez_compressed(tmp_path / "trn00042.npz", ct=ct)
    labels = tmp_path / "imgtrain_Abnormality_and_Location_Labels.csv"
    labels.write_text(
        "NoteAcc_DEID,nodule*right_lung,emphysema*left_lung,cardiomegaly*heart\ntrn00041,1,0,0\ntrn00042,1,0,1\n"
    )
    vol = read_ct(tmp_path / "trn00042.npz", labels_csv=labels)
    assert vol.shape == (30, 20, 7) and vol.hu[29, 19, 6] == ct[6, 19, 29]
    assert vol.spacing == pytest.approx((0.8, 0.8, 0.8))
    assert vol.meta["labels"] == ["nodule*right_lung", "cardiomegaly*heart"]


def test_radchestct_npz_without_ct_array(tmp_path):
    np.savez(tmp_path / "x.npz", volume=np.zeros((2, 2, 2)))
    with pytest.raises(CTReadError, match="no 'ct' array") as err:
        read_ct(tmp_path / "x.npz")
    assert "x.npz" in str(err.value)


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "scan.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(CTReadError, match="unsupported file type"):
        read_ct(tmp_path / "scan.jpg")
    with pytest.raises(CTReadError, match="does not exist"):
        read_ct(tmp_path / "nope.nii.gz")


# --------------------------------------------------------------------------- MONAI integration


def test_monai_loadimaged_with_ct_reader(lidc_subset):
    from monai.transforms import LoadImaged

    load = LoadImaged(["ct", "crop"], reader="common.io.CTReader", ensure_channel_first=True)
    out = load({"ct": str(lidc_subset), "crop": str(TOTALSEG_B)})
    expected = read_ct(lidc_subset)
    assert tuple(out["ct"].shape) == (1, 512, 512, 12)
    assert np.allclose(out["ct"].affine.numpy(), expected.affine)
    assert np.array_equal(out["ct"][0].numpy(), expected.hu)
    assert tuple(out["crop"].shape) == (1, 122, 102, 112)
    assert CTReader().verify_suffix(str(TOTALSEG_B)) and not CTReader().verify_suffix("x.jpg")


def test_reorient_round_trip():
    vol = read_ct(TOTALSEG_B)
    ras = vol.reorient("RAS")
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    back = ras.reorient("LPS")
    assert np.array_equal(back.hu, vol.hu) and np.allclose(back.affine, vol.affine)


@pytest.mark.parametrize("axcodes", ["RAS", "LAI", "SPL"])
def test_reading_in_a_target_orientation_equals_reorienting(lidc_subset, axcodes):
    native = read_ct(lidc_subset)
    direct = read_ct(lidc_subset, axcodes=axcodes)
    expected = native.reorient(axcodes)
    assert nib.aff2axcodes(direct.affine) == tuple(axcodes)
    assert np.array_equal(direct.hu, expected.hu) and np.allclose(direct.affine, expected.affine)
    crop = read_ct(TOTALSEG_B, axcodes=axcodes)
    assert nib.aff2axcodes(crop.affine) == tuple(axcodes)


def test_save_nifti_writes_what_nibabel_writes_through_isal_gzip(tmp_path, rng):
    """common.io.nifti: the .nii.gz is a gzip stream any reader opens, with the voxels and header nib.save writes,
    and no temporary is left beside it; a plain .nii is written too."""
    import gzip

    import nibabel as nib

    from common.io.nifti import save_nifti, save_nifti_array

    data = rng.random((12, 10, 6, 3)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    ours = save_nifti_array(data, affine, tmp_path / "ours" / "map.nii.gz")
    reference = nib.Nifti1Image(data, affine)
    reference.set_qform(affine, code=1)
    reference.set_sform(affine, code=1)
    nib.save(reference, str(tmp_path / "reference.nii.gz"))
    a, b = nib.load(ours), nib.load(tmp_path / "reference.nii.gz")
    assert np.array_equal(np.asarray(a.dataobj), data) and a.get_data_dtype() == np.float32
    assert a.header.binaryblock == b.header.binaryblock
    assert gzip.decompress(ours.read_bytes()) == gzip.decompress((tmp_path / "reference.nii.gz").read_bytes())
    assert sorted(p.name for p in ours.parent.iterdir()) == ["map.nii.gz"]
    plain = save_nifti(nib.Nifti1Image(data[..., 0], affine), tmp_path / "plain.nii")
    assert np.array_equal(np.asarray(nib.load(plain).dataobj), data[..., 0])
