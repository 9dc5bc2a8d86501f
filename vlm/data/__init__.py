"""Training and evaluation data: LLaVA JSON, Hugging Face datasets, and the packaged easy-VQA."""
