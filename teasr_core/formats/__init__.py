"""Weight files, safetensors only: our checkpoint format and writing it (checkpoint.py), loading TEASR
models (load.py), fitting a meta-device model to a file's tensors (layout.py), Qwen-Image base
transformers in ComfyUI's and diffusers' layouts (qwen_image.py), the authors' dual-LoRA files
(dual_lora.py) and text features (text_features.py).

Imports teasr_core.network, sampling, safetensors_io and codecs (the Qwen-Image VAE's codec config).
"""
