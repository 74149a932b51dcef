"""ComfyUI's real web frontend in headless Chromium, driven through Selenium like a user's browser.

The frontend (PyPI `comfyui-frontend-package`, the version ComfyUI 0.3.75 pins) is served by the test
server; Chromium and its WebDriver are Debian's (`apt-get install chromium chromium-driver`, done by
`scripts/setup.sh test` when run as root): a browser that downloads itself cannot work offline.
Every wait is an explicit wait on a condition, generous for a loaded 2-core machine.
"""
from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

PAGE_TIMEOUT_S = 180      # first page load: the 1.6 MB bundle parses slowly when both cores are busy
UI_TIMEOUT_S = 60         # a click or a file load to show its result
INSTALL_HINT = ("run `bash scripts/setup.sh test` as root (it installs Debian's chromium and chromium-driver) "
                "or `sudo apt-get install chromium chromium-driver`")
# Settings of a returning user: no first-run template browser over the canvas, no minimap overlay.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1600,1000")


class BrowserMissing(RuntimeError):
    pass


def frontend_root() -> Path:
    """The built web UI inside the comfyui-frontend-package wheel (ComfyUI's --front-end-root)."""
    try:
        import comfyui_frontend_package
    except ImportError:
        raise BrowserMissing("comfyui-frontend-package is not installed: run `bash scripts/setup.sh test`") from None
    return Path(comfyui_frontend_package.__file__).parent / "static"


