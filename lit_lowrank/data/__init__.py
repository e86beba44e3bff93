"""LightningDataModules: token blocks for causal LM, labelled text, digits, ImageFolder and image-text pairs.

Everything works offline: the embedded corpus (pydoc topics + standard-library docstrings, see
:mod:`lit_lowrank.data.corpus`), scikit-learn's digits and the bundled MiniLM tokenizer need no download.
"""
from lit_lowrank.data.corpus import (
    DEFAULT_PACKAGES,
    Document,
    LabelledText,
    TextClassificationSplits,
    docstring_classification,
    python_text_corpus,
    stable_fraction,
)
from lit_lowrank.data.images import DigitsDataModule, ImageFolderDataModule, ImageTextDataModule
from lit_lowrank.data.instruction import DocstringInstructionDataModule, InstructionDataModule
from lit_lowrank.data.labelled_text import DocstringClassificationDataModule, TextClassificationDataModule
from lit_lowrank.data.text import DatasetUnavailableError, TextBlocksDataModule

__all__ = [
    "DEFAULT_PACKAGES",
    "DatasetUnavailableError",
    "DigitsDataModule",
    "DocstringClassificationDataModule",
    "DocstringInstructionDataModule",
    "Document",
    "ImageFolderDataModule",
    "ImageTextDataModule",
    "InstructionDataModule",
    "LabelledText",
    "TextBlocksDataModule",
    "TextClassificationDataModule",
    "TextClassificationSplits",
    "docstring_classification",
    "python_text_corpus",
    "stable_fraction",
]
