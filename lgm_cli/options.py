"""What every command shares: the consoles, the common options (--device, --batch-size, --subset,
--format, --progress, --json), their checks, the progress bar, one-line errors, JSON output, and
loading checkpoints and test images.

Every command that runs a model takes the same --device, --batch-size, --subset, --data-dir, --progress;
every command that writes figures takes --out (a folder) and --format; every command with numbers a
script would want takes --json FILE.  Nothing here imports torch at module level.
"""
from __future__ import annotations

import enum
import json
import math
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

DEVICE_HELP = "auto | cpu | cuda | cuda:N (default auto: cuda when available, else cpu)"
SUBSET_HELP = ("use N test images: the seeded selection `lgm train --test-subset N` evaluates on "
               "(default: the whole test set)")
BATCH_HELP = "images per forward/backward pass"
PROGRESS_HELP = ("show progress: a bar on a terminal, a plain line every 30 s in a log "
                 "(LGM_PROGRESS_INTERVAL=seconds); --no-progress: none")
FORMAT_HELP = "figure format: png | pdf | svg (vector, for papers)"
JSON_HELP = "also write the numbers as JSON to this file (with the dataset and checkpoints)"


def choices(name: str, values) -> type[enum.Enum]:
    """A str Enum of ``values``, so --help and shell completion list the choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def device_opt():
    return typer.Option(None, "--device", help=DEVICE_HELP)


def batch_opt():
    return typer.Option(256, "--batch-size", help=BATCH_HELP)


def subset_opt():
    return typer.Option(None, "--subset", help=SUBSET_HELP)


def format_opt():
    return typer.Option("png", "--format", help=FORMAT_HELP)


def progress_opt():
    return typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP)


def json_opt():
    return typer.Option(None, "--json", help=JSON_HELP)


def progress_bar(enabled: bool):
    """Progress on stderr, off with --no-progress: a rich bar (count, elapsed, remaining) on a terminal, a plain
    line every 30 s (LGM_PROGRESS_INTERVAL) when stderr is not a terminal (lgm_lab.progress)."""
    from lgm_lab.progress import progress

    return progress(enabled, err_console)


# Folders this command created (out_folder), removed again if it fails while they are still empty: a refused
# command leaves nothing behind.
_CREATED: list[Path] = []


def fail(err: Exception) -> None:
    """One line on stderr, exit status 2, no traceback.  Folders the command created and left empty are
    removed.  The message is printed as it is: no markup, no emoji codes (``128:-1`` stays ``128:-1``)."""
    if isinstance(err, OSError) and err.strerror:
        msg = f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    else:
        msg = " ".join(str(err).split()) or type(err).__name__
    from rich.markup import escape

    from lgm_lab.run_folder import remove_if_empty

    remove_if_empty(_CREATED)
    err_console.print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True, highlight=False, emoji=False)
    raise typer.Exit(2)


def round_floats(obj, digits: int = 4):
    """Floats rounded to ``digits`` decimals (percentages and scores do not need 17 digits)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def check_positive(value: Optional[int], name: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def check_eps(values: list[float], what: str = "--eps") -> list[float]:
    for e in values:
        if not (math.isfinite(e) and 0.0 <= e <= 1.0):
            raise ValueError(f"{what} must be finite and in [0, 1] (images are in [0, 1]), got {e}")
    return values


def parse_eps(text: str) -> list[float]:
    try:
        values = [float(e) for e in text.split(",")]
    except ValueError:
        raise ValueError(f"--eps must be comma-separated numbers, e.g. 0,0.1,0.3; got {text!r}") from None
    return check_eps(values)


def check_writable_folder(folder: Path, what: str) -> None:
    """Refuse a folder a command cannot write into (read-only, a full disk), before any work: a probe file
    is created there and removed (permission bits alone say nothing for root or a read-only mount)."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lgm-probe.", suffix=".lgm-tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what}: cannot write into {folder}: {err.strerror or err}") from err


def check_not_input(target: Optional[Path], inputs, what: str) -> None:
    """Refuse an output ``target`` that is one of the command's own ``inputs`` (by device and inode: another
    spelling of the path or a link is the same file): no command writes over what it reads."""
    from lgm_lab.run_folder import same_file

    if target is None:
        return
    for src in inputs:
        if src is not None and same_file(target, src):
            raise ValueError(f"{what} {target} is this command's own input {src}; it is never written over: give "
                             "another file name")


def check_output_file(path: Optional[Path], what: str) -> None:
    """Refuse at once an output path that is there but is not a regular file: a named pipe (FIFO), a device or a
    socket would block the command (reading or writing it waits for a peer) or send the output elsewhere.  A
    symbolic link is judged by what it points to (it is replaced, not followed, when written); a new name is
    fine."""
    import stat

    if path is None:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:  # a new name, or a dangling link (replaced)
        return
    except OSError as err:
        raise ValueError(f"{what} {path}: {err.strerror or err}") from err
    if stat.S_ISREG(st.st_mode):
        return
    kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
            or stat.S_ISBLK(st.st_mode) else "not a regular file")
    raise ValueError(f"{what} {path} is {kind}; outputs are regular files (or new names): give another name")


def run_folder_of(path: Path) -> Optional[Path]:
    """The run folder ``path`` lies in (its folder holds a run: a checkpoint.pt, or a run's config.json), else
    None."""
    from lgm_lab.checkpoints import CheckpointError, run_config_file

    folder = Path(path).parent
    if (folder / "checkpoint.pt").is_file():
        return folder
    try:
        if (folder / "config.json").is_file():
            run_config_file(folder / "config.json")
            return folder
    except (CheckpointError, OSError):
        pass
    return None


def _is_command_json(path: Path) -> bool:
    """A file some command wrote with --json (its envelope: "command" and "results")."""
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("command"), str) and "results" in obj


def check_not_run_file(path: Optional[Path], what: str, replaceable=_is_command_json) -> None:
    """Refuse an output that is a file of a run folder: the run's own files (checkpoint.pt, metrics.json,
    metrics.csv, config.json, there or not yet) and any file already in it (the measurements cached beside a
    checkpoint, a user's notes) but one ``replaceable`` says this kind of output wrote (by default a command's
    --json file)."""
    from lgm_lab.train import RUN_FILES

    if path is None:
        return
    folder = run_folder_of(path)
    if folder is None:
        return
    if path.name in RUN_FILES or (path.exists() or path.is_symlink()) and not replaceable(path):
        raise ValueError(f"{what} {path} is a file of the run folder {folder} (a run's files and the "
                         "measurements cached beside it are never written over): give another name")


def check_json_target(path: Optional[Path], inputs=()) -> None:
    """Refuse a --json target that cannot be written, or must not be, before any work is done: a folder, a
    missing or unwritable folder, one of the command's ``inputs``, anything there but a regular file (a FIFO
    would block), a file of a run folder (:func:`check_not_run_file`), or an existing file that is not JSON (a
    checkpoint, a detector file, a user's file: --json replaces only a JSON file)."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"--json {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"--json {path}: the folder {path.parent} does not exist")
    check_not_input(path, inputs, "--json")
    check_output_file(path, "--json")
    check_not_run_file(path, "--json")
    if path.exists():
        try:
            json.loads(path.read_bytes() or b"null")
        except (ValueError, OSError):
            raise ValueError(f"--json {path} exists and is not a JSON file; --json replaces only a JSON file (a "
                             "checkpoint or any other file is never written over): give another name") from None
    check_writable_folder(path.parent, "--json")


def write_json(path: Optional[Path], obj) -> None:
    """Write ``obj`` as JSON to ``path`` (None: nothing), atomically: a symbolic link there is replaced,
    never followed out of its folder."""
    if path is not None:
        from lgm_lab.run_folder import write_atomically

        try:
            write_atomically(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))
        except OSError as err:
            fail(err)


