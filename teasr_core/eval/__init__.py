"""Evaluation tooling, off the upscale path: metrics, baselines, their weight cache and the eval harness.

Nothing in the product path (model, sampling, pipeline, CLI upscale, the ComfyUI nodes) imports this
package; `python -m teasr_core eval` and the trainer's LPIPS term do, lazily. Imports
teasr_core.codecs and teasr_core.upscale (image files).
"""
