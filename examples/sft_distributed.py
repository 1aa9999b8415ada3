"""Fine-tune with trl's SFTTrainer on several processes, slothc compiled in (DDP, or FSDP2).

    torchrun --nproc_per_node 2 examples/sft_distributed.py            # DDP: GPUs (nccl) or CPU (gloo)
    torchrun --nproc_per_node 2 examples/sft_distributed.py --fsdp     # FSDP2 on GPUs: each decoder layer and the root sharded
    torchrun --nproc_per_node 2 examples/sft_distributed.py --steps 5 --inner aot_eager

slothc is one line before the trainer, as in one process::

    model.compile(backend="slothc")

``SFTConfig(torch_compile_backend="slothc")`` is refused by accelerate 1.15 (its ``DynamoBackend``
enum), and ``torch.compile(model)`` hides the PEFT model from SFTTrainer; ``model.compile``
compiles the module in place. The Trainer then wraps it: in DDP, Dynamo's DDPOptimizer hands slothc
the graph in pieces at DDP's gradient buckets, and the report has a line per piece; with ``--fsdp``
the Trainer (accelerate) applies FSDP2's ``fully_shard`` to each decoder layer and the root, and
Dynamo compiles each sharded module's forward as its own graph, with FSDP2's gathered weights.

On a CPU ``--fsdp`` stops with the reason: accelerate 1.15 turns the Trainer's ``fsdp`` arguments
into FSDP only for accelerators (its ``MULTI_CPU`` state keeps DDP and ignores them). FSDP2 with
slothc on a CPU, without the Trainer, is tested in ``tests/e2e/test_distributed.py``.

The model is a tiny random-weight Llama with LoRA and the data a few sentences made here, with a
word-level tokenizer: nothing is downloaded. Rank 0 prints the fusion report and the losses.
"""

from __future__ import annotations

import argparse
import os
import warnings

import datasets
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import slothc
from slothc.tiny import add_lora, tiny_model

SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "we read a book at night",
    "she plays the old piano", "he likes green apples", "the river runs to the sea", "birds sing in the morning",
    "my friend bakes bread", "the train is late again", "they walk to school", "rain falls on the roof",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (default 4)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard each decoder layer and the root) instead of DDP")
    p.add_argument("--inner", choices=["inductor", "aot_eager", "eager"],
                   help="slothc's inner compiler (default: inductor on GPUs, aot_eager on a CPU, where Inductor's C++ compiles are slow)")
    p.add_argument("--output-dir", default="/tmp/slothc-sft-distributed")
    return p.parse_args(argv)


def make_tokenizer():
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = make_tokenizer()
    dataset = datasets.Dataset.from_dict({"text": SENTENCES * 4})

    torch.manual_seed(0)
    model = tiny_model("llama", layers=2, hidden=64, vocab=len(tokenizer), seed=0, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    model = add_lora(model, r=8, alpha=16)
    report = slothc.Report()
    model.compile(backend="slothc", options={"inner": args.inner or ("inductor" if cuda else "aot_eager"), "report": report})

    fsdp = {}
    if args.fsdp and not cuda:
        raise SystemExit("--fsdp needs GPUs: on a CPU accelerate 1.15 ignores the Trainer's fsdp arguments and trains with DDP "
                         "(FSDP is enabled only for accelerator devices); run without --fsdp, or see tests/e2e/test_distributed.py "
                         "for FSDP2 with slothc on a CPU without the Trainer")
    if args.fsdp:
        fsdp = dict(fsdp="full_shard auto_wrap",
                    fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "reshard_after_forward": True})
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not cuda, ddp_backend=None if cuda else "gloo",
        max_length=16, seed=0, **fsdp,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    if rank == 0:
        print(report)
        losses = [round(log["loss"], 4) for log in trainer.state.log_history if "loss" in log]
        world = int(os.environ.get("WORLD_SIZE", "1"))
        print(f"{'FSDP2' if args.fsdp else 'DDP'} on {world} process{'es' if world != 1 else ''}: losses {losses}")


if __name__ == "__main__":
    main()
