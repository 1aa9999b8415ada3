"""Fine-tune a causal LM with LoRA through slothc, next to the same run in eager PyTorch.

    python examples/finetune.py                       # Llama, 20 steps, CPU or GPU
    python examples/finetune.py --arch qwen3 --steps 50
    python examples/finetune.py --arch gemma2 --device cpu --steps 5
    python examples/finetune.py --trainer hf --logits drop   # transformers.Trainer, logits never built
    python examples/finetune.py --load-in-4bit               # QLoRA: NF4 base weights (bitsandbytes)

slothc is one line in ``train()``::

    model.compile(backend="slothc")          # then hand the model to SFTTrainer as usual

Everything else is an ordinary TRL run, made self-contained: the model is a small random-weight
one of the chosen architecture (``slothc.tiny``), the text is generated here (short arithmetic
stories), and the tokenizer is a byte-level BPE trained on that text. Nothing is downloaded.

The script prints the fusion report (``slothc.explain`` on one batch), then trains twice with the
same seed and data, eager and slothc, each in a fresh process so that its peak memory is its own,
and prints the two loss curves side by side with the step time and peak memory of each run.
On a GPU the model is larger and trains under bf16 autocast (``bf16=True``); on a CPU it is fp32.

Two things about the wiring, both checked with transformers 5.24 / trl 1.16 / accelerate 1.15:

* ``SFTConfig(torch_compile_backend="slothc")`` does not work: accelerate accepts only the backend
  names of its ``DynamoBackend`` enum. ``torch.compile(model, backend="slothc")`` does not work
  either: SFTTrainer patches the PEFT model's *base model* with its fused LM head and cannot find it
  through the ``OptimizedModule`` wrapper. ``model.compile(backend="slothc")`` compiles the module
  in place, keeps it a ``PeftModel``, and works.
* SFTTrainer computes the loss with its own chunked LM head (trl's ``add_fused_lm_head``), not with
  the model's ``lm_head`` + cross-entropy. The fusion report below comes from the model's own
  forward (``labels=`` given), so its loss sites are the ones a plain Trainer would train through:
  ``--trainer hf`` trains with ``transformers.Trainer`` on the model's own loss, which slothc fuses
  (``--logits drop``: the logits are never materialised; see the ``logits`` backend option).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import multiprocessing
import os
import random
import resource
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import datasets
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer

import slothc
from slothc.tiny import add_lora, tiny_model

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
NAMES = ["ada", "ben", "cleo", "dan", "eve", "finn", "gus", "hana", "ivan", "jo", "kai", "lena"]
THINGS = ["apples", "books", "coins", "shells", "stamps", "marbles", "cards", "pens", "keys", "seeds"]
COLORS = ["red", "blue", "green", "old", "shiny", "small", "big", "odd"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama", help="transformers model_type (default llama)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--layers", type=int, help="decoder layers (default 4 on CPU, 8 on GPU)")
    p.add_argument("--hidden", type=int, help="hidden size (default 256 on CPU, 1024 on GPU)")
    p.add_argument("--seq", type=int, help="tokens per example (default 128 on CPU, 512 on GPU)")
    p.add_argument("--batch", type=int, help="examples per step (default 4 on CPU, 8 on GPU)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-3 on CPU, 1e-3 on GPU)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], help="slothc's inner compiler")
    p.add_argument("--mode", choices=["default", "reduce-overhead"], default="default",
                   help="Inductor's mode for slothc; reduce-overhead records CUDA graphs (GPU; one per batch shape)")
    p.add_argument("--trainer", choices=["sft", "hf"], default="sft",
                   help="trl's SFTTrainer (default; its own chunked loss) or transformers' Trainer (the model's loss)")
    p.add_argument("--logits", choices=["keep", "drop"], default="keep",
                   help="slothc's logits option: drop = the model's loss never materialises the logits")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: load the model through BitsAndBytesConfig(load_in_4bit=True) (NF4, double quant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-eager", action="store_true", help="train only through slothc")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    gpu = args.device == "cuda"
    defaults = (("layers", 4, 8), ("hidden", 256, 1024), ("seq", 128, 512), ("batch", 4, 8), ("lr", 2e-3, 1e-3))
    for name, cpu_default, gpu_default in defaults:
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if gpu else cpu_default)
    args.bf16 = gpu and torch.cuda.is_bf16_supported()
    if args.load_in_4bit and args.hidden % 64:
        p.error(f"--load-in-4bit: --hidden {args.hidden} must be a multiple of 64 (bitsandbytes' blocksize)")
    return args


# --------------------------------------------------------------------------------------------------
# Data, tokenizer, model


def make_texts(n: int, seed: int) -> list[str]:
    """``n`` short stories whose numbers add up, so there is something to learn beyond word counts."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        sentences = []
        for _ in range(8):
            a, b = rng.sample(NAMES, 2)
            thing, color = rng.choice(THINGS), rng.choice(COLORS)
            x, y = rng.randint(2, 9), rng.randint(1, 9)
            if rng.random() < 0.5:
                sentences.append(f"{a} has {x} {color} {thing}. {b} gives {a} {y} more. now {a} has {x + y} {color} {thing}.")
            else:
                y = min(y, x - 1)
                sentences.append(f"{a} has {x} {color} {thing}. {a} gives {y} to {b}. now {a} has {x - y} {color} {thing}.")
        texts.append(" ".join(sentences))
    return texts


