from vcdm.cli.main import run_click
from vcdm.cli.train import command
run_click(command, "train.py")
