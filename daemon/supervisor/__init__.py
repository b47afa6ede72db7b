"""The worker processes and the gateway's: spawn, reap, restart with back-off, kill,
stop — through a launcher (a local subprocess, or a Ray actor per slot).

Start at supervisor.py. It decides; the launchers (launch.py, launch_ray.py) do.
"""
