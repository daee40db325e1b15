"""The model apart from its compute: opening GGUF and synthetic models (loader.py, synthetic.py),
the tokenizer, embedding token ids, and sampling the next token from logits."""
