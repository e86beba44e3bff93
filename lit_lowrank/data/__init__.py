"""LightningDataModules: token blocks for causal LM, labelled text, digits, ImageFolder and image-text pairs.

Everything works offline: the embedded corpora (pydoc topics + standard-library docstrings, and the standard
library's source code, see :mod:`lit_lowrank.data.corpus`), scikit-learn's digits, the bundled MiniLM tokenizer and
the byte-level tokenizer need no download.
"""
from lit_lowrank.data.byte_tokenizer import ByteTokenizer
from lit_lowrank.data.corpus import (
    DEFAULT_PACKAGES,
    Document,
    LabelledText,
    TextClassificationSplits,
    docstring_classification,
    python_source_corpus,
    python_text_corpus,
    stable_fraction,
)
from lit_lowrank.data.hf_datasets import DatasetUnavailableError
from lit_lowrank.data.images import DigitsDataModule, ImageFolderDataModule, ImageTextDataModule
from lit_lowrank.data.instruction import DocstringInstructionDataModule, InstructionDataModule
from lit_lowrank.data.labelled_text import DocstringClassificationDataModule, TextClassificationDataModule
from lit_lowrank.data.text import TextBlocksDataModule

__all__ = [
    "ByteTokenizer",
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
    "python_source_corpus",
    "python_text_corpus",
    "stable_fraction",
]
