"""mole: build Mixture-of-LoRA-Experts language models from domain data and one base causal LM."""

__version__ = "0.1.0"
