"""The shipped workflows as a user meets them: the real ComfyUI frontend (comfyui-frontend-package, served by the
test server with the pack) in headless Chromium, driven through selenium.

For every shipped UI workflow: it loads through the frontend's own file input with no alert, toast, dialog or
JavaScript error; every node is a registered node type (a server's, or a frontend-only note) and none is flagged;
`app.graphToPrompt()` is exactly the shipped API workflow; every node and group title is visible at load in a
1600x1000 window (on the canvas, not under the toolbars, the side bar or the minimap), at a zoom that draws text, and
no node covers another node or a group title. The template browser lists exactly the UI workflows, each with its
thumbnail. One workflow is queued with the Run button and its images checked. On failure a screenshot is saved to
out/browser/<test>.png.

Chromium and its driver are Debian's (scripts/setup_host.sh installs them); only loopback traffic.
"""

import contextlib
import io
import json
import pathlib
import shutil
import tempfile
import time

import numpy as np
import pytest
from PIL import Image
from test_e2e_server import API_DIR, TEST_STEPS, UI_WORKFLOWS, load, shrunk

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1600, 1000)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  f"--window-size={WINDOW[0]},{WINDOW[1]}"]
SCREENSHOTS = pathlib.Path(__file__).resolve().parent.parent / "out" / "browser"
PACK = "comfyui_guidance"
WAIT_S = 30
RUN_WORKFLOW = "APG vs CFG (reference model)"
THUMBNAIL_PX = 256  # scripts/render_thumbnails.py
# Browser console errors that are the frontend's own on a fresh, offline install, not the pack's: missing optional
# user files, the empty user folders, and look-ups of the Comfy registry that the page's content policy blocks.
CONSOLE_NOISE = ("/user.css ", "/favicon.ico ", "/api/userdata?dir=", "/comfy.templates.json ", "api.comfy.org")

# Runs before the page's own scripts: keeps every alert, uncaught exception and unhandled rejection.
RECORD_PROBLEMS = """
window.__problems = [];
window.alert = message => window.__problems.push('alert: ' + message);
window.addEventListener('error', e => window.__problems.push('exception: ' + e.message));
window.addEventListener('unhandledrejection',
    e => window.__problems.push('unhandled rejection: ' + (e.reason && e.reason.stack || e.reason)));
"""

# What the user sees of the loaded graph, in window pixels: per node and per group title bar, the rectangle, whether
# a few points inside it show the canvas itself or the node's own DOM widgets (a prompt's text box), with no toolbar,
# menu or minimap over them, and the node checks.
INSPECT_GRAPH = """
const canvas = app.canvas, ds = canvas.ds, box = canvas.canvas.getBoundingClientRect();
const toWindow = ([x, y, w, h]) => [(x + ds.offset[0]) * ds.scale + box.left, (y + ds.offset[1]) * ds.scale + box.top,
                                    w * ds.scale, h * ds.scale];
const onCanvas = ([x, y, w, h], own = []) => [[x + 3, y + 3], [x + w - 3, y + 3], [x + 3, y + h - 3],
                                              [x + w - 3, y + h - 3], [x + w / 2, y + h / 2]].every(([px, py]) => {
    const found = document.elementFromPoint(px, py);
    return found === canvas.canvas || own.some(element => element.contains(found));
});
const nodes = app.graph.nodes.map(n => {
    const rect = toWindow(Array.from(n.boundingRect));
    const own = (n.widgets || []).map(w => w.element).filter(Boolean);
    return {id: n.id, type: n.type, graph_rect: Array.from(n.boundingRect), visible: onCanvas(rect, own),
            registered: !!LiteGraph.registered_node_types[n.type] && (!!n.constructor.nodeData || !!n.isVirtualNode),
            flagged: !!n.has_errors, labels: (n.widgets || []).map(w => w.label || w.name)};
});
const groups = app.graph.groups.map(g => {
    const [x, y, w] = Array.from(g.boundingRect), title = [x, y, w, g.titleHeight];
    return {title: g.title, graph_title_rect: title, visible: onCanvas(toWindow(title))};
});
return {nodes, groups, low_quality: canvas.low_quality};
"""


