"""The sandbox's launcher: runs inside the sandboxed interpreter (`python -I -S -c <this file's text>
<config JSON>`) before the model-written program.

In order: a new network namespace (and user namespace when not root), dropping to the sandbox uid,
resource limits, the isolation report on the private pipe, the audit-hook guard, then program.py
from the working directory; after the program returns, the per-run marker on the pipe. Standalone
(standard library only, Python 3.8+ syntax): dllmq is not importable in the sandbox, and the text is
passed with -c, so an interpreter running as the unprivileged sandbox uid never has to read this file.
"""
import json
import os
import sys


def _main():
    cfg = json.loads(sys.argv[1])
    sys.argv = ["program.py"]
    sys.dont_write_bytecode = True
    fd = cfg["fd"]
    nonce = cfg.pop("nonce")
    net = "none"
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9, 0, 0, 0)    # PR_SET_PDEATHSIG = SIGKILL
        libc.prctl(38, 1, 0, 0, 0)   # PR_SET_NO_NEW_PRIVS
        if cfg["netns"]:
            if os.geteuid() == 0 and libc.unshare(0x40000000) == 0:          # CLONE_NEWNET
                net = "netns"
            elif os.geteuid() != 0:
                uid, gid = os.getuid(), os.getgid()
                if libc.unshare(0x10000000 | 0x40000000) == 0:               # CLONE_NEWUSER | CLONE_NEWNET
                    for name, text in (("setgroups", "deny"), ("gid_map", "%d %d 1" % (gid, gid)),
                                       ("uid_map", "%d %d 1" % (uid, uid))):
                        with open("/proc/self/" + name, "w") as f:
                            f.write(text)
                    net = "userns+netns"
    except Exception as err:
        sys.stderr.write("sandbox: namespace setup failed: %r\n" % (err,))
    import resource
    dropped = False
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
        dropped = True
    for name, value in cfg["rlimits"]:
        soft = hard = value
        if name == "RLIMIT_CPU":
            hard = value + 1
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.write(fd, ("ISOLATION " + json.dumps({"network": net, "uid_dropped": dropped,
                                              "guard": bool(cfg["guard"])}) + "\n").encode())
    if cfg["guard"]:
        _install_guard(os.getcwd())
    with open("program.py", "rb") as f:
        code = compile(f.read(), "program.py", "exec")
    namespace = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
    exec(code, namespace)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(fd, (nonce + "\n").encode())


def _install_guard(root):
    root = os.path.realpath(root)
    realpath, fsdecode, getpid = os.path.realpath, os.fsdecode, os.getpid
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    busy = [False]
    denied = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
              "os.system", "os.kill", "os.killpg", "os.startfile", "pty.", "ctypes.dlopen", "ctypes.dlsym",
              "ctypes.call_function", "resource.setrlimit", "resource.prlimit", "winreg.", "_winapi.")
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
                   "os.truncate": (0,), "os.utime": (0,), "os.rename": (0, 1), "os.link": (1,),
                   "os.symlink": (1,), "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (1,),
                   "os.chflags": (0,), "os.lchflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
                   "os.setxattr": (0,), "os.removexattr": (0,)}

    def inside(path):
        if isinstance(path, int):
            return True
        try:
            p = realpath(fsdecode(path))
        except Exception:
            return False
        return p == root or p.startswith(root + os.sep) or p == "/dev/null"

    def other_proc(path):
        if isinstance(path, int):
            return False
        try:
            p = fsdecode(path)
        except Exception:
            return True
        if not p.startswith("/proc/"):
            return False
        part = p[6:].split("/", 1)[0]
        return part.isdigit() and int(part) != getpid()

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                writing = bool(mode and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
                if writing and not inside(path):
                    raise PermissionError("dllmq sandbox: writing outside the working directory is not allowed: %r" % (path,))
                if other_proc(path):
                    raise PermissionError("dllmq sandbox: reading other processes is not allowed")
            elif event in path_events:
                for i in path_events[event]:
                    if i < len(args) and args[i] is not None and not inside(args[i]):
                        raise PermissionError("dllmq sandbox: %s outside the working directory is not allowed" % event)
            elif event.startswith(denied):
                raise PermissionError("dllmq sandbox: %s is not allowed" % event)
        finally:
            busy[0] = False
    sys.addaudithook(hook)


if __name__ == "__main__":
    _main()
