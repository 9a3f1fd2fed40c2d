"""`snakemake --report` on the smoke run, opened in a real browser: Debian's Chromium, headless, renders the
self-contained report.html (React), as a reader's browser would. The landing page must draw its menu and workflow
graph; then a script added to a copy of the page clicks through the report as a reader does (menu → category →
subcategory → each result's view and info buttons) and records what the page showed: every table and figure of the
run listed, each with a caption that states its judge, n, new tokens and seeds (matched against the run's own
records), and each figure drawn in the content pane. Both screenshots must not be blank.

Chromium is a system package (`apt-get install chromium`; .ci/run installs it): without it these tests fail."""

from __future__ import annotations

import html
import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import SMOKE, SMOKE_TARGETS, snakemake
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing that reaches for the network: without the background-networking flags Chromium here hangs
# on connection attempts.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
WINDOW = (1600, 1000)
CONFIGURATION = ("Judge", "n", "New tokens", "Seeds")  # what every caption states, as a field list

# Clicks through the report as a reader does and leaves what it saw, as JSON, in <pre id="tamperlab-walk">; ends
# with the first figure open beside its description. It waits with timers (Chromium's virtual time runs them
# without real waiting); `img.decode()` would stall virtual time, so a figure is polled until it has loaded.
WALK = r"""
(async function () {
    const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
    const menu = () => [...document.querySelectorAll("nav div.p-3 a")];
    const link = (text) => menu().find((a) => a.textContent.trim() === text);
    const rows = () => [...document.querySelectorAll("nav table tbody tr")];
    async function click(element, what) {
        if (!element) throw new Error("nothing to click: " + what);
        element.click();
        await sleep(25);
    }
    async function open(category, subcategory) {  // home, the category, and its subcategory where it has several
        await click(document.querySelector("nav ol li a"), "home");
        await click(link(category), category);
        if (Object.keys(categories[category]).length > 1) await click(link(subcategory), subcategory);
    }
    async function view(row, path) {  // the eye button: the figure in the content pane
        await click(row.querySelectorAll("a")[0], "view " + path);
        const img = document.querySelector("div.grow img");
        for (let k = 0; k < 40 && img && !(img.complete && img.naturalWidth); k++) await sleep(25);
        return img ? [img.naturalWidth, img.naturalHeight] : null;
    }
    async function info(row, path) {  // the info button: path, description, rule and parameters in the navbar
        const buttons = row.querySelectorAll("a");
        await click(buttons[buttons.length - 1], "info " + path);
        const fields = {};
        for (const field of document.querySelectorAll("nav tr.field")) {
            fields[field.querySelector("th").textContent.trim().replace(/:$/, "")] =
                field.querySelector("td").textContent.replace(/\s+/g, " ").trim();
        }
        return { text: document.querySelector("nav div.p-3").innerText, fields: fields };
    }
    const walk = { listed: {}, info: {}, shown: {}, errors: [] };
    try {
        await sleep(100);
        walk.menu = menu().map((a) => a.textContent.trim());
        for (const category of Object.keys(categories)) {
            walk.listed[category] = {};
            for (const subcategory of Object.keys(categories[category])) {
                await open(category, subcategory);
                const paths = rows().map((row) => row.querySelector("td").textContent.trim());
                walk.listed[category][subcategory] = paths;
                for (const [i, path] of paths.entries()) {
                    if (results[path].mime_type.startsWith("image/")) {
                        await open(category, subcategory);
                        walk.shown[path] = await view(rows()[i], path);
                    }
                    await open(category, subcategory);
                    walk.info[path] = await info(rows()[i], path);
                }
            }
        }
        const category = "Figures" in categories ? "Figures" : Object.keys(categories)[0];
        await open(category, Object.keys(categories[category]).sort((a, b) => a.localeCompare(b))[0]);
        walk.final = rows()[0].querySelector("td").textContent.trim();
        await view(rows()[0], walk.final);
        await info(rows()[0], walk.final);
        await sleep(200);
    } catch (error) {
        walk.errors.push(String((error && error.stack) || error));
    }
    const out = document.createElement("pre");
    out.id = "tamperlab-walk";
    out.hidden = true;
    out.textContent = JSON.stringify(walk);
    document.body.appendChild(out);
})();
"""


def chromium(page: Path, screenshot: Path, budget_ms: int) -> str:
    """The page's DOM once its scripts have run for `budget_ms` of virtual time, and a screenshot of the window."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={screenshot}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and screenshot.exists(), result.stderr[-4000:]
    return result.stdout


def rendered(dom: str) -> str:
    """The DOM without its scripts and styles: what the page drew, not the data it embeds."""
    return re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)


def colours(png: Path, box: tuple[int, int, int, int] | None = None) -> tuple[int, float]:
    """How many distinct colours the screenshot (or its `box`) has, and the share of its commonest colour."""
    image = Image.open(png).convert("RGB")
    if box:
        image = image.crop(box)
    counts = image.getcolors(image.width * image.height)
    return len(counts), max(counts)[0] / (image.width * image.height)


def report_items(run: Path) -> set[str]:
    """Every table and figure of the run that the report must show: the tables rule's and the visage rule's
    tables and figures, and each landscape scan's CSV and figure (not its shards)."""
    results = run / "results"
    scans = [p for p in results.glob("landscape/**/*") if p.suffix in (".csv", ".png") and "shards" not in p.parts]
    found = [*results.glob("tables/*.csv"), *results.glob("figures/*/*.png"), *scans]
    return {str(path.relative_to(run)) for path in found}


