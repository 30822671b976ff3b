import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # test_gpu reuses test_model's and test_train's helpers (importlib mode adds no test dirs)