def check_fpr_option(fpr: float) -> None:
    """``--fpr``: a false-rejection rate in (0, 1), else ValueError naming the option."""
    import math

    if not (math.isfinite(fpr) and 0.0 < fpr < 1.0):
        raise ValueError(f"--fpr must lie in (0, 1), got {fpr}")


def check_common(device: Optional[str], batch_size: int, subset: Optional[int], json_out: Optional[Path] = None,
                 fmt: Optional[str] = None, inputs=()) -> str:
    """Check the shared options before any work (``inputs``: the files the command reads, which --json
    must not name); returns the resolved device."""
    from lgm_lab.devices import resolve_device

    check_positive(batch_size, "--batch-size")
    check_positive(subset, "--subset")
    check_json_target(json_out, inputs)
    if fmt is not None:
        from lgm_lab.figures import FORMATS

        if fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return resolve_device(device)


def out_folder(out: Path) -> Path:
    """Create the --out folder (refusing a file there, or a folder it cannot write into); a folder created
    here is removed again if the command then fails while it is empty (:func:`fail`)."""
    from lgm_lab.run_folder import make_folder

    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; --out is always a folder")
        _CREATED.extend(make_folder(out))
    except OSError as err:
        raise ValueError(f"cannot create the output folder {out}: {err.strerror or err}") from err
    check_writable_folder(out, "--out")
    return out


