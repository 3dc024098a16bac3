"""Shared fixtures: the real shared CT data, small editable copies of the LIDC series, the default data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from common.default_data import DEFAULT_OUT, shared_data_dir  # noqa: E402

SHARED = shared_data_dir()
LIDC_DIR = SHARED / "lidc_idri_1011_dicom"
TOTALSEG_A = SHARED / "totalseg_chest_crops" / "chest_crop_a.nii.gz"
TOTALSEG_B = SHARED / "totalseg_chest_crops" / "chest_crop_b.nii.gz"
DEEPLESION = SHARED / "deeplesion_png"
LUNG_PET_CT_DX_8MM = SHARED / "lung_pet_ct_dx" / "A0002_siemens_b40f_8mm"
LUNG_PET_CT_DX_5MM = SHARED / "lung_pet_ct_dx" / "A0001_philips_5mm"


TIERS = ("unit", "bundles", "system")  # the sub-folders of tests/, each a marker: pytest -m unit, or make test-fast


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_configure(config):
    if not LIDC_DIR.is_dir():
        raise pytest.UsageError(
            f"shared real CT data not found at {SHARED}: clone the project with ../shared beside it"
        )


@pytest.fixture(scope="session")
def lidc_files_by_position() -> list[Path]:
    """The LIDC files sorted from feet to head (by ImagePositionPatient z)."""
    import pydicom

    files = sorted(LIDC_DIR.glob("*.dcm"))
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    return [f for _, f in sorted(zip(z, files))]


@pytest.fixture
def lidc_subset(tmp_path, lidc_files_by_position) -> Path:
    """12 consecutive mid-lung LIDC slices copied into a folder a test may edit."""
    folder = tmp_path / "lidc_subset"
    folder.mkdir()
    mid = len(lidc_files_by_position) // 2
    for f in lidc_files_by_position[mid - 6 : mid + 6]:
        shutil.copy(f, folder / f.name)
    return folder


def sorted_by_position(folder: Path) -> list[Path]:
    import pydicom

    files = sorted(folder.glob("*.dcm"))
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    return [f for _, f in sorted(zip(z, files))]


def edit_dicom(path: Path, **tags) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


@pytest.fixture(scope="session")
def default_manifest() -> dict:
    from common.default_data import load_manifest

    return load_manifest(DEFAULT_OUT)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --------------------------------------------------------------------------- SA-1 (foundation_clip) fixtures

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
TINY_CLIP_OVERLAY = Path(__file__).resolve().parent / "configs" / "foundation_clip_tiny.json"


@pytest.fixture(scope="session")
def tiny_phantom_manifest(tmp_path_factory) -> Path:
    """A manifest of three small phantoms (64 x 64 x 32 at 5 x 5 x 7.5 mm) and one real NIfTI crop."""
    from common.io import write_json_atomic
    from common.phantom import generate_phantom, write_phantom

    out = tmp_path_factory.mktemp("tiny_manifest")
    cases = []
    for seed in range(3):
        case_id = f"tiny_phantom_{seed}"
        paths = write_phantom(generate_phantom(shape=(64, 64, 32), spacing=(5.0, 5.0, 7.5), seed=seed), out, case_id)
        cases.append(
            {
                "id": case_id,
                "path": paths["ct"],
                "label": paths["label"],
                "lungs": paths["lungs"],
                "report": paths["report"],
                "kind": "phantom",
                "format": "nifti",
            }
        )
    cases.insert(0, {"id": "totalseg_chest_crop_b", "path": str(TOTALSEG_B), "kind": "real", "format": "nifti"})
    path = out / "manifest.json"
    write_json_atomic(path, {"cases": cases, "notes": []})
    return path


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A tiny random BERT directory (tokenizer + config + weights) for fast text-encoder tests."""
    from tests.unit.test_networks import _tiny_bert_dir

    return _tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


# --------------------------------------------------------------------------- tiny SA-1 and H-SAM checkpoints

# the tiny SA-1 and H-SAM checkpoints that the probmap, serve, lungseg and MLflow tests share
IMAGE_SIZE, SLICE_SIZE, PATCH_SIZE, EMBED_DIM = 32, 64, 16, 16


