"""Hand trained adapters to llama.cpp (and everything built on it: llama-cpp-python, Ollama).

    python -m utils.export models/smollm2-135m-lora            # both files, next to the adapter
    python -m utils.export models/smollm2-135m-lora --merged-type F16 --out-dir /tmp/gguf

For an adapter trained on a GGUF-sourced preset (``source: gguf`` in configs/models.yaml), this
writes into ``<adapter_root>/gguf/``:

- ``lora.gguf``: the LoRA adapter as a GGUF adapter file (``general.type = adapter``), loaded by
  llama.cpp's ``--lora`` on top of the *unmodified* shipped GGUF (the adapter stays f32: it is a
  few MB);
- ``merged-<type>.gguf``: the shipped GGUF with the adapter folded in. Tensors the adapter touches
  are dequantised, updated with ``scale * B @ A`` and re-quantised (Q8_0 by default) with the
  ``gguf`` package's own quantisers; every other tensor and every metadata field (tokenizer, chat
  template) is copied byte for byte.

How PEFT's tensors map onto llama.cpp's:
- names come from the ``gguf`` package's tensor-name map of the base's architecture
  (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``);
- llama.cpp's rotary embedding pairs neighbouring rows of the Llama query and key projections,
  Hugging Face's pairs row i with row i + head_dim/2, so GGUF conversion reorders those rows within
  each head. The same reordering is applied to ``lora_B`` (it produces the rows); ``lora_A`` is
  untouched. Architectures that need it: ``ROPE_PERMUTED`` (checked in the tests against the real
  SmolLM2 GGUF and its dequantised safetensors cache);
- llama.cpp scales an adapter by ``alpha / r``; for rsLoRA (``alpha / sqrt(r)``) the written alpha
  is ``alpha * sqrt(r)`` so that the product is the same.

Both files record the sha256 of the GGUF they were made against (``lora_compare.base_sha256``), and
the export refuses a base whose sha256 is not the one the adapter was trained on.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import atomic_file
from .paths import final_adapter

ROPE_PERMUTED = {"llama"}  # architectures whose GGUF conversion reorders q/k rows
BASE_SHA_KEY = "lora_compare.base_sha256"
ADAPTER_KEY = "lora_compare.adapter"
MERGED_TYPES = ("Q8_0", "F16", "F32")


class ExportError(ValueError):
    pass


@dataclass
class LoraPair:
    module: str       # Hugging Face module path, e.g. model.layers.0.self_attn.q_proj
    gguf_name: str    # llama.cpp tensor name without ".weight", e.g. blk.0.attn_q
    a: np.ndarray     # (r, in)
    b: np.ndarray     # (out, r), rows already in the GGUF's order


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    return field.contents() if field is not None else default


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection from Hugging Face's rotary layout to llama.cpp's:
    within each head, row i + head_dim/2 moves next to row i."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise ExportError(f"cannot reorder {out} rows into {n_head} heads of even size")
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def adapter_scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_adapter(adapter: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A PEFT LoRA folder's config and tensors; anything llama.cpp cannot take is refused."""
    from safetensors.numpy import load_file

    config_path, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    for path in (config_path, weights):
        if not path.exists():
            raise ExportError(
                f"{path} not found; expected a PEFT LoRA folder (train one with notebooks/02_train_lora.ipynb)"
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(
            f"{config_path}:{err.lineno}: not valid JSON ({err.msg}); expected PEFT's adapter_config.json"
        ) from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(
            f"{config_path}: peft_type {config.get('peft_type')!r}; only LoRA adapters export to llama.cpp"
        )
    if config.get("use_dora"):
        raise ExportError(f"{config_path}: DoRA adapters have no llama.cpp adapter format; merge in torch instead")
    if config.get("modules_to_save"):
        raise ExportError(
            f"{config_path}: modules_to_save {config['modules_to_save']} are full weights, not LoRA pairs"
        )
    if config.get("fan_in_fan_out"):
        raise ExportError(f"{config_path}: fan_in_fan_out (GPT-2 Conv1D) models have no GGUF base here")
    try:
        return config, load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ExportError(f"{weights}: cannot be read as safetensors ({err}); re-save the adapter "
                          f"(notebooks/02_train_lora.ipynb)") from None


def lora_pairs(tensors: dict[str, np.ndarray], arch: str, n_blocks: int, n_head: int, n_head_kv: int,
               source: str = "adapter") -> list[LoraPair]:
    """PEFT's lora_A/lora_B tensors as llama.cpp-named pairs, B rows in the GGUF's order."""
    import gguf

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_id is None:
        raise ExportError(f"{source}: architecture {arch!r} is not known to the gguf package")
    names = gguf.get_tensor_name_map(arch_id, n_blocks)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                halves.setdefault(module, {})[part] = value.astype(np.float32)
                break
        else:
            raise ExportError(f"{source}: tensor {key!r} is not a lora_A/lora_B weight")
    pairs = []
    for module, pair in sorted(halves.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ExportError(f"{source}: {module} has only {sorted(pair)}")
        name = names.get_name(module)
        if name is None:
            raise ExportError(f"{source}: no llama.cpp tensor for module {module!r} in architecture {arch!r}")
        b = pair["lora_B"]
        if arch in ROPE_PERMUTED and name.endswith(("attn_q", "attn_k")):
            b = rope_permute(b, n_head if name.endswith("attn_q") else n_head_kv)
        pairs.append(LoraPair(module, name, pair["lora_A"], b))
    if not pairs:
        raise ExportError(f"{source}: no LoRA tensors")
    return pairs


class Base:
    """The shipped GGUF an adapter is exported against."""

    def __init__(self, path: Path, expected_sha256: str | None = None):
        import gguf

        from .models import file_sha256

        self.path = Path(path)
        if not self.path.exists():
            raise ExportError(f"base GGUF {self.path} not found")
        self.sha256 = file_sha256(self.path)
        if expected_sha256 and self.sha256 != expected_sha256:
            raise ExportError(f"base GGUF {self.path} has sha256 {self.sha256[:16]}..., but the adapter was trained on "
                              f"{expected_sha256[:16]}...: export against the GGUF the adapter was trained on "
                              f"(or retrain the adapter on this one)")
        self.reader = gguf.GGUFReader(str(self.path))
        self.arch = _field(self.reader, "general.architecture")
        self.n_blocks = int(_field(self.reader, f"{self.arch}.block_count"))
        self.n_head = int(_field(self.reader, f"{self.arch}.attention.head_count"))
        self.n_head_kv = int(_field(self.reader, f"{self.arch}.attention.head_count_kv", self.n_head))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def check(self, pairs: list[LoraPair], source: str) -> None:
        """Every pair names a 2-D tensor of the base with matching shape (ggml: ne = [in, out])."""
        for p in pairs:
            t = self.tensors.get(p.gguf_name + ".weight")
            if t is None:
                raise ExportError(f"{source}: {p.module} -> {p.gguf_name}.weight is not in base {self.path.name}; "
                                  f"the adapter was made for another model")
            n_in, n_out = (int(x) for x in t.shape[:2])
            if p.a.shape[1] != n_in or p.b.shape[0] != n_out:
                raise ExportError(f"{source}: {p.module} is {p.b.shape[0]}x{p.a.shape[1]} but {t.name} in "
                                  f"{self.path.name} is {n_out}x{n_in}; the adapter was made for another model")


def write_lora_gguf(pairs: list[LoraPair], config: dict, base: Base, out: Path, adapter_name: str) -> Path:
    import gguf

    alpha = config["lora_alpha"] * (math.sqrt(config["r"]) if config.get("use_rslora") else 1.0)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_string(BASE_SHA_KEY, base.sha256)
        writer.add_string(ADAPTER_KEY, adapter_name)
        for p in pairs:
            writer.add_tensor(p.gguf_name + ".weight.lora_a", np.ascontiguousarray(p.a))
            writer.add_tensor(p.gguf_name + ".weight.lora_b", np.ascontiguousarray(p.b))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def merged_weight(tensor, pair: LoraPair, scale: float) -> np.ndarray:
    """A base tensor (any gguf type) with ``scale * B @ A`` added, as float32 (out, in)."""
    import gguf

    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    return weight.reshape(pair.b.shape[0], pair.a.shape[1]) + scale * (pair.b @ pair.a)


def write_merged_gguf(pairs: list[LoraPair], config: dict, base: Base, out: Path, adapter_name: str,
                      qtype: str = "Q8_0") -> Path:
    import gguf
    from tqdm.auto import tqdm

    if qtype not in MERGED_TYPES:
        raise ExportError(f"merged type {qtype!r}; expected one of {MERGED_TYPES}")
    target = gguf.GGMLQuantizationType[qtype]
    scale = adapter_scale(config)
    by_name = {p.gguf_name + ".weight": p for p in pairs}
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), base.arch)
        for field in base.reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        writer.add_string(BASE_SHA_KEY, base.sha256)
        writer.add_string(ADAPTER_KEY, adapter_name)

        blobs = {}
        for t in base.reader.tensors:
            if t.name in by_name:
                merged = merged_weight(t, by_name[t.name], scale)
                data = merged.astype(np.float16) if qtype == "F16" else merged if qtype == "F32" else \
                    gguf.quants.quantize(merged, target)
                blobs[t.name] = (data, target)
            else:
                blobs[t.name] = (t.data, t.tensor_type)
        for name, (data, kind) in blobs.items():  # quantised data: byte shape, converted by the writer
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data, _ in tqdm(blobs.values(), desc=f"writing {out.name}", unit="tensor"):
            writer.write_tensor_data(data)
        writer.close()
    return out


