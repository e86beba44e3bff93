"""What CLI tests share: tiny backbones as a second --config, and the trainer flags for a two-step run."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "vocab_size": 30522, "max_position_embeddings": 512}
SHORT = ["--trainer.max_steps=2", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
         "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.val_check_interval=null",
         "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.devices=1"]


def override(tmp: Path, backbone: dict = None, data: dict = None, **top) -> list:
    """A second --config file holding ``top`` and, under the model's backbone and the data module, their
    ``init_args`` (several settings in one argument)."""
    values = dict(top)
    if backbone is not None:
        values["model"] = {"init_args": {"backbone": {"init_args": backbone}}}
    if data is not None:
        values["data"] = {"init_args": data}
    path = tmp / f"override-{len(list(tmp.glob('override-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["--config", str(path)]


def hf(config: dict, tokenizer: str | None = None) -> dict:
    """A transformers backbone built from ``config``; ``tokenizer`` names its tokenizer, which a recipe whose
    pretrained backbone brings its own (and hands it to the data) needs, since a model from a config has none."""
    return {"name_or_path": None, "config": config, **({"tokenizer": tokenizer} if tokenizer else {})}


def tiny_quickstart(tmp: Path) -> list:
    """``--config`` arguments: the quickstart recipe with a one-layer BERT and 12 paragraphs per class."""
    return ["--config", str(CONFIGS / "quickstart.yaml"),
            *override(tmp, hf(TINY_BERT, MINILM), {"cap_per_class": 12})]
