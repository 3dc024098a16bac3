"""``make serve STUDIES=<dir> PORT=<port>``: a MONAI Label server with the probmap and hsam_finetune bundles.

It runs MONAI Label's own ``monaibundle`` sample app (copied offline from the installed monailabel
package by ``monailabel apps --download``) on 127.0.0.1, with two local bundles in its ``model/``
folder and their trained checkpoints as ``models/model.pt``:

- ``probmap``: the SA-2 zero-shot map of the SA-1 model, served as one label map (1 lung, 2 heart,
  3 blood vessel, 4 airway, 5 bone; ``configs/monailabel.json`` overlay);
- ``hsam_finetune``: the prompt-free H-SAM lung mask (1 lung).

The studies folder holds NIfTI files (``.nii.gz`` / ``.nii``), as MONAI Label's local datastore
reads them; a DICOM series in a sub-folder is converted once to ``<folder>.nii.gz`` beside it.
MONAI Label writes its ``labels/`` folder and ``datastore_v2.json`` there too. Other files are
listed at start-up and not served. ``/info/`` lists the models; ``/infer/<model>?image=<id>``
returns the label map.

    python -m common.apps.serve --studies DIR [--port 8000] [--clip-ckpt ...] [--hsam-ckpt ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.segment import BUNDLES, DEFAULT_CLIP, DEFAULT_HSAM, REPO  # the shipped models, one place

DEFAULT_APP = REPO / "outputs" / "serve" / "app"
# What MONAI Label's local datastore reads (its `extensions`); anything else in STUDIES is not served.
IMAGE_SUFFIXES = (".nii.gz", ".nii")
log = logging.getLogger("serve")


class ServeError(RuntimeError):
    """A problem the user can fix (port, folder, checkpoint); printed without a traceback."""


@dataclass
class ServedBundle:
    """A bundle folder, the checkpoint it serves and config values set in the served copy."""

    bundle_dir: Path
    checkpoint: Path
    overrides: dict = field(default_factory=dict)


def default_bundles(
    clip_ckpt: str | Path = DEFAULT_CLIP, hsam_ckpt: str | Path = DEFAULT_HSAM
) -> dict[str, ServedBundle]:
    return {
        "probmap": ServedBundle(BUNDLES / "probmap", Path(clip_ckpt)),
        "hsam_finetune": ServedBundle(BUNDLES / "hsam_finetune", Path(hsam_ckpt)),
    }


def check_port_free(host: str, port: int) -> None:
    """A port another program holds is a clear error before MONAI Label starts, not a uvicorn traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, int(port)))
        except OSError as e:
            raise ServeError(
                f"port {port} on {host} is in use ({e.strerror}); stop what holds it or pass PORT=<another port>"
            ) from None


def check_studies(studies: str | Path) -> tuple[list[Path], list[Path]]:
    """The NIfTI images MONAI Label will serve and the other files it will not; no folder or no image is an error."""
    studies = Path(studies)
    if not studies.is_dir():
        raise ServeError(f"{studies}: studies folder not found (STUDIES=<folder of .nii.gz CT volumes>)")
    files = sorted(p for p in studies.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.name.endswith(IMAGE_SUFFIXES)]
    others = [p for p in files if p not in images and p.name != "datastore_v2.json"]
    if not images:
        raise ServeError(f"{studies}: no NIfTI image (.nii.gz / .nii) and no DICOM series folder to serve")
    return images, others


def convert_dicom_folders(studies: str | Path) -> list[Path]:
    """Each sub-folder of ``studies`` that holds a readable CT series becomes ``<folder>.nii.gz`` beside it
    (HU, RAS affine; written under a temporary name, skipped when it exists). Returns what was written."""
    from common.io import CTReadError, read_ct

    written = []
    for folder in sorted(
        p for p in Path(studies).iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "labels"
    ):
        target = folder.with_name(folder.name + ".nii.gz")
        if target.exists():
            continue
        try:
            read_ct(folder).to_nifti(target)
        except (CTReadError, OSError, ValueError) as e:
            log.warning("%s: not served, not a readable CT series (%s)", folder, e)
            continue
        log.info("%s: DICOM series converted to %s", folder, target.name)
        written.append(target)
    return written


