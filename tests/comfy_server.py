"""A real ComfyUI server for tests, with the pack installed the way users install it (a symlink).

Boot: `main.py --cpu` with its own base directory; ready when /object_info answers; the pack's
import failure is reported with its traceback instead of a silent missing node. Client: the
documented HTTP + websocket protocol (upload, /prompt, /ws messages, /history, /view, /interrupt).
"""
from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from conftest import REPO

BOOT_TIMEOUT_S = 300
PACK_NAME = "teasr"
NODE_IDS = ("TEASRLoader", "TEASRAnyStepSampler", "TEASRTiledUpscale", "TEASRSaveTextFeatures")
WORKFLOWS = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))
# Workflows that need the user's Qwen-Image files, by the inputs naming them. Among them is Qwen-Image's
# 7B-parameter text encoder (CLIPLoader), which no test makes (even with random weights it is gigabytes
# and minutes on a CPU), so no test server runs them: it must reject them for those of these inputs it checks.
MODEL_FILES = {"teasr_qwen_image_text_features": {"clip_name"},
               "teasr_qwen_image_upscale": {"clip_name", "vae_name", "checkpoint", "base_model"}}
DONE = ("execution_success", "execution_error", "execution_interrupted")


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    comfy_dir: Path
    repo: Path
    base: Path
    node_ids: tuple[str, ...] = NODE_IDS
    front_end_root: Path | None = None      # the web UI to serve; None: no UI (an empty folder), API only
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    boot_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"

    def start(self) -> "ComfyServer":
        if not (self.comfy_dir / "main.py").is_file():
            raise ServerError(f"ComfyUI runtime not found at {self.comfy_dir}: run `bash scripts/setup.sh test`")
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (self.base / "custom_nodes" / PACK_NAME).symlink_to(self.repo, target_is_directory=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--front-end-root", str(self.front_end_root or self.base)]
        t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            info = self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.perf_counter() - t0
        self._check_pack_loaded(info)
        return self

    def _wait_ready(self, t0: float) -> dict:
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while booting:\n{self.log_tail()}")
            if time.perf_counter() - t0 > BOOT_TIMEOUT_S:
                raise ServerError(f"ComfyUI did not answer /object_info within {BOOT_TIMEOUT_S} s:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/object_info", timeout=5) as r:
                    return json.load(r)
            except OSError:
                time.sleep(0.25)

    def _check_pack_loaded(self, info: dict) -> None:
        """Fail loudly: a pack that fails to import only leaves log lines, the server runs on."""
        missing = [n for n in self.node_ids if n not in info]
        log = self.log_path.read_text(errors="replace")
        pack_dir = str(self.base / "custom_nodes" / PACK_NAME)
        ours = [line for line in log.splitlines() if pack_dir in line]
        if missing or any("IMPORT FAILED" in line for line in ours):
            failure = log.find(f"Cannot import {pack_dir}")   # preceded by the import's traceback
            traceback = log[log.rfind("Traceback (most recent call last)", 0, failure):failure] if failure > 0 else ""
            raise ServerError(f"the TEASR pack did not load (missing nodes {missing}):\n" + "\n".join(ours)
                              + f"\n{traceback[-8000:]}")

    def stop(self) -> None:
        """Only the process this harness started: SIGTERM, then SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- client ----------------------------------------------------------------------------------------
@dataclass
class PromptRun:
    prompt_id: str
    status: str                      # success | error | interrupted
    body: dict                       # the history entry (empty when interrupted)
    messages: list[dict]
    seconds: float

    def error(self) -> dict | None:
        return next((m["data"] for m in self.messages if m["type"] == "execution_error"), None)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Client:
    """One websocket client id; open() before posting so no message of ours is missed."""

    def __init__(self, server: ComfyServer, session: aiohttp.ClientSession):
        self.url, self.session, self.client_id = server.url, session, uuid.uuid4().hex
        self.ws = None

    async def __aenter__(self) -> "Client":
        self.ws = await self.session.ws_connect(f"{self.url}/ws?clientId={self.client_id}")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def upload(self, image: Image.Image, name: str) -> str:
        form = aiohttp.FormData()
        form.add_field("image", png_bytes(image), filename=name, content_type="image/png")
        form.add_field("overwrite", "true")
        form.add_field("type", "input")
        async with self.session.post(f"{self.url}/upload/image", data=form) as r:
            assert r.status == 200, await r.text()
            up = await r.json()
        return f"{up['subfolder']}/{up['name']}" if up.get("subfolder") else up["name"]

    async def submit(self, graph: dict) -> tuple[int, dict]:
        async with self.session.post(f"{self.url}/prompt", json={"prompt": graph, "client_id": self.client_id}) as r:
            return r.status, await r.json()

    async def next_message(self, timeout: float) -> dict:
        while True:
            m = await self.ws.receive(timeout=timeout)
            if m.type == aiohttp.WSMsgType.TEXT:
                return json.loads(m.data)
            if m.type != aiohttp.WSMsgType.BINARY:
                raise ServerError(f"websocket closed: {m}")

    async def wait(self, prompt_ids: list[str], timeout: float) -> dict[str, tuple[str, list[dict], float]]:
        """Messages of each prompt until it ends; (end type, messages, seconds since this call) per prompt."""
        t0, pending = time.perf_counter(), set(prompt_ids)
        messages = {pid: [] for pid in prompt_ids}
        ended = {}
        while pending:
            remaining = timeout - (time.perf_counter() - t0)
            if remaining <= 0:
                raise TimeoutError(f"prompts {sorted(pending)} did not finish within {timeout} s")
            msg = await self.next_message(remaining)
            pid = msg.get("data", {}).get("prompt_id")
            if pid in pending:
                messages[pid].append(msg)
                if msg["type"] in DONE:
                    pending.discard(pid)
                    ended[pid] = (msg["type"].removeprefix("execution_"), messages[pid], time.perf_counter() - t0)
        return ended

    async def history(self, prompt_id: str) -> dict:
        """The history entry; written by the worker just after the websocket's end message."""
        for _ in range(200):
            async with self.session.get(f"{self.url}/history/{prompt_id}") as r:
                entry = (await r.json()).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no history for {prompt_id}")

    async def run(self, graph: dict, timeout: float = 300) -> PromptRun:
        t0 = time.perf_counter()
        status, body = await self.submit(graph)
        if status != 200:
            raise ServerError(f"/prompt refused the graph (HTTP {status}): {json.dumps(body)[:2000]}")
        pid = body["prompt_id"]
        end, messages, _ = (await self.wait([pid], timeout))[pid]
        entry = await self.history(pid) if end != "interrupted" else {}
        return PromptRun(pid, end, entry, messages, time.perf_counter() - t0)

    async def images(self, entry: dict, node_id: str) -> list[np.ndarray]:
        arrays = []
        for ref in entry["outputs"][node_id]["images"]:
            params = {"filename": ref["filename"], "subfolder": ref["subfolder"], "type": ref["type"]}
            async with self.session.get(f"{self.url}/view", params=params) as r:
                assert r.status == 200, r.status
                arrays.append(np.asarray(Image.open(io.BytesIO(await r.read()))))
        return arrays

    async def interrupt(self) -> None:
        async with self.session.post(f"{self.url}/interrupt") as r:
            assert r.status == 200, r.status


# ---- workflows ---------------------------------------------------------------------------------------
def load_api(name: str) -> dict:
    """A shipped API-format workflow, workflows/api/<name>.json."""
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


def panels(output: np.ndarray, width: int) -> list[np.ndarray]:
    """A horizontally stitched output split back into its panels."""
    return [output[:, i:i + width] for i in range(0, output.shape[1], width)]


def with_input(graph: dict, class_type: str, **inputs) -> dict:
    """A copy of `graph` with `inputs` set on every node of `class_type`."""
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        if node["class_type"] == class_type:
            node["inputs"].update(inputs)
    return graph


def node_id(graph: dict, class_type: str) -> str:
    (found,) = [k for k, v in graph.items() if v["class_type"] == class_type]
    return found

