"""The network: the dual-branch MMDiT (model.py), its DualLoRA layers (lora.py) and its timestep and
2-D RoPE embeddings (embed.py). Plain torch: imports nothing else of teasr_core.
"""
