"""tgi-space: lossless SPACE speculative decoding for Text Generation Inference."""

__version__ = "0.1.0"
