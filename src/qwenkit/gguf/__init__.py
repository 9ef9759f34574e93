"""GGUF files for the CPU/edge engine.

convert   HF safetensors checkpoint → GGUF (f32/f16/bf16/q8_0), and the conversion cache (ensure_gguf)
quantize  GGUF → smaller GGUF through llama.cpp's quantizer (q4_0, q4_k_m, q5_k_m, q6_k, q8_0)
reader    what a Qwen GGUF is (architecture, sizes, quantization, chat template), with clear errors
files     gguf_file()/write_gguf(): a GGUF written with gguf-py appears whole or not at all; read_json()
"""
