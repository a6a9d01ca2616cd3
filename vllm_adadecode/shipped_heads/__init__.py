"""Exit heads shipped with vllm-adadecode, one folder per base model (data only)."""
