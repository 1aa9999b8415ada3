"""Scenarios run in several processes of one machine (torch.distributed over gloo, on the CPU), for
``tests/e2e/test_distributed.py``.

``launch(scenario, directory)`` starts ``python -m tests.e2e._ranks SCENARIO DIRECTORY`` once per
rank, rendezvous through a file in ``directory`` (no port to pick), waits for every rank within a time
limit (killing the ones still running at the limit) and returns what each rank saved. Each rank runs
single-threaded and without ``TRITON_INTERPRET``: slothc's ops run their torch reference code, as
in the other e2e tests.

The models and the global batch are built here, so the test builds its single-process reference
from the same functions.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time
import warnings

import torch

WORLD = 2
TIMEOUT_S = 120  # a bound for a hung collective; a scenario takes 10-30 s on two busy cores
ROOT = str(pathlib.Path(__file__).resolve().parents[2])
GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 128


def launch(scenario: str, directory, world: int = WORLD, timeout: float = TIMEOUT_S) -> list:
    """Run ``scenario`` on ``world`` ranks; the list of what each rank returned."""
    directory = pathlib.Path(directory)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(WORLD_SIZE=str(world), OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, (ROOT, env.get("PYTHONPATH")))),
               SLOTHC_RANKS_PARENT=str(os.getpid()))
    procs, logs = [], [directory / f"rank{rank}.log" for rank in range(world)]
    for rank in range(world):
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.e2e._ranks", scenario, str(directory)], cwd=ROOT,
                                          env=dict(env, RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [proc.returncode for proc in procs]
    if any(codes):
        tails = "\n".join(f"--- rank {r} (exit {c}):\n{logs[r].read_text()[-3000:]}" for r, c in enumerate(codes))
        raise AssertionError(f"scenario {scenario!r}: ranks exited with {codes} (killed at {timeout:.0f} s if negative)\n{tails}")
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


# -- what the ranks and the reference share --------------------------------------------------------


def ddp_model():
    """A tiny Llama whose 2.4 MB of adapters (r=64) fill more than two DDP buckets: DDPOptimizer's
    buckets are at least 1 MiB (its first one is, whatever ``bucket_cap_mb`` says), so a smaller
    model is never split."""
    from slothc.tiny import add_lora, tiny_model

    torch.manual_seed(0)  # the adapters' initialisation draws from the global generator
    return add_lora(tiny_model("llama", layers=4, hidden=128, vocab=VOCAB, seed=0), r=64, alpha=16, init_lora_weights=False)


def fsdp_model():
    """A tiny Llama with LoRA and a trainable lm_head (PEFT's ``modules_to_save``): the fused loss
    computes the lm_head's gradient, which FSDP2 then reduce-scatters."""
    from slothc.tiny import add_lora, tiny_model

    torch.manual_seed(0)
    return add_lora(tiny_model("llama", layers=2, hidden=64, vocab=VOCAB, seed=0), r=4, alpha=8, init_lora_weights=False,
                    modules_to_save=["lm_head"])


def global_batch() -> torch.Tensor:
    return torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def trainable_grads(model) -> dict:
    """name -> the full gradient of each trainable parameter (a DTensor's gathered)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


# -- scenarios (run on every rank) -----------------------------------------------------------------


def ddp(rank: int, world: int) -> dict:
    """One step of the slothc-compiled model in DDP with 1 MiB buckets, each rank on its half."""
    import slothc
    from torch.nn.parallel import DistributedDataParallel

    model = ddp_model()
    report = slothc.Report()
    compiled = torch.compile(DistributedDataParallel(model, bucket_cap_mb=1), backend="slothc",
                             options={"inner": "aot_eager", "report": report})
    ids = global_batch().chunk(world)[rank]
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    return dict(loss=loss.detach(), grads=trainable_grads(model), report=report)


def fsdp2(rank: int, world: int) -> dict:
    """``fully_shard`` on each decoder layer and the root, then slothc on the whole model; one step
    in each ``logits`` mode ("drop": the fused loss reads the lm_head weight itself)."""
    import slothc
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for logits in ("keep", "drop"):
        model = fsdp_model()
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        weight = model.base_model.model.lm_head.modules_to_save["default"].weight
        report = slothc.Report()
        compiled = torch.compile(model, backend="slothc", options={"inner": "aot_eager", "report": report, "logits": logits})
        ids = global_batch().chunk(world)[rank]
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        out[logits] = dict(loss=loss.detach(), grads=trainable_grads(model), report=report,
                           lm_head=(type(weight).__name__, tuple(weight.to_local().shape)))
        torch._dynamo.reset()
    return out


def dtensor_loss(rank: int, world: int) -> dict:
    """The lm_head + cross-entropy of a weight that stays a DTensor in the graph (sharded by rows, as
    FSDP2 keeps it outside its module's forward), compiled: the loss must not be fused."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import slothc

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    hidden, weight, labels = torch.randn(12, 16, generator=g), torch.randn(32, 16, generator=g), torch.randint(0, 32, (12,), generator=g)

    def loss_fn(h, w, y):
        return F.cross_entropy(F.linear(h, w).float().view(-1, 32), y)

    def step(fn):
        w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
        h = distribute_tensor(hidden.clone(), mesh, [Replicate()]).requires_grad_()
        loss = fn(h, w, distribute_tensor(labels, mesh, [Replicate()]))
        loss.backward()
        return loss.full_tensor().detach(), w.grad.full_tensor(), h.grad.full_tensor()

    report = slothc.Report()
    fused = step(torch.compile(loss_fn, backend="slothc", options={"inner": "aot_eager", "report": report}))
    return dict(eager=step(loss_fn), fused=fused, report=report, inputs=(hidden, weight, labels))


SCENARIOS = {"ddp": ddp, "fsdp2": fsdp2, "dtensor_loss": dtensor_loss}


def _exit_with_parent(limit_s: float) -> None:
    """A rank ends when the test that started it is gone (a killed pytest takes its time limit with it)
    or at the limit: never an orphan that holds the CPUs."""
    # The launcher's pid from the environment: by the time torch is imported it may be gone already.
    parent, deadline = int(os.environ.get("SLOTHC_RANKS_PARENT", os.getppid())), time.monotonic() + limit_s

    def watch():
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(scenario: str, directory: str) -> None:
    import torch.distributed as dist

    _exit_with_parent(TIMEOUT_S + 30)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        result = SCENARIOS[scenario](rank, world)
    finally:
        dist.destroy_process_group()
    torch.save(result, pathlib.Path(directory) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
