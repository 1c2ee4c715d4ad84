"""tether's end-to-end benchmark suite: `python3 bench/run.py [--quick] [--only NAME...]`.

Every figure is measured with real processes (a real `tether relay`, real host
agents, mates running OpenSSH under a pty) next to a floor measured in the same
run: plain tmux doing the same job on the same machine.
"""
