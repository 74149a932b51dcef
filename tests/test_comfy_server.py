"""The pack inside a real ComfyUI 0.3.75 server (CPU), driven over HTTP + websocket like a user's client.

Every API workflow in workflows/api/ runs unchanged except for the input image name; those that need the
user's Qwen-Image files (comfy_server.MODEL_FILES) must fail validation for exactly those files. Timings
(boot, per prompt) are printed with `pytest -s` and summarised in one line at the end of the session.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request

import aiohttp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfy_server import MODEL_FILES, NODE_IDS, WORKFLOWS, Client, ComfyServer, load_api, node_id, panels, with_input
from conftest import COMFYUI_DIR, REPO, shared_path

MIN_MEAN_DIFF = 2.0                          # 0..255: the model's output is not a bicubic upscale
MIN_STEP_DIFF = 0.5                          # 0..255: 1 vs 4 steps differ (the bundled model's own grid keeps
                                             # them close: 1.04 on the step comparison's photo, 2026-11-30)
TIMINGS: dict[str, float] = {}


def photo(name: str) -> Image.Image:
    """Real photos from ../shared: a 128 px RealSR LR crop, and a 197x136 photo (sizes not a multiple of 16)."""
    paths = {"lr128": ("RealSR_crop128", "lr", "Canon_001_LR4.png"), "photo": ("RealSet65", "bears.jpg")}
    return Image.open(shared_path("data", *paths[name]))


INPUTS = {"teasr_single_image_upscale": "lr128", "teasr_step_comparison": "lr128", "teasr_tiled_large_photo": "photo"}


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "models" / "teasr").mkdir(parents=True)
    (base / "models" / "teasr" / "broken.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    srv = ComfyServer(COMFYUI_DIR, REPO, base).start()
    TIMINGS["boot"] = srv.boot_seconds
    print(f"\n[comfy] server boot {srv.boot_seconds:.1f} s (port {srv.port})")
    yield srv
    srv.stop()
    line = "; ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())   # 2 shared cores: timings depend on the neighbours
    print(f"\n[comfy] TIMINGS: {line} (load average {load})")


def run(coro_fn, server):
    """Run an async test body with a fresh session and websocket client."""
    async def main():
        async with aiohttp.ClientSession() as session, Client(server, session) as client:
            return await coro_fn(client)
    return asyncio.run(main())


def object_info(server) -> dict:
    with urllib.request.urlopen(f"{server.url}/object_info", timeout=30) as r:
        return json.load(r)


def bicubic_x4(image: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255
    up = F.interpolate(t, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    return (up[0].permute(1, 2, 0).numpy() * 255)


def execution_seconds(messages: list[dict]) -> float:
    stamps = {m["type"]: m["data"]["timestamp"] for m in messages if "timestamp" in m.get("data", {})}
    end = next(stamps[t] for t in ("execution_success", "execution_error", "execution_interrupted") if t in stamps)
    return (end - stamps["execution_start"]) / 1000


# ---- registration ----------------------------------------------------------------------------------
def test_object_info_lists_the_nodes(server):
    info = object_info(server)
    for nid in NODE_IDS:
        assert info[nid]["category"] == "image/upscaling/TEASR"
        assert info[nid]["python_module"] == "custom_nodes.teasr"
    sampler = info["TEASRAnyStepSampler"]["input"]
    assert sampler["required"]["model"][0] == "TEASR_MODEL" and sampler["required"]["image"][0] == "IMAGE"
    assert sampler["required"]["steps"][0] == "INT" and sampler["required"]["seed"][1]["control_after_generate"]
    assert sampler["optional"]["conditioning"][0] == "CONDITIONING"
    assert info["TEASRTiledUpscale"]["input"]["required"]["tile_size"][0] == "INT"
    checkpoints = info["TEASRLoader"]["input"]["required"]["checkpoint"][1]["options"]
    assert checkpoints == ["teasr-small (bundled)", "broken.safetensors"]   # models/teasr, safetensors only
    assert info["TEASRLoader"]["output"] == ["TEASR_MODEL"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_template_copies_are_the_ui_workflows_with_thumbnails(name):
    """That a UI workflow gives its API version is checked in the real frontend (test_frontend.py)."""
    ui = json.loads((REPO / "workflows" / "ui" / f"{name}.json").read_text())
    assert ui == json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    assert (REPO / "example_workflows" / f"{name}.jpg").is_file()


def test_template_browser_lists_exactly_the_example_workflows(server):
    """ComfyUI lists */workflows/*.json too: the API-format graphs must stay out of the template browser."""
    with urllib.request.urlopen(f"{server.url}/workflow_templates", timeout=30) as r:
        templates = json.load(r)
    assert sorted(templates["teasr"]) == WORKFLOWS
    for name in WORKFLOWS:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/teasr/{name}.json", timeout=30) as r:
            assert json.load(r) == json.loads((REPO / "example_workflows" / f"{name}.json").read_text())


# ---- the shipped workflows ---------------------------------------------------------------------------
def test_every_workflow_is_run_or_checked():
    assert sorted([*INPUTS, *MODEL_FILES]) == WORKFLOWS


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_workflow_runs_and_upscales_x4(server, name):
    source = photo(INPUTS[name])
    graph = load_api(name)

    async def body(client):
        uploaded = await client.upload(source, f"teasr_{name}.png")
        result = await client.run(with_input(graph, "LoadImage", image=uploaded), timeout=240)
        assert result.status == "success", result.error()
        outputs = {nid: await client.images(result.body, nid) for nid in result.body["outputs"]}
        return result, outputs

    result, outputs = run(body, server)
    TIMINGS[name] = execution_seconds(result.messages)
    print(f"[comfy] {name}: {TIMINGS[name]:.1f} s ({source.size[0]}x{source.size[1]} {source.mode})")
    lr = np.asarray(source)
    h, w = lr.shape[:2]
    assert outputs, "the workflow saved no image"
    for images in outputs.values():
        for out in images:
            assert out.shape[0] == 4 * h and out.shape[1] % (4 * w) == 0 and out.shape[2] == 3
            pictures = panels(out, 4 * w)
            for picture in pictures:
                assert np.abs(picture - bicubic_x4(lr)).mean() > MIN_MEAN_DIFF
            if len(pictures) > 1:   # the step comparison: the step count takes effect
                assert np.abs(pictures[0].astype(float) - pictures[-1]).mean() > MIN_STEP_DIFF


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_qwen_image_workflows_fail_validation_only_for_the_absent_model_files(server, name):
    """Every model-file input names a file the server lacks, and validation rejects exactly those it checks.

    ComfyUI 0.3.75 checks the value of a V1 combo (a list in /object_info: the core loaders) only; a V3
    combo's (["COMBO", {"options"}]: TEASR Loader's checkpoint, base_model) fails when the node runs.
    """
    info, checked, found = object_info(server), set(), set()
    for node in load_api(name).values():
        spec = info[node["class_type"]]["input"]
        for input_name in MODEL_FILES[name] & node["inputs"].keys():
            kind, *extra = {**spec["required"], **spec.get("optional", {})}[input_name]
            assert node["inputs"][input_name] not in (kind if isinstance(kind, list) else extra[0]["options"])
            found.add(input_name)
            if isinstance(kind, list):
                checked.add(input_name)
    assert found == MODEL_FILES[name]

    async def body(client):
        uploaded = await client.upload(small_photo(), "teasr_qwen.png")
        return await client.submit(with_input(load_api(name), "LoadImage", image=uploaded))

    status, answer = run(body, server)
    assert status == 400, answer
    errors = {(e["type"], e["extra_info"]["input_name"]) for node in answer["node_errors"].values() for e in node["errors"]}
    assert checked and errors == {("value_not_in_list", input_name) for input_name in checked}, errors


# ---- queueing, validation, errors, interrupt ------------------------------------------------------------
def burst_graph(seed: int, image: str, steps: int = 1) -> dict:
    graph = load_api("teasr_single_image_upscale")
    graph = with_input(graph, "LoadImage", image=image)
    return with_input(graph, "TEASRAnyStepSampler", seed=seed, steps=steps)


def small_photo(side: int = 32) -> Image.Image:
    """A crop of the LR photo: many prompts stay cheap on a shared CPU."""
    return photo("lr128").crop((48, 48, 48 + side, 48 + side))


def test_twenty_queued_prompts_all_complete(server):
    async def body(client):
        name = await client.upload(small_photo(), "teasr_burst.png")
        ids = []
        t0 = time.perf_counter()
        for seed in range(1000, 1020):
            status, answer = await client.submit(burst_graph(seed, name))
            assert status == 200, answer
            ids.append(answer["prompt_id"])
        ended = await client.wait(ids, timeout=300)
        return ended, time.perf_counter() - t0

    ended, seconds = run(body, server)
    assert sorted(status for status, _, _ in ended.values()) == ["success"] * 20
    per_prompt = [execution_seconds(messages) for _, messages, _ in ended.values()]
    TIMINGS["20 prompts (32 px, 1 step), total"] = seconds
    TIMINGS["  per prompt, median"] = float(np.median(per_prompt))
    print(f"[comfy] 20 queued prompts: {seconds:.1f} s, per prompt median {np.median(per_prompt):.2f} s")


def node_errors(server, graph: dict, class_type: str) -> list[dict]:
    """Submit a graph that must fail validation: HTTP 400, and the errors of the node of `class_type`."""
    status, body = run(lambda client: client.submit(graph), server)
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation", body
    return body["node_errors"][node_id(graph, class_type)]["errors"]


@pytest.mark.parametrize("steps", [0, 99])
def test_out_of_range_steps_are_rejected_naming_the_input(server, steps):
    graph = with_input(load_api("teasr_single_image_upscale"), "TEASRAnyStepSampler", steps=steps)
    errors = node_errors(server, graph, "TEASRAnyStepSampler")
    assert [e["extra_info"]["input_name"] for e in errors] == ["steps"]


def test_missing_image_input_is_rejected(server):
    graph = load_api("teasr_tiled_large_photo")
    del graph[node_id(graph, "TEASRTiledUpscale")]["inputs"]["image"]
    (error,) = node_errors(server, graph, "TEASRTiledUpscale")
    assert (error["type"], error["extra_info"]["input_name"]) == ("required_input_missing", "image")


def test_bad_timesteps_are_rejected_with_the_reason(server):
    graph = with_input(load_api("teasr_single_image_upscale"), "TEASRAnyStepSampler", timesteps="250,999")
    (error,) = node_errors(server, graph, "TEASRAnyStepSampler")
    assert error["extra_info"]["input_name"] == "timesteps" and "strictly decreasing" in error["details"]


def test_a_corrupt_checkpoint_fails_with_its_reason(server):
    async def body(client):
        name = await client.upload(small_photo(), "teasr_broken.png")
        graph = with_input(burst_graph(1, name), "TEASRLoader", checkpoint="broken.safetensors")
        return await client.run(graph)

    result = run(body, server)
    assert result.status == "error"
    error = result.error()
    assert error["node_type"] == "TEASRLoader" and "not a readable safetensors file" in error["exception_message"]


def test_interrupt_stops_a_long_prompt_and_the_server_carries_on(server):
    async def body(client):
        name = await client.upload(small_photo(64), "teasr_long.png")
        status, answer = await client.submit(burst_graph(7, name, steps=50))
        assert status == 200, answer
        pid = answer["prompt_id"]
        while True:                                 # interrupt once sampling is under way
            message = await client.next_message(timeout=120)
            if message["type"] == "progress" and message["data"].get("prompt_id") == pid:
                break
        t0 = time.perf_counter()
        await client.interrupt()
        end, messages, _ = (await client.wait([pid], timeout=60))[pid]
        stopped_after = time.perf_counter() - t0
        progress = [m["data"]["value"] for m in messages if m["type"] == "progress"]
        after = await client.run(burst_graph(8, await client.upload(small_photo(), "teasr_after.png")))
        return end, stopped_after, progress, after

    end, stopped_after, progress, after = run(body, server)
    assert end == "interrupted"
    assert not progress or max(progress) < 50, "sampling ran to the end"
    assert object_info(server)["TEASRLoader"]
    assert after.status == "success"
    TIMINGS["interrupt -> stopped"] = stopped_after
    print(f"[comfy] interrupt honoured after {stopped_after:.2f} s")
