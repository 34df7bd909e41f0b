"""Run at the start of every Python process whose PYTHONPATH holds this folder (the fp8-matmul
tests' servers): once `flux_lora.device.quant` has loaded, the hardware checks that keep go_fast's
fp8 matmuls off the CPU are lifted (tests/device/fp8_matmuls.py). Importing nothing heavy here
keeps processes that never load it as they were."""

import importlib.abc
import importlib.util
import sys

QUANT = "flux_lora.device.quant"


class _LiftAfterLoading(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != QUANT:
            return None
        sys.meta_path.remove(self)  # from here on the module is found as always
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            from tests.device.fp8_matmuls import lift_hardware_checks

            lift_hardware_checks()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _LiftAfterLoading())
