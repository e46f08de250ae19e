"""LoRA fine-tuning through Hugging Face ``Trainer`` (so ``accelerate launch`` scales it out
unchanged): 8-bit base weights, loss on assistant tokens only, dynamic padding with length
grouping, validation every ``eval_steps`` with early stopping, resumable checkpoints, and a
``run.json`` + model card beside the final adapter.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from . import cards, chat, hardware, int8, models, system
from .runinfo import METHOD_NAMES, PEFT_METHODS, PROMPT_LEARNING, base_precision, method_text  # noqa: F401
from .io import OutputDirError, write_directory_atomically, write_json_atomically, write_text_atomically
from .paths import PROCESSED, final_adapter, from_root, require, shown

RUN_SCHEMA = 1


class TrainingError(ValueError):
    pass


TRAIN_DTYPES = hardware.COMPUTE_DTYPES
# What is trained: LoRA and its variants, IA3 (learned rescaling vectors), prefix tuning (learned
# key/value prefixes in every layer), prompt tuning (learned input embeddings), all through PEFT;
# "full" trains every weight of the model (the ceiling the others are compared with).
TRACKERS = ("tensorboard", "none")
# target_modules aliases (besides a list of names): the preset's default, attention projections, every linear
TARGET_ALIASES = ("default", "attention", "all-linear")
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query_key_value")
TRACKING_SUBDIR = "tensorboard"  # TensorBoard's logs, inside each run's output folder (`make tracker` shows all)


@dataclass
class TrainConfig:
    """Parameters of ``notebooks/02_train_lora.ipynb`` (same names)."""

    model: str = "smollm2-135m"  # preset (gpt2, tinyllama, smollm2-135m, gemma3-270m), local folder or hub id
    data_dir: str = PROCESSED  # output of 01_data_prep
    output_dir: str | None = None  # None: models/<model>-lora
    lora_r: int = 8  # rank of the update
    lora_alpha: int = 16  # scaling: the update is multiplied by alpha / r
    lora_dropout: float = 0.05  # dropout on the LoRA input (0 makes runs exactly repeatable)
    target_modules: str | list[str] | None = None  # None: the preset's default; "attention"; "all-linear"; or names
    peft_method: str = "lora"  # lora, dora, ia3, prefix, prompt (PEFT), or full (every weight; needs no 8-bit)
    use_rslora: bool = False  # rank-stabilised LoRA: the update is scaled by alpha / sqrt(r) instead of alpha / r
    num_virtual_tokens: int = 16  # prefix and prompt tuning: how many learned tokens
    load_in_8bit: bool = True  # 8-bit base weights (bitsandbytes); falls back to fp32, recorded, if it cannot run
    load_in_4bit: bool = False  # 4-bit NF4 base weights instead (QLoRA); turn load_in_8bit off with it
    random_init: bool = False  # architecture-exact random weights (speed and size only)
    num_epochs: float = 1.0  # passes over the training split
    max_steps: int = -1  # > 0 overrides num_epochs
    learning_rate: float | None = None  # None: the preset's default
    batch_size: int = 8  # conversations per device step
    gradient_accumulation_steps: int = 1  # steps per optimizer update
    max_seq_len: int = 256  # tokens; longer conversations are cut (reply tokens beyond it are not trained)
    eval_steps: int = 25  # validation loss every this many optimizer steps
    save_steps: int = 25  # checkpoint every this many steps (a multiple of eval_steps)
    seed: int = 42  # model init of LoRA, data order
    resume: bool = True  # continue from the last complete checkpoint in output_dir
    early_stopping_patience: int = 3  # evaluations without improvement before stopping
    padding: str = "dynamic"  # "dynamic" (length-grouped batches) or "max_length" (the tutorial recipe)
    gradient_checkpointing: bool = False  # recompute layers in the backward pass: less memory, ~30% slower
    lean_allocator: bool = False  # glibc hands freed buffers back at once: less peak memory, ~10-15% slower
    dtype: str = "auto"  # "bf16" (autocast, fp32 LoRA weights and optimizer state), "fp32", or "auto": bf16 where
    # the CPU multiplies bf16 natively (AMX / AVX-512-BF16), fp32 elsewhere (see utils.hardware)
    max_train_examples: int | None = None  # cut the data (smoke runs)
    max_eval_examples: int | None = None  # cut the validation split (smoke runs)
    logging_steps: int = 5  # train loss logged every this many steps
    report_to: str = "tensorboard"  # the Trainer logs to TensorBoard in <output_dir>/tensorboard ("none": off)

    def validate(self) -> None:
        """Refuse impossible settings before any work is done."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise TrainingError(msg)

        need(isinstance(self.lora_r, int) and self.lora_r > 0, f"lora_r={self.lora_r!r}; expected an integer > 0")
        need(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha!r}; expected > 0")
        need(0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout!r}; expected 0 <= dropout < 1")
        need(self.batch_size >= 1, f"batch_size={self.batch_size!r}; expected >= 1")
        need(self.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps={self.gradient_accumulation_steps!r}; expected >= 1")
        need(self.max_seq_len >= 8, f"max_seq_len={self.max_seq_len!r}; expected >= 8 tokens")
        need(self.max_steps > 0 or self.num_epochs > 0, "expected max_steps > 0 or num_epochs > 0")
        need(self.eval_steps >= 1 and self.save_steps >= 1, "eval_steps and save_steps must be >= 1")
        need(self.save_steps % self.eval_steps == 0,
             f"save_steps={self.save_steps} must be a multiple of eval_steps={self.eval_steps} "
             "(the best adapter is chosen among evaluated checkpoints)")
        need(
            self.learning_rate is None or self.learning_rate > 0, f"learning_rate={self.learning_rate!r}; expected > 0"
        )
        need(self.padding in ("dynamic", "max_length"), f"padding={self.padding!r}; expected 'dynamic' or 'max_length'")
        need(self.dtype in TRAIN_DTYPES, f"dtype={self.dtype!r}; expected one of {list(TRAIN_DTYPES)}")
        need(self.peft_method in PEFT_METHODS,
             f"peft_method={self.peft_method!r}; expected one of {list(PEFT_METHODS)}")
        need(not (self.load_in_8bit and self.load_in_4bit),
             "load_in_8bit and load_in_4bit are both True; expected at most one")
        need(self.peft_method != "full" or not (self.load_in_8bit or self.load_in_4bit),
             f"peft_method='full' trains every weight, which 8-bit or 4-bit weights cannot hold; "
             f"set load_in_8bit=False and load_in_4bit=False (got {self.load_in_8bit}, {self.load_in_4bit})")
        need(isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0,
             f"num_virtual_tokens={self.num_virtual_tokens!r}; expected an integer > 0")
        need(self.report_to in TRACKERS, f"report_to={self.report_to!r}; expected one of {list(TRACKERS)}")
        need(isinstance(self.lean_allocator, bool), f"lean_allocator={self.lean_allocator!r}; expected True or False")


@dataclass
class TrainNotebook(TrainConfig):
    """Parameters of ``notebooks/02_train_lora.ipynb``: the training config plus the notebook's own steps."""

    export_gguf: bool = True  # also write the adapter for llama.cpp (lora.gguf, merged-q8_0.gguf) for GGUF bases
    report_dir: str | None = None  # set by the pipeline: loss curves and run.json are copied to <report_dir>/


# --------------------------------------------------------------------------- data


def _load_split(data_dir: Path, split: str, limit: int | None) -> list[dict]:
    from .data import read_jsonl

    rows = read_jsonl(require(data_dir / f"{split}.jsonl", "01_data_prep.ipynb", TrainingError))
    return rows[:limit] if limit else rows


def data_hash(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for split in ("train", "validation"):
        digest.update((data_dir / f"{split}.jsonl").read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- checkpoints


def checkpoint_is_complete(path: Path) -> bool:
    """A checkpoint can be resumed from when its state, optimizer, scheduler and readable
    adapter weights are all there (a run killed mid-save leaves some of them out)."""
    from safetensors import safe_open

    weights = "model.safetensors" if (path / "model.safetensors").exists() else "adapter_model.safetensors"
    needed = ["trainer_state.json", "optimizer.pt", "scheduler.pt", weights]  # full fine-tuning: model.safetensors
    if not all((path / n).is_file() and (path / n).stat().st_size > 0 for n in needed):
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
        with safe_open(str(path / weights), framework="pt") as fh:
            for key in fh.keys():
                fh.get_tensor(key)
    except Exception:  # noqa: BLE001 - any read failure means torn
        return False
    return True


def last_complete_checkpoint(output_dir: Path, log=print) -> Path | None:
    """The newest complete ``checkpoint-N``; torn ones are moved aside to ``torn-checkpoint-N``
    (kept, not deleted) so that the Trainer does not trip over them when it saves step N again."""
    found = sorted((p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for path in found:
        if checkpoint_is_complete(path):
            return path
        aside = _free_name(path.with_name(f"torn-{path.name}"))
        os.rename(path, aside)
        log(f"checkpoint {path.name} is incomplete (killed while saving?); moved aside to {aside.name}")
    return None


def _free_name(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``, ... : the first that does not exist (nothing is overwritten)."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


# --------------------------------------------------------------------------- model


def resolve_targets(cfg: TrainConfig, spec: dict, model) -> list[str]:
    available = models.linear_module_names(model)
    targets = cfg.target_modules
    if targets is None:
        targets = spec.get("lora_targets")
        if targets is None:  # not a preset: attention projections if there are any
            targets = [t for t in ("q_proj", "v_proj", "c_attn", "query_key_value") if t in available] or available
    elif targets == "default":
        targets = spec.get("lora_targets") or [t for t in ("q_proj", "v_proj", "c_attn") if t in available]
    elif targets in ("all-linear", "all_linear"):
        targets = spec.get("all_linear") or available
    elif targets == "attention":
        targets = spec.get("attention") or [t for t in ATTENTION_NAMES if t in available]
    elif isinstance(targets, str):
        targets = [targets]
    missing = [t for t in targets if t not in available]
    if missing:
        raise TrainingError(f"target_modules {missing} not found in {spec['name']}; its linear modules are {available}")
    return list(targets)


def uses_conv1d(model, targets: Sequence[str]) -> bool:
    """GPT-2 style Conv1D layers store weights transposed: LoRA needs ``fan_in_fan_out``."""
    return any(type(m).__name__ == "Conv1D" and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())


def lora_config(cfg: TrainConfig, targets: list[str], fan_in_fan_out: bool):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM",
                      use_dora=cfg.peft_method == "dora", use_rslora=cfg.use_rslora)


# the layers that write a block's output back into the residual stream: IA3 scales their input
FEEDFORWARD_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "o_proj")


def peft_config(cfg: TrainConfig, targets: list[str] | None, fan_in_fan_out: bool):
    """The PEFT config of ``cfg.peft_method`` (None for full fine-tuning)."""
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig

    method = cfg.peft_method
    if method in ("lora", "dora"):
        return lora_config(cfg, targets, fan_in_fan_out)
    if method == "ia3":
        if targets is None:  # PEFT's own choice for the architecture (keys, values, feed-forward output)
            return IA3Config(task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                         feedforward_modules=[t for t in targets if t in FEEDFORWARD_NAMES])
    if method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)
    if method == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)
    return None


def count_parameters(model) -> dict:
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT: counts 4-bit packed weights at their real size
        trainable, total = model.get_nb_trainable_parameters()
    else:  # full fine-tuning: a plain model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": int(trainable), "total_params": int(total),
            "trainable_percent": round(100 * trainable / total, 4)}


def expected_lora_params(model, targets: Sequence[str], r: int) -> int:
    """r x (d_in + d_out) summed over every adapted layer (for checking the count)."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, torch.nn.Linear):
            total += r * (module.in_features + module.out_features)
        elif type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
            total += r * sum(module.weight.shape)
    return total


# --------------------------------------------------------------------------- training


def check_free_space(output_dir: Path, trainable_params: int, keep: int = 2, margin_mb: float = 64) -> None:
    """Refuse to start when the disk cannot hold the checkpoints and the final adapter: each
    checkpoint holds the LoRA weights and Adam's two moments (fp32), ``keep`` are kept, plus the
    final adapter, tokenizer files and a margin."""
    need = trainable_params * 4 * 3 * (keep + 1) + margin_mb * 2**20
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise TrainingError(f"not enough free space in {output_dir}: about {need / 2**20:.0f} MB needed for "
                            f"checkpoints and the adapter, {free / 2**20:.0f} MB free")


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    run: dict = field(default_factory=dict)
    model: object = None  # the trained model in memory (the best checkpoint's weights)


def _trainer_class():
    """``Trainer`` whose length-grouped order is a function of (seed, epoch) only.

    The stock length-grouped sampler draws from the global torch RNG, so a run resumed in the
    middle of an epoch shuffles that epoch differently from the uninterrupted run. Seeding each
    epoch's shuffle explicitly makes a resumed run repeat the uninterrupted one exactly, and gives
    every process of a distributed run the same order to shard."""
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import get_length_grouped_indices

    class EpochSeededLengthSampler(torch.utils.data.Sampler):
        # The epoch is read from the trainer's state when an epoch's iteration starts: on resume
        # the state is restored from the checkpoint, while set_epoch() does not reach a sampler
        # wrapped for skipping the batches already trained.
        def __init__(self, lengths, batch_size: int, seed: int, epoch_fn):
            self.lengths, self.batch_size, self.seed, self.epoch_fn = list(lengths), batch_size, seed, epoch_fn

        def __len__(self) -> int:
            return len(self.lengths)

        def __iter__(self):
            g = torch.Generator()
            g.manual_seed(self.seed * 1000003 + self.epoch_fn())
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))

    class LoraTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Cross-entropy at the trained positions only. The stock path applies the output layer
            to every position and keeps those logits (batch x length x vocabulary floats: 400 MB for
            8 x 256 tokens and SmolLM2's 49k vocabulary, with as much again for their softmax and
            gradient) although only the assistant's tokens carry a label. Here the last hidden state
            is gathered at the labelled positions first, so the logits are (labelled tokens x vocab).
            Same value as the model's own loss (tested); normalised like the Trainer's: by the number
            of labelled tokens in the whole (accumulated, all-process) batch."""
            import inspect

            import torch.nn.functional as F

            causal = self.accelerator.unwrap_model(model)
            base = causal.get_base_model() if hasattr(causal, "get_base_model") else causal
            prompt_learning = getattr(getattr(causal, "active_peft_config", None), "is_prompt_learning", False)
            if ("labels" not in inputs or prompt_learning  # PEFT adds virtual tokens (and their labels) itself
                    or "logits_to_keep" not in inspect.signature(base.forward).parameters):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # other architectures
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            # through the (possibly DDP-wrapped) model's forward, so gradient sync still works;
            # logits_to_keep=1 makes its own output layer nearly free
            outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
            target = labels[:, 1:]
            keep = target != chat.IGNORE_INDEX
            hidden = outputs.hidden_states[-1][:, :-1][keep]
            logits = causal.get_output_embeddings()(hidden).float()
            cap = getattr(causal.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            total = F.cross_entropy(logits, target[keep], reduction="sum")
            if num_items_in_batch is None:
                loss = total / keep.sum().clamp(min=1)
            else:
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices:  # DDP averages gradients over processes
                    loss = loss * self.accelerator.num_processes
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            return (loss, {"loss": loss}) if return_outputs else loss

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            # the "length" column may already be dropped as an unused column by now
            lengths = dataset["length"] if "length" in dataset.column_names else [len(x) for x in dataset["input_ids"]]
            # Grouped by the global batch (all processes, all accumulation steps): accelerate hands
            # consecutive slices of this one order to the processes, so N processes with batch b
            # see exactly the batches one process with batch N*b sees. Grouping by the per-device
            # batch instead gives an order that depends on the process count.
            global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return EpochSeededLengthSampler(lengths, global_batch,
                                            self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                                            lambda: int(round(self.state.epoch or 0.0, 6)))

    return LoraTrainer


def _checkpointing_args(training_arguments, enabled: bool) -> dict:
    """Re-entrant checkpointing under the argument names this transformers version uses
    (``activation_checkpointing*`` replaced ``gradient_checkpointing*`` during 5.x)."""
    if not enabled:
        return {}
    fields = training_arguments.__dataclass_fields__
    prefix = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {prefix: True, f"{prefix}_kwargs": {"use_reentrant": True}}


def _make_callbacks(cfg: TrainConfig):
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Throughput(TrainerCallback):
        """Non-padding tokens, time spent in optimizer steps (evaluation and checkpointing left
        out) and wall time of this session (a resumed run counts its own part), and the peak
        memory during training, sampled every 50 ms by a thread (inside a step, where activations
        peak, not only between steps): resident set in all, and without file-backed pages."""

        def on_train_begin(self, args, state, control, **kw):
            self.tokens0, self.t0, self.step_seconds = state.num_input_tokens_seen, time.perf_counter(), 0.0
            self.steps = 0  # optimizer steps run by this process (a resumed run: only the remaining ones)
            self.memory = system.MemorySampler().start()

        def on_step_begin(self, args, state, control, **kw):
            self.step_t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_seconds += time.perf_counter() - self.step_t0
            self.steps += 1

        def on_train_end(self, args, state, control, **kw):
            self.tokens = state.num_input_tokens_seen - self.tokens0
            self.seconds = time.perf_counter() - self.t0
            self.memory.stop()
            self.peak_rss_mb, self.peak_private_mb = self.memory.peak_rss_mb, self.memory.peak_private_mb

    throughput = Throughput()
    return throughput, [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience), throughput]


def _output_dir(cfg: TrainConfig) -> Path:
    output_dir = from_root(cfg.output_dir) if cfg.output_dir else models.adapter_dir(cfg.model)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(
            f"output_dir {output_dir} cannot be created ({err.strerror}); expected a writable folder"
        ) from err
    if not os.access(output_dir, os.W_OK):
        raise TrainingError(f"output_dir {output_dir} is not writable; expected a writable folder")
    return output_dir


@dataclass
class _Setup:
    """What ``train`` prepared before the Trainer runs, and what the run record reports of it."""

    spec: dict
    loaded: models.LoadedModel
    fmt: str
    data_dir: Path
    train_ds: list
    val_ds: list
    dropped: dict
    targets: list
    fan_in_fan_out: bool
    slimmed: int
    params: dict
    dtype: str
    rss_before: float


def _encode(cfg: TrainConfig, rows: dict, tokenizer, fmt: str, log) -> tuple[list, list, dict]:
    train_ds, dropped_train = chat.encode_rows(rows["train"], tokenizer, fmt, cfg.max_seq_len)
    val_ds, dropped_val = chat.encode_rows(rows["validation"], tokenizer, fmt, cfg.max_seq_len)
    if not train_ds or not val_ds:
        prompts = sorted(chat.encode(r["messages"], tokenizer, fmt, 10**6).prompt_tokens for r in rows["train"][:200])
        raise TrainingError(f"max_seq_len={cfg.max_seq_len} is shorter than every prompt (median prompt "
                            f"{prompts[len(prompts) // 2]} tokens in {fmt!r} format); raise max_seq_len")
    if dropped_train:
        log(f"{dropped_train} of {len(rows['train'])} training conversations have no reply token within "
            f"max_seq_len={cfg.max_seq_len} and are left out")
    return train_ds, val_ds, {"train": dropped_train, "validation": dropped_val}


def method_targets(cfg: TrainConfig, spec: dict, model) -> list[str] | None:
    """The modules the method adapts: None where it adapts none by name (prefix and prompt tuning,
    full fine-tuning) or lets PEFT choose (IA3 without target_modules)."""
    if cfg.peft_method in PROMPT_LEARNING + ("full",):
        return None
    if cfg.peft_method == "ia3" and cfg.target_modules is None:
        return None
    return resolve_targets(cfg, spec, model)


def _add_lora(cfg: TrainConfig, spec: dict, loaded: models.LoadedModel):
    """The base model made trainable: 8-bit/4-bit preparation, checkpointing inputs, the PEFT layers
    of ``cfg.peft_method`` (LoRA by default; full fine-tuning leaves the model as it is)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = loaded.model
    targets = method_targets(cfg, spec, model)
    fan_in_fan_out = uses_conv1d(model, targets or [])
    slimmed = 0
    if loaded.info["load_in_8bit"] or loaded.info.get("load_in_4bit"):
        # casts norms to fp32; checkpointing is switched on (or not) by the Trainer below
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if loaded.info["load_in_8bit"]:
        # bitsandbytes' CPU training matmul keeps every 8-bit layer's input although the frozen
        # weight needs no gradient; these layers keep nothing (same numbers, see utils/int8.py)
        slimmed = int8.slim_frozen_8bit(model)
    if cfg.gradient_checkpointing:
        # Re-entrant checkpointing runs each layer's first forward without autograd, so nothing of it
        # is kept. (The non-re-entrant kind relies on saved-tensor hooks, which bitsandbytes' CPU
        # 8-bit matmul bypasses by holding its input on ctx: it saved no memory in 8-bit.) It needs
        # the layers' input to require grad, although the embeddings are frozen.
        model.enable_input_require_grads()
    config = peft_config(cfg, targets, fan_in_fan_out)
    if config is None:  # full fine-tuning
        return model, targets, fan_in_fan_out, slimmed
    try:
        model = get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError, KeyError) as err:
        raise TrainingError(f"peft_method={cfg.peft_method!r} cannot be applied to {spec['name']} "
                            f"({type(model).__name__}): {str(err).splitlines()[0][:300]}") from err
    if targets is None and hasattr(model, "peft_config"):  # the modules PEFT chose
        chosen = getattr(model.peft_config["default"], "target_modules", None)
        targets = sorted(chosen) if chosen else None
    return model, targets, fan_in_fan_out, slimmed


def training_arguments(cfg: TrainConfig, spec: dict, output_dir: Path, dtype: str):
    """The Trainer's arguments for this config: the repo's recipe in one place."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        bf16=dtype == "bf16",  # autocast: matmuls in bf16, the trained weights and Adam's state stay fp32
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate or spec.get("learning_rate", 2e-4),
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        eval_on_start=True,  # the base model's validation loss: where the loss curve starts
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.padding == "dynamic" else "random",
        length_column_name="length",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=True,
        prediction_loss_only=True,  # evaluation keeps losses only, never every batch's logits
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        run_name=output_dir.name,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        **_checkpointing_args(TrainingArguments, cfg.gradient_checkpointing),
        disable_tqdm=False,
    )


