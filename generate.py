"""Release-compatible entry point: `torchrun --standalone --nproc_per_node=1 generate.py --seeds=0-19999 --network=… …`."""
from vcdm.cli.generate import command
from vcdm.cli.main import run_click

run_click(command, "generate.py")
