"""The headless-browser fixtures (tests/conftest.py) on a tiny HTML page: one real PNG, one missing image."""

from __future__ import annotations

import numpy as np


def test_render_page_reports_facts_and_screenshot(tmp_path, render_page):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(3, 2), dpi=50)
    ax.plot([0, 1, 2], [0, 1, 0], color="tab:red")
    fig.savefig(tmp_path / "plot.png")
    plt.close(fig)

    html = tmp_path / "report.html"
    html.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Tiny report</title></head>"
        "<body style='margin:0;background:#fff'>"
        "<h1>Lung segmentation</h1><p>Dice 0.91 on the held-out phantoms.</p>"
        "<h2>Curve</h2><img src='plot.png' alt='curve'>"
        "<h2>Missing</h2><img src='missing.png' alt='gone'>"
        "</body></html>",
        encoding="utf-8",
    )
    png = tmp_path / "shot.png"
    facts = render_page(html, png, width=800)

    assert facts["title"] == "Tiny report"
    assert facts["headings"] == ["Lung segmentation", "Curve", "Missing"]
    assert facts["h1"] == ["Lung segmentation"] and facts["h2"] == ["Curve", "Missing"]
    assert facts["n_images"] == 2
    assert facts["broken_images"] == ["missing.png"]
    assert facts["viewport_width"] == 800 and not facts["overflow_x"]
    assert facts["page_height"] >= 100  # the 100-pixel-high plot alone
    assert "Dice 0.91" in facts["text"]
    assert any("ERR_FILE_NOT_FOUND" in e for e in facts["console_errors"]), facts["console_errors"]
    assert facts["page_errors"] == []

    assert png.is_file()
    shot = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    assert shot.shape[1] == 800 and shot.shape[0] == facts["page_height"]
    assert shot.std() > 0  # not blank
    assert (shot[..., 0] - shot[..., 2] > 100).any()  # the red curve of the real PNG was painted


def test_render_page_sees_horizontal_overflow(tmp_path, render_page):
    html = tmp_path / "wide.html"
    html.write_text(
        "<html><body><h1>Wide</h1><div style='width:2000px;height:10px;background:#000'></div></body></html>"
    )
    facts = render_page(html, tmp_path / "wide.png", width=640)
    assert facts["overflow_x"] and facts["scroll_width"] >= 2000 and facts["viewport_width"] == 640
    assert facts["broken_images"] == [] and facts["n_images"] == 0
