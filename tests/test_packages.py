"""engine's subpackages: the torch-free modules (what the app's pages and the CLI's light commands
read) import in a process where torch cannot be imported."""

import pkgutil
import subprocess
import sys

import engine
import engine.data
from engine.data.paths import REPO_ROOT

# Every module of engine.data, each subpackage's __init__, and these: the app imports them in pages
# that must render without loading torch.
TORCH_FREE_MODULES = (
    "engine", "engine.errors", "engine.stats", "engine.config_checks", "engine.config_keys",
    "engine.runtime.chat", "engine.judging.refusal_phrases", "engine.judging.coherence",
    "engine.circuits.similarity", "engine.saes.corpus", "engine.steering.limits",
    "app.classroom", "app.top_texts", "app.judges",
)


def _torch_free_modules() -> list[str]:
    subpackages = [m.name for m in pkgutil.iter_modules(engine.__path__, "engine.") if m.ispkg]
    data_modules = [m.name for m in pkgutil.iter_modules(engine.data.__path__, "engine.data.")]
    return sorted({*TORCH_FREE_MODULES, *subpackages, *data_modules})


def _failures_without_torch(modules: list[str]) -> str:
    # A None entry in sys.modules makes any `import torch` raise ImportError.
    check = ("import importlib, sys\nsys.modules['torch'] = None\nfailed = []\n"
             f"for name in {modules!r}:\n"
             "    try:\n        importlib.import_module(name)\n"
             "    except ImportError as error:\n        failed.append(f'{name}: {error}')\n"
             "print('\\n'.join(failed))")
    result = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return result.stdout.strip()


def test_engine_is_grouped_into_subpackages() -> None:
    subpackages = {m.name for m in pkgutil.iter_modules(engine.__path__) if m.ispkg}
    assert subpackages == {"runtime", "data", "judging", "directions", "saes", "circuits", "steering"}


def test_torch_free_modules_import_with_torch_blocked() -> None:
    modules = _torch_free_modules()
    assert "engine.data.store" in modules and "engine.data.schema" in modules
    assert _failures_without_torch(modules) == ""


def test_the_check_sees_a_module_that_needs_torch() -> None:
    assert _failures_without_torch(["engine.runtime.models"]).startswith("engine.runtime.models:")
