"""Helpers shared by the test folders: processes, servers (a real `python -m clce_server` or the
app in this process), references and workloads. Not collected (no test_ prefix); test modules
import from here, never from each other."""
