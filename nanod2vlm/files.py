"""Files in and out, and bad inputs: the one error class a script ends in one line, the check that an output can be
written before the long work, JSON read with a clear error, and every file written so that no reader sees half."""
import json
import os
import sys
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file


class InputError(ValueError):
    """A bad input (a file, an option): the message names it and the fix."""


def cli(main):
    """A script's main(argv) that ends a bad input (InputError: bad videos, annotations, options, checkpoints) or a
    file that cannot be read or written (OSError: a read-only folder, a full disk) in one line `error: ...` and exit
    status 1 (argparse's usage errors: 2), instead of a traceback."""
    def run(argv=None):
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except InputError as e:
            sys.exit(f"error: {e}")
        except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
            sys.exit(f"error: {e} (what was written before is intact)")  # e.g. a read-only folder, a full disk
    return run


def writable(path, option):
    """Fail now, before the long work, if `path` (a file or folder to write, maybe not there yet) cannot be written:
    its nearest existing folder must take a new file."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise InputError(f"{option} {path}: cannot write in {folder} ({e.strerror}); choose another folder") from None


def read_json(path, what="annotation file"):
    """The value a JSON file holds, or an InputError that names the file (`what` it should be) and says why it holds
    none."""
    if not os.path.isfile(path):
        article = "an" if what[0] in "aeiou" else "a"
        why = f"a folder, not {article} {what}" if os.path.isdir(path) else f"{what} not found"
        raise InputError(f"{path}: {why}")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:  # before ValueError, which it is
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None


def write_atomic(path, data):
    """Bytes, text or a dict of tensors (as safetensors) to path: written under a temporary name, then renamed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
    try:
        if isinstance(data, dict):
            save_file({k: v.detach().contiguous().cpu() for k, v in data.items()}, tmp, metadata={"format": "pt"})
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
    except Exception as e:  # a full disk, a file-size limit: say which file (safetensors raises its own error type)
        raise OSError(f"{path}: cannot write ({e})") from None
    os.replace(tmp, path)
