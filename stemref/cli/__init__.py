"""The command-line tools (`python -m stemref.edit`, `.invert`, `.txt2img`, `.evaluate`, `.download`): one
module per command, and what they share, each in a module named for what it does:

- errors.py: `UserError`, exit codes, `run(body)` (one line on stderr and an exit code for every failure);
- output.py: output folders and files that never lose data (`output_folder`, `check_output_file`);
- checks.py: checks of shared settings before any slow work (prompts, steps, sizes);
- model.py: the model arguments (--weights, --device, --dtype) and loading the model;
- progress.py: progress lines for every slow stage.

The library (everything outside this package) never imports it.
"""
