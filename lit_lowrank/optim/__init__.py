"""Optimizers: LoRA-Pro (closed-form adapter gradients) and LoRA-Pre (low-rank factored momenta).

They are plain ``torch.optim.Optimizer`` subclasses and know nothing about Lightning.
"""