def _served_config(bundle: ServedBundle) -> tuple[dict, dict]:
    """The bundle's inference.json (with its monailabel.json overlay) and metadata.json as MONAI Label will read them."""
    from monai.bundle import ConfigParser

    configs = bundle.bundle_dir / "configs"
    files = [configs / "inference.json"] + (
        [configs / "monailabel.json"] if (configs / "monailabel.json").is_file() else []
    )
    config = ConfigParser.load_config_files([str(f) for f in files])
    inputs, outputs = config.pop("monailabel_inputs", None), config.pop("monailabel_outputs", None)
    config.update({"ckpt_path": str(Path(bundle.checkpoint).resolve()), **bundle.overrides})
    metadata = json.loads((configs / "metadata.json").read_text())
    # metadata.json describes the network (slices, windows); MONAI Label reads the served task's volume in and label map out
    if inputs:
        metadata["network_data_format"]["inputs"] = inputs
    if outputs:
        metadata["network_data_format"]["outputs"] = outputs
    return config, metadata


def build_app(app_dir: str | Path = DEFAULT_APP, bundles: dict[str, ServedBundle] | None = None) -> Path:
    """MONAI Label's monaibundle app in ``app_dir``, with ``model/<name>/`` for each bundle.

    The app code is copied once by ``monailabel apps --download`` (offline: from the installed
    package); the bundles' configs are written afresh on every call. ``network_def`` builds the
    network from the given checkpoint (``ckpt_path`` points at it), and ``models/model.pt`` holds
    that network's whole state dict under ``model``, which is what MONAI Label's loader reads
    (our checkpoints hold only what was trained, or a record around the tensors, and it would
    warn about every other key). A missing checkpoint is an error that names it.
    """
    app_dir = Path(app_dir).resolve()
    bundles = default_bundles() if bundles is None else bundles
    for name, b in bundles.items():
        if not Path(b.checkpoint).is_file():
            raise ServeError(
                f"{b.checkpoint}: no checkpoint for {name}; run `make demo` (and the hsam chain) first, "
                "or pass CLIP_CKPT=... HSAM_CKPT=..."
            )
    if not (app_dir / "main.py").is_file():
        app_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = app_dir.parent / f".{app_dir.name}.download"
        shutil.rmtree(tmp, ignore_errors=True)
        run = subprocess.run(
            [*_monailabel(), "apps", "--download", "--name", "monaibundle", "--output", str(tmp)],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0 or not (tmp / "monaibundle" / "main.py").is_file():
            raise ServeError(
                f"monailabel apps --download --name monaibundle failed: {(run.stdout + run.stderr)[-1000:]}"
            )
        shutil.rmtree(app_dir, ignore_errors=True)
        (tmp / "monaibundle").rename(app_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    from common.io import write_json_atomic

    for name, b in bundles.items():
        config, metadata = _served_config(b)
        target = app_dir / "model" / name
        shutil.rmtree(target, ignore_errors=True)
        (target / "configs").mkdir(parents=True)
        (target / "models").mkdir()
        write_json_atomic(target / "configs" / "inference.json", config)
        write_json_atomic(target / "configs" / "metadata.json", metadata)
        if (b.bundle_dir / "configs" / "logging.conf").is_file():
            shutil.copyfile(b.bundle_dir / "configs" / "logging.conf", target / "configs" / "logging.conf")
        _export_state_dict(target, config)
        log.info("%s: bundle %s served from %s", name, b.bundle_dir.name, b.checkpoint)
    return app_dir


def _export_state_dict(target: Path, config: dict) -> None:
    """``target/models/model.pt`` = ``{"model": state_dict}`` of the network the served config builds."""
    import torch
    from monai.bundle import ConfigParser

    from common.io.atomic import atomic_path

    parser = ConfigParser({**config, "bundle_root": str(target)})
    network = parser.get_parsed_content("network_def", instantiate=True)
    with atomic_path(target / "models" / "model.pt") as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in network.state_dict().items()}}, tmp)


