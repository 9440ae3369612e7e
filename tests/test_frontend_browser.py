"""The shipped workflows as a user meets them: the real ComfyUI frontend (comfyui-frontend-package, served by the
test server with the pack) in headless Chromium, driven through selenium.

For every shipped UI workflow: it loads through the frontend's own file input with no alert, toast, dialog, error
overlay or JavaScript error; every node is a registered node type (a server's, or a frontend-only note) and none is
flagged; `app.graphToPrompt()` is exactly the shipped API workflow; every node and group title is visible at load in
a 1600x1000 window (on the canvas, not under the toolbars, the side bar or the minimap), at a zoom that draws text,
and no node covers another node or a group title. The template browser lists exactly the UI workflows, each with its
thumbnail. One workflow is queued with the Run button and its images checked. On failure a screenshot is saved to
out/browser/<test>.png, and the message names the frontend version.

The frontend is the host's own, or the one $GUIDANCE_FRONTEND_ROOT names (scripts/comfy_server.py); the page elements
are found through roles and test ids that frontends 1.32.9, 1.49.6 and 1.58.1 share (FrontendSelectors). Chromium and
its driver are Debian's (scripts/setup_host.sh installs them); only loopback traffic.
"""

import contextlib
import importlib.metadata
import io
import json
import os
import pathlib
import re
import shutil
import tempfile
import time

import numpy as np
import pytest
from PIL import Image
from comfy_server import FRONTEND_ROOT
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
NODE_TITLE_PX = 30  # LiteGraph's NODE_TITLE_HEIGHT: a node's bounding rectangle includes its title bar
# Browser console errors that are the frontend's own on a fresh, offline install, not the pack's: missing optional
# user files, the empty user folders, and look-ups of the Comfy registry that the page's content policy blocks.
CONSOLE_NOISE = ("/user.css ", "/favicon.ico ", "/api/userdata?dir=", "/comfy.templates.json ", "api.comfy.org")
# What a newer frontend (1.49.6, 1.58.1) logs against an older backend (0.3.75) that lacks the routes it asks for: the
# jobs list and the template logos. The host's, not the pack's; matched exactly, so any other 404 still fails a test.
OLD_BACKEND_404S = tuple(re.compile(pattern) for pattern in (
    r"/api/jobs\?\S* - Failed to load resource: the server responded with a status of 404 ",
    r'"\[Jobs API\] Error fetching jobs:" JobsApiError: Failed to fetch jobs: 404\b',
    r'"\[Jobs API\] Failed to fetch jobs: 404"',
    r'"Failed to fetch queue:" JobsApiError: Failed to fetch jobs: 404\b',
    r"/templates/index_logo\.json - Failed to load resource: the server responded with a status of 404 ",
))


