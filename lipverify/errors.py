"""Typed exceptions. The CLI turns each into a one-line message and a non-zero exit."""


class LipverifyError(Exception):
    """Base class of every error lipverify raises on purpose."""


class InputError(LipverifyError, ValueError):
    """A bad argument, data file or parameter (the user's input, not a bug)."""


class ModelError(LipverifyError):
    """A model file that cannot be loaded or does not match what it should compute."""


class UnsupportedLayerError(ModelError):
    """A layer the normalised layer view cannot represent.

    `layer` names the layer; `backends` lists backends that can still run on the module itself.
    """

    def __init__(self, layer: str, backends: tuple[str, ...] = ("attack", "lirpa")) -> None:
        self.layer = layer
        self.backends = backends
        super().__init__(f"unsupported layer {layer}; backends that can still run: "
                         f"{', '.join(backends) or 'none'}")


class BackendUnavailable(LipverifyError):
    """A backend that cannot run here (missing dependency, failed load)."""


class SoundnessError(LipverifyError):
    """Two backends contradict each other (verified and falsified): a bug, never averaged away."""


class ResourceError(LipverifyError):
    """A computation would exceed a memory or time budget."""


class SolverError(LipverifyError):
    """A numerical solver failed on a problem (no bound was obtained; nothing is claimed)."""
