"""report.html: self-contained, its table equals leaderboard.csv, and it sorts and explains itself in a browser.

The browser tests render the page in headless Chromium (Debian package ``chromium``): one reads the table back
from the DOM after the page's JavaScript ran; one drives the page with playwright (the ``dev`` extra, on the
system browser: no ``playwright install``) at 1280x800 and measures where the columns are. Both are skipped only
when no Chromium binary is installed (so they run wherever one is, CI included).
"""

from __future__ import annotations

import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from benchmark import leaderboard as lb
from benchmark import metrics
from tests.test_leaderboard import synthetic_records, write_records


class TableReader(HTMLParser):
    """Headers (name -> title) and rows (list of {column: data-value}) of ``<table id=leaderboard>``."""

    def __init__(self) -> None:
        super().__init__()
        self.in_table = False
        self.titles: dict[str, str] = {}
        self.header: list[str] = []
        self.rows: list[dict[str, str]] = []
        self.images: list[str] = []
        self.scripts_src: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "leaderboard":
            self.in_table = True
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag in ("script", "link") and (a.get("src") or a.get("href")):
            self.links.append(a.get("src") or a.get("href"))
        elif self.in_table and tag == "th":
            self.header.append(a["data-col"])
            self.titles[a["data-col"]] = a.get("title", "")
        elif self.in_table and tag == "tr" and self.header:
            self.rows.append({})
        elif self.in_table and tag == "td":
            self.rows[-1][a["data-col"]] = a.get("data-value", "")

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = False


def read(html: str) -> TableReader:
    p = TableReader()
    p.feed(html)
    return p


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory):
    d = write_records(tmp_path_factory.mktemp("rep"), synthetic_records())
    lb.write_all(d)
    return d


def _same(cell: str, expected) -> bool:
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        return cell == ""
    if isinstance(expected, (bool,)) or type(expected).__name__ == "bool_":
        return cell == str(bool(expected))
    try:
        return float(cell) == float(expected)  # exact: data-value holds the full-precision value
    except ValueError:
        return cell == str(expected)


def check_table_matches_csv(page: TableReader, board: pd.DataFrame) -> None:
    assert len(page.rows) == len(board) > 0
    key = lambda r: (r["kind"], r["method"], r["model"], r["sequence_id"])  # noqa: E731
    by_key = {key(r): r for r in page.rows}
    assert len(by_key) == len(board)
    for _, expected in board.iterrows():
        cells = by_key[key(expected)]
        assert set(cells) == set(page.header)
        for col, cell in cells.items():
            assert _same(cell, expected[col]), (col, cell, expected[col])


def test_report_is_self_contained_and_matches_leaderboard_csv(result_dir):
    html = (result_dir / "report.html").read_text(encoding="utf-8")
    page = read(html)
    board = pd.read_csv(result_dir / "leaderboard.csv", float_precision="round_trip", dtype={"seeds": str})
    check_table_matches_csv(page, board)
    assert list(page.rows[i]["method"] for i in range(len(page.rows))) == list(board["method"])  # CSV order
    for name in metrics.METRICS:  # every metric column, its definition on hover
        assert name in page.header and metrics.METRICS[name][2] in page.titles[name]
    assert "Pareto" in page.titles["pareto"] and "hash" in page.titles["sequence_id"]
    n_png = len(list((result_dir / "plots").rglob("*.png")))
    assert len(page.images) == n_png >= 3 and all(s.startswith("data:image/png;base64,") for s in page.images)
    assert page.links == [] and "http://" not in html and "https://" not in html  # nothing fetched from outside
    assert "did not finish" in html and "RuntimeError: diverged" in html  # the failed run is reported


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def dump_dom(browser: str, url: str, profile: Path) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
           f"--user-data-dir={profile}", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "<table" in out.stdout, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_in_headless_chromium_sorts_and_reads_back(result_dir, tmp_path):
    board = pd.read_csv(result_dir / "leaderboard.csv", float_precision="round_trip", dtype={"seeds": str})
    url = (result_dir / "report.html").resolve().as_uri()
    browser = chromium()
    page = read(dump_dom(browser, url, tmp_path / "profile"))
    check_table_matches_csv(page, board)
    # the page's own JavaScript sorts on load from the URL fragment, the same code a header click runs
    for col, direction in (("final_avg", "asc"), ("general_delta", "desc")):
        dom = dump_dom(browser, f"{url}#sort={col}:{direction}", tmp_path / "profile")
        page = read(dom)
        check_table_matches_csv(page, board)
        values = [float(r[col]) for r in page.rows if r[col] != ""]
        assert values == sorted(values, reverse=direction == "desc") and len(values) >= 3
        assert all(r[col] == "" for r in page.rows[len(values):])  # undefined cells sort last
        assert f'data-col="{col}"' in dom and ('aria-sort="ascending"' if direction == "asc"
                                                else 'aria-sort="descending"') in dom