def run_record(cfg: TrainConfig, setup: _Setup, trainer, result, throughput, checkpoint: Path | None) -> dict:
    """``run.json``: what was trained, on what, how, and what it measured."""
    loaded, state = setup.loaded, trainer.state
    history = state.log_history
    return {
        "schema": RUN_SCHEMA,
        "model": setup.spec["name"],
        "base_model": loaded.info.get("hub_id") or loaded.info["weights"],
        "source": loaded.info["source"],
        "weights": loaded.info["weights"],
        "gguf_sha256": loaded.info.get("gguf_sha256"),
        "random_init": cfg.random_init,
        "label": loaded.info.get("label"),
        "load_in_8bit": loaded.info["load_in_8bit"],
        "load_in_8bit_fallback": loaded.info.get("load_in_8bit_fallback"),
        "load_in_4bit": loaded.info.get("load_in_4bit", False),
        "peft_method": cfg.peft_method,
        "slim_8bit_layers": setup.slimmed,
        "chat_format": setup.fmt,
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "rslora": cfg.use_rslora,
                 "target_modules": setup.targets, "fan_in_fan_out": setup.fan_in_fan_out},
        **setup.params,
        "config": asdict(cfg),
        "data_dir": shown(setup.data_dir),
        "data_sha256": data_hash(setup.data_dir),
        "examples": {"train": len(setup.train_ds), "validation": len(setup.val_ds), "dropped_too_long": setup.dropped},
        "seed": cfg.seed,
        "resumed_from": checkpoint.name if checkpoint else None,
        "global_step": state.global_step,
        "steps_this_session": throughput.steps,  # optimizer steps this process ran (after resuming: the rest)
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "best_eval_loss": state.best_metric,
        "loss_history": {
            "train": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
            "validation": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        },
        "train_runtime_s": round(throughput.seconds, 2),  # wall time, evaluation and checkpoints included
        "train_step_time_s": round(throughput.step_seconds, 2),
        "train_tokens": int(throughput.tokens),  # non-padding tokens
        "train_tokens_per_s": (round(throughput.tokens / throughput.step_seconds, 2)
                               if throughput.step_seconds else None),
        "peak_private_rss_mb": round(throughput.peak_private_mb, 1),  # while training, file-backed pages left out
        "peak_train_rss_mb": round(throughput.peak_rss_mb, 1),  # while training, everything resident
        "train_loss": result.training_loss,
        "model_memory_mb": round(loaded.model.get_memory_footprint() / 2**20, 1),
        "peak_rss_mb": round(system.lifetime_peak_rss_mb(), 1),
        "peak_rss_before_model_mb": round(setup.rss_before, 1),
        "device": "cpu" if trainer.args.use_cpu else "cuda",
        "dtype": setup.dtype,
        "dtype_probe": hardware.dtype_probe(),
        "world_size": trainer.args.world_size,  # training processes; token counts above are summed over them
        "checkpointing_active": bool(getattr(loaded.model, "is_activation_checkpointing",
                                             getattr(loaded.model, "is_gradient_checkpointing", False))),
        "versions": system.versions(),
    }


