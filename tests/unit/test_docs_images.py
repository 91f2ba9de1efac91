"""The docs' figures: every image a page names exists, every image in docs/img is named by a page
and made by `make figures`, and a drawn figure keeps its legend off the data and its title whole."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def referenced() -> dict[Path, list[Path]]:
    """Map each image path a page names (resolved from that page) to the pages naming it."""
    found: dict[Path, list[Path]] = {}
    for page in pages():
        for target in IMAGE.findall(page.read_text()):
            if "://" not in target:
                found.setdefault((page.parent / target).resolve(), []).append(page)
    return found


def test_every_image_a_page_names_exists():
    missing = {str(img.relative_to(ROOT)): [p.name for p in where]
               for img, where in referenced().items() if not img.is_file()}
    assert not missing, f"pages name images that do not exist: {missing}"


def test_every_image_in_docs_img_is_named_by_a_page():
    named = set(referenced())
    images = sorted((ROOT / "docs" / "img").glob("*.png"))
    assert images, "docs/img holds no figure"
    unused = [p.name for p in images if p.resolve() not in named]
    assert not unused, f"docs/img holds images no page shows: {unused}"


def figure_sources() -> list[str]:
    """The JSON files the Makefile's `figures` target plots (FIGURE_JSON and its recipe)."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nfigures:")[1].split("\n\n")[0]
    listed = makefile.split("FIGURE_JSON =")[1].split("\nfigures:")[0]
    return re.findall(r"docs/[\w./-]+\.json", listed + recipe)


def drawn(monkeypatch, tmp_path) -> dict:
    """Draw every `make figures` source into tmp_path; return {file name: matplotlib figure}."""
    pytest.importorskip("matplotlib")
    from mpifed.cli import plot

    figures = {}
    real_save = plot._save

    def keep(fig, out, name):
        figures[name] = fig
        return real_save(fig, out, name)

    monkeypatch.setattr(plot, "_save", keep)
    for source in figure_sources():
        data = json.loads((ROOT / source).read_text())
        if "meta" in data:
            plot.plot_allreduce(data, str(tmp_path))
        elif "intra" in data and "inter" in data:
            plot.plot_heldout(data, str(tmp_path))
        else:
            plot.plot_scaling(data, str(tmp_path))
    return figures


def test_make_figures_draws_every_image_in_docs_img(monkeypatch, tmp_path):
    """Each docs/img/*.png is redrawn by `make figures` (none is hand-made or stale-named)."""
    names = set(drawn(monkeypatch, tmp_path))
    assert names == {p.name for p in (ROOT / "docs" / "img").glob("*.png")}
    assert {p.name for p in tmp_path.glob("*.png")} == names


def test_no_legend_covers_data_and_no_title_is_cut(monkeypatch, tmp_path):
    """Every figure's legend lies outside its axes, and the saved PNG is wide enough for the
    title (a fixed-size canvas cut the long all-reduce titles)."""
    from matplotlib.image import imread

    for name, fig in drawn(monkeypatch, tmp_path).items():
        renderer = fig.canvas.get_renderer()
        saved_inches = imread(tmp_path / name).shape[1] / 110  # _save writes at dpi 110
        for ax in fig.axes:
            box = ax.get_window_extent(renderer)
            legend = ax.get_legend()
            if legend is not None:
                leg = legend.get_window_extent(renderer)
                assert leg.y1 <= box.y0 or leg.x0 >= box.x1, f"{name}: legend over the axes"
            title_inches = ax.title.get_window_extent(renderer).width / fig.dpi
            assert title_inches <= 0.99 * saved_inches, f"{name}: title cut"
