"""mpe: Context-Adaptive Multi-Prompt Embedding for vision-language models."""

__version__ = "0.1.0"
