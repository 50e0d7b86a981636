"""The floor: a minimal os.fork pre-fork master.  Usage: floor.py FILE.py:FUNC N

N children run FUNC(ctx) in a loop; SIGCHLD -> respawn; SIGTERM -> children finish
the current task (ctx.sleep returns False at once) and exit, then the master exits.

BENCH_FLOOR_HOLD=mod1,mod2,...: the master imports those modules first and prepares its
memory as tprocess's master does before it forks (the bench's `floor+imports`: how much of
tprocess's distance to the floor is the code it holds rather than what it does)."""
import importlib
import importlib.util
import os
import select
import signal
import sys
import time


class Ctx:
    def __init__(self):
        self.stopping, (self.r, w) = False, os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))

    def sleep(self, s):
        end = time.monotonic() + s
        while not self.stopping and (left := end - time.monotonic()) > 0:
            select.select([self.r], [], [], left)
        return not self.stopping


def hold(names):
    """Import `names`, then collect, trim the C heap and freeze, as tprocess's master before it forks."""
    import ctypes
    import gc

    for name in names:
        importlib.import_module(name)
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    gc.freeze()


def main():
    if os.environ.get("BENCH_FLOOR_HOLD"):
        hold(os.environ["BENCH_FLOOR_HOLD"].split(","))
    path, _, fn = sys.argv[1].rpartition(":")
    spec = importlib.util.spec_from_file_location("bench_task", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    task, n, kids = getattr(mod, fn), int(sys.argv[2]), set()
    sigs = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    def spawn():
        if (pid := os.fork()) == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            ctx = Ctx()
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            while not ctx.stopping:
                task(ctx)
            os._exit(0)
        kids.add(pid)

    for _ in range(n):
        spawn()
    stopping = False
    while kids:
        if signal.sigwait(sigs) != signal.SIGCHLD and not stopping:
            stopping = True
            for k in kids:
                os.kill(k, signal.SIGTERM)
        while kids and (pid := os.waitpid(-1, os.WNOHANG)[0]):
            kids.discard(pid)
            if not stopping:
                spawn()


if __name__ == "__main__":
    main()