def is_landscape(path: str) -> bool:
    return path.startswith(("results/landscape/", "results/figures/landscape/")) or path.endswith("/visage.csv")


@pytest.fixture(scope="module")
def report(smoke_run, tmp_path_factory) -> Path:
    """`snakemake --report` of the smoke run (it reads the run's results and metadata, and runs no job)."""
    path = tmp_path_factory.mktemp("report") / "report.html"
    snakemake(smoke_run, "--configfile", str(SMOKE), "--report", str(path), targets=SMOKE_TARGETS)
    return path


@pytest.fixture(scope="module")
def walked(report, tmp_path_factory) -> tuple[dict, Path]:
    """What the click-through saw, and the screenshot it ended on (the first figure and its description)."""
    directory = tmp_path_factory.mktemp("walk")
    page = directory / "report.html"
    text = report.read_text()
    end = text.rindex("</body>")
    page.write_text(f"{text[:end]}<script>{WALK}</script>\n{text[end:]}")
    screenshot = directory / "figure.png"
    dom = chromium(page, screenshot, budget_ms=120_000)
    found = re.search(r'<pre id="tamperlab-walk"[^>]*>(.*?)</pre>', dom, flags=re.S)
    assert found, "the click-through did not finish within Chromium's virtual-time budget"
    return json.loads(html.unescape(found.group(1))), screenshot


@pytest.mark.slow
def test_the_report_opens_with_its_menu_and_workflow_graph_drawn(report, tmp_path):
    screenshot = tmp_path / "landing.png"
    page = rendered(chromium(report, screenshot, budget_ms=10_000))
    assert re.search(r'id="loading-screen" style="display: none;"', page), "the report's scripts did not finish"
    menu = re.findall(r"<span>([^<]+)</span>", page)
    assert {"Workflow", "Statistics", "About", "Tables", "Figures", "Landscape scans"} <= set(menu), menu
    assert re.search(r'<canvas [^>]*class="marks"', page), "no workflow graph (Vega) drawn"
    # the landing page describes the configuration (workflow/report/workflow.rst): the smoke config's defences
    text = re.sub(r"<[^>]+>", "", page)
    assert "Defences:" in text and "tar_knowledge (tar)" in text and "Refusal judge:" in text, text[:2000]
    distinct, commonest = colours(screenshot)
    assert distinct >= 64 and commonest < 0.95, (distinct, commonest)


@pytest.mark.slow
def test_every_table_and_figure_is_listed_with_a_caption_stating_its_configuration(walked, smoke_run):
    walk, _ = walked
    assert walk["errors"] == []
    listed = [path for category in walk["listed"].values() for paths in category.values() for path in paths]
    assert sorted(listed) == sorted(report_items(smoke_run))
    assert {"Tables", "Figures", "Landscape scans"} <= set(walk["menu"])
    # the settings the run itself recorded: an evaluation's summary, a landscape scan's manifest, the split seed
    evaluation = json.loads((smoke_run / "results/eval/tiny/none/refusal.json").read_text())
    scan = json.loads(next(smoke_run.glob("results/landscape/**/shards/**/*.manifest.json")).read_text())["params"]
    seed = json.loads((smoke_run / "results/data/splits/manifest.json").read_text())["params"]["seed"]
    for path in listed:
        fields = walk["info"][path]["fields"]
        assert path in walk["info"][path]["text"]
        assert set(CONFIGURATION) <= set(fields) and all(fields[name] for name in CONFIGURATION), (path, fields)
        assert re.search(rf"\b{seed}\b", fields["Seeds"]), (path, fields["Seeds"])
        if is_landscape(path):
            assert fields["Judge"].startswith(scan["judge"]), (path, fields)
            assert re.search(rf"\b{scan['limit']}\b", fields["n"]), (path, fields)
            assert re.search(rf"\b{scan['max_new_tokens']}\b", fields["New tokens"]), (path, fields)
            assert f"directions {scan['seed']}" in fields["Seeds"], (path, fields)
        elif Path(path).name.startswith("hazard_"):  # hazard accuracy: multiple choice, nothing generated
            assert fields["Judge"].startswith("none") and "likelihood" in fields["New tokens"], (path, fields)
        else:
            assert fields["Judge"].startswith(evaluation["judge"]), (path, fields)
            assert evaluation["generation"]["split"] in fields["n"], (path, fields)
            assert re.search(rf"\b{evaluation['generation']['max_new_tokens']}\b", fields["New tokens"]), (path, fields)


@pytest.mark.slow
def test_every_figure_is_drawn_and_the_last_one_opened_is_on_screen(walked, smoke_run):
    walk, screenshot = walked
    figures = {path for path in report_items(smoke_run) if path.endswith(".png")}
    assert set(walk["shown"]) == figures
    for path in figures:
        with Image.open(smoke_run / path) as image:
            assert walk["shown"][path] == list(image.size), path  # decoded by the browser at its own size
    assert walk["final"] in figures and walk["final"] in walk["info"]
    distinct, commonest = colours(screenshot)
    assert distinct >= 64 and commonest < 0.95, (distinct, commonest)
    # the content pane, right of the navbar, holds the figure
    pane, _ = colours(screenshot, (WINDOW[0] // 2, 0, WINDOW[0], WINDOW[1]))
    assert pane >= 64, pane