class FrontendSelectors:
    """CSS selectors for the page elements the tests use, each matching the same thing on frontends 1.32.9, 1.49.6 and
    1.58.1 (roles and test ids rather than a component library's class names, where a frontend has them)."""

    # a modal: the template browser, a "missing nodes" or "prompt failed" report (1.32.9: PrimeVue's .p-dialog, which
    # carries the role too)
    DIALOG = "[role=dialog]"
    # a template card of the template browser; the test id ends with the workflow's name
    TEMPLATE_CARD = '[data-testid^="template-workflow-"]'
    # the Run button: the button itself (1.49.6, 1.58.1), or the main button of the split button (1.32.9)
    RUN = 'button[data-testid="queue-button"], [data-testid="queue-button"] > button:first-of-type'
    # a toast: PrimeVue's (1.32.9, 1.49.6) or the list item of 1.58.1's toaster (not its empty live region)
    TOAST = ".p-toast-message, li[role=alert]"
    # the problems panel over the canvas (1.49.6, 1.58.1; 1.32.9 reports in a dialog)
    ERROR_OVERLAY = "[data-testid=error-overlay]"
    # what a test must not see after loading or running a workflow
    PROBLEMS = {"dialog": DIALOG, "toast": TOAST, "error overlay": ERROR_OVERLAY}

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
    return {id: String(n.id), type: n.type, graph_rect: Array.from(n.boundingRect), visible: onCanvas(rect, own),
            registered: !!LiteGraph.registered_node_types[n.type] && (!!n.constructor.nodeData || !!n.isVirtualNode),
            flagged: !!n.has_errors, labels: (n.widgets || []).map(w => w.label || w.name)};
});
const groups = app.graph.groups.map(g => {
    const [x, y, w] = Array.from(g.boundingRect), title = [x, y, w, g.titleHeight];
    return {title: g.title, graph_title_rect: title, visible: onCanvas(toWindow(title))};
});
return {nodes, groups, low_quality: canvas.low_quality};
"""


# The drawn layout may differ from the saved one: the frontend grows a node whose title or widgets need more room in
# the fonts of the machine at hand. The saved layouts leave room for that (test_workflows_ui.py's
# test_layout_leaves_slack: 24 px or more between nodes and widths above the title's estimate), so the check on the
# drawn layout tolerates a node drawn up to 24 px wider or taller than saved, and fails only where two drawn
# rectangles share area.
def overlap(a, b):
    """Whether rectangles [x, y, w, h] a and b share any area."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def as_drawn(node, saved):
    """How a drawn node's size differs from its saved one, for a failure message."""
    width, height = node["graph_rect"][2], node["graph_rect"][3] - NODE_TITLE_PX
    return f"node {node['id']} {node['type']}: saved {saved[0]}x{saved[1]}, drawn {width:.0f}x{height:.0f}"


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
        self.load_page()
        self.version = self.js("return window.__COMFYUI_FRONTEND_VERSION__")

    def load_page(self):
        self.driver.get(self.server.url)
        wait_for(lambda: self.js("return !!(window.app && app.graph && app.canvas && "
                                 "document.getElementById('comfy-file-input'))"), "the frontend to start")

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def shown(self, kinds):
        """["<kind>: <text>"] of the elements on the page that the selectors {kind: selector} find, read in one go (a
        toast can go away between two WebDriver calls)."""
        return self.js("return Object.entries(arguments[0]).flatMap(([kind, selector]) => "
                       "[...document.querySelectorAll(selector)].filter(e => e.getClientRects().length)"
                       ".map(e => kind + ': ' + e.innerText))", kinds)

    def problems(self):
        """Alerts, exceptions, unhandled rejections and console errors (less CONSOLE_NOISE and OLD_BACKEND_404S) since
        the last call, and the dialogs, toasts and error overlay on the page."""
        found = self.js("const p = window.__problems; window.__problems = []; return p;")
        found += [f"console: {entry['message']}" for entry in self.driver.get_log("browser")
                  if entry["level"] == "SEVERE" and not any(noise in entry["message"] for noise in CONSOLE_NOISE)
                  and not any(known.search(entry["message"]) for known in OLD_BACKEND_404S)]
        return found + self.shown(FrontendSelectors.PROBLEMS)

    def reset(self):
        """Closes what an earlier test left open (a dialog, a toast or the error overlay after a failure, say), so that
        one failure does not cascade into the next tests: Escape first, a page reload if that does not do it."""
        if self.shown(FrontendSelectors.PROBLEMS):
            self.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
            if settle(lambda: self.shown(FrontendSelectors.PROBLEMS), lambda found: not found, timeout_s=5):
                self.load_page()
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

    def nodes(self):
        """Sorted [id, type] of the graph's nodes; ids as strings (numbers in saved JSON and in 1.32.9's graph,
        strings in later frontends' graph)."""
        return sorted(self.js("return app.graph.nodes.map(n => [String(n.id), n.type])"))

    def open_file(self, path):
        """Load `path` as a user does with Open (the frontend's file input); wait until its nodes are on the graph."""
        expected = sorted([str(n["id"]), n["type"]] for n in load(path)["nodes"])
        self.driver.find_element(By.ID, "comfy-file-input").send_keys(str(path))
        wait_for(lambda: self.nodes() == expected, f"{path.name} on the graph")
        time.sleep(0.5)  # the frontend reports a bad workflow in a toast after loading what it can

    def graph_to_prompt(self):
        return self.driver.execute_async_script(
            "const done = arguments[0]; app.graphToPrompt().then(p => done(p.output), e => done(String(e)));")

    @contextlib.contextmanager
    def screenshot_on_failure(self, name):
        """On a failure: a screenshot in out/browser/, and the frontend's version and the screenshot's path in the
        failure's report."""
        try:
            yield
        except BaseException as failure:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            screenshot = SCREENSHOTS / f"{name} (frontend {self.version}).png"
            self.driver.save_screenshot(str(screenshot))
            failure.add_note(f"frontend {self.version}; screenshot: {screenshot}")
            raise

    def quit(self):
        self.driver.quit()


@pytest.fixture(scope="module")
def browser(comfy_server):
    profile = tempfile.mkdtemp(prefix="guidance-chromium-")
    page = Frontend(comfy_server, profile)
    print(f"frontend {page.version}")  # in the report of a failing test
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
        wait_for(lambda: frontend.js("const e = [...document.querySelectorAll(arguments[0] + ' span')]"
                                     ".find(e => e.textContent.trim() === arguments[1]); if (e) e.click(); return !!e;",
                                     FrontendSelectors.DIALOG, PACK), "the pack's template category")
        names = sorted(p.stem for p in UI_WORKFLOWS)
        cards = f"{FrontendSelectors.DIALOG} {FrontendSelectors.TEMPLATE_CARD}"
        listed = settle(lambda: frontend.js(
            "return [...document.querySelectorAll(arguments[0])]"
            ".map(card => card.dataset.testid.slice('template-workflow-'.length))", cards),
            lambda found: len(found) >= len(names))
        assert sorted(listed) == names
        # A thumbnail loads while its card is in view (and may be dropped once it scrolls away): one card at a time.
        read_card = ("const card = [...document.querySelectorAll(arguments[0])]"
                     ".find(card => card.dataset.testid === 'template-workflow-' + arguments[1]);"
                     "card.scrollIntoView(); const img = card.querySelector('img');"
                     "return [arguments[1], img && img.src, img && img.complete ? img.naturalWidth : 0];")
        thumbnails = [settle(lambda: frontend.js(read_card, cards, name), lambda found: found[2]) for name in names]
        for name, src, width in thumbnails:
            assert src and src.startswith("blob:") and width == THUMBNAIL_PX, (name, src, width)
        frontend.click(f'{FrontendSelectors.DIALOG} [data-testid="template-workflow-{RUN_WORKFLOW}"]')
        wait_for(lambda: not frontend.shown({"dialog": FrontendSelectors.DIALOG}), "the dialog to close")
        expected = sorted([str(n["id"]), n["type"]] for n in load(API_DIR.parent / f"{RUN_WORKFLOW}.json")["nodes"])
        wait_for(lambda: frontend.nodes() == expected, "the template on the graph")
        time.sleep(0.5)
        assert frontend.problems() == []


