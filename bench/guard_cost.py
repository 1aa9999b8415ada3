"""What Dynamo's guard check costs a PEFT model before each compiled step, and which guards it is.

The profiles of workloads (a) and (b) (bench/NOTES.md, 2026-12-03) show the GPU idle 4.7 ms and
12.0 ms a step while the host is in ``TorchDynamo Cache Lookup``: the guards of the compiled
frame, evaluated after the step's loss is read. This measures that lookup on a Llama of
``--layers`` layers with LoRA on its seven linears (tiny widths: the guards depend on the module
tree, not on the sizes), compiled with the ``eager`` backend (the lookup is the same for any
backend), and counts the guards by type:

    python3 bench/guard_cost.py                                  # every guard kept, and the counts
    python3 bench/guard_cost.py --drop TYPE_MATCH CONSTANT_MATCH # a guard_filter_fn dropping types
    python3 bench/guard_cost.py --unsafe                         # skip_guard_on_all_nn_modules_unsafe

Bench only (not a test): dropping guards is unsafe in general; this says where the time goes.
"""

from __future__ import annotations

import argparse
import collections

import peft
import torch
from torch.profiler import profile
from transformers import LlamaConfig, LlamaForCausalLM

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (default 16, workload (a)'s)")
    ap.add_argument("--drop", nargs="*", default=[], help="guard types that a guard_filter_fn drops")
    ap.add_argument("--unsafe", action="store_true", help="torch.compiler.skip_guard_on_all_nn_modules_unsafe")
    ap.add_argument("--calls", type=int, default=10, help="profiled calls after 3 warm-up calls")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules=LINEARS))
    counts: collections.Counter = collections.Counter()
    drop = set(args.drop)

    def keep(entries):
        counts.update(e.guard_type for e in entries)
        return [e.guard_type not in drop for e in entries]

    guard_filter = torch.compiler.skip_guard_on_all_nn_modules_unsafe if args.unsafe else keep
    compiled = torch.compile(model, backend="eager", options={"guard_filter_fn": guard_filter})
    ids = torch.randint(0, config.vocab_size, (1, 16))
    for _ in range(3):
        compiled(input_ids=ids)
    with profile() as prof:
        for _ in range(args.calls):
            compiled(input_ids=ids)
    lookups = [e.cpu_time_total for e in prof.events() if "Cache Lookup" in e.name]
    label = "unsafe nn-module filter" if args.unsafe else (f"dropping {sorted(drop)}" if drop else "every guard")
    print(f"{args.layers} layers, LoRA on {len(LINEARS)} linears, {label}: Dynamo cache lookup "
          f"{sum(lookups) / max(len(lookups), 1) / 1000:.2f} ms a call ({len(lookups)} calls)")
    if counts:
        print(f"{sum(counts.values())} guards:", ", ".join(f"{t} {n}" for t, n in counts.most_common()))


if __name__ == "__main__":
    main()
