"""Exporters: take a repacked Hugging Face folder (or a .gguf) and write runtime formats."""
