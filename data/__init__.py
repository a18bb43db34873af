"""Data: the MQAR generator and text language-modelling data modules."""

from seqzoo.data.mqar import MQARDataModule, MQARSegment, generate_mqar
from seqzoo.data.text import ByteTokenizer, HFTokenizer, TextDataModule, load_documents, pack_documents, stdlib_corpus_files

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "MQARDataModule",
    "MQARSegment",
    "TextDataModule",
    "generate_mqar",
    "load_documents",
    "pack_documents",
    "stdlib_corpus_files",
]
