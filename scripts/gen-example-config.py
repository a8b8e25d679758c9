#!/usr/bin/env python3
"""Regenerates config/DAEMON.example.toml from a daemon's `-h`: every option as a commented key
with its default and help text. Run after adding or changing an option:

    python3 scripts/gen-example-config.py target/release/host-proxy config/host-proxy.example.toml 'enclave="vsock:16:5000"'
    python3 scripts/gen-example-config.py target/release/enclave-proxy config/enclave-proxy.example.toml

Extra arguments KEY=VALUE give required options a live value. The daemons' unit tests check that
every option has its key in the example and that every example value is accepted."""
import re, subprocess, sys, textwrap
bin, out, required = sys.argv[1], sys.argv[2], dict(a.split('=',1) for a in sys.argv[3:])
name = bin.split('/')[-1]
help_ = subprocess.run([bin, '-h'], capture_output=True, text=True).stdout
lines = help_.split('\n')
opts = []
items = []
for l in lines:
    m = re.match(r'^\s+(?:-\w, )?--([a-z0-9-]+)(?: <([^>]+)>)?(?:\s{2,}(.*))?$', l)
    if m:
        items.append([m.group(1), m.group(2), m.group(3) or ''])
    elif items and l.strip() and l.startswith('          '):
        items[-1][2] = (items[-1][2] + ' ' + l.strip()).strip()
for long, meta, text in items:
    if long in ('help', 'version', 'config'): continue
    default = None
    poss = re.search(r'\[possible values: ([^\]]*)\]$', text)
    if poss: text = text[:poss.start()].strip()
    d = re.search(r'\[default: ([^\]]*)\]$', text)
    if d:
        default = d.group(1); text = text[:d.start()].strip()
    opts.append((long, meta, text, default))
examples = {
    'publish': '["8080:80", "8443:443", "9000-9010:7000-7010"]',
    'publish-udp': '["5353:53"]',
    'allow': '["169.254.169.254/32:80"]',
    'deny': '["10.0.0.0/8", "192.168.0.0/16:22"]',
    'dns-upstream': '["10.0.0.2", "10.0.0.3:53"]',
    'idle-timeout': '300',
    'expose': '"80,443,8000-8100"',
    'resolv-conf': '"/etc/resolv.conf"',
    'metrics': '"127.0.0.1:9464"',
    'name': '"web"',
    'metrics-port': '9464',
    'ready-file': '"/run/enclave-proxy.ready"',
    'publish-transparent': '["eth0:80,443,10000-20000"]',
}
repeatable = {'publish','publish-udp','allow','deny','dns-upstream','publish-transparent'}
res = [f"# {name}: every option as a config key (--config PATH). Keys are the long options with",
       "# underscores; an option on the command line overrides its key. Commented keys show the",
       "# default. See README, \"Options\" and \"Config files\".", ""]
for long, meta, text, default in opts:
    key = long.replace('-', '_')
    res += ['# ' + l for l in textwrap.wrap(f"--{long}" + (f" <{meta}>" if meta else "") + f": {text}", 96)]
    def val(v):
        return v if re.fullmatch(r'-?\d+(\.\d+)?', v) else '"' + v + '"'
    if long in required:
        res.append(f"{key} = {required[long]}")
    elif meta is None:
        res.append(f"# {key} = false")
    elif default is not None:
        res.append(f"# {key} = {val(default)}")
    elif long in examples:
        res.append("# Not set by default; for example:")
        res.append(f"# {key} = {examples[long]}")
    else:
        raise SystemExit(f"no example for --{long}")
    res.append("")
open(out, 'w').write('\n'.join(res).rstrip() + '\n')
