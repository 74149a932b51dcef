"""TEASR core: a plain-PyTorch library (no ComfyUI imports) for any-step dual-branch DiT super-resolution."""
__version__ = "0.1.0"
