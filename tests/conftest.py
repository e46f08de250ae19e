import json
import os
from pathlib import Path

import pytest

# Tests never touch the network: the hub libraries fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def write_jsonl(tmp_path):
    """Write rows (dicts or raw strings/bytes) as lines of a JSONL file and return its path."""

    def _write(name, rows):
        path = Path(tmp_path) / name
        with open(path, "wb") as fh:
            for row in rows:
                if isinstance(row, bytes):
                    fh.write(row + b"\n")
                elif isinstance(row, str):
                    fh.write(row.encode() + b"\n")
                else:
                    fh.write(json.dumps(row).encode() + b"\n")
        return path

    return _write


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2's shipped GGUF and its dequantised Hugging Face weights (the project's safetensors cache)."""
    from safetensors.numpy import load_file

    from utils import models

    spec = models.resolve("smollm2-135m")
    folder, info = models.weights_folder(spec)
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return {"spec": spec, "gguf": models.gguf_path(spec), "sha256": info["gguf_sha256"], "hf": weights}
