from setuptools import find_packages, setup

setup(
    name="lit-llama-lima",
    version="0.1.0",
    description="Fine-tune LLaMA-family models LIMA-style: every turn ends with a dedicated end-of-turn token",
    packages=find_packages(include=["lit_llama", "lit_llama.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",  # SDPA with enable_gqa
        "lightning>=2.2",
        "sentencepiece>=0.2",
        "protobuf",  # sentencepiece's model file, edited to append special tokens
        "jsonargparse[signatures]>=4.27",
        "tqdm",
        "safetensors",  # Hugging Face checkpoints in and out
        "matplotlib",  # the loss plot every run draws
    ],
    extras_require={
        "tensorboard": ["tensorboard"],  # --logger_name tensorboard
        "wandb": ["wandb"],  # --logger_name wandb
        "serve": ["fastapi", "uvicorn"],  # generate/serve.py
        "quantize": ["torchao>=0.18"],  # --quantize nf4
        "eval": ["lm-eval[api]>=0.4.9"],  # lm-evaluation-harness against generate/serve.py
        "test": ["pytest", "transformers>=5", "hypothesis", "tensorboard", "fastapi", "uvicorn", "openai", "httpx",
                 "torchao>=0.18", "peft"],
    },
)