def make_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def make_data(args):
    """The dataset (long enough texts, so every example is cut at ``--seq`` tokens: one shape, one
    compile) and its tokenizer."""
    texts = make_texts(max(2 * args.steps * args.batch, 64), args.seed)
    tokenizer = make_tokenizer(texts)
    per_text = len(tokenizer(texts[0]).input_ids)
    if per_text <= args.seq:  # make every example longer than --seq
        texts = [" ".join([t] * (args.seq // per_text + 1)) for t in texts]
    return datasets.Dataset.from_dict({"text": texts}), tokenizer


def make_model(args, tokenizer):
    """A random-weight model of ``args.arch`` with LoRA adapters on every linear layer."""
    extra = {}
    if args.load_in_4bit:
        # every in_features a whole number of 64-element blocks, as in real checkpoints: bitsandbytes'
        # CPU dequantisation (the eager run's) is wrong when a block crosses rows (688 = 10.75 x 64)
        config = tiny_model(args.arch, layers=1, hidden=args.hidden, vocab=len(tokenizer)).config
        extra["intermediate_size"] = -(-config.intermediate_size // 64) * 64
    model = tiny_model(
        args.arch, layers=args.layers, hidden=args.hidden, vocab=len(tokenizer), seed=args.seed,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra,
    )
    if args.load_in_4bit:
        model = quantize_4bit(model, args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return add_lora(model, r=args.lora_r, alpha=2 * args.lora_r)


def quantize_4bit(model, args):
    """The same weights as a QLoRA user loads them (``slothc.tiny.load_in_4bit``: saved, then read back
    with ``BitsAndBytesConfig(load_in_4bit=True)``, NF4, double-quantised absmax, compute in bf16 on a GPU)."""
    from slothc.tiny import load_in_4bit

    return load_in_4bit(model, torch.bfloat16 if args.bf16 else torch.float32, device=args.device)


# --------------------------------------------------------------------------------------------------
# Training (each run in a fresh process)


def train(args, backend: str) -> dict:
    """Train ``args.steps`` steps with SFTTrainer; ``backend`` is ``"eager"`` or ``"slothc"``.
    Returns the per-step losses and times and the peak memory."""
    _quiet()
    dataset, tokenizer = make_data(args)
    model = make_model(args, tokenizer)
    reports = ReportCollector()
    if backend == "slothc":
        options = {"report": True, "logits": args.logits, "mode": args.mode}  # each graph's fusion report, collected below
        if args.inner:
            options["inner"] = args.inner
        model.compile(backend="slothc", options=options)

    config_cls = SFTConfig if args.trainer == "sft" else transformers.TrainingArguments
    extra = dict(max_length=args.seq) if args.trainer == "sft" else {}
    config = config_cls(
        output_dir=os.path.join("/tmp", f"slothc-finetune-{backend}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        **extra,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        use_cpu=args.device == "cpu",
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    timer = StepTimer(backend, args.steps, cuda=args.device == "cuda")
    if args.trainer == "sft":
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    else:  # the model's own loss: tokenized, cut to --seq, labels = input_ids
        def tokenize(batch):
            ids = tokenizer(batch["text"], truncation=True, max_length=args.seq)["input_ids"]
            return {"input_ids": ids, "labels": [list(x) for x in ids]}

        tokenized = dataset.map(tokenize, batched=True, remove_columns=["text"])
        trainer = transformers.Trainer(
            model=model, args=config, train_dataset=tokenized, data_collator=transformers.default_data_collator, callbacks=[timer]
        )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # StepTimer prints the progress
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with reports:
        trainer.train()
    if reports.reports:
        fused = collections.Counter()
        for report in reports.reports:
            fused.update({name: len(sites) for name, sites in report.fused.items()})
        what = ", ".join(f"{name} {n}" for name, n in fused.items() if n) or "nothing"
        print(f"  [{backend}] compiled {len(reports.reports)} graphs while training; fused: {what}", flush=True)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"losses": timer.losses, "times": timer.times, "peak_mib": peak}


class StepTimer(TrainerCallback):
    """Times every optimizer step and prints it with its loss."""

    def __init__(self, name: str, steps: int, cuda: bool):
        self.name, self.steps, self.cuda = name, steps, cuda
        self.losses, self.times, self.start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):  # called after on_step_end
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            step = len(self.losses)
            note = "  (includes compiling)" if step == 1 and self.name == "slothc" else ""
            print(f"  [{self.name}] step {step:>3}/{self.steps}  loss {self.losses[-1]:.4f}  {self.times[-1]:.2f} s{note}", flush=True)


class ReportCollector(logging.Handler):
    """Collects the fusion reports that the slothc backend logs (``options={"report": True}``)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reports = []
        self.logger = logging.getLogger("slothc")

    def emit(self, record):
        if record.args and isinstance(record.args[0], slothc.Report):
            self.reports.append(record.args[0])

    def __enter__(self):
        self.level, self.propagate = self.logger.level, self.logger.propagate
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)
        self.logger.propagate = self.propagate


def run_in_fresh_process(fn, *args):
    """``fn(*args)`` in a new Python process: its own peak memory, its own compile caches."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --------------------------------------------------------------------------------------------------
# Report


def explain(args):
    """The fusion report of the model on one training batch (forward and backward)."""
    dataset, tokenizer = make_data(args)
    model = make_model(args, tokenizer).to(args.device).train()
    enc = tokenizer(dataset["text"][: args.batch], truncation=True, max_length=args.seq, return_tensors="pt")
    batch = {k: v.to(args.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    batch["labels"] = batch["input_ids"].clone()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    options = {"logits": args.logits}
    if args.inner:
        options["inner"] = args.inner  # explain() defaults to the eager inner compiler
    with autocast:
        return slothc.explain(model, options=options, use_cache=False, **batch)


def print_comparison(args, runs: dict) -> None:
    names = list(runs)
    print("\nloss per step (same seed, same data)")
    header = "step | " + " | ".join(f"{n} loss" for n in names)
    if len(names) == 2:
        header += " | difference"
    print(header)
    for i in range(args.steps):
        losses = [runs[n]["losses"][i] if i < len(runs[n]["losses"]) else None for n in names]
        cells = [f"{v:.4f}" if v is not None else "-" for v in losses]
        line = f"{i + 1:>4} | " + " | ".join(f"{c:>{len(n) + 5}}" for c, n in zip(cells, names))
        if len(names) == 2 and None not in losses:
            line += f" | {abs(losses[0] - losses[1]):.1e}"
        print(line)

    memory = "peak GPU memory allocated" if args.device == "cuda" else "peak RSS of the process"
    print(f"\n{'':<28}" + "".join(f"{n:>14}" for n in names))
    print(f"{'first step (s)':<28}" + "".join(f"{runs[n]['times'][0]:>14.2f}" for n in names))
    rest = {n: runs[n]["times"][1:] or runs[n]["times"] for n in names}
    print(f"{'median of later steps (s)':<28}" + "".join(f"{statistics.median(rest[n]):>14.3f}" for n in names))
    print(f"{memory + ' (MiB)':<28}" + "".join(f"{runs[n]['peak_mib']:>14.0f}" for n in names))
    if len(names) == 2 and all(len(rest[n]) > 0 for n in names):
        speedup = statistics.median(rest[names[0]]) / statistics.median(rest[names[1]])
        print(f"{'slothc speed-up':<28}{'':>14}{speedup:>13.2f}x")
    if args.device == "cpu":
        print("(on a CPU the slothc ops run their plain-torch reference implementations; the Triton kernels need a GPU)")


def main(argv=None) -> int:
    args = parse_args(argv)
    _quiet()
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(
        f"slothc fine-tuning example: {args.arch}, {args.layers} layers, hidden {args.hidden}, LoRA r={args.lora_r} "
        f"on every linear layer, {args.steps} steps of {args.batch} x {args.seq} tokens, {args.device}, {precision}, "
        f"{'trl SFTTrainer' if args.trainer == 'sft' else 'transformers Trainer'}, logits {args.logits}",
        flush=True,
    )

    backends = ["slothc"] if args.skip_eager else ["eager", "slothc"]
    stages = 1 + len(backends)
    print(f"\n[1/{stages}] fusion report (slothc.explain on one batch)", flush=True)
    start = time.perf_counter()
    report = explain(args)
    print(report)
    print(f"({time.perf_counter() - start:.1f} s)", flush=True)

    runs = {}
    for i, backend in enumerate(backends, start=2):
        print(f"\n[{i}/{stages}] training, {backend}", flush=True)
        start = time.perf_counter()
        runs[backend] = run_in_fresh_process(train, args, backend)
        print(f"  [{backend}] done in {time.perf_counter() - start:.1f} s (process start and compile included)", flush=True)

    print_comparison(args, runs)
    return 0


def _quiet() -> None:
    """Keep the output to what this script prints: no progress bars or deprecation notes from the libraries."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