def start_chromium() -> webdriver.Chrome:
    """Headless Debian Chromium with a fresh profile; a clear message when it is not installed."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        raise BrowserMissing(f"Chromium and its WebDriver are needed (found chromium={binary}, "
                             f"chromedriver={driver}): {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary     # with both paths given, Selenium never tries to fetch a browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='teasr-chromium-')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_script_timeout(UI_TIMEOUT_S)
    return browser


class ComfyPage:
    """The ComfyUI page of one server: load workflows, read the frontend's prompt, queue, browse."""

    def __init__(self, browser: webdriver.Chrome, url: str):
        self.browser, self.url = browser, url

    def open(self, node_ids: tuple[str, ...]) -> "ComfyPage":
        for key, value in SETTINGS.items():
            request = urllib.request.Request(f"{self.url}/settings/{key}", data=json.dumps(value).encode(),
                                             method="POST", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=30).close()
        self.browser.get(self.url)
        self.wait(PAGE_TIMEOUT_S, "the app to start with the TEASR nodes registered", lambda _: self.js(
            "return !!(window.app?.graph && window.LiteGraph) && "
            "arguments[0].every(t => t in LiteGraph.registered_node_types)", list(node_ids)))
        return self

    def wait(self, timeout: float, what: str, condition):
        """Poll `condition` until truthy; an element re-rendered under a poll is "not yet", not an error."""
        waiter = WebDriverWait(self.browser, timeout, poll_frequency=0.25,
                               ignored_exceptions=(StaleElementReferenceException,))
        return waiter.until(condition, f"waited {timeout} s for {what}")

    def js(self, script: str, *args):
        return self.browser.execute_script(script, *args)

    def js_async(self, body: str, *args):
        """Run `body`, an async function body that reads its arguments as args[0], args[1], ...; its value."""
        return self.browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"(async (...args) => {{ {body} }})(...arguments).then(done, e => done({{error: String(e)}}));", *args)

    # ---- workflows ------------------------------------------------------------------------------
    def open_workflow_file(self, path: Path) -> None:
        """What Workflow > Open does: the file goes through the page's own file input and loader."""
        self.js("app.graph.clear()")
        self.browser.find_element(By.ID, "comfy-file-input").send_keys(str(path))
        self.wait_loaded(path)

    def wait_loaded(self, path: Path) -> None:
        """Until the graph holds the nodes of the workflow file `path` (cleared before loading it)."""
        ids = sorted(node["id"] for node in json.loads(path.read_text())["nodes"])
        self.wait(UI_TIMEOUT_S, f"{path.name} to load", lambda _: self.node_ids() == ids)

    def node_ids(self) -> list[int]:
        return sorted(self.js("return app.graph.nodes.map(n => n.id)"))

    def missing_node_types(self) -> list[str]:
        """Node types of the loaded graph the frontend does not know (what its missing-nodes dialog lists)."""
        return self.js("return app.graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types))"
                       ".map(n => n.type)")

    def dialog_texts(self) -> list[str]:
        return [e.text for e in self.browser.find_elements(By.CSS_SELECTOR, ".p-dialog")]

    def prompt(self) -> dict:
        """The API graph the frontend itself makes of the loaded workflow (what Run posts)."""
        return self.js_async("return (await app.graphToPrompt()).output;")

    # ---- running --------------------------------------------------------------------------------
    def upload_image(self, png: bytes, name: str) -> str:
        """Upload through the page's API client, as its image upload widget does; the stored name."""
        answer = self.js_async(
            "const bytes = Uint8Array.from(atob(args[0]), c => c.charCodeAt(0));"
            "const body = new FormData();"
            "body.append('image', new File([bytes], args[1], {type: 'image/png'}));"
            "body.append('overwrite', 'true');"
            "const r = await window.comfyAPI.api.api.fetchApi('/upload/image', {method: 'POST', body});"
            "return r.ok ? (await r.json()) : {error: r.status + ' ' + await r.text()};",
            base64.b64encode(png).decode(), name)
        assert "error" not in answer, answer
        return answer["name"]

    def choose_image(self, name: str) -> None:
        """Pick `name` in every Load Image node, the way choosing it in the combo does."""
        self.js("for (const node of app.graph.nodes.filter(n => n.type === 'LoadImage')) {"
                "  const widget = node.widgets.find(w => w.name === 'image');"
                "  widget.value = arguments[0]; widget.callback?.(widget.value); }", name)

    def wait_image_preview(self) -> None:
        """Until every Load Image node shows its picture."""
        self.wait(UI_TIMEOUT_S, "the Load Image preview", lambda _: self.js(
            "return app.graph.nodes.filter(n => n.type === 'LoadImage')"
            ".every(n => n.imgs?.length && n.imgs.every(i => i.complete && i.naturalWidth > 0))"))

    def click_run(self) -> None:
        self.browser.find_element(By.CSS_SELECTOR, "[data-testid=queue-button] button").click()

    # ---- browsing -------------------------------------------------------------------------------
    def open_templates(self) -> list[str]:
        """Open the template browser; the names in its category list, once shown (while the dialog fades
        in, Selenium reads them as '')."""
        self.browser.find_element(By.CSS_SELECTOR, "button.templates-tab-button").click()
        self.wait(UI_TIMEOUT_S, "the template browser",
                  lambda b: b.find_elements(By.CSS_SELECTOR, "[data-testid=template-workflows-content]"))

        def names(browser):
            texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".p-dialog nav [role=button]")]
            return texts if texts and all(texts) else None
        return self.wait(UI_TIMEOUT_S, "the template categories to show", names)

    def template_cards(self, category: str) -> dict[str, object]:
        """Click `category` in the template browser; its cards by workflow name."""
        self.click_text(".p-dialog nav [role=button]", category)
        prefix = "template-workflow-"

        def cards(browser):
            found = browser.find_elements(By.CSS_SELECTOR, f"[data-testid^={prefix}]")
            return {e.get_attribute("data-testid").removeprefix(prefix): e for e in found} or None
        return self.wait(UI_TIMEOUT_S, f"the template cards of {category}", cards)

    def click_text(self, selector: str, text: str) -> None:
        """Click the innermost element matching `selector` whose text is exactly `text`."""
        def find(_):
            hits = [e for e in self.browser.find_elements(By.CSS_SELECTOR, selector) if e.text.strip() == text]
            return hits[-1] if hits else None
        self.wait(UI_TIMEOUT_S, f"{text!r} to click", find).click()

    def open_node_help(self, display_name: str) -> dict[str, list[str]]:
        """The node library's help page of one node: its rendered headings by level."""
        self.browser.find_element(By.CSS_SELECTOR, "button.node-library-tab-button").click()
        box = self.wait(UI_TIMEOUT_S, "the node library search box",
                        lambda b: b.find_element(By.CSS_SELECTOR, "input.search-box-input"))
        box.send_keys(display_name)
        leaf = self.wait(UI_TIMEOUT_S, f"{display_name} in the node library", lambda b: next(
            (e for e in b.find_elements(By.CSS_SELECTOR, ".node-lib-node-container") if e.text == display_name), None))
        ActionChains(self.browser).move_to_element(leaf).perform()     # the help button shows on hover
        leaf.find_element(By.CSS_SELECTOR, ".help-button").click()
        content = self.wait(UI_TIMEOUT_S, f"the help page of {display_name}",
                            lambda b: b.find_element(By.CSS_SELECTOR, ".markdown-content h1"))
        page = content.find_element(By.XPATH, "..")
        return {tag: [e.text for e in page.find_elements(By.TAG_NAME, tag)] for tag in ("h1", "h2")}

    def screenshot_graph(self, path: Path, margin: int = 16) -> None:
        """The whole graph zoomed to fit (as "Zoom to fit" does, with room for the page's overlays),
        cropped to it and saved as PNG once drawn."""
        box = self.js_async(
            "const nodes = app.graph.nodes, top = LiteGraph.NODE_TITLE_HEIGHT, ds = app.canvas.ds;"
            "const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - top));"
            "const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));"
            "const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));"
            "ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: 0.7}); app.canvas.setDirty(true, true);"
            "for (let i = 0; i < 3; i++) await new Promise(requestAnimationFrame);"
            "const origin = app.canvas.canvas.getBoundingClientRect();"
            "const [[l, t], [r, b]] = [ds.convertOffsetToCanvas([x0, y0]), ds.convertOffsetToCanvas([x1, y1])];"
            "return [l + origin.left, t + origin.top, r + origin.left, b + origin.top]"
            ".map(v => Math.round(v * devicePixelRatio));")
        shot = Image.open(io.BytesIO(self.browser.get_screenshot_as_png()))
        left, top, right, bottom = box
        shot.crop((left - margin, top - margin, right + margin, bottom + margin)).save(path)
