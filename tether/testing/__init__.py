"""Drive real tether processes as a person would: one harness for tests and benchmarks.

``procs``: waiting with deadlines, free ports, /proc readers; ``env``: isolated
HOME/XDG_STATE_HOME/TMPDIR environments and work directories; ``relay``: `tether relay`
on loopback; ``host``: `tether -S SOCK new-session -d`; ``mate``: OpenSSH mates in a
local tmux or under a pty; ``proxy``: loopback TCP/UDP proxies to cut or count;
``tap``: a control-mode client that types into a tmux and times its pane's output.
Shipped in the package (as httpcore ships its mock backends) so benchmarks and other
projects need neither ``tests`` nor private names.
"""
