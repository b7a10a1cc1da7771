"""One error hierarchy: the CLI maps these to exit codes (2 bad input, 3 quality gate, 1 runtime)."""

from __future__ import annotations


class CompressorError(Exception):
    """Base of every error this package raises on purpose; `exit_code` is what the CLI returns."""

    exit_code: int = 1


class UsageError(CompressorError):
    """Bad command-line input that is not part of a recipe (paths, option values)."""

    exit_code = 2


class RecipeError(CompressorError):
    """A recipe that cannot run: unknown method or key, wrong type, impossible combination."""

    exit_code = 2


class UnsupportedModelError(CompressorError):
    """A model this package cannot load or has no adapter for."""

    exit_code = 2


class ModelLoadError(CompressorError):
    """A model path that exists but whose files are missing or corrupt."""

    exit_code = 2


class CalibrationError(CompressorError):
    """Calibration or evaluation data that is missing, empty, or does not fit the model."""

    exit_code = 2


class ExportError(CompressorError):
    """Writing the output failed, or the output directory is not writable as asked."""

    exit_code = 1


class OutputExistsError(ExportError):
    """The output directory exists and `--overwrite` was not given."""

    exit_code = 2


class NumericalError(CompressorError):
    """NaN/inf in a layer's inputs or a solver that could not recover."""

    exit_code = 1


class QualityGateError(CompressorError):
    """A quality gate failed; the output was still written."""

    exit_code = 3
