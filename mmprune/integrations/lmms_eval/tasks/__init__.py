"""No tasks of its own: lmms-eval's plugin loader adds this folder to ``--include_path``."""
