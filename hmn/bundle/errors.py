"""What the bundles run first: an uncaught error of the project's own ends the output with one readable line,
and a command-line override that names no setting of the bundle is warned about.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any

__all__ = ["check_overrides", "error_summary", "install_error_summary"]

# arguments of `python -m monai.bundle run` that are not config overrides
_RUN_ARGS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
             "workflow_type", "properties_path"}


def _tracking_keys() -> set[str]:
    """The settings MONAI's ``--tracking`` adds to the config (``tracking_uri``, ``experiment_name``, ``run_name``,
    ...): overrides of them are read, though the bundle's own configs do not name them."""
    try:
        from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS
    except ImportError:
        return set()
    return {key for settings in DEFAULT_EXP_MGMT_SETTINGS.values() for key in settings.get("configs", {})}


def _raised_by_project(exc: BaseException) -> bool:
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    module = last.tb_frame.f_globals.get("__name__", "") if last is not None else ""
    return module.split(".")[0] == "hmn" or type(exc).__module__.split(".")[0] == "hmn"


def error_summary(exc: BaseException) -> str | None:
    """``"error: <message>"`` for the outermost exception of `exc`'s chain (``__cause__``, or ``__context__``
    unless suppressed) that the project's own code raised, or None when none did. MONAI wraps such an
    error in "Failed to instantiate component ..." and prints a long traceback; this is the sentence that
    says what to fix (the project's errors name the file or value and what is accepted)."""
    current, seen = exc, set()
    while current is not None and id(current) not in seen:
        if _raised_by_project(current):
            return f"error: {type(current).__name__}: {' '.join(str(current).split())}"
        seen.add(id(current))
        current = current.__cause__ if current.__cause__ is not None else (
            None if current.__suppress_context__ else current.__context__)
    return None


def install_error_summary() -> None:
    """Makes an uncaught error end the output with one readable line, :func:`error_summary`, after Python's
    usual traceback. The bundles call it first in their ``initialize``; installing it twice adds nothing."""
    previous = sys.excepthook
    if getattr(previous, "_hmn_error_summary", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        line = error_summary(value)
        if line:
            print(line, file=sys.stderr)

    hook._hmn_error_summary = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _config_ids(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every id of a parsed config (``a``, ``a#b``, ``a#0``, ...) with its raw value."""
    out: dict[str, Any] = {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        cid = f"{prefix}#{key}" if prefix else str(key)
        out[cid] = value
        out.update(_config_ids(value, cid))
    return out


def _command_line_overrides(argv: list[str]) -> tuple[dict[str, str], Any]:
    """``--key value`` / ``--key=value`` pairs of a ``monai.bundle run`` command line, and its config_file."""
    pairs: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            pairs[key.replace("::", "#")] = value
        i += 1
    config = pairs.pop("config_file", None)
    if isinstance(config, str) and config.strip().startswith("["):
        import ast

        config = ast.literal_eval(config)
    return pairs, config


def check_overrides(argv: list[str] | None = None) -> list[str]:
    """Warns about command-line overrides that name no key of the bundle's configs, with the closest key.

    ``python -m monai.bundle run ... --backbone convnext_tinyy`` adds a new top-level key that nothing
    reads: the run trains the default backbone without a word. The bundles call this first (their
    ``initialize``): each ``--key`` of the command line (MONAI's own ``run`` arguments aside) must be an id
    of the merged configs (``image_size``, ``network_def#backbone``, ...) or a new entry of an existing
    component (``--validate#best_saver#key_metric_n_saved 2``). Anything else is logged as a warning
    naming the key and the closest id (the id ending in the same name, else the nearest spelling).

    Args:
        argv: the command line; default ``sys.argv`` when the process runs ``monai.bundle`` (otherwise,
            e.g. ``monai.bundle.load`` from a Python program, nothing is checked).

    Returns:
        The warnings logged (empty when every override names a key).
    """
    import logging

    if argv is None:
        main = sys.argv[0] if sys.argv else ""
        if not (main.endswith("__main__.py") and os.path.basename(os.path.dirname(main)) == "bundle"):
            return []
        argv = sys.argv[1:]
    pairs, config = _command_line_overrides(list(argv))
    if not config:
        return []
    from monai.bundle import ConfigParser

    try:
        merged = ConfigParser.load_config_files(config)
    except Exception:  # noqa: BLE001 - MONAI reports an unreadable config itself
        return []
    ids = _config_ids(dict(merged))
    by_name: dict[str, list[str]] = {}
    for cid in ids:
        by_name.setdefault(cid.rsplit("#", 1)[-1], []).append(cid)
    warnings = []
    for key in pairs:
        if key in _RUN_ARGS or key in ids or ("tracking" in pairs and key in _tracking_keys()):
            continue
        parent = key.rsplit("#", 1)[0] if "#" in key else None
        if parent is not None and isinstance(ids.get(parent), dict) and "_target_" in ids[parent]:
            continue  # a new argument of an existing component: MONAI passes it on (and refuses a wrong one)
        name = key.rsplit("#", 1)[-1]
        close = by_name.get(name) or difflib.get_close_matches(key, list(ids), n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else ""
        warnings.append(f"--{key} is not a setting of this bundle ({', '.join(map(str, config if isinstance(config, list) else [config]))}): "
                        f"nothing reads it, so it changes nothing{hint}")
    log = logging.getLogger(__name__)
    for w in warnings:
        log.warning(w)
    return warnings