def skip_reason(adapter_root: str | Path) -> str | None:
    """Why a training output cannot be exported for llama.cpp (None: it can)."""
    from . import models

    run = models.read_run(adapter_root)
    spec = models.resolve(run["config"]["model"])
    if run.get("random_init"):
        return "trained on random weights (there is no GGUF of them)"
    if spec.get("source") != "gguf":
        return f"model {spec['name']!r} has no shipped GGUF (source {spec.get('source')!r}); pass --base-gguf"
    return None


def export(adapter_root: str | Path, out_dir: str | Path | None = None, base_gguf: str | Path | None = None,
           merged_type: str = "Q8_0", merged: bool = True) -> dict:
    """Write ``lora.gguf`` (and ``merged-<type>.gguf``) for a training output folder; return the paths
    and what they were made against."""
    from . import models

    adapter_root = Path(adapter_root)
    run = models.read_run(adapter_root)
    spec = models.resolve(run["config"]["model"])
    if spec.get("source") != "gguf" and base_gguf is None:
        raise ExportError(f"{adapter_root}: model {spec['name']!r} has no GGUF base (source {spec.get('source')!r}); "
                          f"pass --base-gguf with the GGUF of its base weights")
    if run.get("random_init"):
        raise ExportError(f"{adapter_root}: trained on random weights; there is no GGUF of them")
    base = Base(Path(base_gguf) if base_gguf else models.gguf_path(spec), run.get("gguf_sha256"))
    adapter = final_adapter(adapter_root)
    config, tensors = read_adapter(adapter)
    pairs = lora_pairs(tensors, base.arch, base.n_blocks, base.n_head, base.n_head_kv, source=str(adapter))
    base.check(pairs, str(adapter))
    out_dir = Path(out_dir) if out_dir else adapter_root / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{spec['name']} + {adapter_root.name}"
    result = {"base_gguf": str(base.path), "base_sha256": base.sha256, "architecture": base.arch,
              "tensors": len(pairs), "lora": str(write_lora_gguf(pairs, config, base, out_dir / "lora.gguf", name))}
    if merged:
        out = out_dir / f"merged-{merged_type.lower()}.gguf"
        result["merged"] = str(write_merged_gguf(pairs, config, base, out, name, merged_type))
        result["merged_type"] = merged_type
    (out_dir / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_root", help="a training output folder (models/<model>-lora, with run.json and final/)")
    parser.add_argument("--out-dir", help="where to write (default: <adapter_root>/gguf)")
    parser.add_argument("--base-gguf", help="the base GGUF (default: the preset's shipped file)")
    parser.add_argument("--merged-type", default="Q8_0", choices=MERGED_TYPES)
    parser.add_argument("--no-merged", action="store_true", help="write only the LoRA adapter GGUF")
    args = parser.parse_args(argv)
    from .models import ModelError

    try:
        result = export(args.adapter_root, args.out_dir, args.base_gguf, args.merged_type, not args.no_merged)
    except (ExportError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
