from vcdm.cli.main import run_click
from vcdm.cli.dataset import command
run_click(command, "dataset_tool.py")