def train(cfg: TrainConfig, extra_callbacks: Sequence = (), log=print) -> TrainResult:
    """Fine-tune ``cfg.model`` with LoRA; return where the adapter and ``run.json`` are."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, set_seed

    cfg.validate()
    spec = models.resolve(cfg.model)
    data_dir = from_root(cfg.data_dir)
    rows = {"train": _load_split(data_dir, "train", cfg.max_train_examples),
            "validation": _load_split(data_dir, "validation", cfg.max_eval_examples)}
    output_dir = _output_dir(cfg)

    set_seed(cfg.seed)
    rss_before = system.lifetime_peak_rss_mb()
    loaded = models.load_model(cfg.model, load_in_8bit=cfg.load_in_8bit, random_init=cfg.random_init,
                               load_in_4bit=cfg.load_in_4bit)
    tokenizer = loaded.tokenizer
    # random-weight stand-ins come with a byte-level tokenizer, which has no chat template
    fmt = chat.chat_format({**spec, "chat_format": "auto"} if cfg.random_init else spec, tokenizer)
    train_ds, val_ds, dropped = _encode(cfg, rows, tokenizer, fmt, log)

    model, targets, fan_in_fan_out, slimmed = _add_lora(cfg, spec, loaded)
    allocator = system.lean_allocator() if cfg.lean_allocator else None  # for this whole process
    if allocator:
        log(f"memory: {allocator}")
    params = count_parameters(model)
    check_free_space(output_dir, params["trainable_params"])
    log(f"{cfg.peft_method} on {targets or 'its own parameters'}: {params['trainable_params']:,} trainable of "
        f"{params['total_params']:,} parameters ({params['trainable_percent']:.3f}%)")
    dtype = hardware.pick_dtype(cfg.dtype, "training", allowed=TRAIN_DTYPES)
    how = "bf16 autocast, fp32 LoRA weights and optimizer state" if dtype == "bf16" else "fp32"
    log(f"compute dtype: {dtype} ({how}; requested {cfg.dtype!r}, CPU {hardware.cpu_model()})")
    setup = _Setup(spec, loaded, fmt, data_dir, train_ds, val_ds, dropped, targets, fan_in_fan_out, slimmed,
                   params, dtype, rss_before)

    args = training_arguments(cfg, spec, output_dir, dtype)
    collator = DataCollatorForSeq2Seq(
        tokenizer, label_pad_token_id=chat.IGNORE_INDEX,
        padding="max_length" if cfg.padding == "max_length" else True,
        max_length=cfg.max_seq_len if cfg.padding == "max_length" else None,
    )
    throughput, callbacks = _make_callbacks(cfg)
    with tracking_dir(cfg, output_dir):
        trainer = _trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(train_ds),
                                   eval_dataset=Dataset.from_list(val_ds), data_collator=collator,
                                   callbacks=callbacks + list(extra_callbacks))

    # Several processes (accelerate/torchrun): the main one looks first, and moves torn checkpoints
    # aside; the others then find the same complete checkpoint.
    with args.main_process_first(desc="looking for the last complete checkpoint"):
        checkpoint = last_complete_checkpoint(output_dir, log) if cfg.resume else None
    if checkpoint is not None:
        log(f"resuming from {checkpoint.name}")
    with models.quiet_bnb():
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    run = run_record(cfg, setup, trainer, result, throughput, checkpoint)
    run["allocator"] = allocator or "default"
    final_dir = final_adapter(output_dir)

    def write_final(folder: Path) -> None:
        trainer.model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        if (folder / "adapter_config.json").exists():  # full fine-tuning writes a whole model instead
            _point_adapter_at_base(folder, run["base_model"])

    if trainer.is_world_process_zero():  # one writer when several processes train
        write_directory_atomically(final_dir, write_final)
        write_json_atomically(output_dir / "run.json", run)
        write_text_atomically(output_dir / "MODEL_CARD.md", cards.model_card(run, spec))
        from . import plots

        plots.plot_loss_curves(run, output_dir / "loss_curves.png")
    trainer.accelerator.wait_for_everyone()
    return TrainResult(output_dir, final_dir, run, trainer.model)


@contextlib.contextmanager
def tracking_dir(cfg: TrainConfig, output_dir: Path):
    """TensorBoard's log folder for this run, ``<output_dir>/tensorboard``: the Trainer's callback
    reads it from the environment when the Trainer is built (restored afterwards)."""
    key = "TENSORBOARD_LOGGING_DIR"
    before = os.environ.get(key)
    if cfg.report_to == "tensorboard":
        os.environ[key] = str(output_dir / TRACKING_SUBDIR)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _point_adapter_at_base(folder: Path, base: str) -> None:
    """Record the base model's public id (not a machine's cache path) in adapter_config.json."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2) + "\n")


