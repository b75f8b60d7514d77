"""The fused MoE operator: schema, fake and autograd, the PyTorch path, activations, routing."""
