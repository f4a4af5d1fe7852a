"""Fine-tune LLaMA-family models LIMA-style, with a dedicated end-of-turn token."""