def overlap(a, b):
    """Whether rectangles [x, y, w, h] a and b share any area."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def wait_for(condition, what, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def settle(read, done, timeout_s=WAIT_S):
    """The value of `read()` once `done` holds for it, or its last value after `timeout_s`, for the caller's assert."""
    deadline = time.monotonic() + timeout_s
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


class Frontend:
    """The ComfyUI page in a headless Chromium: its problems since the last check, and the graph it shows."""

    def __init__(self, server, profile):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.server = server
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_PROBLEMS})
        # A new user's first start opens the template browser over the graph; the tests open it themselves.
        status, _ = server.request("/api/settings/Comfy.TutorialCompleted", True)
        assert status == 200
        self.driver.get(server.url)
        wait_for(lambda: self.js("return !!(window.app && app.graph && app.canvas && "
                                 "document.getElementById('comfy-file-input'))"), "the frontend to start")

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def problems(self):
        """Alerts, exceptions, unhandled rejections and console errors (less CONSOLE_NOISE) since the last call, and
        the toasts and dialogs on the page."""
        found = self.js("const p = window.__problems; window.__problems = []; return p;")
        found += [f"console: {entry['message']}" for entry in self.driver.get_log("browser")
                  if entry["level"] == "SEVERE" and not any(noise in entry["message"] for noise in CONSOLE_NOISE)]
        # read in one go: a toast can go away between two WebDriver calls
        found += self.js("return [...document.querySelectorAll('.p-toast-message, .p-dialog')]"
                         ".filter(e => e.getClientRects().length).map(e => e.className + ': ' + e.innerText)")
        return found

    def reset(self):
        """Closes what an earlier test left open (a dialog after a failure, say), so that one failure does not
        cascade into the next tests: Escape first, a page reload if that does not do it."""
        dialogs = "return document.querySelectorAll('.p-dialog').length"
        if self.js(dialogs):
            self.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
            if settle(lambda: self.js(dialogs), lambda n: n == 0, timeout_s=5):
                self.driver.get(self.server.url)
                wait_for(lambda: self.js("return !!(window.app && app.graph && app.canvas)"), "the frontend")
        self.problems()

    def click(self, selector):
        """Clicks the element that `selector` finds, finding it again if the page re-rendered it meanwhile."""
        def clicked():
            try:
                self.driver.find_element(By.CSS_SELECTOR, selector).click()
                return True
            except (StaleElementReferenceException, ElementClickInterceptedException):
                return False
        wait_for(clicked, f"a click on {selector}")

    def open_file(self, path):
        """Load `path` as a user does with Open (the frontend's file input); wait until its nodes are on the graph."""
        expected = sorted([n["id"], n["type"]] for n in load(path)["nodes"])
        self.driver.find_element(By.ID, "comfy-file-input").send_keys(str(path))
        wait_for(lambda: sorted(self.js("return app.graph.nodes.map(n => [n.id, n.type])")) == expected,
                 f"{path.name} on the graph")
        time.sleep(0.5)  # the frontend reports a bad workflow in a toast after loading what it can

    def graph_to_prompt(self):
        return self.driver.execute_async_script(
            "const done = arguments[0]; app.graphToPrompt().then(p => done(p.output), e => done(String(e)));")

    @contextlib.contextmanager
    def screenshot_on_failure(self, name):
        try:
            yield
        except BaseException:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
            raise

    def quit(self):
        self.driver.quit()


@pytest.fixture(scope="module")
def browser(comfy_server):
    profile = tempfile.mkdtemp(prefix="guidance-chromium-")
    page = Frontend(comfy_server, profile)
    try:
        yield page
    finally:
        page.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def frontend(browser):
    """The page, with nothing left open by an earlier test."""
    browser.reset()
    return browser


