"""Weight converters between neo and Hugging Face (GPT-Neo, GPT-NeoX)."""
