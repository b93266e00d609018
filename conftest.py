"""Collection rules shared by the test suite and the doctests under ``mmprune/``."""

import importlib.util

# The lmms-eval plugin's model module imports lmms-eval, an optional extra: without it there is nothing to
# collect there (tests/test_lmms_eval_plugin.py says so with a skip reason).
collect_ignore_glob = []
if importlib.util.find_spec("lmms_eval") is None:
    collect_ignore_glob.append("mmprune/integrations/lmms_eval/models/mmprune.py")
