"""Exit-head training and evaluation by self-distillation (base model frozen)."""