def check_inputs(cfg: TrainConfig) -> None:
    """Stop before any work when the data splits are missing, naming the notebook that writes them."""
    for split in ("train", "validation"):
        require(from_root(cfg.data_dir) / f"{split}.jsonl", "01_data_prep.ipynb", TrainingError)


def summary(run: dict) -> str:
    """What a training run showed, in a few sentences (markdown), from its run record."""
    val = run["loss_history"]["validation"]
    start, best = (val[0]["loss"] if val else None), run["best_eval_loss"]
    lines = [f"{method_text(run)} trained "
             f"**{run['trainable_params']:,} of {run['total_params']:,} parameters ({run['trainable_percent']:.2f}%, "
             f"{100 - run['trainable_percent']:.2f}% fewer than full fine-tuning)** for {run['global_step']} steps "
             f"({base_precision(run)} base weights, {run['dtype']} compute)."]
    if start is not None and best is not None:
        change = "fell" if best < start else "did not fall"
        lines.append(f"Validation loss {change} from {start:.3f} (the base model) to {best:.3f} "
                     f"(best, {run['best_checkpoint']}).")
    if run["random_init"]:
        lines.append(f"**{models.RANDOM_WEIGHTS_LABEL}**: the losses say nothing about a real model.")
    if run.get("train_tokens_per_s"):
        lines.append(f"{run['train_tokens_per_s']:.0f} non-padding tokens/s on {run['dtype_probe']['cpu']}, "
                     f"peak memory while training {run['peak_train_rss_mb']:.0f} MB.")
    return " ".join(lines)


