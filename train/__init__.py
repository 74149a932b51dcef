"""TEASR trainer: data pipeline, degradations and the training loop (imports teasr_core, never ComfyUI)."""
