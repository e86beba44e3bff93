"""LightningModules, one per task; each takes a backbone, optional LoRA adapters, and injected optimizer/scheduler."""
from lit_lowrank.tasks.base import LowRankTask
from lit_lowrank.tasks.causal_lm import CausalLMTask
from lit_lowrank.tasks.clip import CLIPTask
from lit_lowrank.tasks.image_classification import ImageClassificationTask
from lit_lowrank.tasks.seq_classification import SequenceClassificationTask

__all__ = ["CLIPTask", "CausalLMTask", "ImageClassificationTask", "LowRankTask", "SequenceClassificationTask"]
