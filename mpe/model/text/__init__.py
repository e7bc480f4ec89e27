"""The LLM text tower: adaptive prompt tokens, prompt-wise masking, trunk/top split, readouts."""