def _monailabel() -> list[str]:
    # The `monailabel` script runs whatever `python` is first on PATH; this interpreter is the one with the
    # package. It goes through launch() below for the pydicom 3 shim.
    return [sys.executable, "-m", "common.apps.serve", "--monailabel"]


def pydicom3_shim() -> None:
    """Let monailabel 0.8.5 import under pydicom 3.

    monailabel imports pydicom-seg 0.4.1, which imports ``pydicom._storage_sopclass_uids``, a module
    pydicom 3 removed (Project-MONAI/MONAILabel#1841, razorx89/pydicom-seg#60). The one name it takes
    from there, ``SegmentationStorage``, is in ``pydicom.uid`` since pydicom 2.3, so that module stands
    in for the missing one. Nothing else changes; with pydicom 2 this does nothing.
    """
    import importlib.util

    import pydicom.uid

    if importlib.util.find_spec("pydicom._storage_sopclass_uids") is None:
        sys.modules["pydicom._storage_sopclass_uids"] = pydicom.uid


def launch(argv: list[str]) -> int:
    """``monailabel <argv>`` in this process, after :func:`pydicom3_shim`."""
    pydicom3_shim()
    from monailabel.main import Main

    sys.argv = ["monailabel", *argv]
    Main().run()
    return 0


def server_command(
    app_dir: str | Path, studies: str | Path, models: list[str], host: str = "127.0.0.1", port: int = 8000
) -> list[str]:
    """``monailabel start_server`` for local bundles only (no model-zoo download, no SAM2, no trainers), on
    :mod:`common.apps.serve_app`: MONAI Label's app with clear answers to bad requests."""
    conf = {
        "models": ",".join(models),
        "zoo_source": "local",
        "sam2": "false",
        "skip_trainers": "true",
        "preload": "false",
    }
    cmd = [
        *_monailabel(),
        "start_server",
        "--app",
        str(app_dir),
        "--studies",
        str(studies),
        "--host",
        host,
        "--port",
        str(port),
        "--uvicorn_app",
        "common.apps.serve_app:app",
    ]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    return cmd


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--monailabel"]:
        return launch(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", required=True, help="folder of NIfTI CT volumes")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) keeps the server on this machine")
    p.add_argument("--app-dir", default=str(DEFAULT_APP))
    p.add_argument("--clip-ckpt", default=os.environ.get("CLIP_CKPT") or str(DEFAULT_CLIP))
    p.add_argument("--hsam-ckpt", default=os.environ.get("HSAM_CKPT") or str(DEFAULT_HSAM))
    p.add_argument(
        "--prepared",
        action="store_true",
        help="serve APP_DIR as it is (built before, e.g. by build_app with overrides)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    try:
        check_port_free(args.host, args.port)
        if not Path(args.studies).is_dir():
            raise ServeError(
                f"{args.studies}: studies folder not found (STUDIES=<folder of .nii.gz CT volumes or DICOM series folders>)"
            )
        convert_dicom_folders(args.studies)
        images, others = check_studies(args.studies)
        if args.prepared:
            app_dir = Path(args.app_dir).resolve()
            models = (
                sorted(d.name for d in (app_dir / "model").iterdir() if (d / "configs" / "inference.json").is_file())
                if (app_dir / "model").is_dir()
                else []
            )
            if not models:
                raise ServeError(f"{app_dir}: no prepared app with bundles under model/ (run without --prepared)")
        else:
            app_dir = build_app(args.app_dir, default_bundles(args.clip_ckpt, args.hsam_ckpt))
            models = list(default_bundles())
    except ServeError as e:
        print(f"make serve: {e}", file=sys.stderr)
        return 2
    for other in others:
        log.warning("%s: not a NIfTI image; MONAI Label will not list or serve it", other)
    url = f"http://{args.host}:{args.port}"
    log.info(
        "serving %d image(s) from %s with %s at %s (/info/, /infer/<model>?image=<id>); Ctrl-C stops",
        len(images),
        args.studies,
        ", ".join(models),
        url,
    )
    try:
        return subprocess.call(server_command(app_dir, Path(args.studies).resolve(), models, args.host, args.port))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