def test_template_browser_lists_the_ui_workflows_with_thumbnails(frontend):
    """Templates -> Extensions -> the pack: one card per UI workflow (no API-format ones), each thumbnail loaded from
    the pack's folder; a card opens its workflow without complaint."""
    with frontend.screenshot_on_failure("template_browser"):
        frontend.problems()
        frontend.js("return app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        # the category's entry, clicked in the page: the dialog re-renders its list while it loads
        wait_for(lambda: frontend.js("const e = [...document.querySelectorAll('.p-dialog span')]"
                                     ".find(e => e.textContent.trim() === arguments[0]); if (e) e.click(); return !!e;",
                                     PACK), "the pack's template category")
        names = sorted(p.stem for p in UI_WORKFLOWS)
        listed = settle(lambda: frontend.js(
            "return [...document.querySelectorAll('.p-dialog [data-testid^=\"template-workflow-\"]')]"
            ".map(card => card.dataset.testid.slice('template-workflow-'.length))"), lambda found: len(found) >= len(names))
        assert sorted(listed) == names
        # A thumbnail loads while its card is in view (and may be dropped once it scrolls away): one card at a time.
        read_card = ("const card = document.querySelector(`.p-dialog [data-testid=\"template-workflow-${arguments[0]}\"]`);"
                     "card.scrollIntoView(); const img = card.querySelector('img');"
                     "return [arguments[0], img && img.src, img && img.complete ? img.naturalWidth : 0];")
        cards = [settle(lambda: frontend.js(read_card, name), lambda found: found[2]) for name in names]
        for name, src, width in cards:
            assert src and src.startswith("blob:") and width == THUMBNAIL_PX, (name, src, width)
        frontend.click(f'[data-testid="template-workflow-{RUN_WORKFLOW}"]')
        wait_for(lambda: not frontend.driver.find_elements(By.CSS_SELECTOR, ".p-dialog"), "the dialog to close")
        expected = sorted([n["id"], n["type"]] for n in load(API_DIR.parent / f"{RUN_WORKFLOW}.json")["nodes"])
        wait_for(lambda: sorted(frontend.js("return app.graph.nodes.map(n => [n.id, n.type])")) == expected,
                 "the template on the graph")
        time.sleep(0.5)
        assert frontend.problems() == []


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_cleanly(frontend, path):
    """Opened with the frontend's file input: no complaint, every node known and unflagged, and the prompt it queues
    is the shipped API workflow."""
    with frontend.screenshot_on_failure(path.stem):
        frontend.problems()
        frontend.open_file(path)
        assert frontend.problems() == []
        graph = frontend.js(INSPECT_GRAPH)
        assert [n["id"] for n in graph["nodes"] if not n["registered"] or n["flagged"]] == []
        assert frontend.graph_to_prompt() == load(API_DIR / path.name)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_fits_the_window(frontend, path):
    """At load, in a 1600x1000 window, the saved view's zoom draws the text (the frontend draws no text below a
    zoom of about 0.57), every node and group title is on the canvas (not under a toolbar, the side bar or the
    minimap; a node's own prompt box counts as the node), and no node covers another node or a group title."""
    with frontend.screenshot_on_failure(f"{path.stem}_layout"):
        frontend.open_file(path)
        graph = frontend.js(INSPECT_GRAPH)
        assert not graph["low_quality"], "zoomed out so far that the frontend draws no text"
        hidden = [f"node {n['id']} {n['type']}" for n in graph["nodes"] if not n["visible"]]
        hidden += [f"group {g['title']!r}" for g in graph["groups"] if not g["visible"]]
        assert hidden == [], f"not fully visible at load in a {WINDOW[0]}x{WINDOW[1]} window"
        nodes = graph["nodes"]
        covered = [(a["id"], b["id"]) for i, a in enumerate(nodes) for b in nodes[i + 1:]
                   if overlap(a["graph_rect"], b["graph_rect"])]
        covered += [(n["id"], g["title"]) for n in nodes for g in graph["groups"]
                    if overlap(n["graph_rect"], g["graph_title_rect"])]
        assert covered == [], "nodes that cover another node or a group title"


def test_cfgpp_guidance_reads_lambda(frontend):
    """The CFG++ nodes' guidance widget is labelled lambda, as in the README and the tooltip."""
    frontend.problems()
    frontend.open_file(API_DIR.parent / "CFG++ image editing (SD1.5).json")
    labels = {n["type"]: n["labels"] for n in frontend.js(INSPECT_GRAPH)["nodes"] if n["type"].startswith("CFGpp")}
    assert labels == {"CFGppSampler": ["sampler_name", "lambda"], "CFGppDDIMInversion": ["lambda"],
                      "CFGppDDIMSampleFromInversion": ["lambda"]}
    fresh = frontend.js("const n = LiteGraph.createNode('CFGppSampler'); app.graph.add(n);"
                        "const labels = [n.widgets.map(w => w.label || w.name), n.inputs.map(i => i.label || "
                        "i.localized_name || i.name)]; app.graph.remove(n); return labels;")
    assert fresh == [["sampler_name", "lambda"], ["mask", "sampler_name", "lambda"]]  # mask: the optional socket


def test_run_button_queues_the_workflow(frontend, comfy_server):
    """The reference model's APG workflow, opened, set to TEST_STEPS steps in its widgets (CPU budget) and queued
    with the Run button, saves its CFG and APG images: the reference model's 32x32 images, one per class, that differ
    between CFG and APG, and shows them on its Save Image nodes."""
    with frontend.screenshot_on_failure("run_button"):
        frontend.problems()
        frontend.open_file(API_DIR.parent / f"{RUN_WORKFLOW}.json")
        frontend.js("app.graph.nodes.flatMap(n => n.widgets || []).filter(w => w.name === 'steps')"
                    ".forEach(w => { w.value = arguments[0]; })", TEST_STEPS)
        before = set(comfy_server.get("/history"))
        frontend.click(".comfyui-queue-button button")
        [prompt_id] = wait_for(lambda: set(comfy_server.get("/history")) - before, "the queued prompt", 300)
        entry = wait_for(lambda: (e := comfy_server.get(f"/history/{prompt_id}")[prompt_id])["status"].get(
            "completed") is not None and e, "the run to finish", 300)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert entry["prompt"][2] == shrunk(load(API_DIR / f"{RUN_WORKFLOW}.json"))
        images = {}
        for node_id, output in entry["outputs"].items():
            prefix = entry["prompt"][2][node_id]["inputs"]["filename_prefix"]
            images[prefix] = np.stack([np.asarray(Image.open(io.BytesIO(comfy_server.view(image))).convert("RGB"),
                                                  dtype=np.float32) / 255 for image in output["images"]])
        assert sorted(images) == [f"{RUN_WORKFLOW}/apg", f"{RUN_WORKFLOW}/cfg"]
        cfg, apg = images[f"{RUN_WORKFLOW}/cfg"], images[f"{RUN_WORKFLOW}/apg"]
        assert cfg.shape == apg.shape == (10, 32, 32, 3)
        assert cfg.std(axis=(1, 2, 3)).min() > 0.05 and apg.std(axis=(1, 2, 3)).min() > 0.05
        assert np.abs(cfg - apg).mean() > 0.005
        # the frontend shows what it ran: the Save Image nodes' previews
        wait_for(lambda: frontend.js("return app.graph.nodes.filter(n => n.type === 'SaveImage')"
                                     ".every(n => n.imgs && n.imgs.length === 10)"), "the previews")
        assert frontend.problems() == []