def build_tiny_clip(out_dir: Path, text_dir: Path, teacher_shape=None, preprocessing: bool = True):
    """A tiny SA-1 model (random tiny CNN, the tiny text encoder) and its saved checkpoint, seeded."""
    import torch

    from common.networks import build_lung_clip, save_network

    torch.manual_seed(0)
    model = build_lung_clip(
        image_encoder="tiny_cnn",
        pretrained=False,
        image_encoder_kwargs={"out_channels": 16, "width": 8},
        text_model_dir=text_dir,
        embed_dim=EMBED_DIM,
        teacher_shape=teacher_shape,
    )
    if preprocessing:
        model.preprocessing = {
            "slice_size": SLICE_SIZE,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "patch_mm": 40.0,
            "hu_window": [-1000.0, 400.0],
        }
    path = save_network(model, Path(out_dir) / "model.pt")
    return model.eval(), path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tiny_text_dir):
    return build_tiny_clip(tmp_path_factory.mktemp("clip_ckpt"), tiny_text_dir)


@pytest.fixture(scope="module")
def tiny_hsam(tmp_path_factory):
    import torch

    from common.networks import save_network
    from common.networks import load_sam_family
    from common.networks.hsam import build_hsam

    out = tmp_path_factory.mktemp("tiny_hsam")
    torch.manual_seed(0)
    backbone = load_sam_family("tiny_sam", random_init=True)
    parts = torch.nn.ModuleDict(
        {
            "image_encoder": backbone.image_encoder,
            "prompt_encoder": backbone.prompt_encoder,
            "mask_decoder": backbone.mask_decoder,
        }
    )
    torch.save(parts.state_dict(), out / "tiny_sam.pth")
    return save_network(build_hsam("tiny_sam", sam_checkpoint=out / "tiny_sam.pth"), out / "hsam.pt")


# --------------------------------------------------------------------------- real headless browser (HTML reports)

CHROMIUM = Path("/usr/bin/chromium")
# --headless etc. as Debian's Chromium needs them here; without the background-networking flags its
# connections are refused many at a time on a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Facts about the loaded page, read in the page itself (see render_page).
_PAGE_FACTS_JS = """() => {
    const imgs = Array.from(document.images);
    const text = (el) => (el.innerText || el.textContent || '').trim();
    const heads = Array.from(document.querySelectorAll('h1, h2'));
    const doc = document.documentElement;
    return {
        title: document.title,
        headings: heads.map(text),
        h1: heads.filter(h => h.tagName === 'H1').map(text),
        h2: heads.filter(h => h.tagName === 'H2').map(text),
        n_images: imgs.length,
        broken_images: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src') || i.currentSrc || ''),
        scroll_width: Math.max(doc.scrollWidth, document.body ? document.body.scrollWidth : 0),
        viewport_width: window.innerWidth,
        page_height: Math.max(doc.scrollHeight, document.body ? document.body.scrollHeight : 0),
        text: document.body ? document.body.innerText : '',
    };
}"""


@pytest.fixture(scope="session")
def headless_browser():
    """Debian's Chromium (/usr/bin/chromium, installed by `make browser`) driven by Playwright's sync API.

    Fails (never skips) when the browser is missing: `make test` installs it through `make browser`.
    """
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run `make browser` (apt-get install -y chromium, as root)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:  # pragma: no cover - playwright is a project dependency
        pytest.fail(f"playwright is not installed ({e}): run `make install`", pytrace=False)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, timeout=120_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def render_page(headless_browser):
    """render_page(html_path, png_path, width=1280) -> dict: opens file://html_path in the headless browser,
    waits for it to load, takes a full-page screenshot to png_path and returns facts to assert on:

    title, headings (h1/h2 texts in page order), h1, h2, n_images, broken_images (src of every <img> not
    complete or with naturalWidth 0), scroll_width, viewport_width, overflow_x (scroll_width > viewport_width),
    page_height, console_errors (console.error messages, failed resource loads included), page_errors
    (uncaught exceptions), text (document.body.innerText), png (the screenshot's path).
    """

    def render(html_path, png_path, width: int = 1280) -> dict:
        html_path, png_path = Path(html_path).resolve(), Path(png_path)
        if not html_path.is_file():
            raise FileNotFoundError(html_path)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        context = headless_browser.new_context(viewport={"width": int(width), "height": 800})
        try:
            page = context.new_page()
            console_errors: list[str] = []
            page_errors: list[str] = []
            page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.goto(html_path.as_uri(), wait_until="load", timeout=60_000)
            # lazy images load only when scrolled to: load them all, then wait (bounded) until each is settled
            page.evaluate("() => document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
            try:
                page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=10_000)
            except Exception:  # still-loading images are reported as broken below
                pass
            page.screenshot(path=str(png_path), full_page=True)
            facts = page.evaluate(_PAGE_FACTS_JS)
        finally:
            context.close()
        facts["overflow_x"] = facts["scroll_width"] > facts["viewport_width"]
        facts["console_errors"] = console_errors
        facts["page_errors"] = page_errors
        facts["png"] = png_path
        return facts

    return render
