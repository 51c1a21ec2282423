"""The self-contained HTML report: escaping and embedding, and the comparison report rendered in headless Chromium."""
import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from excite.experiments.compare import compare_runs
from excite.report.html import HtmlReport, Section, report_html
from excite.train.config import TrainConfig
from excite.train.fit import fit

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CONCLUSION = "SE-ResNet-20 <w=4> & ResNet-20 trained on different folders: a check of the report, not a result"


def _png(colour=(200, 30, 30), size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


class _Page(HTMLParser):
    """The tags of a page with their attributes, and its text."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def images(self) -> list[bytes]:
        """The decoded data of every <img>, which must be a base64 PNG data URI."""
        found = []
        for tag, attrs in self.tags:
            if tag == "img":
                prefix = "data:image/png;base64,"
                assert attrs["src"].startswith(prefix), attrs["src"][:40]
                found.append(base64.b64decode(attrs["src"][len(prefix):], validate=True))
        return found


def test_text_is_escaped_and_images_embedded(tmp_path):
    png = _png()
    path = (HtmlReport("A <b>title</b>").add_heading("Runs & more").add_paragraph("<script>alert(1)</script>")
            .add_table(["run", "acc"], [["a<1>", "93.3%"], {"run": "b", "acc": None}])
            .add_image(png, 'alt "quoted"', caption="curves").write(tmp_path / "r.html"))
    page = path.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>A &lt;b&gt;title&lt;/b&gt;</title>" in page and "Runs &amp; more" in page
    assert 'alt="alt &quot;quoted&quot;"' in page
    parsed = _Page(page)
    assert parsed.images() == [png]
    assert not [attrs for tag, attrs in parsed.tags if tag in ("script", "link", "iframe")]
    assert '<td>a&lt;1&gt;</td><td class="num">93.3%</td>' in page  # numbers right-aligned, names not
    assert '<td>b</td><td class="num"></td>' in page  # a missing key is an empty cell


def test_a_file_that_is_not_a_png_is_refused():
    with pytest.raises(ValueError, match="is not a PNG"):
        HtmlReport("t").add_image(b"GIF89a....", "gif")
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        HtmlReport("t").add_table(["a", "b", "c"], [[1, 2]])


def test_report_html_renders_sections_in_order(tmp_path):
    page = report_html("Sweep", [
        Section("Conclusions", notes=["growth rate 24 beats 12 by 1.2 points"]),
        Section("Runs", paragraphs=["Two runs."], columns=["run"], rows=[["a"], ["b"]], warnings=["look here"]),
        Section("Plots", images=[(_png(), "one"), (_png((0, 0, 200)), "two")], grid=True),
    ], warnings=["top warning"], path=tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text() == page
    order = ["top warning", "<h2>Conclusions</h2>", "growth rate 24 beats 12", "<h2>Runs</h2>", "look here",
             "Two runs.", "<td>a</td>", "<h2>Plots</h2>", 'class="grid"', "<figcaption>two</figcaption>"]
    positions = [page.index(text) for text in order]
    assert positions == sorted(positions)
    assert len(_Page(page).images()) == 2


# --- The comparison report in a real browser -------------------------------------------------------------------


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=180)


def _console_lines(stderr: str, url: str) -> list[str]:
    """What the page logged to its console (errors, blocked loads, uncaught exceptions), from Chromium's log."""
    return [line for line in stderr.splitlines() if ("CONSOLE" in line or "Uncaught" in line) and url in line]


@pytest.fixture(scope="module")
def report(tmp_path_factory, make_image_folder) -> Path:
    """The report of two tiny runs trained on different folders, compared with force and a conclusion line."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: apt-get install chromium")
    root = tmp_path_factory.mktemp("report")
    runs = []
    for name, model, seed in (("resnet", "resnet20_cifar", 0), ("se_resnet", "se_resnet20_cifar", 1)):
        config = TrainConfig(model=model, model_kwargs={"widths": [4, 8, 8]}, epochs=2, batch_size=8, img_size=16,
                             device="cpu", data=str(make_image_folder(root / f"images-{name}", seed=seed)),
                             out=str(root / name))
        runs.append(fit(config, log=lambda _: None).run_dir)
    compare_runs(runs, out=root / "cmp", force=True, conclusions=[CONCLUSION])
    return root / "cmp" / "report.html"


def test_the_console_check_sees_errors(tmp_path):
    """The log lines the report test looks for are there when a page does log an error."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: apt-get install chromium")
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><script>notDefined();</script></body></html>")
    result = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert any("notDefined" in line for line in _console_lines(result.stderr, page.as_uri())), result.stderr


def test_the_report_renders_in_chromium(report, tmp_path):
    url = report.as_uri()
    result = _chromium(tmp_path, "--dump-dom", url)
    assert result.returncode == 0, result.stderr
    assert _console_lines(result.stderr, url) == []
    dom = _Page(result.stdout)
    text = " ".join(" ".join(dom.text).split())
    # The table, with a row for every run.
    assert [tag for tag, _ in dom.tags].count("table") == 1
    cells = re.findall(r"<td>(.*?)</td>", result.stdout)
    assert "resnet" in cells and "se_resnet" in cells
    # Every image is an embedded PNG that decodes: curves, accuracy vs cost, per-class, two confusion matrices.
    images = dom.images()
    assert len(images) == 5
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.width > 300
    assert CONCLUSION in text
    assert "Warning: compared with --force although runs resnet and se_resnet were trained on different data" in text

    shot = tmp_path / "report.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert result.returncode == 0 and shot.is_file(), result.stderr
    assert _console_lines(result.stderr, url) == []
    with Image.open(shot) as image:
        pixels = image.convert("RGB")
        assert pixels.size == (1280, 2000)
        colours = pixels.getcolors(maxcolors=1 << 20)
    assert len(colours) > 200  # text, tables and plots, not a blank page
    inked = sum(count for count, rgb in colours if min(rgb) < 200)
    assert inked > 0.02 * 1280 * 2000
    # The plots were drawn by the browser: matplotlib's first two line colours are on screen...
    assert sum(count for count, rgb in colours if _near(rgb, (31, 119, 180))) > 200
    assert sum(count for count, rgb in colours if _near(rgb, (255, 127, 14))) > 200
    # ...and the warning's red border is near the top of the page.
    top = pixels.crop((0, 0, 1280, 500)).getcolors(maxcolors=1 << 20)
    assert sum(count for count, rgb in top if _near(rgb, (192, 57, 43))) > 500


def _near(rgb, target, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(rgb, target))