def export_to_report(result: TrainResult, report_dir: Path) -> None:
    """Copy the run's loss curves and run.json into a pipeline report folder."""
    name = result.run["model"]
    (report_dir / "figures").mkdir(parents=True, exist_ok=True)
    (report_dir / "runs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.output_dir / "loss_curves.png", report_dir / "figures" / f"loss_curves-{name}.png")
    shutil.copyfile(result.output_dir / "run.json", report_dir / "runs" / f"{name}.json")


def _cli_bool(value: str) -> bool:
    import argparse

    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if value.lower() not in words:
        raise argparse.ArgumentTypeError(f"{value!r} is not a boolean; expected true or false")
    return words[value.lower()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line for scripted and multi-process runs, e.g.
    ``accelerate launch --config_file configs/accelerate/ddp.yaml -m utils.training --model smollm2-135m``.
    Every ``TrainConfig`` field is an option (``--lora-r 16``, ``--target-modules q_proj v_proj``)."""
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser(prog="python -m utils.training", description=main.__doc__)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "target_modules":
            parser.add_argument(flag, nargs="+", default=None)
        elif f.type in ("bool", bool):
            parser.add_argument(flag, type=_cli_bool, default=f.default, metavar="{true,false}")
        elif f.type in ("int", int, "int | None"):
            parser.add_argument(flag, type=int, default=f.default)
        elif f.type in ("float", float, "float | None"):
            parser.add_argument(flag, type=float, default=f.default)
        else:
            parser.add_argument(flag, default=f.default)
    args = vars(parser.parse_args(argv))
    if args["target_modules"] and len(args["target_modules"]) == 1 and args["target_modules"][0] == "all-linear":
        args["target_modules"] = "all-linear"
    try:
        result = train(TrainConfig(**args))
    except (TrainingError, models.ModelError, OutputDirError) as err:  # bad input: the message says it all
        print(f"python -m utils.training: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: result.run[k] for k in ("model", "global_step", "best_eval_loss", "trainable_params",
                                                       "train_tokens_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
