"""The CPU rehearsal's one change to what it runs: ``torch.compile`` with the ``aot_eager`` backend.

Inductor's C++ code generation takes minutes on a 2-core VM (the 3-block demo network: 8 minutes
for the step's graphs with one thread), longer than the whole rehearsal. ``aot_eager`` still
captures every graph with Dynamo and traces forward and backward with AOTAutograd, which is where a
graph break, an unsupported operation or a recompilation shows up, and runs them eagerly. Only on
``PYTHONPATH`` in ``gpu_check.sh --rehearse``, and only while ``GPU_CHECK_COMPILE_BACKEND`` is set:
the GPU run compiles with Inductor as users do.
"""

import os

_BACKEND = os.environ.get("GPU_CHECK_COMPILE_BACKEND")

if _BACKEND:
    import importlib.abc
    import importlib.machinery
    import sys

    def _patch(torch) -> None:  # noqa: ANN001
        original = torch.compile

        def compile(*args, **kwargs):  # noqa: A001, ANN002, ANN003, ANN202
            kwargs.setdefault("backend", _BACKEND)
            if kwargs["backend"] != "inductor":
                kwargs.pop("mode", None)  # modes are Inductor's options
            return original(*args, **kwargs)

        torch.compile = compile

    class _AfterTorch(importlib.abc.MetaPathFinder):
        """Patch ``torch.compile`` once torch has been imported, without importing it here."""

        def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
            if name != "torch":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None:
                return None
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_patch(module) -> None:  # noqa: ANN001
                exec_module(module)
                _patch(module)

            loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _AfterTorch())