def check_out_folder(out: Path, own: dict, overwrite: bool, command: str) -> None:
    """The rule of `lgm train --out` for a command that writes a few files into a folder: a folder that holds
    anything (but the lock and this project's temporaries) is refused unless ``overwrite``, which replaces only
    the command's own files -- ``own`` maps each of their names to a check that the file there is the command's
    (None: by its name) -- and touches nothing else.  A file of those names that the command did not write, or
    that is not a regular file, is refused even then.  Call it before :func:`out_folder`."""
    from lgm_lab.run_folder import LOCK_NAME, is_own_temporary

    if not out.is_dir():
        return
    there = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not is_own_temporary(p))
    if there and not overwrite:
        shown = ", ".join(there[:5]) + (f" and {len(there) - 5} more" if len(there) > 5 else "")
        raise ValueError(f"--out {out} holds files ({shown}); give a new or empty folder, or --overwrite to replace "
                         f"{command}'s own {', '.join(own)} there (nothing else is touched)")
    for name, is_own in own.items():
        path = out / name
        check_output_file(path, "--out")
        if path.exists() and is_own is not None and not is_own(path):
            raise ValueError(f"--out {out}: {path} is not a file {command} wrote; it is never written over, even with "
                             "--overwrite: give another folder")


def is_command_output(path: Path, command: str) -> bool:
    """Whether ``path`` is the JSON that ``command`` (e.g. ``"ood"``) writes (:func:`envelope`)."""
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and obj.get("command") == command and "results" in obj


def check_seed(value: int, option: str = "--seed") -> int:
    """Seeds are integers in [0, 2**32 - 1] everywhere (what torch, numpy and Python's random all take)."""
    from lgm_lab.config import MAX_SEED

    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{option} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return value


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """Comma-separated seeds, e.g. ``0,1,2``; an empty list, a non-integer, a repeated seed or one out of
    [0, 2**32 - 1] is refused (one rule for every command)."""
    try:
        seeds = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    for v in seeds:
        check_seed(v, option)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{option} names a seed twice: {text!r}")
    return seeds


def envelope(command: str, results, *, dataset: str, checkpoints, device: str, n: int, **extra) -> dict:
    """The JSON every command writes: what ran on what, then the results."""
    return round_floats({"command": command, "dataset": dataset, "checkpoints": [str(c) for c in checkpoints],
                         "test_images": n, "device": device, **extra, "results": results})


def check_same_data(configs: dict) -> None:
    """Checkpoints measured together must have been trained on one dataset (they are evaluated on the
    first one's test images): ``configs`` maps a checkpoint path to its TrainConfig."""
    first_path, first = next(iter(configs.items()))
    for path, cfg in configs.items():
        if cfg.dataset != first.dataset:
            raise ValueError(f"the checkpoints were trained on different datasets: {first_path} on {first.dataset}, "
                             f"{path} on {cfg.dataset}; measure them separately")


def load_runs(checkpoints: list[Path], device: str = "cpu") -> dict:
    """Trained models by name (the head's label; the run folder's name added when two share one):
    name -> (model, head, config).  Checkpoints of different datasets are refused (:func:`check_same_data`)."""
    from lgm_lab.checkpoints import load_trained

    loaded = {ck: load_trained(ck, device) for ck in checkpoints}
    check_same_data({ck: t.config for ck, t in loaded.items()})
    runs = {}
    for ck, (model, head, cfg, _) in loaded.items():
        name = head.label
        runs[f"{name} ({ck.parent.name})" if name in {n.split(" ")[0] for n in runs} else name] = (model, head, cfg)
    return runs


def eval_tensors(cfg, subset: Optional[int], data_dir: Optional[Path], device: str = "cpu"):
    """The test images every command evaluates on: ``--subset`` picks the same seeded selection as
    ``lgm train --test-subset`` (the run's seed), of the run's classes only (``--classes``)."""
    from lgm_lab.data import load_dataset
    from lgm_lab.ood_data import restrict_classes
    from lgm_lab.tensors import stack_dataset

    ds = load_dataset(cfg.dataset, False, data_dir=data_dir or cfg.data_dir, subset=subset, seed=cfg.seed)
    ds = restrict_classes(ds, cfg.class_list)
    x, y = stack_dataset(ds)
    return x.to(device), y.to(device)
