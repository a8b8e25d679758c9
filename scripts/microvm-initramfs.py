#!/usr/bin/env python3
"""Builds the microVM guest's initramfs (a newc cpio, gzipped if OUT ends in .gz) for
scripts/microvm.sh.

    microvm-initramfs.py OUT MODULES_DIR INIT_SCRIPT ENTRY... -- MODULE...

MODULES_DIR is the kernel's lib/modules/VERSION. Each MODULE is resolved with the modules it
depends on (read from each .ko's own `depends=` in .modinfo, so no depmod is needed), and the
list goes into /etc/modules.order in an order insmod can follow. An ENTRY is FILE=DEST (a file
to DEST in the image), +FILE (a dynamic binary at its own path with every library `ldd` lists
for it), or DIR/ (a directory, recursively, at its own path). Written with Python's standard library only, the
archive entries sorted, so the same inputs give the same bytes."""
import gzip, io, os, stat, subprocess, sys


def modinfo_depends(path):
    data = open(path, 'rb').read()
    at = data.find(b'\0depends=')
    if at < 0:
        at = data.find(b'depends=')
        if at != 0:
            return []
    else:
        at += 1
    end = data.find(b'\0', at)
    value = data[at + len(b'depends='):end].decode()
    return [d for d in value.split(',') if d]


def index(modules_dir):
    found = {}
    for root, _, files in os.walk(modules_dir):
        for f in files:
            if f.endswith('.ko'):
                found[f[:-3].replace('-', '_')] = os.path.join(root, f)
    return found


def resolve(names, found):
    order, seen = [], set()

    def visit(name):
        name = name.replace('-', '_')
        if name in seen:
            return
        seen.add(name)
        if name not in found:
            raise SystemExit(f'module {name} not found under the kernel modules')
        for dep in modinfo_depends(found[name]):
            visit(dep)
        order.append(name)

    for n in names:
        visit(n)
    return order


def cpio(entries):
    """entries: sorted list of (path, mode, data or None for a directory)."""
    out = io.BytesIO()
    ino = 1
    for path, mode, data in entries + [('TRAILER!!!', 0, b'')]:
        name = path.encode() + b'\0'
        body = data or b''
        fields = [ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name), 0]
        out.write(b'070701' + b''.join(b'%08X' % f for f in fields) + name)
        out.write(b'\0' * ((4 - out.tell() % 4) % 4))
        out.write(body)
        out.write(b'\0' * ((4 - out.tell() % 4) % 4))
        ino += 1
    return out.getvalue()


def main():
    args = sys.argv[1:]
    sep = args.index('--')
    out, modules_dir, init = args[0], args[1], args[2]
    files, modules = args[3:sep], args[sep + 1:]
    found = index(modules_dir)
    order = resolve(modules, found)
    entries = {}

    def add_dirs(path):
        parts = path.strip('/').split('/')[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault('/'.join(parts[:i]), (stat.S_IFDIR | 0o755, None))

    def add(dest, data, mode):
        dest = dest.lstrip('/')
        add_dirs(dest)
        entries[dest] = (stat.S_IFREG | mode, data)

    for d in ['dev', 'proc', 'sys', 'run', 'tmp', 'etc', 'bin', 'sbin', 'usr/bin', 'usr/sbin',
              'var/run', 'lib/modules', 'root']:
        add_dirs(d + '/x')
        entries.setdefault(d, (stat.S_IFDIR | 0o755, None))
    add('init', open(init, 'rb').read(), 0o755)
    def copy(src, dest):
        add(dest, open(src, 'rb').read(), os.stat(src).st_mode & 0o777)

    for spec in files:
        if spec.startswith('+'):
            binary = spec[1:]
            copy(binary, binary)
            run = subprocess.run(['ldd', binary], capture_output=True, text=True)
            if run.returncode != 0 or 'not found' in run.stdout:
                raise SystemExit(f'ldd {binary} failed or a library is missing:\n{run.stdout}{run.stderr}')
            for word in run.stdout.split():
                if word.startswith('/'):
                    copy(word, word)
        elif spec.endswith('/'):
            for root, _, names in os.walk(spec):
                for n in names:
                    path = os.path.join(root, n)
                    copy(path, path)
        else:
            src, dest = spec.split('=', 1)
            copy(src, dest)
    for name in order:
        add(f'lib/modules/{name}.ko', open(found[name], 'rb').read(), 0o644)
    add('etc/modules.order', ''.join(f'{n}\n' for n in order).encode(), 0o644)
    archive = cpio(sorted((p, m, d) for p, (m, d) in entries.items()))
    tmp = out + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(gzip.compress(archive, compresslevel=6, mtime=0) if out.endswith('.gz') else archive)
    os.replace(tmp, out)
    print(f'{out}: {len(order)} modules ({", ".join(order)}), {len(archive) >> 20} MiB unpacked')


main()
