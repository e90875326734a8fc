"""The compression methods DiViCo is compared with, each a mode (pipeline/model/modes.py) in a file
of its own, registered in pipeline/model/settings.py's MODES."""
