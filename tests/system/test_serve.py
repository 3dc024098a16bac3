"""`make serve`: a real MONAI Label server process with the probmap and hsam_finetune bundles, real requests over loopback."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch


REPO = Path(__file__).resolve().parents[2]
LIDC = REPO.parent / "shared" / "data" / "lidc_idri_1011_dicom"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", timeout: float = 120.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_bad_set_ups_are_clear_errors(tmp_path, tiny_clip):
    from common.apps.serve import ServedBundle, ServeError, build_app, check_port_free, check_studies, main

    with pytest.raises(ServeError, match="studies folder not found"):
        check_studies(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no scans here")
    with pytest.raises(ServeError, match="no NIfTI image"):
        check_studies(tmp_path / "empty")
    with pytest.raises(ServeError, match="gone.pt: no checkpoint for hsam_finetune"):
        build_app(
            tmp_path / "app",
            {
                "probmap": ServedBundle(REPO / "bundles" / "probmap", tiny_clip[1]),
                "hsam_finetune": ServedBundle(REPO / "bundles" / "hsam_finetune", tmp_path / "gone.pt"),
            },
        )
    assert not (tmp_path / "app").exists()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", port)
        assert main(["--studies", str(tmp_path / "empty"), "--port", str(port)]) == 2


@pytest.mark.skipif(not LIDC.is_dir(), reason="shared LIDC series not present")
def test_dicom_series_folders_become_nifti_once(tmp_path, caplog):
    import shutil

    from common.apps.serve import check_studies, convert_dicom_folders

    shutil.copytree(LIDC, tmp_path / "lidc")
    (tmp_path / "not_a_series").mkdir()
    (tmp_path / "not_a_series" / "x.txt").write_text("text")
    written = convert_dicom_folders(tmp_path)
    assert written == [tmp_path / "lidc.nii.gz"] and nib.load(str(written[0])).shape[:2] == (512, 512)
    assert "not_a_series: not served, not a readable CT series" in caplog.text
    assert convert_dicom_folders(tmp_path) == []  # done once
    images, others = check_studies(tmp_path)
    assert images == [tmp_path / "lidc.nii.gz"] and others == []


@pytest.mark.timeout(600)
def test_monai_label_server_lists_and_runs_both_bundles_and_survives_bad_requests(
    tmp_path, tiny_clip, tiny_hsam, tiny_phantom_manifest
):
    from common.apps.serve import ServedBundle, build_app

    phantom = next(c for c in json.loads(Path(tiny_phantom_manifest).read_text())["cases"] if c["kind"] == "phantom")
    studies = tmp_path / "studies"
    studies.mkdir()
    # on a field 1.6 times wider (benchmarks/real_ct_bad_input.py --case wide-field): H-SAM frames the patient, and the
    # served model must do as the bundle does, although MONAI Label calls the inferer with the image alone
    spec = importlib.util.spec_from_file_location("bad_input", REPO / "benchmarks" / "real_ct_bad_input.py")
    bad_input = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bad_input)
    phantom_ct = nib.load(phantom["path"])
    hu = np.asarray(phantom_ct.dataobj, dtype=np.float32)
    hu, _, affine = bad_input.wide_field(hu, np.zeros(hu.shape, bool), phantom_ct.affine, 1.6)
    nib.save(nib.Nifti1Image(hu, affine), str(studies / "phantom0.nii.gz"))
    src = nib.load(str(studies / "phantom0.nii.gz"))
    (studies / "notes.txt").write_text("not an image")
    (studies / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    app = build_app(
        tmp_path / "app",
        {
            "probmap": ServedBundle(REPO / "bundles" / "probmap", tiny_clip[1], {"stride_mm": 20.0}),
            "hsam_finetune": ServedBundle(REPO / "bundles" / "hsam_finetune", tiny_hsam),
        },
    )
    served = torch.load(app / "model" / "hsam_finetune" / "models" / "model.pt", weights_only=True)["model"]
    assert any("lora" in k for k in served) and any(
        k.startswith("sam.image_encoder") or "image_encoder" in k for k in served
    )

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "common.apps.serve",
                "--studies",
                str(studies),
                "--port",
                str(port),
                "--app-dir",
                str(app),
                "--prepared",
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        info = None
        for _ in range(120):  # bounded: at most about two minutes to start
            if server.poll() is not None:
                pytest.fail(f"server exited with {server.returncode}: {log_path.read_text()[-3000:]}")
            try:
                status, body = _request(f"{url}/info/", timeout=5)
            except OSError:
                status = None
            if status == 200:
                info = json.loads(body)
                break
            time.sleep(1)
        assert info is not None, log_path.read_text()[-3000:]
        assert set(info["models"]) == {"probmap", "hsam_finetune"}
        assert info["models"]["hsam_finetune"]["labels"] == {
            "right lung": 1,
            "left lung": 2,
        }  # lungseg's labels.nii.gz values
        assert info["models"]["probmap"]["labels"] == {"lung": 1, "heart": 2, "blood vessel": 3, "airway": 4, "bone": 5}
        assert "notes.txt: not a NIfTI image" in log_path.read_text()
        status, body = _request(f"{url}/datastore/?output=all")
        assert status == 200 and set(json.loads(body)["objects"]) == {"phantom0", "broken"}

        answers = {}
        for model in ("hsam_finetune", "probmap"):
            status, body = _request(f"{url}/infer/{model}?image=phantom0&output=image", "POST", timeout=300)
            assert status == 200, body[:2000]
            (tmp_path / f"{model}.nii.gz").write_bytes(body)
            label = nib.load(str(tmp_path / f"{model}.nii.gz"))
            assert label.shape == src.shape and np.allclose(label.affine, src.affine)
            answers[model] = np.asarray(label.dataobj)
        assert set(np.unique(answers["hsam_finetune"])) <= {0, 1, 2}
        assert set(np.unique(answers["probmap"])) <= {0, 1, 2, 3, 4, 5}

        # the served H-SAM answer is the bundle's own: the same right/left map as `monai.bundle run` with the same checkpoint
        cases = json.dumps([{"image": str(studies / "phantom0.nii.gz"), "case_id": "phantom0"}])
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                str(REPO / "bundles/hsam_finetune/configs/inference.json"),
                "--bundle_root",
                str(REPO / "bundles/hsam_finetune"),
                "--ckpt_path",
                str(tiny_hsam),
                "--cases",
                f"${cases}",
                "--output_dir",
                str(tmp_path / "bundle_out"),
                "--progress",
                "false",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        own = np.asarray(nib.load(str(tmp_path / "bundle_out" / "phantom0" / "phantom0_lung_sides.nii.gz")).dataobj)
        np.testing.assert_array_equal(answers["hsam_finetune"], own)
        frame = json.loads((tmp_path / "bundle_out" / "phantom0" / "phantom0_report.json").read_text())["field_of_view"]
        assert frame != [0, hu.shape[0], 0, hu.shape[1]]  # framed, so the equality above covers the served frame too

        # bad requests: clear answers, and the server stays up
        status, body = _request(f"{url}/infer/nope?image=phantom0", "POST")
        assert (
            status == 404
            and "unknown model 'nope'" in json.loads(body)["detail"]
            and "hsam_finetune" in json.loads(body)["detail"]
        )
        status, body = _request(f"{url}/infer/hsam_finetune?image=ghost", "POST")
        assert status == 404 and "unknown image 'ghost'" in json.loads(body)["detail"]
        status, body = _request(f"{url}/infer/hsam_finetune?image=broken", "POST")
        assert status == 500 and "on image 'broken' failed" in json.loads(body)["detail"]
        assert _request(f"{url}/info/")[0] == 200 and server.poll() is None

        # a second server on the same port: a clear error before MONAI Label starts
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "common.apps.serve",
                "--studies",
                str(studies),
                "--port",
                str(port),
                "--app-dir",
                str(app),
                "--prepared",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in second.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
