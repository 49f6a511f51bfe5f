"""Open every page of the built book in headless Chromium, with no network.

The site in _build/html (run `make book` first) is served on 127.0.0.1 and every
other host is unreachable, so a page that still needs a CDN shows up as a failed
or foreign request. For each page listed in _toc.yml: math is typeset by the
local MathJax, every image decodes, nothing is fetched from another origin,
nothing fails to load, the console has no errors, no code block (input or
output, folded ones unfolded) scrolls sideways at a 1280 px wide window, and a
full-page screenshot is saved to _build/screenshots/<page>.png for a person to
look at.

TVQ_BOOK_ROOT (default: the repository), TVQ_TOC (default: <book root>/_toc.yml)
and TVQ_HTML_DIR (default: <book root>/_build/html) point the test at another
build.
"""

import base64
import functools
import html.parser
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.browser

ROOT = Path(os.environ.get("TVQ_BOOK_ROOT", Path(__file__).resolve().parents[1]))
HTML = Path(os.environ.get("TVQ_HTML_DIR", ROOT / "_build" / "html"))
TOC = Path(os.environ.get("TVQ_TOC", ROOT / "_toc.yml"))
SHOTS = HTML.parent / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE_LOAD_S = 60
MAX_SHOT_HEIGHT = 16_000  # px; Chromium refuses much taller captures
LOCAL_SCHEMES = ("data:", "blob:", "about:")


def toc_pages():
    """(page, source suffix) for the root and each `file:` of _toc.yml, in order."""
    toc = yaml.safe_load(TOC.read_text(encoding="utf-8"))
    entries = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                entries.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return [(entry, source_suffix(entry)) for entry in entries]


def source_suffix(entry):
    """.ipynb or .md: the kind of source file a toc entry was built from."""
    for suffix in (".ipynb", ".md"):
        if (ROOT / f"{entry}{suffix}").is_file():
            return suffix
    return ""


PAGES = toc_pages()
ROOT_PAGE = PAGES[0][0]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def base_url():
    if not (HTML / "index.html").is_file():
        pytest.fail(f"no built book at {HTML}: run `make book` first")
    handler = functools.partial(QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def driver():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        reason = (
            f"{' and '.join(missing)} not installed "
            "(Debian packages chromium and chromium-driver; .ci/run installs them)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tvq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
        # No other host resolves, and anything that is not loopback goes to a
        # proxy port where nothing listens: IP literals cannot leak either.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
    ):
        options.add_argument(flag)
    options.set_capability(
        "goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"}
    )
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    browser.set_page_load_timeout(PAGE_LOAD_S)
    browser.set_script_timeout(PAGE_LOAD_S)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def network_events(browser):
    """CDP Network events since the last call, from the performance log."""
    events = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"].startswith("Network."):
            events.append(message)
    return events


def is_local(url, base_url):
    return url.startswith(base_url) or url.startswith(LOCAL_SCHEMES)


WAIT_FOR_PAGE = """
const done = arguments[arguments.length - 1];
(async () => {
  const deadline = Date.now() + 30000;
  // MathJax loads with `defer`: wait until its startup promise exists, then
  // until the first typesetting pass has finished.
  while (document.querySelector(".math") && !(window.MathJax
         && MathJax.startup && MathJax.startup.promise)) {
    if (Date.now() > deadline) return done("MathJax never started");
    await new Promise(r => setTimeout(r, 50));
  }
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = "eager"; });
  await Promise.all(images.map(img => img.complete ? null
    : new Promise(r => { img.onload = img.onerror = r; })));
  done("ok");
})().catch(e => done("error: " + e));
"""

PAGE_FACTS = """
const math = Array.from(document.querySelectorAll(".math"));
return {
  mathjax: window.MathJax && MathJax.version ? MathJax.version : null,
  math: math.length,
  untypeset: math.filter(m => !m.querySelector("mjx-container")).length,
  containers: document.querySelectorAll("mjx-container").length,
  mathErrors: document.querySelectorAll(
    '[data-mjx-error], [data-mml-node="merror"], mjx-merror').length,
  images: Array.from(document.images).map(i => ({
    src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
  outputImages: document.querySelectorAll(".cell_output img").length,
  repoLinks: Array.from(document.querySelectorAll("a[href]"))
    .map(a => a.href)
    .filter(h => /mybinder\\.org|colab\\.research/.test(h)
      || /github\\.com\\/(tvq-book|executablebooks)/.test(h)),
  resources: performance.getEntriesByType("resource").map(e => e.name),
  height: Math.ceil(Math.max(document.documentElement.scrollHeight,
                             document.body.scrollHeight)),
};
"""


# Unfold every folded cell (myst-nb's hide-input and hide-output are <details>
# elements), then list each code block, input or output, whose content is
# wider than its box: a reader would have to scroll it sideways.
OVERFLOWING_CODE = """
document.querySelectorAll("details").forEach(d => { d.open = true; });
return Array.from(document.querySelectorAll("pre")).filter(
  pre => pre.getClientRects().length && pre.scrollWidth > pre.clientWidth + 1
).map(pre => ({
  scrollWidth: pre.scrollWidth,
  clientWidth: pre.clientWidth,
  output: Boolean(pre.closest(".cell_output, .output")),
  longestLine: pre.textContent.split("\\n").reduce(
    (a, b) => (b.length > a.length ? b : a), "").slice(0, 120),
}));
"""


