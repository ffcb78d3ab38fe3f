"""Test configuration: tests import the helpers in this folder (tiny_models) directly."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# Never reach a model hub from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
