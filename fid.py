"""Release-compatible entry point: `python fid.py ref --data=… --dest=…`, `python fid.py calc --images=… --ref=… --num N`."""
from vcdm.cli.fid import command
from vcdm.cli.main import run_click

run_click(command, "fid.py")
