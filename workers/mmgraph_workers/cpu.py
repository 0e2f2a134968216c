"""CPU-only tuning, in one place: what mmgraph sets for vLLM, NIXL and torch when a stage has no GPU (the demo,
the tests, CPU nodes). Nothing here applies where torch sees CUDA. Why each setting exists, with measurements:
docs/architecture.md, "CPU-only shims and settings". Also CPU-specific but kept beside what they tune:
scripts/cpu_shims.py (torchvision's CUDA build, NIXL's progress-thread pause) and the transfer reader's spin
before it yields the GIL (transfer.py, `NixlTransfer.SPIN_SECONDS`).
"""

from __future__ import annotations

import os

import torch

# A user's own executor or parallelism settings win over ours.
PARALLEL_ARGS = ("--distributed-executor-backend", "--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp")


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def uses_uni_executor(user_args: list[str]) -> bool:
    """pd and decode run the model in vLLM's engine-core process (the `uni` executor) on CPU: with the worker
    process, vLLM's shared-memory queue between them lost a step's reply for 10-60 s under load on 2 cores."""
    return on_cpu() and not any(arg.startswith(PARALLEL_ARGS) for arg in user_args)


def engine_executor_args(user_args: list[str]) -> list[str]:
    """vLLM engine arguments for the executor (pure: the environment it needs is `apply_engine_env`'s)."""
    return ["--distributed-executor-backend", "uni"] if uses_uni_executor(user_args) else []


def apply_engine_env(user_args: list[str]) -> None:
    """Set, before vLLM starts, what a CPU engine needs in its environment: vLLM's CPU platform turns `uni` back
    into `mp` unless VLLM_ENABLE_V1_MULTIPROCESSING=0 (AsyncLLM still runs the engine core in its own process),
    and its OpenMP threads are not pinned (cores are shared with the graph's other stages) unless said."""
    if not on_cpu():
        return
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if uses_uni_executor(user_args):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def omp_threads(engines: int, gpus: int) -> dict[str, str]:
    """OpenMP threads for one of a graph's `engines` CPU engines on this machine: the cores but one, split between
    them. The core left is for the graph's Python processes (the frontend, each engine's API server, the
    encoder): an OpenMP team on every core spins at each barrier while they wait for a core (agg on 2 cores: two
    threads gave 0.49-0.64x the requests/s of vLLM's server with one; two engines with a thread per core each:
    decode's inter-token latency ~40 ms instead of ~8 ms). The user's OMP_NUM_THREADS wins."""
    if gpus or engines == 0 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, ((os.cpu_count() or 1) - 1) // engines))}
