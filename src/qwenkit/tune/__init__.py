"""`qwenkit tune`: LoRA / QLoRA supervised fine-tuning on chat data (data, masks, memory, training, merge)."""