HEADLINE = ["method", "final_avg", "general_delta", "plasticity", "forgetting"]


@pytest.fixture(scope="module")
def published_copy(tmp_path_factory):
    """A report over a copy of the published tiny-world records (13 rows, real widths), without the plots."""
    d = tmp_path_factory.mktemp("published")
    shutil.copytree(Path(__file__).resolve().parents[1] / "results" / "tiny-world" / "runs", d / "runs")
    lb.write_all(d, plots=False)
    return d


@pytest.mark.skipif(chromium() is None, reason="no chromium binary (chromium, chromium-browser or google-chrome)")
def test_report_headline_columns_fit_a_laptop_screen_and_the_toggle_shows_the_rest(published_copy):
    """At 1280x800 the headline columns are on screen; "more columns" reveals the others; sorting still works."""
    from playwright.sync_api import sync_playwright  # the dev extra; only this test needs it

    url = (published_copy / "report.html").resolve().as_uri()
    board = pd.read_csv(published_copy / "leaderboard.csv", float_precision="round_trip", dtype={"seeds": str})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            header = page.locator("#leaderboard thead th")
            cols = header.evaluate_all("hs => hs.map(h => h.dataset.col)")
            assert cols[:len(HEADLINE)] == HEADLINE and len(cols) > 20
            for col in HEADLINE:
                box = page.locator(f'#leaderboard th[data-col="{col}"]').bounding_box()
                assert box is not None and 0 <= box["x"] and box["x"] + box["width"] <= 1280, (col, box)
                assert box["y"] + box["height"] <= 800, (col, box)  # above the fold, too
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # no sideways scrolling
            more = [c for c in cols if c not in HEADLINE]
            assert all(page.locator(f'#leaderboard th[data-col="{c}"]').is_hidden() for c in more)
            toggle = page.locator("button.more-toggle")
            assert toggle.get_attribute("aria-expanded") == "false" and f"({len(more)})" in toggle.inner_text()
            toggle.click()
            assert toggle.get_attribute("aria-expanded") == "true"
            for c in more:
                assert page.locator(f'#leaderboard th[data-col="{c}"]').is_visible(), c
            assert page.locator('#leaderboard td[data-col="general_worst_delta"]').first.is_visible()
            # the headline stays in place when the rest is shown
            assert page.locator('#leaderboard th[data-col="forgetting"]').bounding_box()["x"] + 1 < 1280
            # header tooltips: each header's title is its definition
            for col in ("final_avg", "general_delta", "n_seeds"):
                title = page.locator(f'#leaderboard th[data-col="{col}"]').get_attribute("title")
                assert title and (col not in metrics.METRICS or metrics.METRICS[col][2] in title)
            # sorting by a click on a headline header: first click descending, second ascending
            page.locator('#leaderboard th[data-col="general_delta"]').click()
            values = page.locator('#leaderboard tbody td[data-col="general_delta"]').evaluate_all(
                "cs => cs.map(c => c.dataset.value)")
            nums = [float(v) for v in values if v != ""]
            assert nums == sorted(nums, reverse=True) and len(nums) == len(board)
            page.locator('#leaderboard th[data-col="general_delta"]').click()
            assert page.locator('#leaderboard th[data-col="general_delta"]').get_attribute("aria-sort") == "ascending"
            toggle.click()
            assert page.locator('#leaderboard th[data-col="n_seeds"]').is_hidden()
            page = browser.new_page(viewport={"width": 1280, "height": 800})  # a fresh load: the hash is read on load
            page.goto(url + "#columns=all")
            assert page.locator('#leaderboard th[data-col="n_seeds"]').is_visible()
        finally:
            browser.close()
