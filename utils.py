"""Small jobs every script shares: stopping on bad input, writing files atomically, hashing files,
setting up worker processes, and reading what the CPU is.

    >>> from utils import atomic_write, fail
    >>> with atomic_write('models/train_log.csv', 'w', newline='') as f:
    ...     f.write('split,epoch\\n')
    >>> fail('train.py', '--num_layers must be at least 1, got 0')   # one line on stderr, exit code 2

Temporary files are named ``.NAME.PID.tmp`` beside NAME: hidden, in the same folder (so the
rename is atomic), and tied to the process that writes them, so `remove_stale_temporaries`
can tell a killed writer's leftovers from a live writer's file.
"""
import argparse
import contextlib
import ctypes
import hashlib
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TEMPORARY = re.compile(r'^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$')


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that prints each flag's default, except where there is none to
    print (None, False): those flags' help says in words what happens when they are not given."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def fail(prog, message):
    """Bad input: one line on stderr naming the problem and the fix, exit code 2, no traceback."""
    print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def temporary_name(path, pid=None):
    """'models/latest.pt' -> 'models/.latest.pt.1234.tmp' (1234: this process's pid)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f'.{name}.{os.getpid() if pid is None else pid}.tmp')


@contextlib.contextmanager
def atomic_write(path, mode='wb', fsync=True, **open_kwargs):
    """Open a temporary file beside `path`; when the block ends without an error, rename it
    to `path` in one step, so readers see the old file or the new one, never half of one.

    On any error (a full disk, Ctrl-C) the temporary file is removed and `path` is untouched.
    fsync=True makes the contents durable before the rename (a power cut then cannot leave an
    empty file under the final name); small files that are rewritten often may skip it.
    The file gets the mode of any file the user creates (the umask's), whatever wrote it.
    """
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def why_not_writable(folder):
    """None if files can be written into `folder`, else why not (e.g. 'Read-only file system').
    A folder that does not exist yet is judged by its nearest existing parent. It writes and
    removes a probe file: root ignores permission bits, but not a read-only disk."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f'{folder} is not a folder'
    probe = temporary_name(os.path.join(folder, 'probe'))
    try:
        with open(probe, 'wb'):
            pass
        os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def remove_stale_temporaries(folder):
    """Remove the ``.NAME.PID.tmp`` files in `folder` whose writing process is gone (killed
    mid-write); returns their names. A live process's temporary file is left alone."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            match = TEMPORARY.match(name)
            if match and not pid_alive(int(match['pid'])):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed.append(name)
    return removed


def pid_alive(pid):
    """Is process `pid` running (on this machine)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def file_sha256(path):
    """The sha256 hex digest of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def cpu_info(key):
    """The value of `key` ('model name', 'vendor_id', 'flags', ...) for the first CPU in
    /proc/cpuinfo; '' where there is none (other systems)."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.split(':', 1)[0].strip() == key), '')
    except OSError:
        return ''


def leave_signals_to_parent(parent):
    """Set up a worker process (a DataLoader's, a Pool's): stopping is its main process's job.

    Ctrl-C in a terminal reaches every process of the run, and so does a cluster's SIGTERM. A
    worker that died of one would end the run with an error before the main process could stop
    cleanly, so a worker ignores SIGINT, and obeys a SIGTERM only from `parent`, its main process:
    that is how multiprocessing ends its workers when the main process exits, and then it waits for
    them. And a worker dies with `parent`, whatever killed that (SIGKILL included): on Linux the
    kernel is asked to kill it then (prctl PR_SET_PDEATHSIG).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not sys.platform.startswith('linux'):
        return  # no PDEATHSIG, no sigwaitinfo: SIGTERM keeps its default, which kills the worker
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    # SIGTERM stays blocked in every thread, so it waits for this one thread, which can ask who sent it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    inherited = multiprocessing.current_process()._config.get('tempdir')  # the main process's to remove

    def obey_parent():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        # the one clean-up of a normal exit that matters here: the /tmp/pymp-* folder the worker
        # made when it first sent a tensor's shared memory to the main process (all of exit's
        # clean-up could wait forever, on a queue the main process no longer reads)
        tempdir = multiprocessing.current_process()._config.get('tempdir')
        if tempdir and tempdir != inherited:
            shutil.rmtree(tempdir, ignore_errors=True)
        os._exit(0)
    threading.Thread(target=obey_parent, name='obey_parent', daemon=True).start()
