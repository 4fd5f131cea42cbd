"""Adapter layers (LoRA wrappers, fused autograd functions) and quantized base layers."""
