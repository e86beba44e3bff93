"""Callbacks usable in any Lightning project: adapters, LoRA-Pro gradients, optimizer memory, adapter export, plots."""
from lit_lowrank.callbacks.adapter_export import AdapterExport
from lit_lowrank.callbacks.generation_writer import GenerationWriter
from lit_lowrank.callbacks.lora_adapters import LoRAAdapters
from lit_lowrank.callbacks.lora_pro_gradients import LoRAProGradients
from lit_lowrank.callbacks.metrics_plot import MetricsPlot
from lit_lowrank.callbacks.optimizer_state import OptimizerStateMonitor
from lit_lowrank.callbacks.prediction_writer import PredictionWriter
from lit_lowrank.callbacks.skipped_steps import SkippedStepsGuard

__all__ = ["AdapterExport", "GenerationWriter", "LoRAAdapters", "LoRAProGradients", "MetricsPlot",
           "OptimizerStateMonitor", "PredictionWriter", "SkippedStepsGuard"]
