"""Data: raw SFT records (Alpaca, ShareGPT, chat messages) -> templates -> masked, packed samples -> MindRecord
files and training datasets. Names are imported lazily so that worker processes stay light."""
import importlib

_EXPORTS = {
    "MindRecordDataset": "dataset", "OnlineSFTDataset": "dataset", "ArrayDataset": "rows",
    "build_dataset": "dataset",
    "SFTOptions": "pipeline", "iter_rows": "pipeline", "iter_samples": "pipeline", "iter_conversations": "pipeline",
    "SFTEncoder": "tokenize", "Sample": "tokenize", "IGNORE_INDEX": "tokenize",
    "get_template": "templates", "template_names": "templates",
    "Conversation": "formats", "Location": "formats", "RecordError": "formats", "to_conversation": "formats",
    "detect_format": "formats", "parse_map_keys": "formats",
    "read_files": "readers", "read_file": "readers", "resolve_files": "readers",
    "Packer": "packing", "positions_and_segments": "packing",
    "MindRecordWriter": "mindrecord", "read_mindrecord": "mindrecord",
    "Stats": "stats", "RejectLog": "stats",
    "BatchPlan": "sampler", "collate": "sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
