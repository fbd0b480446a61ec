from ray_inference.cli.main import cli

cli(prog_name="rayinfer")