def save_full_page_screenshot(browser, height, path):
    """Lay the page out in a viewport as tall as its content, then capture it."""
    height = min(max(height, 1), MAX_SHOT_HEIGHT)
    metrics = {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
LOADING_LINK_RELS = {"stylesheet", "preload", "modulepreload", "icon", "manifest"}
CSS_URL = re.compile(r"""(?:url\(\s*|@import\s+)["']?([^"')\s]+)""")


class ResourceLinks(html.parser.HTMLParser):
    """Collects the URLs an HTML page loads by itself (not the links it offers)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "audio", "video", "embed"):
            self.urls.append(attrs.get("src"))
            srcset = attrs.get("srcset") or ""
            self.urls.extend(part.split()[0] for part in srcset.split(",") if part)
        elif tag == "link" and LOADING_LINK_RELS & set(
            (attrs.get("rel") or "").lower().split()
        ):
            self.urls.append(attrs.get("href"))
        style = attrs.get("style") or ""
        self.urls.extend(CSS_URL.findall(style))


def test_built_files_name_no_remote_resources():
    # A static check of what the pages and style sheets would fetch; it needs
    # no browser, so it runs wherever the book was built.
    if not (HTML / "index.html").is_file():
        pytest.fail(f"no built book at {HTML}: run `make book` first")
    remote = []
    for page in sorted(HTML.rglob("*.html")):
        parser = ResourceLinks()
        parser.feed(page.read_text(encoding="utf-8"))
        remote += [(page.name, u) for u in parser.urls if u and REMOTE.match(u)]
    for sheet in sorted(HTML.rglob("*.css")):
        urls = CSS_URL.findall(sheet.read_text(encoding="utf-8", errors="replace"))
        remote += [(sheet.name, u) for u in urls if REMOTE.match(u)]
    assert not remote, f"remote resources in the built site: {sorted(set(remote))}"


def test_index_redirects_to_root_page(driver, base_url):
    driver.get(base_url)
    assert driver.current_url.endswith(f"{ROOT_PAGE}.html"), driver.current_url


@pytest.mark.parametrize(("page", "suffix"), PAGES, ids=[p for p, _ in PAGES])
def test_page_renders_offline(driver, base_url, page, suffix):
    html = HTML / f"{page}.html"
    assert html.is_file(), f"{html} was not built: run `make book`"
    driver.get_log("browser")  # drop what earlier pages logged
    network_events(driver)

    driver.get(base_url + f"{page}.html")
    assert driver.execute_async_script(WAIT_FOR_PAGE) == "ok"
    facts = driver.execute_script(PAGE_FACTS)
    save_full_page_screenshot(driver, facts["height"], SHOTS / f"{Path(page).name}.png")
    events = network_events(driver)
    console = driver.get_log("browser")

    # Nothing from another origin: what the page asked for, and what it loaded.
    requested = [
        e["params"]["request"]["url"]
        for e in events
        if e["method"] == "Network.requestWillBeSent"
    ]
    foreign = [u for u in requested + facts["resources"] if not is_local(u, base_url)]
    assert not foreign, f"{page} requests other hosts: {sorted(set(foreign))}"

    # Nothing failed to load.
    urls = {
        e["params"]["requestId"]: e["params"]["request"]["url"]
        for e in events
        if e["method"] == "Network.requestWillBeSent"
    }
    failed = [
        (urls.get(e["params"]["requestId"]), e["params"].get("errorText"))
        for e in events
        # Only this page's requests: the last page's may still be winding down.
        if e["method"] == "Network.loadingFailed" and e["params"]["requestId"] in urls
    ]
    failed += [
        (e["params"]["response"]["url"], e["params"]["response"]["status"])
        for e in events
        if e["method"] == "Network.responseReceived"
        and e["params"]["response"]["status"] >= 400
    ]
    assert not failed, f"{page}: failed loads {failed}"
    severe = [m["message"] for m in console if m["level"] == "SEVERE"]
    assert not severe, f"{page}: console errors {severe}"

    broken = [i["src"] for i in facts["images"] if not i["ok"]]
    assert not broken, f"{page}: images that did not decode: {broken}"

    # Math is typeset by the vendored MathJax, without TeX errors.
    if suffix == ".ipynb" or page == ROOT_PAGE:
        assert facts["math"] > 0, f"{page} has no math"
    if facts["math"]:
        assert facts["mathjax"] == "3.2.2", f"{page}: MathJax {facts['mathjax']}"
        assert facts["untypeset"] == 0, f"{page}: {facts['untypeset']} untypeset"
        assert facts["containers"] >= facts["math"]
        assert facts["mathErrors"] == 0, f"{page}: {facts['mathErrors']} TeX errors"

    # No code block scrolls sideways, folded cells included (measured after the
    # facts above, as it unfolds them).
    overflowing = driver.execute_script(OVERFLOWING_CODE)
    assert not overflowing, (
        f"{page}: code blocks wider than the page at 1280 px (keep notebook "
        f"code within book/ruff.toml's line length): {overflowing}"
    )

    if suffix == ".ipynb":
        assert facts["outputImages"] > 0, f"{page}: no figure in the cell outputs"
    # The book names no hosted copy of its repository (none is published):
    # no launch buttons, no repository link (_config.yml).
    assert not facts["repoLinks"], (
        f"{page}: links to a repository: {facts['repoLinks']}"
    )
