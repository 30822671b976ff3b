"""vtn.temporal: the VTN temporal encoder + head (`VTNConfig`, `VTN`) and stage-two jobs.

The model is imported lazily so that `vtn --help` (which imports this package's cli) does not load torch.
"""

_MODEL_NAMES = ("VTN", "VTNConfig", "PRESETS", "preset", "frame_positions")


def __getattr__(name):
    if name in _MODEL_NAMES:
        from vtn.temporal import model

        return getattr(model, name)
    raise AttributeError(f"module 'vtn.temporal' has no attribute '{name}'")


__all__ = list(_MODEL_NAMES)
