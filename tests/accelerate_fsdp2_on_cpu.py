"""Run ``examples/accelerate_fsdp2.py`` (arguments passed through) with accelerate's FSDP plugin kept on
CPU processes, under ``accelerate launch --config_file examples/accelerate_fsdp2.yaml`` with
``ACCELERATE_USE_CPU=true``.

accelerate 1.16 turns the plugin on only for accelerator launches; this keeps it on for gloo CPU
processes, which is all that differs from a GPU launch: the Trainer then prepares the model with
accelerate's FSDP2 code path (``fully_shard`` per decoder layer and on the root).
"""

import runpy
import sys
from pathlib import Path

import accelerate.state
from accelerate.utils import DistributedType

accelerator_state_init = accelerate.state.AcceleratorState.__init__


def init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs) -> None:  # noqa: ANN001
    accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = init_keeping_fsdp
example = Path(__file__).resolve().parents[1] / "examples" / "accelerate_fsdp2.py"
sys.argv = [str(example), *sys.argv[1:]]
runpy.run_path(str(example), run_name="__main__")