def test_serves_the_chosen_frontend(browser, comfy_server):
    """The page is the frontend that $GUIDANCE_FRONTEND_ROOT names (the server's log names it as its web root), or
    else the host's own comfyui-frontend-package."""
    root = os.environ.get(FRONTEND_ROOT)
    if root:
        assert f"[Prompt Server] web root: {root}" in comfy_server.log(), f"page: frontend {browser.version}"
    else:
        assert browser.version == importlib.metadata.version("comfyui-frontend-package")


def test_a_toast_is_a_problem(frontend):
    """A toast that the frontend shows, whichever way this frontend draws it, is among the problems the tests check."""
    with frontend.screenshot_on_failure("toast"):
        frontend.open_file(API_DIR.parent / f"{RUN_WORKFLOW}.json")
        assert frontend.problems() == []
        frontend.js("app.extensionManager.toast.add({severity: 'error', summary: 'Test', detail: arguments[0], "
                    "life: 30000})", "a toast raised by the test")
        found = settle(frontend.problems, lambda found: found)
        assert [problem for problem in found if problem.startswith("toast: ")] == [
            "toast: Test\na toast raised by the test"], found


def test_a_refused_prompt_is_a_problem(frontend, comfy_server):
    """A workflow queued with the Run button that the server refuses (a step count below its minimum) is reported
    by the frontend, in a dialog (1.32.9) or its error overlay (1.49.6, 1.58.1), and that report is among the problems
    the tests check; nothing runs."""
    with frontend.screenshot_on_failure("refused_prompt"):
        frontend.open_file(API_DIR.parent / f"{RUN_WORKFLOW}.json")
        assert frontend.problems() == []
        frontend.js("app.graph.nodes.flatMap(n => n.widgets || []).filter(w => w.name === 'steps')"
                    ".forEach(w => { w.value = 0; })")
        before = comfy_server.get("/history")
        frontend.click(FrontendSelectors.RUN)
        reported = []
        is_report = lambda problem: problem.startswith(("dialog: ", "error overlay: "))  # noqa: E731
        settle(lambda: reported.extend(frontend.problems()) or reported, lambda found: any(map(is_report, found)))
        assert any(map(is_report, reported)), reported
        assert comfy_server.get("/history") == before


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
    minimap; a node's own prompt box counts as the node), and no node, as drawn (grown to fit this machine's text,
    within the saved layout's slack: see overlap), covers another node or a group title."""
    with frontend.screenshot_on_failure(f"{path.stem}_layout"):
        frontend.open_file(path)
        graph = frontend.js(INSPECT_GRAPH)
        assert not graph["low_quality"], "zoomed out so far that the frontend draws no text"
        hidden = [f"node {n['id']} {n['type']}" for n in graph["nodes"] if not n["visible"]]
        hidden += [f"group {g['title']!r}" for g in graph["groups"] if not g["visible"]]
        assert hidden == [], f"not fully visible at load in a {WINDOW[0]}x{WINDOW[1]} window"
        nodes = graph["nodes"]
        saved = {str(n["id"]): n["size"] for n in load(path)["nodes"]}
        covered = [f"{as_drawn(a, saved[a['id']])} covers {as_drawn(b, saved[b['id']])}"
                   for i, a in enumerate(nodes) for b in nodes[i + 1:] if overlap(a["graph_rect"], b["graph_rect"])]
        covered += [f"{as_drawn(n, saved[n['id']])} covers the title of group {g['title']!r}" for n in nodes
                    for g in graph["groups"] if overlap(n["graph_rect"], g["graph_title_rect"])]
        assert covered == [], "drawn nodes that cover another node or a group title (saved too close, or drawn larger than the slack)"


def test_cfgpp_guidance_reads_lambda(frontend):
    """The CFG++ nodes' guidance widget is labelled lambda, as in the README and the tooltip."""
    with frontend.screenshot_on_failure("cfgpp_lambda"):
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
        frontend.click(FrontendSelectors.RUN)
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
