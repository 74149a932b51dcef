"""The upscale path shared by the CLI, the ComfyUI nodes and the trainer's sample grids: the streaming
pipeline (pipeline.py), colour fix (color.py), reading and writing image files (imageio.py) and the
allocator setting for large images (process.py).

Imports teasr_core.codecs, formats, network, sampling and tiling; never eval/.
"""
